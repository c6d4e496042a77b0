"""Flash attention in Pallas, written for GPUs (Triton lowering): forward and backward.

One program per (row, KV head, block of query rows) keeps its rows' running softmax in
registers and loops over key blocks read straight from HBM, only up to the block holding
the last slot its rows may see: causal training rows skip the future half, and a decode
step or an appended chunk reads its own row's used slots and nothing past them (there is
no window of padding slots to stream). Nothing of size T × S is ever written to memory.

Layouts: queries in the grouped row layout of `common` ([B, KVH, T·G, D]), keys and values
[B, KVH, S, D] (the accelerator cache layout), visibility as in `common.Visibility`.

Backward (training): the forward saves its output and the log-sum-exp of each row; one
kernel recomputes each row block's probabilities against the key blocks it sees and
accumulates dQ, another accumulates dK and dV per key block over the row blocks that can
see it (the G heads of a KV head are rows of one matrix, so their gradients sum there).
On a CPU the kernels run in Pallas' interpret mode (tests); that is for checking, not speed.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from searchr1_jax.models.kernels.common import (MASK_VALUE, Visibility, block_scores,
                                                block_visible, dot, finish_softmax,
                                                kernel_operands, ungrouped_rows,
                                                online_softmax_step)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static settings. block_rows: query rows (tokens × heads of a group) per program;
    block_kv: key slots per loop step; both powers of two ≥ 16 on a GPU (Triton tiles).
    num_warps / num_stages: Triton launch settings (ignored when interpreted)."""

    block_rows: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    interpret: bool = False

    def compiler_params(self):
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def default_config(rows: int, backend: str | None = None) -> FlashConfig:
    """Blocks for `rows` query rows per KV head (T · G); interpret mode (small blocks) on a
    CPU. A decode step has only G rows: its row block shrinks to the next power of two
    (at least 16, Triton's smallest product tile). Untuned: gpu.py's first run decides."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return FlashConfig(block_rows=16, block_kv=16, interpret=True)
    return FlashConfig(block_rows=min(64, max(16, 1 << max(0, rows - 1).bit_length())))


def flash_attention(q, k, v, vis: Visibility, config: FlashConfig | None = None) -> jax.Array:
    """Attention of q [B, T, H, D] over k, v [B, KVH, S, D] under `vis` → [B, T, H, D].

    Scores and softmax in float32; the products read q, k, v in their own dtype. A query
    that sees no key gets 0. Differentiable in q, k and v.
    """
    b, t, h, d = q.shape
    kvh = k.shape[1]
    config = config or default_config(t * (h // kvh))
    rows, row_slot, row_segment, kv_segment, k, v = kernel_operands(
        q, k, v, vis, config.block_rows, config.block_kv)
    out = _flash_rows(rows, k, v, row_slot, row_segment, kv_segment, (config, 1.0 / math.sqrt(d)))
    return ungrouped_rows(out[:, :, :t * (h // kvh)], t)


# -- forward ---------------------------------------------------------------------------------

def _forward_kernel(rows_ref, slot_ref, segment_ref, kv_segment_ref, k_ref, v_ref, out_ref,
                    lse_ref, *, scale: float, block_kv: int):
    rows = rows_ref[...]
    row_slot, row_segment = slot_ref[...], segment_ref[...]
    num_blocks = k_ref.shape[0] // block_kv
    # Slots only grow along the rows, so no row of this block sees past its last row's slot.
    end = jnp.minimum(jnp.max(row_slot) // block_kv + 1, num_blocks)

    def step(j, carry):
        first = pl.multiple_of(j * block_kv, block_kv)
        keys = k_ref[pl.ds(first, block_kv), :]
        visible = block_visible(row_slot, row_segment, kv_segment_ref[:, pl.ds(first, block_kv)],
                                first, block_kv)
        return online_softmax_step(block_scores(rows, keys, scale), visible,
                                   v_ref[pl.ds(first, block_kv), :], *carry)

    block_rows, d = rows.shape
    init = (jnp.full((block_rows, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((block_rows, 1), jnp.float32), jnp.zeros((block_rows, d), jnp.float32))
    out, lse = finish_softmax(*jax.lax.fori_loop(0, end, step, init))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def _row_specs(config: FlashConfig, d: int, s: int):
    """BlockSpecs of a (row, KV head, row block) grid: the row block's queries and metadata,
    and all of the row's keys and values (read block by block inside)."""
    br = config.block_rows
    return dict(
        rows=pl.BlockSpec((None, None, br, d), lambda b, h, i: (b, h, i, 0)),
        meta=pl.BlockSpec((None, br, 1), lambda b, h, i: (b, i, 0)),
        kv_segment=pl.BlockSpec((None, 1, s), lambda b, h, i: (b, 0, 0)),
        kv=pl.BlockSpec((None, None, s, d), lambda b, h, i: (b, h, 0, 0)),
        row_stat=pl.BlockSpec((None, None, br, 1), lambda b, h, i: (b, h, i, 0)),
    )


def _forward(rows, k, v, row_slot, row_segment, kv_segment, config: FlashConfig, scale: float):
    b, kvh, r, d = rows.shape
    s = k.shape[2]
    spec = _row_specs(config, d, s)
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, block_kv=config.block_kv),
        grid=(b, kvh, r // config.block_rows),
        in_specs=[spec["rows"], spec["meta"], spec["meta"], spec["kv_segment"], spec["kv"], spec["kv"]],
        out_specs=[spec["rows"], spec["row_stat"]],
        out_shape=[jax.ShapeDtypeStruct(rows.shape, rows.dtype),
                   jax.ShapeDtypeStruct((b, kvh, r, 1), jnp.float32)],
        compiler_params=config.compiler_params(), interpret=config.interpret,
        name="flash_forward",
    )(rows, row_slot, row_segment, kv_segment, k, v)


# -- backward --------------------------------------------------------------------------------

def _probabilities(rows, keys, scale, visible, lse):
    """The forward's softmax probabilities of one (row block, key block) pair, recomputed."""
    return jnp.where(visible, jnp.exp(block_scores(rows, keys, scale) - lse), 0.0)


def _dq_kernel(rows_ref, dout_ref, lse_ref, delta_ref, slot_ref, segment_ref, kv_segment_ref,
               k_ref, v_ref, dq_ref, *, scale: float, block_kv: int):
    rows, dout = rows_ref[...], dout_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    row_slot, row_segment = slot_ref[...], segment_ref[...]
    end = jnp.minimum(jnp.max(row_slot) // block_kv + 1, k_ref.shape[0] // block_kv)

    def step(j, dq):
        first = pl.multiple_of(j * block_kv, block_kv)
        keys = k_ref[pl.ds(first, block_kv), :]
        values = v_ref[pl.ds(first, block_kv), :]
        visible = block_visible(row_slot, row_segment, kv_segment_ref[:, pl.ds(first, block_kv)],
                                first, block_kv)
        probs = _probabilities(rows, keys, scale, visible, lse)
        dscores = probs * (dot(dout, values, (1, 1)) - delta)
        return dq + dot(dscores.astype(keys.dtype), keys, (1, 0))

    dq = jax.lax.fori_loop(0, end, step, jnp.zeros(rows.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(rows_ref, dout_ref, lse_ref, delta_ref, slot_ref, segment_ref, kv_segment_ref,
                k_ref, v_ref, dk_ref, dv_ref, *, scale: float, block_rows: int):
    keys, values = k_ref[...], v_ref[...]
    block_kv = keys.shape[0]
    first = pl.program_id(2) * block_kv
    kv_segment = kv_segment_ref[...]
    num_row_blocks = rows_ref.shape[0] // block_rows

    # The first row block with a row at or past this key block (slots only grow along rows);
    # the blocks before it see none of these keys.
    def before(i):
        return (i < num_row_blocks) & (
            jnp.max(slot_ref[pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows), :]) < first)

    begin = jax.lax.while_loop(before, lambda i: i + 1, jnp.int32(0))

    def step(i, carry):
        dk, dv = carry
        at = pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows)
        rows, dout = rows_ref[at, :], dout_ref[at, :]
        visible = block_visible(slot_ref[at, :], segment_ref[at, :], kv_segment, first, block_kv)
        probs = _probabilities(rows, keys, scale, visible, lse_ref[at, :])
        dv = dv + dot(probs.astype(dout.dtype), dout, (0, 0))
        dscores = probs * (dot(dout, values, (1, 1)) - delta_ref[at, :])
        dk = dk + dot(dscores.astype(rows.dtype), rows, (0, 0))
        return dk, dv

    zeros = jnp.zeros(keys.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(begin, num_row_blocks, step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(rows, k, v, row_slot, row_segment, kv_segment, out, lse, dout, config, scale):
    b, kvh, r, d = rows.shape
    s = k.shape[2]
    # delta = rowsum(dO ∘ O): the softmax Jacobian's correction term, one number per row.
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    spec = _row_specs(config, d, s)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_kv=config.block_kv),
        grid=(b, kvh, r // config.block_rows),
        in_specs=[spec["rows"], spec["rows"], spec["row_stat"], spec["row_stat"], spec["meta"],
                  spec["meta"], spec["kv_segment"], spec["kv"], spec["kv"]],
        out_specs=spec["rows"],
        out_shape=jax.ShapeDtypeStruct(rows.shape, rows.dtype),
        compiler_params=config.compiler_params(), interpret=config.interpret,
        name="flash_backward_dq",
    )(rows, dout, lse, delta, row_slot, row_segment, kv_segment, k, v)

    bk = config.block_kv
    all_rows = pl.BlockSpec((None, None, r, d), lambda b_, h, j: (b_, h, 0, 0))
    all_stats = pl.BlockSpec((None, None, r, 1), lambda b_, h, j: (b_, h, 0, 0))
    all_meta = pl.BlockSpec((None, r, 1), lambda b_, h, j: (b_, 0, 0))
    kv_block = pl.BlockSpec((None, None, bk, d), lambda b_, h, j: (b_, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_rows=config.block_rows),
        grid=(b, kvh, s // bk),
        in_specs=[all_rows, all_rows, all_stats, all_stats, all_meta, all_meta,
                  pl.BlockSpec((None, 1, bk), lambda b_, h, j: (b_, 0, j)), kv_block, kv_block],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=config.compiler_params(), interpret=config.interpret,
        name="flash_backward_dkv",
    )(rows, dout, lse, delta, row_slot, row_segment, kv_segment, k, v)
    return dq, dk, dv


# -- differentiable wrapper ------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash_rows(rows, k, v, row_slot, row_segment, kv_segment, static):
    config, scale = static
    return _forward(rows, k, v, row_slot, row_segment, kv_segment, config, scale)[0]


def _flash_rows_fwd(rows, k, v, row_slot, row_segment, kv_segment, static):
    config, scale = static
    out, lse = _forward(rows, k, v, row_slot, row_segment, kv_segment, config, scale)
    return out, (rows, k, v, row_slot, row_segment, kv_segment, out, lse)


def _flash_rows_bwd(static, residuals, dout):
    config, scale = static
    rows, k, v, row_slot, row_segment, kv_segment, out, lse = residuals
    dq, dk, dv = _backward(rows, k, v, row_slot, row_segment, kv_segment, out, lse, dout,
                           config, scale)
    return dq, dk, dv, None, None, None


_flash_rows.defvjp(_flash_rows_fwd, _flash_rows_bwd)
