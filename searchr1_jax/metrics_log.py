"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files, optionally W&B.

Only the main process writes. On resume, `truncate_after(step)` drops lines of steps the
restored checkpoint does not contain (a run killed after logging step N but before saving
it, or before its first save: step 0), and a torn last line, so the file always describes
one uninterrupted run; the TensorBoard events are rewritten from the kept lines, so they
hold each step once too.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """JSON-able scalar; NaN/inf become None so the file stays valid JSON."""
    value = np.asarray(value).item() if hasattr(value, "shape") or isinstance(value, np.generic) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, enabled: bool = True, wandb_project: str = "",
                 run_name: str = "", config: dict | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb_dir = Path(output_dir) / "tensorboard"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.tb_dir))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("config.trainer.wandb_project is set but wandb is not installed: "
                                  "pip install 'searchr1_jax[wandb]'") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config or {})

    def truncate_after(self, step: int) -> None:
        """Keep only lines with step <= `step` (dropping a torn, unparsable line), and make
        the TensorBoard events say the same."""
        if not self.enabled:
            return
        kept = [row for row in _parse_lines(self.path) if row.get("step", 0) <= step] if self.path.exists() else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.path)
        self._tb.close()
        shutil.rmtree(self.tb_dir, ignore_errors=True)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.tb_dir))
        for row in kept:
            self._add_scalars(row)
        self._tb.flush()

    def _add_scalars(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, row["step"])

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._add_scalars(row)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _parse_lines(path: Path) -> list[dict]:
    """The rows of a metrics file; a line that is not JSON (torn by a kill mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
