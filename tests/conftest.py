"""Test-wide setup: CPU with 8 simulated devices (for sharding tests), float32 matmuls."""
import os

# Must be set before JAX is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def make_tiny_world(root):
    """The small demo world (short prompts) and a random 2-layer Qwen2 model saved in HF
    format under `root`: {"root", "paths", "model"} for CLI tests."""
    import json

    from flax import nnx

    from searchr1_jax.demo.build import build_demo
    from searchr1_jax.models import Decoder, save_hf
    from searchr1_jax.models.config import config_from_hf_dict

    paths = build_demo(root / "cache", size="small", seed=0, instruction="short")
    raw = json.loads(paths.model_config.read_text())
    raw.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    cfg = config_from_hf_dict(raw)
    save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), cfg, root / "model", tokenizer_dir=paths.tokenizer)
    return {"root": root, "paths": paths, "model": root / "model"}


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def user_files_template(tmp_path_factory):
    """A new user's working directory before the README's real-model steps (see
    real_model_setup.py), built once; tests copy it with `copy_user_files`."""
    from real_model_setup import make_user_files

    return make_user_files(tmp_path_factory.mktemp("user_files"))


def copy_user_files(template, dest):
    """A copy of the template directory at `dest` with `configs/` linked from the repository."""
    import shutil
    from pathlib import Path

    shutil.copytree(template, dest, ignore=shutil.ignore_patterns(".demo_cache"))
    (dest / "configs").symlink_to(Path(__file__).resolve().parents[1] / "configs")
    return dest


def wait_for_step(metrics_path, step: int, proc, timeout: float = 400) -> None:
    """Block until the run writing `metrics_path` has logged `step` (or fail if it ended)."""
    import time

    from searchr1_jax.metrics_log import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics_path.exists() and any(r["step"] >= step for r in read_metrics(metrics_path)):
            return
        assert proc.poll() is None, "the run ended before the step was reached"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")
