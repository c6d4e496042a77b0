"""The PPO clipped value (critic) loss.

Per policy token, with V the critic's current value, V_old its value at rollout time and R the
return target:
    V_clip = V_old + clip(V - V_old, -clip_range, clip_range)
    loss = 0.5 * max((V - R)^2, (V_clip - R)^2)
The pessimistic max keeps one update from moving a value by more than `clip_range` for gain.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
from jax import Array

from searchr1_jax.rl.aggregation import Aggregated, aggregate
from searchr1_jax.rl.masked import as_bool_mask, check_token_arrays, select


def check_value_clip(clip_range) -> None:
    """Raise ValueError for a non-positive `clip_range` given as a Python number."""
    if isinstance(clip_range, numbers.Real) and clip_range <= 0:
        raise ValueError(f"searchr1_jax.rl: value clip_range must be > 0, got {clip_range}")


def clipped_value_per_token(values, old_values, returns, loss_mask, clip_range) -> Array:
    """Per-token clipped value loss `[B, T]` float32; 0 off policy tokens.

    `values` (differentiated), `old_values`, `returns`: `[B, T]`. `clip_range` > 0, in the
    units of the values.
    """
    check_value_clip(clip_range)
    check_token_arrays(values=values, old_values=old_values, returns=returns, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    values, old_values, returns = (select(x, mask) for x in (values, old_values, returns))
    clipped = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
    loss = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return select(loss, mask)


def clipped_value_loss(values, old_values, returns, loss_mask, *, clip_range, aggregation: str) -> Aggregated:
    """`clipped_value_per_token` aggregated as `Aggregated(numerator, denominator)`."""
    per_token = clipped_value_per_token(values, old_values, returns, loss_mask, clip_range)
    return aggregate(per_token, loss_mask, aggregation)
