"""Orbax checkpoints of the training state: array items (`policy` on its own, so export can
read just it; `train_state` with critic, optimizer states and RNG) plus a JSON `record`
(step, data position, KL controller, model paths).

Orbax writes each step into a temporary directory and renames it into place only when the
save is complete (on every process), so a crash or `kill -9` mid-save leaves nothing that
`latest_step()` would pick up. Saves are asynchronous: the next training step starts while
the previous checkpoint is written; `wait()` blocks until it is on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

ARRAY_ITEMS = ("policy", "train_state")


class Checkpointer:
    """Keeps the last `keep` checkpoints of `directory` (absolute or relative path)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=ARRAY_ITEMS + ("record",))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, items: dict[str, Any], record: dict, *, force: bool = False) -> bool:
        """Start saving `items` (name in ARRAY_ITEMS → pytree of jax arrays) and `record`
        (JSON-able) as `step`."""
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        return self._manager.save(step, args=ocp.args.Composite(record=ocp.args.JsonSave(record), **args),
                                  force=force)

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

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(x):
    """A restore target; without a sharding of its own, the leaf lands whole on the first
    local device (e.g. exporting on one device what eight devices saved)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
