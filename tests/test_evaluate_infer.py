"""The evaluate and infer CLIs on a tiny model and the small demo world."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    world = make_tiny_world(tmp_path_factory.mktemp("evaluate"))
    world["env"] = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return world


def _run(setup, module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=setup["env"], capture_output=True,
                          text=True, timeout=300)
    return proc


def test_evaluate_writes_the_table_files(setup):
    p, out = setup["paths"], setup["root"] / "eval"
    proc = _run(setup, "searchr1_jax.evaluate", "--model", str(setup["model"]), "--data", str(p.test),
                "--index", str(p.index), "--out", str(out), "--batch-size", "8", "--limit", "12",
                "--max-turns", "1", "--max-new-tokens", "8", "--max-obs-tokens", "32", "--max-prompt-tokens", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((out / "eval_table.json").read_text())
    assert set(table) == {"demo_single_hop", "demo_two_hop", "all"}
    assert table["all"]["n"] == 12
    assert set(table["all"]) == {"n", "em", "subem", "f1", "reward", "searches", "turns", "invalid_rate"}
    rows = [json.loads(line) for line in (out / "eval_trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all({"question", "response", "em", "golden_answers"} <= set(r) for r in rows)
    md = (out / "eval_table.md").read_text()
    assert md.startswith("| data_source |") and "| all | 12 |" in md
    assert "| data_source |" in proc.stdout


def test_evaluate_names_a_missing_index(setup):
    proc = _run(setup, "searchr1_jax.evaluate", "--model", str(setup["model"]), "--data", str(setup["paths"].test),
                "--index", "/no/such/index", "--out", str(setup["root"] / "x"))
    assert proc.returncode != 0 and "/no/such/index" in proc.stderr


def test_infer_prints_an_episode(setup):
    proc = _run(setup, "searchr1_jax.infer", "--model", str(setup["model"]), "--index", str(setup["paths"].index),
                "--question", "What is the capital of Velimo?", "--max-turns", "1", "--max-new-tokens", "8",
                "--max-obs-tokens", "32", "--max-prompt-tokens", "400")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("Question: What is the capital of Velimo?")
    assert "Answer:" in out and "searches:" in out and "turns:" in out


def test_infer_reports_a_prompt_over_the_limit(setup):
    proc = _run(setup, "searchr1_jax.infer", "--model", str(setup["model"]), "--index", str(setup["paths"].index),
                "--question", "What is the capital of Velimo?", "--max-prompt-tokens", "16")
    assert proc.returncode != 0
    assert "max_prompt_tokens" in proc.stderr and "Traceback" not in proc.stderr
