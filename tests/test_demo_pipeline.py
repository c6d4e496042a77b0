"""The embedded default end to end: the reduced demo (the pipeline, its outputs and a learning
rise, in about 2 minutes) and the shipped demo itself (slow: its learning targets)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_demo_command(overrides: dict, timeout: int, config: str = "tiny_demo.py") -> str:
    """The README's first command (or another demo config) with `overrides`, in its own process
    (as a user runs it)."""
    command = [sys.executable, "-m", "searchr1_jax.train", f"--config={ROOT / 'configs' / config}"]
    command += [f"--config.{k}={v}" for k, v in overrides.items()]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_reduced_demo_learns_to_search(tmp_path):
    """configs/tiny_demo_reduced.py from an empty demo cache and without the XLA compilation
    cache, as on a fresh machine (about 2 minutes on 2 cores): the warm start answers without
    searching (held-out EM 0); 16 GRPO steps make it search and answer held-out questions
    (seed 1, this test: 0.94; before the rollout engine compacted its turn tails, seeds 0, 1, 2
    reached 0.50, 0.79, 0.54)."""
    out = run_demo_command({"demo.cache_dir": tmp_path / "cache", "trainer.output_dir": tmp_path / "run",
                            "trainer.compilation_cache_dir": ""}, timeout=600, config="tiny_demo_reduced.py")
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trained_em"] - summary["warm_start_em"] >= 0.3, summary
    assert summary["single_hop"]["trained_em"] >= 0.5, summary
    assert summary["two_hop"]["trained_em"] > summary["two_hop"]["warm_start_em"], summary
    assert summary["searches_per_question"]["trained"] >= summary["searches_per_question"]["warm_start"] + 0.5, summary
    # The outputs: curve, export, metrics from the warm start (step 0) to the last step, the
    # printed episode and table, and both warm-start stages cached beside the world.
    assert (run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "export" / "config.json").read_text())["model_type"] == "qwen2"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 16
    assert "Question:" in out and "| single-hop |" in out and "warm start (held-out, greedy)" in out
    cache = next((tmp_path / "cache").glob("demo-reduced-*"))
    stages = sorted(p.name.rsplit("-", 1)[0] for p in cache.glob("warm_start-*"))
    assert stages == ["warm_start", "warm_start-clean"]


@pytest.mark.slow
def test_shipped_demo_meets_its_learning_targets(tmp_path):
    """configs/tiny_demo.py as shipped, from an empty cache (about 7 minutes on 2 cores): held-out
    EM rises by at least 0.3 over the warm start, single-hop reaches 0.8, two-hop improves."""
    run_demo_command({"demo.cache_dir": tmp_path / "cache", "trainer.output_dir": tmp_path / "run"}, timeout=1200)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trained_em"] - summary["warm_start_em"] >= 0.3, summary
    assert summary["single_hop"]["trained_em"] >= 0.8, summary
    assert summary["two_hop"]["trained_em"] > summary["two_hop"]["warm_start_em"], summary
    assert summary["searches_per_question"]["trained"] > summary["searches_per_question"]["warm_start"], summary
