"""Building blocks of the decoder: RMSNorm, Linear, rotary embeddings, masked attention.

Every parameter carries `logical_axes` metadata (names such as "embed", "heads", "mlp",
"vocab"); `searchr1_jax.parallel` maps those names to mesh axes. Parameters are stored in
`param_dtype` and cast to the compute `dtype` at use, so float32 master weights can drive
bfloat16 matmuls.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from searchr1_jax.models.config import RopeConfig

# Large finite negative: fully masked rows (padding queries) stay finite instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 like transformers."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the activation dtype before the weight multiply.
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class Linear(nnx.Module):
    """x @ kernel (+ bias). kernel: [in, out] (transpose of torch's [out, in])."""

    def __init__(self, in_dim: int, out_dim: int, *, axes: tuple[str, str], use_bias: bool,
                 dtype, param_dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        kernel = init_std * jax.random.normal(rngs.params(), (in_dim, out_dim), jnp.float32)
        self.kernel = nnx.Param(kernel.astype(param_dtype), logical_axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_dim,), param_dtype), logical_axes=(axes[1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> jax.Array:
    """Inverse frequencies [head_dim // 2] (float32), with llama3/linear scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between
        # them interpolated smoothly (Llama 3.1 recipe).
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, D] by positions [B, T] (int), half-split convention of transformers."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q: [B, T, H, D]; k, v: [B, S, KVH, D] with H a multiple of KVH;
    mask: [B, T, S] bool, True where query t may attend key s.
    Returns [B, T, H, D]. Scores and softmax are float32.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(d))
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
