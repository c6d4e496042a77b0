"""What every attention implementation shares: which keys a query may see (`Visibility`),
the grouped-query row layout of the kernels, and the online-softmax step of one key block.

Visibility rule (one rule for training rows, prefill, appended chunks and decode steps):
query t of row b sees key slot s iff
    s <= q_slot[b, t]                                   (no slot from its future)
    and kv_segment[b, s] != 0                            (the slot holds a real token)
    and (q_segment[b, t] == 0 or kv_segment[b, s] == q_segment[b, t])   (its own sequence)
A query whose segment is 0 (padding in a training row, or any query of an appended chunk)
sees every real slot up to its own; `Decoder`'s dense masks (`causal_padding_mask`,
`chunk_attention_mask`) are this rule written out. Slots are in time order, so q_slot is
non-decreasing along T; the kernels rely on it to skip key blocks.

Kernel row layout: the H = KVH·G query heads of a token are grouped under their KV head, so
each KV head's queries form one matrix of rows r = t·G + g ([B, KVH, T·G, D]) and a block
of rows is multiplied with a block of keys read once for all G heads (no repeated KV heads).
Each row carries its token's slot and segment, so a block of rows may straddle tokens and G
need not be a power of two.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# Large finite negative (as layers.MASK_VALUE): masked scores never produce inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@flax.struct.dataclass
class Visibility:
    """The keys each query sees (module doc). q_segment, q_slot: [B, T] int32;
    kv_segment: [B, S] int32. mask: optional dense [B, T, S] bool, the same rule written out,
    attached for implementations that read it (`with_dense`)."""

    q_segment: jax.Array
    kv_segment: jax.Array
    q_slot: jax.Array
    mask: jax.Array | None = None

    # The constructors also write the rule out densely for their own case, in the fewest
    # operations; implementations that do not read it drop it (`without_dense`), and XLA
    # then never computes it.
    @classmethod
    def for_sequences(cls, attention_mask: jax.Array) -> "Visibility":
        """Training/scoring rows: attention_mask [B, T], 0 on padding, else the id of the
        packed sequence of each token (a 0/1 mask is one sequence per row)."""
        segment = attention_mask.astype(jnp.int32)
        t = segment.shape[1]
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment.shape)
        causal = jnp.tril(jnp.ones((t, t), bool))
        same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, :, None] == 0)
        mask = causal[None] & (segment > 0)[:, None, :] & same
        return cls(q_segment=segment, kv_segment=segment, q_slot=slots, mask=mask)

    @classmethod
    def for_chunk(cls, valid_after: jax.Array, start: jax.Array, chunk_len: int) -> "Visibility":
        """A chunk of chunk_len queries written at slots start[b] … of a cache whose valid
        slots (after the write) are valid_after [B, S]: each query sees valid slots up to its
        own, padding queries included."""
        b = valid_after.shape[0]
        q_slot = start[:, None].astype(jnp.int32) + jnp.arange(chunk_len, dtype=jnp.int32)[None, :]
        slots = jnp.arange(valid_after.shape[1], dtype=jnp.int32)
        mask = valid_after[:, None, :] & (slots[None, None, :] <= q_slot[:, :, None])
        return cls(q_segment=jnp.zeros((b, chunk_len), jnp.int32),
                   kv_segment=valid_after.astype(jnp.int32), q_slot=q_slot, mask=mask)

    def dense(self) -> jax.Array:
        """The rule as a [B, T, S] bool mask (the attached one, if any)."""
        if self.mask is not None:
            return self.mask
        return self.rule_dense()

    def rule_dense(self) -> jax.Array:
        """The rule as a [B, T, S] bool mask, computed from the vectors."""
        slots = jnp.arange(self.kv_segment.shape[1], dtype=jnp.int32)
        kv = self.kv_segment[:, None, :]
        q = self.q_segment[:, :, None]
        return ((slots[None, None, :] <= self.q_slot[:, :, None]) & (kv != 0)
                & ((q == 0) | (kv == q)))

    def with_dense(self) -> "Visibility":
        """The same visibility with its dense mask attached (computed once, for all layers)."""
        return self.replace(mask=self.dense())

    def without_dense(self) -> "Visibility":
        return self.replace(mask=None)


def grouped_rows(q: jax.Array, kvh: int) -> jax.Array:
    """q [B, T, H, D] → [B, KVH, T·G, D], row t·G + g holding head kvh·G + g of token t."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, -1, d)


def ungrouped_rows(rows: jax.Array, t: int) -> jax.Array:
    """The inverse of grouped_rows: [B, KVH, T·G, D] → [B, T, H, D]."""
    b, kvh, _, d = rows.shape
    return rows.reshape(b, kvh, t, -1, d).transpose(0, 2, 1, 3, 4).reshape(b, t, -1, d)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def kernel_operands(q, k, v, vis: Visibility, block_rows: int, block_kv: int):
    """The arrays the kernels read, padded to whole blocks.

    q [B, T, H, D]; k, v [B, KVH, S, D]. Returns (rows [B, KVH, R, D], row_slot [B, R, 1],
    row_segment [B, R, 1], kv_segment [B, 1, S'], k, v [B, KVH, S', D]) with R a multiple of
    block_rows and S' of block_kv. Padding rows have slot -1 (they see nothing); padding
    slots have segment 0 (nobody sees them). K and V are copied only when S is not already
    a multiple of block_kv (cache windows and training lengths usually are).
    """
    b, t, h, _ = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    rows = grouped_rows(q, kvh)
    r = t * g
    r_pad, s_pad = round_up(r, block_rows) - r, round_up(s, block_kv) - s
    row_slot = jnp.repeat(vis.q_slot.astype(jnp.int32), g, axis=1)
    row_segment = jnp.repeat(vis.q_segment.astype(jnp.int32), g, axis=1)
    kv_segment = vis.kv_segment.astype(jnp.int32)
    if r_pad:
        rows = jnp.pad(rows, ((0, 0), (0, 0), (0, r_pad), (0, 0)))
        row_slot = jnp.pad(row_slot, ((0, 0), (0, r_pad)), constant_values=-1)
        row_segment = jnp.pad(row_segment, ((0, 0), (0, r_pad)))
    if s_pad:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, s_pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, s_pad), (0, 0)))
        kv_segment = jnp.pad(kv_segment, ((0, 0), (0, s_pad)))
    return rows, row_slot[..., None], row_segment[..., None], kv_segment[:, None, :], k, v


def block_visible(row_slot, row_segment, kv_segment, first_slot: jax.Array, block_kv: int):
    """[BR, BK] bool: which of a key block's slots (first_slot …, kv_segment [1, BK]) each
    row (row_slot, row_segment [BR, 1]) sees."""
    slots = first_slot + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    return ((slots <= row_slot) & (kv_segment != 0)
            & ((row_segment == 0) | (kv_segment == row_segment)))


def dot(a, b, contract: tuple[int, int]) -> jax.Array:
    """A 2-D product contracting axis contract[0] of a with axis contract[1] of b, float32
    out. HIGHEST precision: float32 operands are multiplied in full float32 (Triton would
    use TF32 by default); bfloat16 products are exact either way."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST)


def block_scores(rows, keys, scale: float) -> jax.Array:
    """rows [BR, D] · keys [BK, D]ᵀ in float32, scaled: [BR, BK]."""
    return dot(rows, keys, (1, 1)) * scale


def online_softmax_step(scores, visible, values, top, total, acc):
    """Fold one key block into a running softmax.

    scores, visible [BR, BK]; values [BK, D]; top, total [BR, 1] (running max and sum of
    exponentials), acc [BR, D] (unnormalised output), all float32. Masked entries add
    nothing (not even exp(0)), so a row that sees no key at all keeps total = 0.
    """
    scores = jnp.where(visible, scores, MASK_VALUE)
    new_top = jnp.maximum(top, jnp.max(scores, axis=1, keepdims=True))
    probs = jnp.where(visible, jnp.exp(scores - new_top), 0.0)
    rescale = jnp.exp(top - new_top)
    total = total * rescale + jnp.sum(probs, axis=1, keepdims=True)
    acc = acc * rescale + dot(probs.astype(values.dtype), values, (1, 0))
    return new_top, total, acc


def finish_softmax(top, total, acc):
    """(output [BR, D] float32, log-sum-exp [BR, 1]) of a running softmax; a row that saw
    no key gets output 0 and log-sum-exp MASK_VALUE (its probabilities are all 0)."""
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return acc / safe, jnp.where(seen, top + jnp.log(safe), MASK_VALUE)
