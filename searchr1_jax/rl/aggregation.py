"""Turning a per-token loss `[B, T]` into a scalar, split as numerator / denominator.

Every loss in this package returns `Aggregated(numerator, denominator)` instead of a mean, so
that gradient accumulation over micro-batches is exact:

    D = loss_denominator(mini_batch_loss_mask, mode)   # masks only: known before any forward
    for micro in micro_batches:                        # rows are never split across micro-batches
        grads += grad(lambda p: loss(p, micro).numerator / D)

equals `grad(loss(p, mini_batch).numerator / D)` up to float rounding, because every mode's
numerator is a sum over rows. Dividing each micro-batch by its own denominator and averaging
would not be: token counts differ between micro-batches.

Modes (config names):
- `token_mean`: numerator sum of the loss over policy tokens; denominator number of policy
  tokens. Long sequences weigh more (DAPO-style).
- `seq_mean_token_mean`: numerator sum over sequences of the per-sequence token mean;
  denominator number of sequences. Each sequence weighs the same (original GRPO).
- `seq_mean_token_sum`: numerator sum of the loss over policy tokens; denominator number of
  sequences. No length normalisation (Dr.GRPO).
"Number of sequences" counts rows with at least one policy token, so all-padding rows
(filler that rounds a batch up to a fixed shape) change neither numerator nor denominator.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from searchr1_jax.rl.masked import as_bool_mask, check_token_arrays, masked_count, masked_sum

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


class Aggregated(NamedTuple):
    """A loss as `numerator / denominator`; both float32 scalars. Divide once, after summing."""

    numerator: Array
    denominator: Array


def check_aggregation(mode: str) -> None:
    """Raise ValueError unless `mode` is one of AGGREGATIONS."""
    if mode not in AGGREGATIONS:
        raise ValueError(
            f"searchr1_jax.rl: unknown loss aggregation {mode!r}; expected one of {AGGREGATIONS}"
        )


def loss_denominator(loss_mask, mode: str) -> Array:
    """Denominator of `mode` for the rows of `loss_mask` `[B, T]`: policy tokens or sequences.

    Depends on the mask only, so a trainer computes it for the whole mini-batch up front and
    divides the summed micro-batch numerators by it.
    """
    check_aggregation(mode)
    check_token_arrays(loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    if mode == "token_mean":
        return masked_count(mask)
    return masked_count(jnp.any(mask, axis=-1))


def aggregate(per_token, loss_mask, mode: str) -> Aggregated:
    """Aggregate `per_token` `[B, T]` float over tokens where `loss_mask` `[B, T]` is nonzero."""
    check_aggregation(mode)
    check_token_arrays(per_token=per_token, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    row_sums = masked_sum(per_token, mask, axis=-1)
    if mode == "seq_mean_token_mean":
        numerator = jnp.sum(row_sums / jnp.maximum(masked_count(mask, axis=-1), 1.0))
    else:
        numerator = jnp.sum(row_sums)
    return Aggregated(numerator, loss_denominator(mask, mode))


def aggregated_value(parts: Aggregated) -> Array:
    """`numerator / denominator`, 0 when the denominator is 0 (no policy token at all)."""
    return parts.numerator / jnp.maximum(parts.denominator, 1.0)
