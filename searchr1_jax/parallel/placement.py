"""Placement of the policy, critic and reference models on the mesh.

All three are colocated: each is sharded over the whole mesh by the same rules, so every
device holds 1/N of each and no weights move between phases of a step. (Putting a model on
a sub-mesh instead is `shard_module(model, sub_mesh, rules)` with a mesh built from a
subset of `jax.devices()`.)
"""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from searchr1_jax.models import Decoder, ValueModel
from searchr1_jax.parallel.rules import Fallback, Rules
from searchr1_jax.parallel.sharding import shard_module


def frozen_copy(policy: Decoder) -> Decoder:
    """The reference model: a Decoder with its own copy of `policy`'s parameters.

    Copies, not aliases: the policy's update step may donate its buffers. The copy has
    the shardings the policy has when it is made.
    """
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    copied = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)
    return nnx.merge(graphdef, copied, rest)


def place_models(policy: Decoder, critic: ValueModel | None, reference: Decoder | None,
                 mesh: Mesh, rules: Rules) -> dict[str, list[Fallback]]:
    """Shard the given models over `mesh` in place; None entries are skipped.

    Returns, per model name ("policy", "critic", "reference"), the dimensions that stay
    replicated against the rules.
    """
    if reference is policy:
        raise ValueError("reference must be a separate copy of the policy (use frozen_copy(policy)), "
                         "not the policy itself: the policy's update would change it")
    placed = {}
    for name, model in (("policy", policy), ("critic", critic), ("reference", reference)):
        if model is not None:
            placed[name] = shard_module(model, mesh, rules)
    return placed
