"""NamedShardings for parameters, optimizer state, batches and the KV cache.

Parameters are read from the `logical_axes` metadata of every `nnx.Param`; the sharding
trees mirror the state trees exactly (a Variable holding a NamedSharding where the state
holds a Variable holding an array), so they can be passed as `in_shardings` /
`out_shardings` to `jax.jit` or to `jax.device_put` as they are.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from searchr1_jax.models.kv_cache import VALUE_AXES, KVCache, key_axes
from searchr1_jax.parallel.rules import Fallback, Rules, logical_to_spec

logger = logging.getLogger(__name__)

# Arrays at least this large that stay replicated against the rules are logged as warnings.
LARGE_ARRAY_BYTES = 1 << 20


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path: tuple) -> str:
    """"model/layers/0/mlp/up_proj/kernel" from a jax key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_shardings(module: nnx.Module, mesh: Mesh, rules: Rules,
                    fallbacks: list[Fallback] | None = None) -> nnx.State:
    """Shardings of `nnx.state(module, nnx.Param)`, same tree structure.

    Every parameter must carry `logical_axes` metadata (a ValueError names the one that
    does not). Dimensions left replicated against the rules go to `fallbacks`.
    """
    def one(path, variable):
        axes = variable.get_metadata().get("logical_axes")
        name = _path_str(path)
        if axes is None:
            raise ValueError(f"parameter {name} has no logical_axes metadata; cannot shard it")
        value = variable.get_value()
        spec = logical_to_spec(axes, rules, value.shape, mesh, path=name,
                               nbytes=value.size * value.dtype.itemsize, fallbacks=fallbacks)
        return variable.replace(NamedSharding(mesh, spec))

    state = nnx.state(module, nnx.Param)
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def place_array(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` (host array or jax.Array) laid out as `sharding`.

    Values held whole by this process (host arrays, single-device arrays) are split on the
    host and each device receives only its shard: this works the same with many
    processes, and avoids compiling one resharding program per parameter shape, which
    costs more than the copy for a model's few hundred arrays. Arrays already spread
    over several processes are resharded on device.
    """
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable:
            return jax.device_put(x, sharding)
    host = np.asarray(x)
    # Copy each shard: on CPU a device buffer may alias the numpy memory it came from, and
    # a view would then keep the whole source array alive.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.array(host[index]))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules) -> list[Fallback]:
    """Move the module's parameters onto `mesh` as the rules say (in place).

    Returns the dimensions that had to stay replicated; those of large arrays are also
    logged as warnings.
    """
    fallbacks: list[Fallback] = []
    shardings = param_shardings(module, mesh, rules, fallbacks)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(place_array, state, shardings))
    for fb in fallbacks:
        if fb.nbytes >= LARGE_ARRAY_BYTES:
            logger.warning("sharding: %s (%.2f MiB replicated)", fb, fb.nbytes / 2**20)
    return fallbacks


def _leaf_paths(node: Any) -> tuple[str, ...] | None:
    """Paths of a tree's leaves (Variables count as leaves); None for non-pytrees.

    Paths rather than tree structures: nnx flattens a nested State into plain dicts, so
    the same layout can arrive as either node type.
    """
    try:
        flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=_is_variable)
    except Exception:  # noqa: BLE001 - objects that are not pytrees never mirror params
        return None
    return tuple(_path_str(path) for path, _ in flat)


def optimizer_shardings(opt_state: Any, param_sharding_tree: Any) -> Any:
    """Shardings for an optimizer state whose moment trees mirror the parameters.

    Works for optax states built on `nnx.state(model, nnx.Param)` (or on plain dicts of
    arrays) and for `nnx.state(nnx.Optimizer(...), nnx.OptState)`: every subtree laid out
    like the parameters gets the parameters' shardings; every other leaf (step counts,
    scalars of schedules) is replicated.
    """
    param_paths = _leaf_paths(param_sharding_tree)
    param_leaves = jax.tree.leaves(param_sharding_tree)
    replicated = NamedSharding(param_leaves[0].mesh, PartitionSpec())

    def mirrors(node) -> bool:
        return not isinstance(node, NamedSharding) and _leaf_paths(node) == param_paths

    def assign(node):
        if mirrors(node):
            return jax.tree.unflatten(jax.tree.structure(node), param_leaves)
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(assign, opt_state, is_leaf=mirrors)


def batch_spec(rules: Rules) -> PartitionSpec:
    """PartitionSpec of a [B, ...] array: dim 0 over the mesh axes of the "batch" rule."""
    axes = dict(rules)["batch"]
    return PartitionSpec(axes if len(axes) != 1 else axes[0]) if axes else PartitionSpec()


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """NamedSharding for [B, ...] arrays (batch over data×fsdp in every preset)."""
    return NamedSharding(mesh, batch_spec(rules))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    """Number of batch shards: a global batch must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in dict(rules)["batch"])


def shard_batch(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Global jax.Arrays, split over the batch axes, from host arrays [B, ...].

    Every process must hold the same full host arrays (each keeps only its own shards), so
    this works unchanged on one host or many. Raises when B is not a multiple of the
    number of batch shards.
    """
    sharding = batch_sharding(mesh, rules)
    shards = batch_divisor(mesh, rules)

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % shards:
            raise ValueError(f"batch field {jax.tree_util.keystr(path) or '<root>'} has shape {x.shape}: "
                             f"its leading (batch) size must be a multiple of {shards} "
                             f"(data×fsdp of mesh {dict(mesh.shape)})")
        return place_array(x, sharding)

    return jax.tree_util.tree_map_with_path(put, tree)


def cache_shardings(cache: KVCache, mesh: Mesh, rules: Rules,
                    fallbacks: list[Fallback] | None = None) -> KVCache:
    """A KVCache of NamedShardings: keys and values (in the cache's layout) over batch and
    kv heads, valid [B, S] and length [B] over batch."""
    def spec_of(axes: tuple[str, ...], name: str) -> Callable[[jax.Array], NamedSharding]:
        def one(x):
            return NamedSharding(mesh, logical_to_spec(axes, rules, x.shape, mesh, path=name,
                                                       nbytes=x.size * x.dtype.itemsize,
                                                       fallbacks=fallbacks))
        return one

    key = spec_of(key_axes(cache.layout), "kv_cache")
    value = spec_of(VALUE_AXES, "kv_cache")
    return KVCache(keys=tuple(map(key, cache.keys)), values=tuple(map(value, cache.values)),
                   valid=spec_of(("batch", "length"), "kv_cache/valid")(cache.valid),
                   length=spec_of(("batch",), "kv_cache/length")(cache.length),
                   layout=cache.layout)


def logits_sharding(mesh: Mesh, rules: Rules, shape: tuple[int, int, int]) -> NamedSharding:
    """Sharding of logits [B, T, V]: batch over data×fsdp, vocab as the "act_vocab" rule says."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length", "act_vocab"), rules, shape, mesh))
