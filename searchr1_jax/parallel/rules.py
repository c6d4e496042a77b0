"""Logical-axis rules: which mesh axes each named array dimension is split over.

Parameters carry logical axis names in their metadata (`searchr1_jax.models`); activations
and the KV cache use the activation names below. A rule set maps every name to a tuple of
mesh axes (empty = replicated). Three presets:

  * "fsdp": every matrix split along its `embed` dimension over the "fsdp" axis, batch over
    ("data", "fsdp"). Parameters, gradients and optimizer state are 1/fsdp per device.
  * "fsdp_tensor": as "fsdp", plus heads, mlp and vocab over the "tensor" axis (Megatron
    style) for weights and activations.
  * "data": parameters replicated, batch over ("data", "fsdp") — pure data parallelism.

A dimension is split only when its size is divisible by the product of its mesh axes and
no earlier dimension of the same array already uses one of those axes; otherwise it stays
replicated and a `Fallback` records why, so nothing large is replicated silently.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence, Union

from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "mlp", "norm", "scalar")
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_heads", "act_kv_heads", "head_dim",
                   "act_mlp", "act_vocab")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

MeshAxes = Union[None, str, Sequence[str]]
Rules = tuple[tuple[str, tuple[str, ...]], ...]

_BATCH = ("data", "fsdp")
_REPLICATED_ALL = {name: () for name in LOGICAL_AXES}

PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "fsdp": {**_REPLICATED_ALL, "embed": ("fsdp",), "batch": _BATCH},
    "fsdp_tensor": {
        **_REPLICATED_ALL, "embed": ("fsdp",), "batch": _BATCH,
        "vocab": ("tensor",), "q_heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",),
        "act_heads": ("tensor",), "act_kv_heads": ("tensor",), "act_mlp": ("tensor",),
        "act_vocab": ("tensor",),
    },
    "data": {**_REPLICATED_ALL, "batch": _BATCH},
}


def _normalise_axes(value: MeshAxes, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else tuple(value)
    for axis in axes:
        if axis not in MESH_AXES:
            raise ValueError(f"{where}: unknown mesh axis {axis!r}; use one of {MESH_AXES} or None")
    if len(set(axes)) != len(axes):
        raise ValueError(f"{where}: mesh axis repeated in {axes}")
    return axes


def rules_for(preset: str, overrides: Sequence[tuple[str, MeshAxes]] = ()) -> Rules:
    """The rules of `preset`, with `overrides` replacing the entries they name.

    overrides: (logical name, mesh axis | tuple of mesh axes | None) pairs, e.g.
    `(("vocab", "tensor"), ("batch", ("data", "fsdp")))`. Unknown names are an error so
    that a typo cannot silently leave a dimension replicated.
    """
    if preset not in PRESETS:
        raise ValueError(f"config.mesh.preset: unknown preset {preset!r}; use one of {sorted(PRESETS)}")
    table = dict(PRESETS[preset])
    for i, pair in enumerate(overrides):
        where = f"config.mesh.rules[{i}]"
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{where}: expected a (logical name, mesh axes) pair, got {pair!r}")
        name, axes = pair
        if name not in table:
            raise ValueError(f"{where}: unknown logical axis {name!r}; known: {LOGICAL_AXES}")
        table[name] = _normalise_axes(axes, where)
    return tuple(table.items())


@dataclasses.dataclass(frozen=True)
class Fallback:
    """A dimension the rules asked to split that stays replicated.

    path: the array's name ("" when unknown); dim: index of the dimension; size: its length;
    mesh_axes: the axes the rules named; reason: why they were not used; nbytes: size of the
    whole array in bytes (0 when unknown), to tell large arrays from small ones.
    """

    path: str
    logical: str
    dim: int
    size: int
    mesh_axes: tuple[str, ...]
    reason: str
    nbytes: int = 0

    def __str__(self) -> str:
        return (f"{self.path or '<array>'} dim {self.dim} ({self.logical}, size {self.size}) "
                f"not split over {self.mesh_axes}: {self.reason}")


def mesh_shape_of(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """{axis name: size} of a Mesh, or of a plain mapping (to plan for hardware not present)."""
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def logical_to_spec(logical_axes: Sequence[str], rules: Rules, shape: Sequence[int],
                    mesh: Mesh | Mapping[str, int], *, path: str = "", nbytes: int = 0,
                    fallbacks: list[Fallback] | None = None) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry `logical_axes`.

    Dimensions that cannot be split as the rules say stay replicated; each is appended to
    `fallbacks` (when given) with `path` and `nbytes` copied in.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{path or 'array'}: {len(logical_axes)} logical axes {tuple(logical_axes)} "
                         f"for shape {tuple(shape)}")
    table = dict(rules)
    sizes = mesh_shape_of(mesh)
    used: set[str] = set()
    entries: list[tuple[str, ...] | None] = []
    for dim, (name, size) in enumerate(zip(logical_axes, shape)):
        if name not in table:
            raise ValueError(f"{path or 'array'}: logical axis {name!r} has no rule; known: {tuple(table)}")
        axes = tuple(a for a in table[name] if a in sizes)
        reason = None
        if used.intersection(axes):
            reason = f"mesh axis {sorted(used.intersection(axes))} already splits another dimension"
        elif axes and size % math.prod(sizes[a] for a in axes):
            reason = f"{size} is not divisible by mesh size {math.prod(sizes[a] for a in axes)}"
        if reason is not None:
            if fallbacks is not None:
                fallbacks.append(Fallback(path, name, dim, int(size), axes, reason, nbytes))
            axes = ()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh | Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array of `shape` split by `spec` (dims assumed divisible)."""
    sizes = mesh_shape_of(mesh)
    out = []
    for dim, size in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(size // math.prod(sizes[a] for a in axes))
    return tuple(out)
