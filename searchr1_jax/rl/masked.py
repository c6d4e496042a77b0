"""Masked reductions over `[B, T]` token arrays, and the shape checks every rl function shares.

A `loss_mask` is a `[B, T]` bool or float array that is nonzero exactly on tokens the policy
generated; prompt, padding and retrieved-observation tokens are zero. Every function here
*selects* with the mask (`jnp.where`) instead of multiplying by it, so NaN or inf in masked
positions can neither leak into a result nor into a gradient (0 * inf is NaN; a select is not).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array


def check_token_arrays(**arrays) -> None:
    """Raise ValueError unless every named array is 2-D `[B, T]` and all shapes agree.

    Runs at trace time (shapes are static), so a jitted caller pays nothing for it.
    """
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items() if a is not None}
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"searchr1_jax.rl: `{name}` must be a [B, T] array, got shape {shape}")
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"searchr1_jax.rl: token arrays must share one [B, T] shape, got {listed}")


def check_sequence_array(name: str, array, batch: int) -> None:
    """Raise ValueError unless `array` has shape `[batch]` (one value per sequence)."""
    shape = tuple(jnp.shape(array))
    if shape != (batch,):
        raise ValueError(
            f"searchr1_jax.rl: `{name}` must hold one value per sequence, shape ({batch},), got {shape}"
        )


def as_bool_mask(loss_mask) -> Array:
    """`loss_mask` as bool: True where nonzero."""
    return jnp.asarray(loss_mask).astype(bool)


def select(x, mask: Array, fill: float = 0.0) -> Array:
    """`x` where `mask`, `fill` elsewhere, as float32. Called on inputs before any arithmetic."""
    return jnp.where(mask, jnp.asarray(x, jnp.float32), jnp.float32(fill))


def masked_sum(x, mask: Array, axis=None) -> Array:
    """Sum of `x` over entries where `mask` is True."""
    return jnp.sum(select(x, mask), axis=axis)


def masked_count(mask: Array, axis=None) -> Array:
    """Number of True entries of `mask`, float32."""
    return jnp.sum(mask.astype(jnp.float32), axis=axis)


def masked_mean(x, mask: Array, axis=None) -> Array:
    """Mean of `x` over masked-in entries; 0 where there are none."""
    count = masked_count(mask, axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x, mask: Array) -> Array:
    """Unbiased (Bessel-corrected, as torch.var) variance over masked-in entries.

    0 when fewer than two entries are masked in.
    """
    x = select(x, mask)
    count = masked_count(mask)
    centred = select(x - masked_mean(x, mask), mask)
    return jnp.sum(centred**2) / jnp.maximum(count - 1.0, 1.0)


def masked_whiten(x, mask: Array, eps: float = 1e-8) -> Array:
    """`(x - mean) / sqrt(var + eps)` with mean and unbiased var over masked-in entries only.

    Masked-out entries of the result are 0.
    """
    x = select(x, mask)
    whitened = (x - masked_mean(x, mask)) * jnp.reciprocal(jnp.sqrt(masked_var(x, mask) + eps))
    return select(whitened, mask)


def masked_min(x, mask: Array) -> Array:
    """Smallest masked-in entry; 0 when none is masked in."""
    return jnp.where(jnp.any(mask), jnp.min(select(x, mask, jnp.inf)), 0.0)


def masked_max(x, mask: Array) -> Array:
    """Largest masked-in entry; 0 when none is masked in."""
    return jnp.where(jnp.any(mask), jnp.max(select(x, mask, -jnp.inf)), 0.0)
