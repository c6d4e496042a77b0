"""The device mesh: axes ("data", "fsdp", "tensor") over all devices of all hosts.

"tensor" is the innermost (fastest-varying) axis, so a tensor group is a set of
neighbouring devices (same host / same ICI ring) and the costly per-layer collectives of
tensor parallelism stay on the fastest links; "data" is outermost.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh

from searchr1_jax.parallel.rules import MESH_AXES, PRESETS, MeshAxes, Rules, rules_for


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh and sharding settings (`config.mesh`).

    data, fsdp, tensor: axis sizes; -1 (at most one of them) means "all remaining devices".
    preset: one of "fsdp", "fsdp_tensor", "data" (see `rules.py`).
    rules: (logical name, mesh axes) pairs overriding entries of the preset's rules.
    device_memory_gb: memory per device in GiB for the fit check; 0 = ask the device.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    preset: str = "fsdp"
    rules: tuple[tuple[str, MeshAxes], ...] = ()
    device_memory_gb: float = 0.0

    def __post_init__(self):
        for name in MESH_AXES:
            size = getattr(self, name)
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ValueError(f"config.mesh.{name}: expected a positive int or -1, got {size!r}")
        if sum(getattr(self, name) == -1 for name in MESH_AXES) > 1:
            raise ValueError("config.mesh: at most one of data, fsdp, tensor may be -1 "
                             f"(got data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})")
        if self.preset not in PRESETS:
            raise ValueError(f"config.mesh.preset: unknown preset {self.preset!r}; use one of {sorted(PRESETS)}")
        if self.device_memory_gb < 0:
            raise ValueError(f"config.mesh.device_memory_gb: must be >= 0, got {self.device_memory_gb}")
        rules_for(self.preset, self.rules)  # validates the overrides early, naming the bad entry

    @property
    def resolved_rules(self) -> Rules:
        return rules_for(self.preset, self.rules)


def mesh_config_from(section: Any) -> MeshConfig:
    """MeshConfig from `config.mesh` (an ml_collections ConfigDict, a dict, or None → defaults)."""
    if section is None:
        return MeshConfig()
    get = section.get if hasattr(section, "get") else lambda k, d: getattr(section, k, d)
    defaults = MeshConfig()
    known = {f.name for f in dataclasses.fields(MeshConfig)}
    keys = section.keys() if hasattr(section, "keys") else known
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"config.mesh: unknown field(s) {unknown}; known: {sorted(known)}")
    rules = get("rules", ()) or ()
    return MeshConfig(
        data=get("data", defaults.data),
        fsdp=get("fsdp", defaults.fsdp),
        tensor=get("tensor", defaults.tensor),
        preset=get("preset", defaults.preset),
        rules=tuple(tuple(pair) if isinstance(pair, list) else pair for pair in rules),
        device_memory_gb=float(get("device_memory_gb", defaults.device_memory_gb) or 0.0),
    )


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """{"data": d, "fsdp": f, "tensor": t} with d*f*t == num_devices; -1 takes the rest."""
    sizes = {name: getattr(mesh_cfg, name) for name in MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    wildcard = [name for name, s in sizes.items() if s == -1]
    if wildcard:
        if num_devices % fixed:
            raise ValueError(f"config.mesh: {num_devices} devices cannot be split into "
                             f"{'×'.join(f'{k}={v}' for k, v in sizes.items())} "
                             f"({num_devices} is not a multiple of {fixed})")
        sizes[wildcard[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"config.mesh: data×fsdp×tensor = {sizes['data']}×{sizes['fsdp']}×"
                         f"{sizes['tensor']} = {fixed}, but there are {num_devices} devices; "
                         "set one axis to -1 to take the remaining devices")
    return sizes


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all devices of all processes) with axes MESH_AXES.

    Axis types are Auto: sharding follows the explicit in/out shardings we pass to jit,
    not sharding-in-types.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
