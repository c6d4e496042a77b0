"""Orbax checkpoints of the training state: array items (`policy` on its own, so export can
read just it; `train_state` with critic, optimizer states and RNG) plus a JSON `record`
(step, data position, KL controller, model paths, the run's config).

Orbax writes each step into a temporary directory and renames it into place only when the
save is complete (on every process), so a crash or `kill -9` mid-save leaves nothing that
`latest_step()` would pick up. Saves are asynchronous: the next training step starts while
the previous checkpoint is written; `wait()` blocks until it is on disk.

Integrity: once a step is on disk, process 0 writes `integrity.json` into its directory:
the size and CRC-32 of every file, and the health mark (the trainer saves only steps whose
losses and parameters were finite). `verify(step)` re-reads the files and names the first
difference, so a flipped byte or a truncated file is found before Orbax or TensorStore read
it. A step whose run ended before its mark was written (a `kill -9` right after the save)
has no mark; it is complete by Orbax's rename, and is used unverified, with a log line.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("searchr1_jax")

ARRAY_ITEMS = ("policy", "train_state")
INTEGRITY_FILE = "integrity.json"
_CHUNK = 1 << 24


class Checkpointer:
    """Keeps the last `keep` checkpoints of `directory` (absolute or relative path)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self._manager = self._open()
        self._unmarked: dict[int, dict] = {}  # saved steps whose integrity file is not written yet

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=ARRAY_ITEMS + ("record",))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, items: dict[str, Any], record: dict, *, force: bool = False) -> bool:
        """Start saving `items` (name in ARRAY_ITEMS → pytree of jax arrays) and `record`
        (JSON-able) as `step`; its integrity file follows once it is on disk (at the next
        save, `wait()` or `close()`)."""
        self._mark_saved()
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        started = self._manager.save(step, args=ocp.args.Composite(record=ocp.args.JsonSave(record), **args),
                                     force=force)
        if started:
            self._unmarked[step] = {"healthy": True}
        return started

    def _mark_saved(self) -> None:
        """Wait for the pending saves and write their integrity files (process 0)."""
        if not self._unmarked:
            return
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step, health in sorted(self._unmarked.items()):
                if self.step_dir(step).is_dir():  # not rotated away meanwhile
                    write_integrity(self.step_dir(step), step, health)
        self._unmarked.clear()

    def verify(self, step: int) -> str | None:
        """None when `step`'s files match its integrity file, else why not (one line)."""
        return verify_integrity(self.step_dir(step))

    def set_aside(self, steps: list[int]) -> Path | None:
        """Move the directories of `steps` (rejected by `verify` or unreadable) out of the
        checkpoint directory, into `<directory>.rejected/`, so later saves can reuse their
        step numbers; nothing is deleted. Returns where they went."""
        if not steps:
            return None
        aside = self.directory.with_name(self.directory.name + ".rejected")
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                suffix = 1
                while target.exists():
                    target, suffix = aside / f"{step}.{suffix}", suffix + 1
                os.replace(self.step_dir(step), target)
        self._manager.close()
        self._manager = self._open()
        return aside

    def restore(self, step: int | None, abstract_items: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """Restore the items named in `abstract_items` (and the record) of `step` (default:
        latest), with the structure, dtypes and shardings of the given pytrees (of
        jax.ShapeDtypeStruct or arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        args = {name: ocp.args.StandardRestore(jax.tree.map(_abstract, tree))
                for name, tree in abstract_items.items()}
        out = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore(), **args))
        return {name: out[name] for name in abstract_items}, dict(out["record"])

    def read_record(self, step: int | None = None) -> dict:
        """Only the JSON record of `step` (default: latest), without loading arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        out = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
        return dict(out["record"])

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._mark_saved()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != INTEGRITY_FILE)


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_integrity(step_dir: Path, step: int, health: dict) -> None:
    """`integrity.json` of a complete step directory: size and CRC-32 per file, and health."""
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p)] for p in _files(step_dir)}
    tmp = step_dir / (INTEGRITY_FILE + ".tmp")
    tmp.write_text(json.dumps({"step": step, **health, "files": files}, indent=1))
    os.replace(tmp, step_dir / INTEGRITY_FILE)  # atomic: a torn file never looks written


def verify_integrity(step_dir: Path) -> str | None:
    """Why `step_dir` does not match its integrity file, or None (also None without one:
    see the module docstring)."""
    path = step_dir / INTEGRITY_FILE
    if not path.exists():
        log.warning("checkpoint %s has no integrity file (the run ended right after saving it): used "
                    "unverified", step_dir)
        return None
    try:
        manifest = json.loads(path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {INTEGRITY_FILE} is unreadable"
    if not manifest.get("healthy", False):
        return "it is not marked healthy (non-finite losses or parameters)"
    present = {str(p.relative_to(step_dir)): p for p in _files(step_dir)}
    for name in sorted(set(expected) | set(present)):
        if name not in present:
            return f"file {name} is missing"
        if name not in expected:
            return f"file {name} was not part of the saved checkpoint"
        size, crc = expected[name]
        actual = present[name].stat().st_size
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were saved (truncated or overwritten)"
        if _crc32(present[name]) != crc:
            return f"file {name} does not match its saved checksum (corrupted)"
    return None


def _abstract(x):
    """A restore target; without a sharding of its own, the leaf lands whole on the first
    local device (e.g. exporting on one device what eight devices saved)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
