"""Config loading and validation: every error names the key, through the API and the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from searchr1_jax.config import ConfigError, base_config, config_from_file, require_path, validate

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def _load(name):
    return config_from_file(REPO / "configs" / f"{name}.py")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    config = validate(_load(name))
    assert config.name == name


def test_published_hyperparameters_in_qwen3b_configs():
    ppo, grpo = _load("qwen3b_ppo"), _load("qwen3b_grpo")
    assert (ppo.trainer.batch_size, ppo.trainer.mini_batch_size, ppo.optim.actor_lr, ppo.optim.critic_lr) == \
        (512, 256, 1e-6, 1e-5)
    assert (ppo.algorithm.gamma, ppo.algorithm.lam, ppo.algorithm.kl_coef, ppo.algorithm.kl_in_reward) == \
        (1.0, 1.0, 0.001, True)
    assert (ppo.rollout.max_turns, ppo.rollout.max_new_tokens, ppo.rollout.max_obs_tokens, ppo.retriever.topk) == \
        (4, 500, 500, 3)
    assert (grpo.algorithm.name, grpo.rollout.n_samples, grpo.algorithm.kl_loss, grpo.algorithm.kl_estimator) == \
        ("grpo", 5, True, "k3")


def test_unknown_key_is_named():
    c = base_config()
    c.trainer.totl_steps = 3
    with pytest.raises(ConfigError, match=r"config\.trainer\.totl_steps: unknown key.*total_steps"):
        validate(c)


def test_value_outside_choices_is_named():
    c = base_config()
    c.algorithm.name = "dpo"
    with pytest.raises(ConfigError, match=r"config\.algorithm\.name: 'dpo' is not one of"):
        validate(c)


@pytest.mark.parametrize("field,value,pattern", [
    ("trainer.mini_batch_size", 100, r"mini_batch_size \(100\) must divide config\.trainer\.batch_size"),
    ("trainer.micro_batch_size", 7, r"micro_batch_size \(7\) must divide"),
    ("rollout.max_context_tokens", 1000, r"max_context_tokens \(1000\) must hold"),
    ("trainer.total_steps", 0, r"config\.trainer\.total_steps: must be > 0"),
    ("optim.actor_lr", float("nan"), r"config\.optim\.actor_lr: must be a finite number >= 0, got nan"),
    ("optim.actor_lr", -1e-6, r"config\.optim\.actor_lr: must be a finite number >= 0"),
    ("optim.critic_lr", float("inf"), r"config\.optim\.critic_lr: must be a finite number >= 0"),
    ("trainer.keep_checkpoints", 0, r"config\.trainer\.keep_checkpoints: must be > 0"),
    ("retriever.timeout_s", 0.0, r"config\.retriever\.timeout_s: must be > 0"),
    ("retriever.max_wait_s", float("nan"), r"config\.retriever\.max_wait_s: must be > 0"),
    ("trainer.max_bad_steps", 0, r"config\.trainer\.max_bad_steps: must be > 0"),
])
def test_impossible_combinations(field, value, pattern):
    c = base_config()
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ConfigError, match=pattern):
        validate(c)


def test_group_algorithms_need_several_samples():
    c = base_config()
    c.algorithm.name = "grpo"
    c.algorithm.kl_in_reward = False
    with pytest.raises(ConfigError, match=r"n_samples must be >= 2 for algorithm 'grpo'"):
        validate(c)


def test_missing_path_names_the_field(tmp_path):
    c = base_config()
    with pytest.raises(ConfigError, match=r"config\.model\.path is empty"):
        require_path(c, "model.path")
    c.model.path = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"config\.model\.path: '.*nope' does not exist"):
        require_path(c, "model.path")


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "searchr1_jax.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_reports_bad_overrides_and_missing_paths():
    unknown = _cli("--config=configs/qwen3b_ppo.py", "--config.trainer.bogus=1")
    assert unknown.returncode != 0 and "bogus" in unknown.stderr
    wrong_type = _cli("--config=configs/qwen3b_ppo.py", "--config.trainer.batch_size=lots")
    assert wrong_type.returncode != 0 and "batch_size" in wrong_type.stderr
    missing = _cli("--config=configs/qwen3b_ppo.py", "--config.model.path=/no/such/model")
    assert missing.returncode != 0
    assert "config.model.path: '/no/such/model' does not exist" in missing.stderr
