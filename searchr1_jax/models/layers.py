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


# On CPU the float32 scores of a whole batch ([B, H, T, S]) are far larger than the caches,
# and masking and softmax make several passes over them at DRAM speed; computed a few rows
# at a time they stay in cache (a chunk of 128 queries over 2048 slots: ~4x faster).
# GPUs and TPUs use fused kernels instead (models/attention.py chooses).
CPU_SCORE_BLOCK_BYTES = 4 << 20


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           extent: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention, the CPU path ("cpu" in models/attention.py).

    q: [B, T, H, D]; k: [B, KVH, D, S] and v: [B, KVH, S, D] (the cache's layouts, see
    kv_cache) with H a multiple of KVH;
    mask: [B, T, S] bool, True where query t may attend key s;
    extent: optional [B] int32, a bound on row b's visible slots (mask[b, :, s] is False for
      s >= extent[b]); on CPU, slots beyond every row of a block are then skipped.
    Returns [B, T, H, D]. Scores and softmax are float32.
    """
    b, t, h, _ = q.shape
    # The batch may be sharded over the devices (CPU devices when a host is split into one
    # per core); a block of a multiple of that many rows stays split over them, where a
    # smaller one would be gathered onto every device. Inside a shard_map (the rollout
    # engine's calls) the rows at hand are this device's own.
    manual = bool(jax.sharding.get_abstract_mesh().manual_axes)
    shards = 1 if manual else math.gcd(b, jax.device_count())
    rows = cpu_rows_per_block(b, h * t * k.shape[3] * 4, shards)
    if rows == b:  # all scores fit at once (decode steps, short chunks)
        return _attend_all(q, k, v, mask)
    if extent is None or k.shape[3] <= KV_BLOCK:
        return attend_in_row_blocks(q, k, v, mask, rows)
    # Scores are held KV_BLOCK slots at a time; one row per device at a time, so that each
    # stops at its own extent.
    return attend_in_row_blocks(q, k, v, mask, shards, extent)


def cpu_rows_per_block(batch: int, score_bytes_per_row: int, multiple: int = 1) -> int:
    """The largest multiple of `multiple` dividing `batch` whose rows' scores fit
    CPU_SCORE_BLOCK_BYTES, or `multiple` when none fits (multiple divides batch)."""
    fitting = max(multiple, CPU_SCORE_BLOCK_BYTES // max(score_bytes_per_row, 1))
    return max(r for r in range(multiple, min(batch, fitting) + 1, multiple) if batch % r == 0)


def attend_in_row_blocks(q, k, v, mask, rows: int, extent=None) -> jax.Array:
    """`attend` computed `rows` rows at a time (rows divides B), sequentially; with `extent`,
    each block reads only the KV_BLOCK-slot blocks that one of its rows can see.

    Block j holds rows j, j + B/rows, j + 2B/rows, ...: each array is viewed as
    [rows, B/rows, ...] and the loop indexes the second axis, so a batch sharded in contiguous
    pieces over `rows` (or a divisor of it) devices stays sharded inside every block, and only
    the block at hand is copied out (never a transposed copy of the whole cache).
    """
    blocks = q.shape[0] // rows

    def block(x, j):
        return jax.lax.dynamic_index_in_dim(x.reshape(rows, blocks, *x.shape[1:]), j, axis=1,
                                            keepdims=False)

    def one_block(j, out):
        args = (block(q, j), block(k, j), block(v, j), block(mask, j))
        if extent is None:
            part = _attend_all(*args)
        else:
            part = _attend_prefix(*args, jnp.max(block(extent, j)))
        return jax.lax.dynamic_update_index_in_dim(out, part, j, axis=1)

    out = jnp.zeros((rows, blocks, *q.shape[1:]), q.dtype)
    return jax.lax.fori_loop(0, blocks, one_block, out).reshape(q.shape)


# Slots per step of `_attend_prefix`; windows of rollouts are multiples of it.
KV_BLOCK = 256


def _attend_prefix(q, k, v, mask, extent) -> jax.Array:
    """`_attend_all` over slots [0, extent) only (extent: a scalar, mask False beyond it), in
    KV_BLOCK-slot steps with a running softmax: a row's old cache and its chunk's causal part
    are read once, and the slots past every row's end not at all."""
    b, t, h, d = q.shape
    kvh, slots = k.shape[1], k.shape[3]
    g = h // kvh
    q = _grouped_queries(q, kvh) * (1.0 / math.sqrt(d))

    def step(i, carry):
        top, total, acc = carry  # [b, kvh, g*t] (twice), [b, kvh, g*t, d]
        # The last block of a window that KV_BLOCK does not divide starts early; its slots
        # before i * KV_BLOCK were counted by the block before.
        first = jnp.minimum(i * KV_BLOCK, slots - KV_BLOCK)
        keys = jax.lax.dynamic_slice_in_dim(k, first, KV_BLOCK, axis=3)
        values = jax.lax.dynamic_slice_in_dim(v, first, KV_BLOCK, axis=2)
        seen = jax.lax.dynamic_slice_in_dim(mask, first, KV_BLOCK, axis=2)
        seen &= (first + jnp.arange(KV_BLOCK) >= i * KV_BLOCK)[None, None]
        scores = jnp.einsum("bkqd,bkds->bkqs", q, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(seen[:, None, None], scores.reshape(b, kvh, g, t, -1), MASK_VALUE)
        scores = scores.reshape(b, kvh, g * t, -1)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
        probs = jnp.exp(scores - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(probs, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), values,
                                                    preferred_element_type=jnp.float32)
        return new_top, total, acc

    init = (jnp.full((b, kvh, g * t), MASK_VALUE, jnp.float32), jnp.zeros((b, kvh, g * t), jnp.float32),
            jnp.zeros((b, kvh, g * t, d), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, -(-extent // KV_BLOCK), step, init)
    return _ungrouped((acc / total[..., None]).astype(v.dtype), t)


def _grouped_queries(q: jax.Array, kvh: int) -> jax.Array:
    """q [B, T, H, D] → [B, KVH, G*T, D]: each KV head's queries as one matrix, so both
    products are plain batched matmuls over (row, kv head); XLA's CPU dot is several times
    slower on the 5-D forms."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, -1, d)


def _ungrouped(out: jax.Array, t: int) -> jax.Array:
    """The inverse of _grouped_queries: [B, KVH, G*T, D] → [B, T, H, D]."""
    b, kvh, _, d = out.shape
    return out.reshape(b, kvh, -1, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, d)


def _attend_all(q, k, v, mask) -> jax.Array:
    b, t, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    scores = jnp.einsum("bkqd,bkds->bkqs", _grouped_queries(q, kvh), k,
                        preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores.reshape(b, kvh, g, t, -1), mask[:, None, None], d)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, kvh, g * t, -1).astype(v.dtype), v)
    return _ungrouped(out, t)


def _masked_softmax(scores: jax.Array, mask: jax.Array, head_dim: int) -> jax.Array:
    """softmax(scores / sqrt(head_dim)) over the last axis where mask (broadcast) is True."""
    scores = jnp.where(mask, scores * (1.0 / math.sqrt(head_dim)), MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)
