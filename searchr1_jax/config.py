"""The run configuration: every field with its default, and validation with clear errors.

Config files under `configs/` start from `base_config()` and override fields; the trainer
calls `validate(config)` before anything is built. Validation names the offending key for
an unknown key, a wrong type, a value outside its allowed set, or an impossible
combination (for example a mini-batch that does not divide the batch).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_collections

ALGORITHMS = ("ppo", "grpo", "reinforce_pp", "rloo", "drgrpo")
# Algorithms whose advantages come from a learned critic.
CRITIC_ALGORITHMS = ("ppo",)
# Algorithms that compare samples of the same prompt.
GROUP_ALGORITHMS = ("grpo", "rloo", "drgrpo")
DTYPES = ("float32", "bfloat16", "float16")
# models/attention.py's policies ("auto": the backend's); kept here so that a config is
# checked without importing the models (tests/test_attention.py ties the two lists).
ATTENTION_POLICIES = ("auto", "cpu", "gpu", "tpu", "cudnn", "naive")
CHOICES: dict[str, tuple] = {
    "algorithm.name": ALGORITHMS,
    "algorithm.loss_agg_mode": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"),
    "algorithm.kl_estimator": ("k1", "k2", "k3"),
    "algorithm.kl_controller": ("fixed", "adaptive"),
    "model.param_dtype": DTYPES,
    "model.compute_dtype": DTYPES,
    "model.attention": ATTENTION_POLICIES,
    "data.template": ("auto", "base", "chat"),
    "mesh.preset": ("fsdp", "fsdp_tensor", "data"),
    "demo.size": ("full", "small", "reduced"),
}


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with the published Search-R1 PPO values as defaults."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # local HF directory (config.json + safetensors)
    c.model.tokenizer_path = ""  # defaults to model.path
    c.model.param_dtype = "float32"  # master weights
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.model.attention = "auto"  # attention implementations (models/attention.py); "auto": by backend
    c.model.critic_path = ""  # defaults to model.path (critic starts from the base model)

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # comma-separated parquet paths
    c.data.val_files = ""
    # "auto": the tokenizer's chat template when it has one, else the raw text (the original's
    # rule; Qwen2.5 base tokenizers have one); "base" / "chat" force one (data.prompts).
    c.data.template = "auto"
    c.data.shuffle = True

    c.retriever = ml_collections.ConfigDict()
    c.retriever.index_dir = ""  # in-process retriever from a built index …
    c.retriever.url = ""  # … or an HTTP server speaking the /retrieve API
    c.retriever.topk = 3
    c.retriever.timeout_s = 30.0  # per request
    c.retriever.max_retries = 12  # HTTP: retries of a failed request, with exponential backoff (≤ 30 s each)…
    c.retriever.max_wait_s = 300.0  # … while the waits add up to at most this (a restarting server)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.max_turns = 4
    c.rollout.max_new_tokens = 500  # per turn
    c.rollout.max_obs_tokens = 500
    c.rollout.max_prompt_tokens = 2048  # Search-R1's "max_start_length"
    c.rollout.max_context_tokens = 4608  # slots per sequence: 4096 context + a 500-token turn
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.n_samples = 1  # samples per prompt (the group size for GRPO/RLOO)

    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.name = "ppo"
    c.algorithm.gamma = 1.0
    c.algorithm.lam = 1.0
    c.algorithm.clip_low = 0.2
    c.algorithm.clip_high = 0.2
    c.algorithm.dual_clip = 3.0  # 0 disables
    c.algorithm.value_clip = 0.5
    c.algorithm.entropy_coef = 0.0
    c.algorithm.loss_agg_mode = "token_mean"
    c.algorithm.norm_adv_by_std = True  # GRPO: divide by the group std
    c.algorithm.kl_in_reward = True  # PPO in Search-R1: KL penalty in the reward
    c.algorithm.kl_loss = False  # GRPO in Search-R1: KL as a loss term
    c.algorithm.kl_coef = 0.001
    c.algorithm.kl_estimator = "k3"
    c.algorithm.kl_controller = "fixed"
    c.algorithm.kl_target = 0.1  # adaptive controller only
    c.algorithm.kl_horizon = 10000

    c.optim = ml_collections.ConfigDict()
    c.optim.actor_lr = 1e-6
    c.optim.actor_warmup_ratio = 0.285
    c.optim.critic_lr = 1e-5
    c.optim.critic_warmup_ratio = 0.015
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999

    c.trainer = ml_collections.ConfigDict()
    c.trainer.total_steps = 1005
    c.trainer.batch_size = 512  # prompts per step
    c.trainer.mini_batch_size = 256  # prompts per optimizer step
    c.trainer.micro_batch_size = 8  # sequences per forward/backward (gradient accumulation)
    c.trainer.ppo_epochs = 1
    c.trainer.critic_warmup_steps = 0
    c.trainer.eval_every = 100
    c.trainer.eval_size = 0  # 0 = the whole validation set
    c.trainer.save_every = 100
    c.trainer.keep_checkpoints = 3
    c.trainer.output_dir = ""  # default runs/<name>
    c.trainer.resume = False  # continue the run in output_dir from its latest checkpoint
    c.trainer.overwrite = False  # move an earlier run in output_dir aside instead of refusing to start
    c.trainer.resume_override = False  # resume even if model, data, seed, batch shapes or algorithm changed
    c.trainer.max_bad_steps = 3  # consecutive steps with a non-finite loss/gradient/update before stopping
    c.trainer.samples_to_log = 4
    c.trainer.wandb_project = ""  # set to log to Weights & Biases
    c.trainer.compilation_cache_dir = ".cache/jax"  # persistent XLA cache ("" disables): faster reruns

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: the remaining devices
    c.mesh.tensor = 1
    c.mesh.preset = "fsdp"
    c.mesh.device_memory_gb = 0.0  # 0: ask the device

    c.demo = ml_collections.ConfigDict()  # the CPU demo pipeline (configs/tiny_demo.py)
    c.demo.enabled = False
    c.demo.size = "full"  # "full" (the README's demo), "reduced" (the suite's learning test) or "small" (pipeline tests)
    c.demo.cache_dir = ".cache/demo"
    c.demo.instruction = "search_r1"  # Search-R1's prompt word for word, or "short"
    c.demo.sft_steps = 1000  # warm start, stage 1: clean episodes in relabeled and renamed worlds
    c.demo.sft_lr = 1e-3
    c.demo.sft_batch_size = 8
    c.demo.sft_noisy_steps = 60  # stage 2: the noisy behaviour policy on the demo's train questions
    c.demo.sft_noisy_lr = 1e-4

    c.reward = ml_collections.ConfigDict()
    c.reward.name = "em"
    c.reward.lambda_f = 0.2
    c.reward.lambda_s = 0.2
    c.reward.retrieval_bonus = 0.0
    c.reward.per_source = ml_collections.ConfigDict()  # data_source -> reward name
    return c


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def config_from_file(path: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, for configs that start from another one
    (configs/tiny_demo_reduced.py starts from configs/tiny_demo.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _walk(cfg: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield path, value, True
            yield from _walk(value, path + ".")
        else:
            yield path, value, False


def _lookup(cfg: ml_collections.ConfigDict, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    return node


def check_schema(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None) -> None:
    """Unknown keys and wrong types, compared with `base_config()`.

    Free-form sections (`reward.per_source`) accept any key with a string value.
    """
    reference = reference or base_config()
    free_form = ("reward.per_source",)
    known = {path: (value, is_dict) for path, value, is_dict in _walk(reference)}
    for path, value, is_dict in _walk(config):
        if any(path.startswith(f + ".") for f in free_form):
            if not isinstance(value, str):
                raise ConfigError(f"config.{path}: expected a reward name (str), got {value!r}")
            continue
        if path not in known:
            section = path.rsplit(".", 1)[0] if "." in path else ""
            siblings = sorted(_lookup(reference, section).keys() if section else reference.keys())
            raise ConfigError(f"config.{path}: unknown key; known keys here: {siblings}")
        ref_value, ref_is_dict = known[path]
        if is_dict != ref_is_dict:
            raise ConfigError(f"config.{path}: expected {'a section' if ref_is_dict else type(ref_value).__name__}")
        if is_dict:
            continue
        ok = isinstance(value, type(ref_value)) or (isinstance(ref_value, float) and isinstance(value, int)
                                                     and not isinstance(value, bool))
        if isinstance(ref_value, int) and isinstance(value, bool) and not isinstance(ref_value, bool):
            ok = False
        if not ok:
            raise ConfigError(f"config.{path}: expected {type(ref_value).__name__}, got {value!r} "
                              f"({type(value).__name__})")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Schema, allowed values and cross-field rules. Returns the config for chaining."""
    check_schema(config)
    for path, choices in CHOICES.items():
        value = _lookup(config, path)
        if value not in choices:
            raise ConfigError(f"config.{path}: {value!r} is not one of {list(choices)}")
    t, r, a = config.trainer, config.rollout, config.algorithm
    positive = {"trainer.total_steps": t.total_steps, "trainer.batch_size": t.batch_size,
                "trainer.mini_batch_size": t.mini_batch_size, "trainer.micro_batch_size": t.micro_batch_size,
                "trainer.ppo_epochs": t.ppo_epochs, "rollout.max_new_tokens": r.max_new_tokens,
                "rollout.n_samples": r.n_samples, "rollout.max_context_tokens": r.max_context_tokens,
                "retriever.topk": config.retriever.topk, "trainer.keep_checkpoints": t.keep_checkpoints,
                "trainer.max_bad_steps": t.max_bad_steps, "retriever.timeout_s": config.retriever.timeout_s,
                "retriever.max_wait_s": config.retriever.max_wait_s}
    for path, value in positive.items():
        if not value > 0:  # also refuses NaN
            raise ConfigError(f"config.{path}: must be > 0, got {value}")
    for path in ("optim.actor_lr", "optim.critic_lr", "optim.weight_decay", "optim.grad_clip",
                 "optim.actor_warmup_ratio", "optim.critic_warmup_ratio", "algorithm.kl_coef"):
        value = _lookup(config, path)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"config.{path}: must be a finite number >= 0, got {value}")
    if config.retriever.max_retries < 0:
        raise ConfigError(f"config.retriever.max_retries: must be >= 0, got {config.retriever.max_retries}")
    if t.batch_size % t.mini_batch_size:
        raise ConfigError(f"config.trainer.mini_batch_size ({t.mini_batch_size}) must divide "
                          f"config.trainer.batch_size ({t.batch_size})")
    sequences_per_mini = t.mini_batch_size * r.n_samples
    if sequences_per_mini % t.micro_batch_size:
        raise ConfigError(f"config.trainer.micro_batch_size ({t.micro_batch_size}) must divide the sequences "
                          f"of a mini-batch (mini_batch_size × rollout.n_samples = {sequences_per_mini})")
    if a.name in GROUP_ALGORITHMS and r.n_samples < 2:
        raise ConfigError(f"config.rollout.n_samples must be >= 2 for algorithm {a.name!r} "
                          f"(it compares samples of the same prompt), got {r.n_samples}")
    if r.max_prompt_tokens + r.max_new_tokens > r.max_context_tokens:
        raise ConfigError(f"config.rollout.max_context_tokens ({r.max_context_tokens}) must hold at least "
                          f"max_prompt_tokens + max_new_tokens ({r.max_prompt_tokens + r.max_new_tokens})")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"config.rollout.top_p must be in (0, 1], got {r.top_p}")
    if r.temperature < 0:
        raise ConfigError(f"config.rollout.temperature must be >= 0, got {r.temperature}")
    if t.resume and t.overwrite:
        raise ConfigError("config.trainer.resume and config.trainer.overwrite are both True: continue the run "
                          "in output_dir, or move it aside and start anew, not both")
    if a.kl_in_reward and a.kl_loss:
        raise ConfigError("config.algorithm.kl_in_reward and config.algorithm.kl_loss are both True: "
                          "choose one place for the KL term")
    if bool(config.retriever.index_dir) == bool(config.retriever.url) and (
            config.retriever.index_dir or config.retriever.url):
        raise ConfigError("config.retriever.index_dir and config.retriever.url are both set: choose one")
    return config


def require_path(config: ml_collections.ConfigDict, path: str, *, kind: str = "path") -> str:
    """The value of a path-valued field, or an error naming the field when it is empty/missing."""
    import os

    value = _lookup(config, path)
    if not value:
        raise ConfigError(f"config.{path} is empty: set it to a {kind} (e.g. --config.{path}=...)")
    for part in str(value).split(","):
        if not os.path.exists(part):
            raise ConfigError(f"config.{path}: {part!r} does not exist")
    return value
