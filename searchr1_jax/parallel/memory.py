"""Per-device memory estimate of an RL step, and a fit check that runs before compiling.

Model of a step (all figures are bytes on one device, after sharding by the rules):

  resident (live all the time)
    params of each model held (policy; critic for PPO; reference when KL is used) in
    `param_dtype`; when `master_dtype` differs, a master copy of each trained model;
    Adam's two moments of each trained model in `moment_dtype`.
  rollout (live while generating)
    KV cache: 2 × layers × B × S × KVH × D in `cache_dtype`, plus valid [B, S] and length [B];
    one prefill call: its logits [rows, chunk, V] float32 and one layer's working set
    (below) with `chunk` queries over `cache_length` keys;
    all-gathered weights in flight (FSDP): 2 × the largest layer or embedding, unsplit
    over data/fsdp.
  train (live during one policy update; the critic's is no larger)
    gradients of the policy (master dtype when there is one) and, with gradient
    accumulation, an accumulator of the same size;
    activations of one micro-batch of b sequences of T tokens:
      remat:    L × x + 2 × W      (layer inputs kept; one layer recomputed, with cotangents)
      no remat: (L + 1) × W        (every layer's working set kept, plus one of cotangents)
    where x = [b, T, E] and the working set W of one layer is, in `compute_dtype`:
    4 × [b, T, E] (input, two norms, residual), 2 × [b, T, H, D] (q, attention output),
    2 × [b, T, KVH, D] (k, v), 3 × [b, T, M] (gate, up, product), attention probabilities
    [b, H, T, T] plus their float32 scores (the decoder's attention is not fused);
    logits, log-probs and their gradient: 3 × [b, T, V] float32;
    all-gathered weights in flight, as in rollout.

  peak = resident + max(rollout, train).

Assumed: the update step donates parameters and optimizer state, and prefill/decode donate
the cache (without donation, each needs a second copy while the step runs).

Activations are assumed split like the "act_*" rules say; XLA chooses their real layout,
so treat the activation figures as the right order of magnitude, not exact. Parameter,
optimizer and cache figures are exact per-device buffer sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from searchr1_jax.models import Decoder, ModelConfig, ValueModel
from searchr1_jax.parallel.distributed import log_main
from searchr1_jax.parallel.rules import MESH_AXES, Rules, logical_to_spec, mesh_shape_of, shard_shape

GIB = 2**30
PHASES = ("resident", "rollout", "train")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Global sizes that set a step's transient memory (split over the mesh by the rules).

    rollout_batch: sequences generated together (all their KV caches are live).
    cache_length: KV slots per sequence (prompt plus every turn's response and observation).
    prefill_rows, prefill_chunk: rows and tokens per row of one prefill/extend call.
    train_micro_batch, train_length: sequences and tokens per row of one training micro-batch.
    grad_accumulation: gradients of several micro-batches are summed before the update.
    remat: decoder layers are recomputed in the backward pass.
    """

    rollout_batch: int
    cache_length: int
    prefill_rows: int
    prefill_chunk: int
    train_micro_batch: int
    train_length: int
    grad_accumulation: bool = True
    remat: bool = True


@dataclasses.dataclass(frozen=True)
class Precision:
    """Storage dtypes. master_dtype None: the optimizer updates the params themselves."""

    param_dtype: object = jnp.float32
    master_dtype: object | None = None
    compute_dtype: object = jnp.float32
    cache_dtype: object = jnp.float32
    moment_dtype: object = jnp.float32


@dataclasses.dataclass(frozen=True)
class MemoryItem:
    name: str
    phase: str
    bytes: int
    hint: str


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Items of the estimate, bytes per device. `peak_bytes` = resident + max(rollout, train)."""

    items: tuple[MemoryItem, ...]
    mesh_shape: dict
    preset: str

    def phase_bytes(self, phase: str) -> int:
        return sum(item.bytes for item in self.items if item.phase == phase)

    def bytes_of(self, *names: str) -> int:
        known = {item.name for item in self.items}
        missing = set(names) - known
        if missing:
            raise KeyError(f"no estimate item(s) {sorted(missing)}; have {sorted(known)}")
        return sum(item.bytes for item in self.items if item.name in names)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes("resident") + max(self.phase_bytes("rollout"), self.phase_bytes("train"))

    def table(self, device_memory_bytes: int | None = None) -> str:
        """A fixed-width table (GiB per device) to print at start-up."""
        mesh = "×".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [f"memory per device (preset {self.preset}, mesh {mesh})",
                 f"  {'item':<34}{'phase':<10}{'GiB':>9}"]
        for item in self.items:
            lines.append(f"  {item.name:<34}{item.phase:<10}{item.bytes / GIB:>9.2f}")
        for phase in PHASES:
            lines.append(f"  {'total ' + phase:<44}{self.phase_bytes(phase) / GIB:>9.2f}")
        lines.append(f"  {'peak = resident + max(rollout, train)':<44}{self.peak_bytes / GIB:>9.2f}")
        if device_memory_bytes:
            lines.append(f"  {'device memory':<44}{device_memory_bytes / GIB:>9.2f}")
        return "\n".join(lines)


class MemoryBudgetError(RuntimeError):
    """The estimated peak does not fit the device memory."""


@functools.lru_cache(maxsize=8)
def param_table(model_cfg: ModelConfig, kind: str) -> tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...]:
    """(path, shape, logical axes) of every parameter of a "decoder" or "critic", built
    abstractly (no memory is allocated)."""
    cls = {"decoder": Decoder, "critic": ValueModel}[kind]
    abstract = nnx.eval_shape(lambda: cls(model_cfg, rngs=nnx.Rngs(0)))
    return tuple(("/".join(map(str, path)), tuple(var.get_value().shape), tuple(var.get_metadata()["logical_axes"]))
                 for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def _itemsize(dtype) -> int:
    return np.dtype(jnp.dtype(dtype)).itemsize


def _per_device(shape: Sequence[int], axes: Sequence[str], rules: Rules,
                mesh_shape: Mapping[str, int], dtype) -> int:
    spec = logical_to_spec(axes, rules, shape, mesh_shape)
    return math.prod(shard_shape(shape, spec, mesh_shape)) * _itemsize(dtype)


def _params_bytes(table, rules, mesh_shape, dtype) -> int:
    return sum(_per_device(shape, axes, rules, mesh_shape, dtype) for _, shape, axes in table)


def _gathered_weights_bytes(table, rules, mesh_shape, dtype) -> int:
    """2 × the largest layer (or embedding / head) with data and fsdp splits undone."""
    unsplit = {**mesh_shape, "data": 1, "fsdp": 1}
    groups: dict[str, int] = {}
    for path, shape, axes in table:
        parts = path.split("/")
        group = "/".join(parts[:3]) if parts[:2] == ["model", "layers"] else path
        groups[group] = groups.get(group, 0) + _per_device(shape, axes, rules, unsplit, dtype)
    return 2 * max(groups.values())


def _layer_working_set(cfg: ModelConfig, rows: int, queries: int, keys: int, rules: Rules,
                       mesh_shape: Mapping[str, int], dtype) -> int:
    """Bytes of one decoder layer's activations for `rows` × `queries` tokens over `keys`."""
    e, h, kvh, d, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    b, t = rows, queries

    def size(shape, axes, dt=dtype):
        return _per_device(shape, axes, rules, mesh_shape, dt)

    return (4 * size((b, t, e), ("batch", "length", "act_embed"))
            + 2 * size((b, t, h, d), ("batch", "length", "act_heads", "head_dim"))
            + 2 * size((b, t, kvh, d), ("batch", "length", "act_kv_heads", "head_dim"))
            + 3 * size((b, t, m), ("batch", "length", "act_mlp"))
            + size((b, h, t, keys), ("batch", "act_heads", "length", "length"))
            + size((b, h, t, keys), ("batch", "act_heads", "length", "length"), jnp.float32))


def estimate_memory(model_cfg: ModelConfig, mesh: Mesh | Mapping[str, int], rules: Rules,
                    workload: Workload, precision: Precision = Precision(), *,
                    critic: bool, reference: bool, preset: str = "custom") -> MemoryEstimate:
    """Per-device memory of an RL step: see the module docstring for the model.

    mesh: a Mesh or a plain {"data", "fsdp", "tensor"} size mapping (to plan for hardware
    that is not present). critic / reference: whether those models are held.
    """
    given = mesh_shape_of(mesh)
    mesh_shape = {axis: given.get(axis, 1) for axis in MESH_AXES}
    p = precision
    cfg = model_cfg
    trained = p.master_dtype if p.master_dtype is not None else p.param_dtype
    has_master = p.master_dtype is not None and jnp.dtype(p.master_dtype) != jnp.dtype(p.param_dtype)
    items: list[MemoryItem] = []

    def add(name, phase, nbytes, hint):
        items.append(MemoryItem(name, phase, int(nbytes), hint))

    shard_hint = "shard parameters and optimizer state: preset 'fsdp' and a larger config.mesh.fsdp"
    models = [("policy", param_table(cfg, "decoder"))]
    if critic:
        models.append(("critic", param_table(cfg, "critic")))
    for name, table in models:
        add(f"{name} params", "resident", _params_bytes(table, rules, mesh_shape, p.param_dtype), shard_hint)
        if has_master:
            add(f"{name} master copy", "resident", _params_bytes(table, rules, mesh_shape, p.master_dtype),
                shard_hint)
        add(f"{name} Adam moments", "resident", 2 * _params_bytes(table, rules, mesh_shape, p.moment_dtype),
            shard_hint)
    decoder_table = models[0][1]
    if reference:
        add("reference params", "resident", _params_bytes(decoder_table, rules, mesh_shape, p.param_dtype),
            shard_hint)

    w = workload
    b, s = w.rollout_batch, w.cache_length
    kv = _per_device((b, cfg.num_kv_heads, s, cfg.head_dim), ("batch", "act_kv_heads", "length", "head_dim"),
                     rules, mesh_shape, p.cache_dtype)
    kv_meta = (_per_device((b, s), ("batch", "length"), rules, mesh_shape, jnp.bool_)
               + _per_device((b,), ("batch",), rules, mesh_shape, jnp.int32))
    add("KV cache", "rollout", 2 * cfg.num_layers * kv + kv_meta,
        "lower the rollout batch or the cache length (max prompt + turns × (response + observation))")
    prefill_hint = "prefill fewer rows or shorter chunks per extend call"
    add("prefill logits", "rollout",
        _per_device((w.prefill_rows, w.prefill_chunk, cfg.vocab_size), ("batch", "length", "act_vocab"),
                    rules, mesh_shape, jnp.float32), prefill_hint)
    add("prefill activations", "rollout",
        _layer_working_set(cfg, w.prefill_rows, w.prefill_chunk, s, rules, mesh_shape, p.compute_dtype),
        prefill_hint)
    gathered = _gathered_weights_bytes(decoder_table, rules, mesh_shape, p.param_dtype)
    if math.prod(mesh_shape[a] for a in dict(rules)["embed"]) > 1:
        for phase in ("rollout", "train"):
            add(f"gathered weights ({phase})", phase, gathered, "use tensor parallelism (preset 'fsdp_tensor')")

    grads = _params_bytes(decoder_table, rules, mesh_shape, trained)
    add("gradients", "train", grads, shard_hint)
    if w.grad_accumulation:
        add("gradient accumulator", "train", grads, shard_hint)
    mb, t = w.train_micro_batch, w.train_length
    layer_input = _per_device((mb, t, cfg.hidden_size), ("batch", "length", "act_embed"), rules, mesh_shape,
                              p.compute_dtype)
    working = _layer_working_set(cfg, mb, t, t, rules, mesh_shape, p.compute_dtype)
    activations = (cfg.num_layers * layer_input + 2 * working if w.remat
                   else (cfg.num_layers + 1) * working)
    act_hint = "lower the training micro-batch" + ("" if w.remat else " or enable remat")
    add("activations" + (" (remat)" if w.remat else ""), "train", activations, act_hint)
    add("logits, log-probs, grad", "train",
        3 * _per_device((mb, t, cfg.vocab_size), ("batch", "length", "act_vocab"), rules, mesh_shape,
                        jnp.float32), act_hint + " or split the vocab (preset 'fsdp_tensor')")
    return MemoryEstimate(items=tuple(items), mesh_shape=dict(mesh_shape), preset=preset)


def device_memory_bytes(device: jax.Device | None = None, override_gb: float = 0.0) -> int | None:
    """Usable bytes of one device: `override_gb` GiB when > 0, else the allocator's limit
    from `device.memory_stats()`; for CPU devices, which report none, the host's physical
    memory shared by its local devices; None when nothing is known."""
    if override_gb > 0:
        return int(override_gb * GIB)
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        return host_memory_bytes() // max(1, len(jax.local_devices(backend="cpu")))
    return None


def host_memory_bytes() -> int:
    """Physical memory of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(estimate: MemoryEstimate, device_memory: int | None) -> None:
    """Raise MemoryBudgetError naming the largest items and what would shrink them when the
    estimated peak exceeds `device_memory` bytes. Unknown memory (None): no check."""
    if device_memory is None or estimate.peak_bytes <= device_memory:
        return
    biggest = sorted(estimate.items, key=lambda it: it.bytes, reverse=True)[:3]
    detail = "; ".join(f"{it.name} {it.bytes / GIB:.2f} GiB ({it.phase}) → {it.hint}" for it in biggest)
    mesh = "×".join(f"{k}={v}" for k, v in estimate.mesh_shape.items())
    raise MemoryBudgetError(
        f"estimated peak {estimate.peak_bytes / GIB:.2f} GiB per device does not fit the "
        f"{device_memory / GIB:.2f} GiB of device memory (preset {estimate.preset!r}, mesh {mesh}). "
        f"Largest items: {detail}. Other levers: more devices, or config.mesh.device_memory_gb "
        f"if the device's memory was misread.")


def report_memory(estimate: MemoryEstimate, override_gb: float = 0.0,
                  device: jax.Device | None = None) -> int | None:
    """Start-up check: log the estimate's table (process 0 only), then `check_fits` against
    `device_memory_bytes(device, override_gb)`. Returns the bytes checked against (None:
    unknown, nothing checked). Call it before compiling anything."""
    memory = device_memory_bytes(device, override_gb)
    log_main("%s", estimate.table(memory))
    if memory is None:
        log_main("device memory unknown (no memory_stats; set config.mesh.device_memory_gb): fit not checked",
                 level=logging.WARNING)
    check_fits(estimate, memory)
    return memory
