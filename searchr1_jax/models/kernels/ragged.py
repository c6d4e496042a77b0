"""Ragged attention over a KV cache in Pallas, written for TPUs (Mosaic lowering): decode
steps and appended chunks read only the key blocks their rows can see.

The grid runs over (row, KV head, block of query rows, key block). Before the kernel, each
(row, row block) gets the range of key blocks [first, end) that can hold a slot it sees:
from the row's first real slot to the block of its last query's slot. Both are handed to
the kernel as scalar-prefetch operands, and the key/value index maps clamp the key-block
index into that range: Pallas' TPU pipeline fetches a block only when its index changes,
so blocks outside the range are never copied from HBM, and the kernel skips their
compute (`pl.when`). A decode step of a row holding 700 slots in a 2,048-slot window reads
two 512-slot blocks, not four. The running softmax lives in VMEM scratch across the key
blocks (the last grid axis is sequential).

Forward only: the rollout never differentiates through its cache, and training rows use
splash attention on TPU (`library.py`). Layouts as in `flash.py`. On a CPU the kernel runs
in Pallas' interpret mode (tests).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from searchr1_jax.models.kernels.common import (MASK_VALUE, Visibility, block_scores,
                                                block_visible, finish_softmax, kernel_operands,
                                                online_softmax_step, round_up, ungrouped_rows)


@dataclasses.dataclass(frozen=True)
class RaggedConfig:
    """block_rows: query rows per block (a multiple of 8; capped at the rows there are);
    block_kv: key slots per block (a multiple of 128 on a TPU)."""

    block_rows: int = 256
    block_kv: int = 512
    interpret: bool = False


def default_config(query_len: int, backend: str | None = None) -> RaggedConfig:
    """Bigger key blocks for decode (few rows, so each grid step must move more bytes to
    pay for its fixed cost); interpret mode with small blocks on a CPU."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return RaggedConfig(block_rows=8, block_kv=16, interpret=True)
    return RaggedConfig(block_rows=256, block_kv=512 if query_len == 1 else 256)


def block_ranges(row_slot, kv_segment, block_rows: int, block_kv: int, num_kv_blocks: int):
    """Per (row, row block), the key blocks [first, end) that may hold a visible slot, each
    flattened to [B · row blocks] int32. row_slot [B, R, 1]; kv_segment [B, 1, S]."""
    b, r = row_slot.shape[:2]
    last_slot = jnp.max(row_slot[..., 0].reshape(b, r // block_rows, block_rows), axis=-1)
    end = jnp.clip(last_slot // block_kv + 1, 0, num_kv_blocks)
    first_real = jnp.argmax(kv_segment[:, 0, :] != 0, axis=-1).astype(jnp.int32)
    first = jnp.broadcast_to((first_real // block_kv)[:, None], end.shape)
    return first.reshape(-1), end.reshape(-1)


def _kernel(first_ref, end_ref, rows_ref, slot_ref, segment_ref, kv_segment_ref, k_ref, v_ref,
            out_ref, top_ref, total_ref, acc_ref, *, scale: float, block_kv: int):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    at = b * pl.num_programs(2) + i

    @pl.when(j == 0)
    def _():
        top_ref[...] = jnp.full(top_ref.shape, MASK_VALUE, jnp.float32)
        total_ref[...] = jnp.zeros(total_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= first_ref[at]) & (j < end_ref[at]))
    def _():
        visible = block_visible(slot_ref[...], segment_ref[...], kv_segment_ref[...],
                                j * block_kv, block_kv)
        top, total, acc = online_softmax_step(block_scores(rows_ref[...], k_ref[...], scale),
                                              visible, v_ref[...], top_ref[...],
                                              total_ref[...], acc_ref[...])
        top_ref[...], total_ref[...], acc_ref[...] = top, total, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        out, _ = finish_softmax(top_ref[...], total_ref[...], acc_ref[...])
        out_ref[...] = out.astype(out_ref.dtype)


def ragged_attention(q, k, v, vis: Visibility, config: RaggedConfig | None = None) -> jax.Array:
    """Attention of q [B, T, H, D] over the cache k, v [B, KVH, S, D] under `vis` →
    [B, T, H, D]; a query that sees no key gets 0. Not differentiable (forward only)."""
    b, t, h, d = q.shape
    kvh = k.shape[1]
    config = config or default_config(t)
    block_rows = min(config.block_rows, round_up(t * (h // kvh), 8))
    # A key block that divides the window (rollout windows are multiples of 256 slots), so
    # that the cache is never padded, i.e. copied, for the call.
    bk = next((n for n in (config.block_kv, 256, 128) if n <= config.block_kv and k.shape[2] % n == 0),
              config.block_kv)
    rows, row_slot, row_segment, kv_segment, k, v = kernel_operands(q, k, v, vis, block_rows, bk)
    r, s = rows.shape[2], k.shape[2]
    num_row_blocks, num_kv_blocks = r // block_rows, s // bk
    first, end = block_ranges(row_slot, kv_segment, block_rows, bk, num_kv_blocks)

    def kv_block(b_, h_, i, j, first_ref, end_ref):
        at = b_ * num_row_blocks + i
        # Outside [first, end) the index repeats a neighbour's, so nothing new is fetched.
        return jnp.maximum(jnp.minimum(j, end_ref[at] - 1), first_ref[at])

    rows_spec = pl.BlockSpec((None, None, block_rows, d), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    meta_spec = pl.BlockSpec((None, block_rows, 1), lambda b_, h_, i, j, *_: (b_, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b_, h_, i, j, *refs: (b_, h_, kv_block(b_, h_, i, j, *refs), 0))
    segment_spec = pl.BlockSpec((None, 1, bk),
                                lambda b_, h_, i, j, *refs: (b_, 0, kv_block(b_, h_, i, j, *refs)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, kvh, num_row_blocks, num_kv_blocks),
        in_specs=[rows_spec, meta_spec, meta_spec, segment_spec, kv_spec, kv_spec],
        out_specs=rows_spec,
        scratch_shapes=[pltpu.VMEM((block_rows, 1), jnp.float32),
                        pltpu.VMEM((block_rows, 1), jnp.float32),
                        pltpu.VMEM((block_rows, d), jnp.float32)])
    out = pl.pallas_call(
        functools.partial(_kernel, scale=1.0 / math.sqrt(d), block_kv=bk),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(rows.shape, rows.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=config.interpret, name="ragged_attention",
    )(first, end, rows, row_slot, row_segment, kv_segment, k, v)
    return ungrouped_rows(out[:, :, :t * (h // kvh)], t)
