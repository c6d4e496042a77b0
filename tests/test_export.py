"""export: which paths name a checkpoint (run dir, checkpoints/ folder, one step's folder),
and clean one-line failures for everything else."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from searchr1_jax.checkpoint import Checkpointer
from searchr1_jax.export import load_policy, resolve_checkpoint
from searchr1_jax.models import Decoder, save_hf
from searchr1_jax.models.config import config_from_hf_dict

REPO = Path(__file__).resolve().parents[1]
TINY_QWEN2 = dict(model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory whose checkpoints/ holds steps 1 and 2 with different policies."""
    root = tmp_path_factory.mktemp("export")
    cfg = config_from_hf_dict(dict(TINY_QWEN2))
    save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), cfg, root / "model")
    ckpt = Checkpointer(root / "run" / "checkpoints", async_save=False)
    policies = {}
    for step in (1, 2):
        _, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(step)))
        policies[step] = params
        record = {"step": step, "model_path": str(root / "model"), "tokenizer_path": str(root / "model")}
        ckpt.save(step, {"policy": params}, record)
    ckpt.close()
    return root / "run", policies


def _same(model, params):
    _, got = nnx.split(model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_checkpoints_and_step_directories_are_accepted(run):
    run_dir, policies = run
    checkpoints = run_dir / "checkpoints"
    assert resolve_checkpoint(run_dir) == (checkpoints, 2)
    assert resolve_checkpoint(checkpoints) == (checkpoints, 2)
    assert resolve_checkpoint(checkpoints / "1") == (checkpoints, 1)
    assert resolve_checkpoint(checkpoints / "2", 2) == (checkpoints, 2)
    assert resolve_checkpoint(run_dir, 1) == (checkpoints, 1)
    for path, step in ((run_dir, 2), (checkpoints / "1", 1), (checkpoints / "2", 2)):
        model, record = load_policy(path)
        assert record["step"] == step
        _same(model, policies[step])


def test_bad_paths_fail_with_one_line(run, tmp_path):
    run_dir, _ = run
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = [
        (tmp_path / "gone", None, FileNotFoundError, "does not exist"),
        (tmp_path / "file.txt", None, ValueError, "is a file"),
        (tmp_path / "empty", None, FileNotFoundError, "no complete checkpoint in"),
        (run_dir / "checkpoints" / "1", 2, ValueError, "is the folder of step 1 but --step 2 was given"),
        (run_dir, 7, ValueError, r"step 7 is not among the complete checkpoints of .*: \[1, 2\]"),
    ]
    for path, step, error, message in cases:
        with pytest.raises(error, match=message):
            resolve_checkpoint(path, step)


@pytest.mark.parametrize("what", ["step_dir", "bad"])
def test_cli_exports_a_step_directory_and_fails_cleanly(run, tmp_path, what):
    run_dir, policies = run
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    source = run_dir / "checkpoints" / "1" if what == "step_dir" else tmp_path
    proc = subprocess.run([sys.executable, "-m", "searchr1_jax.export", "--checkpoint", str(source), "--out",
                           str(tmp_path / "hf")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if what == "step_dir":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"exported step 1 of {source}" in proc.stdout
        from searchr1_jax.models import load_hf

        model, _ = load_hf(tmp_path / "hf")
        _same(model, policies[1])
    else:
        assert proc.returncode == 1
        assert proc.stderr.strip() == (f"export: error: no complete checkpoint in {str(tmp_path)!r}: expected a run "
                                       "directory, its checkpoints/ folder or one step's folder (e.g. runs/X/checkpoints/2)")
