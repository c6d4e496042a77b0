"""The closing summary of a training run: where it wrote, how validation went per data
source, which checkpoints exist, and the command that exports the policy.

`summarize` reads only what the run left on disk (`metrics.jsonl` rows and the checkpoint
steps), so a resumed run's summary covers its whole history.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

EVAL_PREFIX = "eval/"


def validation_scores(rows: Sequence[dict], metric: str = "em") -> dict[str, dict]:
    """Per data source (and "all"): the last and the best validation `metric` with their steps,
    from metrics rows holding `eval/<source>/<metric>` keys."""
    out: dict[str, dict] = {}
    for row in rows:
        for key, value in row.items():
            if not (key.startswith(EVAL_PREFIX) and key.endswith(f"/{metric}")) or value is None:
                continue
            source = key[len(EVAL_PREFIX):-len(metric) - 1]
            entry = out.setdefault(source, {"last": value, "last_step": row["step"], "best": value,
                                            "best_step": row["step"]})
            entry.update(last=value, last_step=row["step"])
            if value > entry["best"]:
                entry.update(best=value, best_step=row["step"])
    return out


def summarize(out_dir: Path, rows: Sequence[dict], checkpoint_steps: Sequence[int], *, total_steps: int,
              step: int, stopped_early: bool, seconds: float) -> dict:
    """A JSON-able summary of a run in `out_dir`."""
    out_dir = Path(out_dir)
    return {
        "output_dir": str(out_dir), "step": step, "total_steps": total_steps, "stopped_early": stopped_early,
        "wall_seconds": round(seconds, 1), "validation_em": validation_scores(rows),
        "checkpoints": [str(out_dir / "checkpoints" / str(s)) for s in sorted(checkpoint_steps)],
        "export_command": (f"python -m searchr1_jax.export --checkpoint {out_dir} "
                           f"--out exports/{out_dir.name}"),
    }


def format_summary(summary: dict) -> str:
    """The summary as the lines a run prints when it ends."""
    state = ("stopped early (resume with --config.trainer.resume=True)" if summary["stopped_early"]
             else "finished")
    lines = [f"run {state} at step {summary['step']} of {summary['total_steps']} "
             f"({summary['wall_seconds']:.0f} s): {summary['output_dir']}"]
    scores = summary["validation_em"]
    if scores:
        width = max(len(s) for s in scores)
        lines.append("validation EM      last (step)     best (step)")
        for source, s in sorted(scores.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            lines.append(f"  {source:<{width}}  {s['last']:.3f} ({s['last_step']})   "
                         f"{s['best']:.3f} ({s['best_step']})")
    else:
        lines.append("validation: none run (set config.data.val_files and config.trainer.eval_every)")
    lines.append("checkpoints: " + (", ".join(summary["checkpoints"]) or "none"))
    lines.append(f"export the policy: {summary['export_command']}")
    return "\n".join(lines)
