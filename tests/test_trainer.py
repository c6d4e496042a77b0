"""The trainer through its CLI on a tiny model and world: PPO and GRPO runs, exact resume
after kill -9, a checkpoint on SIGTERM, 8 devices vs 1, and export to transformers."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from conftest import make_tiny_world, wait_for_step
from searchr1_jax.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("trainer"))


def _command(world, out_dir, *extra):
    p = world["paths"]
    return [sys.executable, "-m", "searchr1_jax.train", "--config=tests/configs/tiny_cli.py",
            f"--config.model.path={world['model']}", f"--config.data.train_files={p.train}",
            f"--config.data.val_files={p.test}", f"--config.retriever.index_dir={p.index}",
            f"--config.trainer.output_dir={out_dir}", *extra]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for every CLI run of this module: each later run loads the
    programs the first one compiled instead of compiling them again."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    yield
    for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        os.environ.pop(key, None)


def _env(devices=8):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _run(world, out_dir, *extra, devices=8):
    proc = subprocess.run(_command(world, out_dir, *extra), cwd=REPO, env=_env(devices), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(Path(out_dir) / "metrics.jsonl")


def _deterministic(rows):
    """Metric rows without wall-clock timings."""
    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_three_step_run_through_the_cli(world, tmp_path, algorithm):
    extra = ["--config.algorithm.name=ppo", "--config.algorithm.kl_in_reward=True",
             "--config.algorithm.kl_loss=False", "--config.rollout.n_samples=1",
             "--config.trainer.batch_size=8", "--config.trainer.mini_batch_size=8"] if algorithm == "ppo" else []
    rows = _run(world, tmp_path / "run", "--config.trainer.eval_every=3", "--config.trainer.eval_size=8", *extra)
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = rows[-1].keys()
    assert {"actor/loss", "rollout/reward", "timing/rollout", "timing/update", "eval/all/em"} <= set(keys)
    assert ("critic/loss" in keys) == (algorithm == "ppo")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "samples" / "eval_step3_table.md").is_file()
    if algorithm == "grpo":
        # A longer run resumed from this one: said in one line, since the warm-up follows the total.
        proc = subprocess.run(_command(world, tmp_path / "run", "--config.trainer.eval_every=3",
                                       "--config.trainer.eval_size=8", "--config.trainer.total_steps=4",
                                       "--config.trainer.resume=True"),
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "config.trainer.total_steps is 4 where the checkpoint's run had 3" in proc.stderr
        assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
        assert "run finished at step 4 of 4" in proc.stdout


def test_kill_resume_and_sigterm_match_an_uninterrupted_run(world, tmp_path):
    five = ["--config.trainer.total_steps=5"]
    reference = _deterministic(_run(world, tmp_path / "straight", *five))
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5]

    run = tmp_path / "interrupted"
    metrics = run / "metrics.jsonl"
    # 1. kill -9 once step 2 is logged, i.e. while step 3 runs.
    proc = subprocess.Popen(_command(world, run, *five), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(metrics, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2. resume; SIGTERM once step 3 is logged: the run saves a checkpoint and exits cleanly.
    proc = subprocess.Popen(_command(world, run, *five, "--config.trainer.resume=True"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(metrics, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    logged = read_metrics(metrics)[-1]["step"]
    assert logged < 5, "SIGTERM came too late to test anything"
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == logged, f"SIGTERM left checkpoints {saved} after logging step {logged}"
    # 3. resume to the end.
    resumed = _deterministic(_run(world, run, *five, "--config.trainer.resume=True"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed[2:] == reference[2:]


def test_eight_devices_give_the_one_device_first_step_loss(world, tmp_path):
    one = _run(world, tmp_path / "one", "--config.trainer.total_steps=1", devices=1)[0]
    eight = _run(world, tmp_path / "eight", "--config.trainer.total_steps=1", devices=8)[0]
    assert eight["rollout/response_tokens"] == one["rollout/response_tokens"]
    np.testing.assert_allclose(eight["actor/loss"], one["actor/loss"], atol=1e-4)
    np.testing.assert_allclose(eight["actor/kl_loss"], one["actor/kl_loss"], atol=1e-4)


def test_export_loads_in_transformers_with_the_same_logits(world, tmp_path):
    from searchr1_jax.export import load_policy

    run = tmp_path / "run"
    _run(world, run, "--config.trainer.total_steps=2")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "searchr1_jax.export", "--checkpoint", str(run), "--out", str(out)],
                          cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy, record = load_policy(run)
    assert record["step"] == 2
    initial = transformers.AutoModelForCausalLM.from_pretrained(world["model"]).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.RandomState(0).randint(0, policy.config.vocab_size, (2, 16)).astype(np.int32)
    with torch.no_grad():
        ref = exported(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        before = initial(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(policy(tokens)), ref, atol=1e-5)
    # Exporting the untrained weights by mistake would differ from the trained ones by more
    # than the tolerance above.
    assert np.abs(ref - before).max() > 5e-5, "training changed nothing: the export test would be vacuous"
