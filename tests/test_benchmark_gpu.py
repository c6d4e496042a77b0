"""benchmarks/gpu.py: its cost model on hand-computed values, and its --smoke run on this CPU."""
import os
import subprocess
import sys

import numpy as np


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
import gpu  # noqa: E402
from roofline import Shape  # noqa: E402

# 2 layers of 1,000 matrix weights, 4 query / 2 KV heads of width 8, hidden 32, vocab 100, bf16.
SHAPE = Shape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, vocab=100, layer_weights=1000,
              bytes_per_value=2)


def test_decode_roofline_hand_values():
    # Per step all weights once: (2 * 1000 + 32 * 100) * 2 = 10,400 bytes. Rows of 3 and 5
    # tokens decode 2 tokens each at positions 3, 4 and 5, 6: 4 + 5 + 6 + 7 = 22 slots of
    # 2 layers * (K and V) * 2 heads * 8 * 2 bytes = 128 bytes. 4 tokens per 23,616 bytes.
    got = gpu.decode_roofline(SHAPE, 1e6, np.array([3, 5]), 2)
    assert abs(got - 4 * 1e6 / (2 * 10400 + 22 * 128)) < 1e-6


def test_train_flops_hand_values():
    # Forward of 4 tokens: matrices 4 * 2 * 2 * 1000 = 16,000; causal attention
    # 4 * 2 * 4 * 8 * (1 + 2 + 3 + 4) = 2,560; LM head 2 * 32 * 100 * 4 = 25,600.
    assert gpu.train_flops(SHAPE, batch=3, length=4) == 3 * 3 * (16000 + 2560 + 25600)


def test_smoke_run_prints_every_part():
    """The script the GPU machine will run, with tiny shapes: every part prints its row and
    none fails (a fresh process: the script patches the engine for its own run)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(BENCHMARKS), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "gpu.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "failed" not in out and "skipped" not in out and "\ndone in" in out, out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    decode = [r for r in rows if len(r) == 10 and r[0].strip() != "policy"]
    train = [r for r in rows if len(r) == 6 and r[0].strip() != "attention policy"]
    assert [r[0].strip() for r in decode] == ["cpu", "gpu"]
    assert [r[0].strip() for r in train] == ["gpu", "naive"]
    for r in decode:
        assert float(r[2].replace(",", "")) > 0 and r[6].strip() != "–"  # ours and transformers
    for r in train:
        assert float(r[1]) > 0 and r[4].strip().endswith("%")
