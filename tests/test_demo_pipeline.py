"""The embedded default end to end on the small world: build, two-stage warm start, GRPO,
evaluation, summary.json, learning curve, export, infer example (a few steps of each)."""
import importlib.util
import json
from pathlib import Path

from searchr1_jax.demo.pipeline import run_demo

ROOT = Path(__file__).resolve().parents[1]


def small_demo_config(tmp_path):
    spec = importlib.util.spec_from_file_location("tiny_demo", ROOT / "configs" / "tiny_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.demo.size = "small"
    c.demo.cache_dir = str(tmp_path / "cache")
    c.demo.sft_steps, c.demo.sft_noisy_steps, c.demo.sft_batch_size = 6, 2, 8
    c.rollout.n_samples = 2
    c.trainer.batch_size = c.trainer.mini_batch_size = 4
    c.trainer.micro_batch_size = 8
    c.trainer.total_steps = c.trainer.eval_every = c.trainer.save_every = 2
    c.trainer.output_dir = str(tmp_path / "run")
    return c


def test_demo_pipeline_writes_summary_curve_and_export(tmp_path, capsys):
    summary = run_demo(small_demo_config(tmp_path))
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    for key in ("warm_start_em", "trained_em"):
        assert 0.0 <= summary[key] <= 1.0
        for kind in ("single_hop", "two_hop"):
            assert 0.0 <= summary[kind][key] <= 1.0
    assert (run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "export" / "config.json").read_text())["model_type"] == "qwen2"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 2
    out = capsys.readouterr().out
    assert "Question:" in out and "| single-hop |" in out and "warm start (held-out, greedy)" in out
    # Both warm-start stages are cached beside the world, for the next run to reuse.
    cache = next((tmp_path / "cache").glob("demo-small-*"))
    stages = sorted(p.name.rsplit("-", 1)[0] for p in cache.glob("warm_start-*"))
    assert stages == ["warm_start", "warm_start-clean"]
