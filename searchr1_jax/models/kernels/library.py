"""Library attention kernels for training rows (no cache): splash attention on TPU and
`jax.nn.dot_product_attention` (cuDNN's fused attention) on GPU.

Both take the projections' layout, q [B, T, H, D] and k, v [B, T, KVH, D], with the
visibility of training rows (`Visibility.for_sequences`: q_slot = slot index, the same
segments for queries and keys). Both handle GQA without repeating KV heads.

Splash: segment ids plus a causal mask, computed inside the kernel from two [T] vectors per
row; blocks that the causal mask hides are skipped. Its segment rule has no wildcard, so a
padding query (segment 0) attends to the padding keys before it rather than to the real
ones: its output differs from the other implementations', and is never used (finite).
cuDNN: `jax.nn.dot_product_attention` in this jax version takes no segment ids, so packed
and padded rows pass the dense mask [B, 1, T, T] (cuDNN reads it as an additive bias,
T² bytes per row instead of the H·T² float32 scores of the naive path), with is_causal so
that it skips the upper triangle.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from searchr1_jax.models.kernels.common import Visibility, round_up

SPLASH_BLOCK = 512


def splash_attention(q, k, v, vis: Visibility, *, block: int = SPLASH_BLOCK,
                     interpret: bool | None = None) -> jax.Array:
    """Splash attention of training rows → [B, T, H, D] (float32 softmax inside)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    # Splash's blocks are multiples of 128 slots; pad T to whole blocks (padded slots get
    # segment -1, seen by no real query).
    block = min(block, round_up(t, 128))
    t_pad = round_up(t, block)
    segment = vis.q_segment.astype(jnp.int32)
    if t_pad != t:
        pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment = jnp.pad(segment, ((0, 0), (0, t_pad - t)), constant_values=-1)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((t_pad, t_pad)) for _ in range(g)])
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    # Splash scales nothing: the 1/sqrt(D) goes on the queries. One MQA kernel call per
    # (row, KV head), its G query heads against the head's keys: [G, T, D] × [T, D].
    q = (q.astype(jnp.float32) * (1.0 / np.sqrt(d))).astype(q.dtype)
    q = q.reshape(b, t_pad, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, T, D]

    def one_row(q_row, k_row, v_row, segment_row):
        ids = splash.SegmentIds(q=segment_row, kv=segment_row)
        return jax.vmap(functools.partial(kernel, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, segment)  # [B, KVH, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, h, d)[:, :t]


def cudnn_attention(q, k, v, vis: Visibility, *, implementation: str | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention` of training rows → [B, T, H, D]. implementation:
    "cudnn" (default on a GPU) or "xla" (elsewhere: the same call, unfused, for tests)."""
    if implementation is None:
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=vis.dense()[:, None], is_causal=True,
                                        implementation=implementation)
