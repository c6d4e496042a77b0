"""What makes a resumed run the same run: the config fields that change its meaning.

A checkpoint's record stores the config it was trained with. On resume, `changed_fields`
compares it with the config given now; the trainer refuses any difference in these fields
(unless `trainer.resume_override`), since the KL reference, the data order or the meaning
of a step would silently change. Sizes that only change how the work is split
(micro-batches, mesh, rollout lengths) and the run length (`trainer.total_steps`, said in a
log line) may change.
"""
from __future__ import annotations

import os
from typing import Mapping

# Fields compared; a section name covers every field under it.
MEANING_FIELDS = ("seed", "model.path", "model.tokenizer_path", "model.critic_path", "data.train_files",
                  "data.template", "data.shuffle", "trainer.batch_size", "trainer.mini_batch_size",
                  "trainer.ppo_epochs", "rollout.n_samples", "algorithm", "reward")
PATH_FIELDS = ("model.path", "model.tokenizer_path", "model.critic_path", "data.train_files")


def _flat(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _comparable(field: str, value: object, cwd: str) -> object:
    """Paths as absolute paths (each of a comma-separated list), so that the same files given
    relative to the same directory compare equal."""
    if field in PATH_FIELDS and isinstance(value, str) and value:
        return ",".join(os.path.normpath(os.path.join(cwd, p.strip())) for p in value.split(","))
    return value


def changed_fields(saved: Mapping, current: Mapping, *, saved_cwd: str, cwd: str) -> list[str]:
    """`field: saved → current` for each meaning field that differs (configs as nested dicts;
    relative paths resolved against the directory each run started in)."""
    before, now = _flat(saved), _flat(current)
    changes = []
    for field in sorted(set(before) | set(now)):
        if not any(field == f or field.startswith(f + ".") for f in MEANING_FIELDS):
            continue
        old = _comparable(field, before.get(field), saved_cwd)
        new = _comparable(field, now.get(field), cwd)
        if old != new:
            changes.append(f"{field}: {before.get(field)!r} → {now.get(field)!r}")
    return changes
