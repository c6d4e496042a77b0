"""A per-sequence KV cache that chunks of any length can be appended to.

Each row (sequence) writes into its own slots from `length[b]` on, so rows advance
independently: a prompt, then generated tokens, then an observation of a different length
per row, then more generated tokens — nothing is ever recomputed. `valid[b, s]` marks the
slots that hold real tokens; attention reads only those, so left padding in a prompt and
right padding in an appended chunk cost slots but change nothing.

Slot order is time order within a row, so "slot s is not in the future of the query at
slot q" is simply `s <= q`.

Keys and values are stored head-major, keys transposed: keys [B, KVH, D, S], values
[B, KVH, S, D]. Attention computes q·K over each head's slots and probs·V over them, and these
are the layouts both products read without a transpose; with keys [D, S] a decode step's q·K
is a vector-matrix product along contiguous slots, which XLA's CPU dot ran 1.3-2x faster than
any form over keys [S, D] (benchmarks/README.md, "Rollout").
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """keys: one [B, KVH, D, S] array per layer; values: one [B, KVH, S, D] array per layer;
    valid: [B, S] bool; length: [B] int32."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int,
               head_dim: int, dtype) -> "KVCache":
        key_shape = (batch, num_kv_heads, head_dim, capacity)
        value_shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            keys=tuple(jnp.zeros(key_shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(value_shape, dtype) for _ in range(num_layers)),
            valid=jnp.zeros((batch, capacity), bool),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times consecutively (row b → rows b*n … b*n+n-1)."""
        return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)


def write_rows(buffer: jax.Array, chunk: jax.Array, start: jax.Array, slot_axis: int = 1) -> jax.Array:
    """buffer [B, ...] with chunk [B, ...] written along `slot_axis` at slots start[b] …
    start[b]+C-1 of each row b (C: the chunk's size on that axis; other axes match).

    The caller guarantees start + C <= S (dynamic_update_slice would clamp otherwise).
    """
    def one_row(row, piece, s):
        return jax.lax.dynamic_update_slice_in_dim(row, piece, s, axis=slot_axis - 1)

    return jax.vmap(one_row)(buffer, chunk.astype(buffer.dtype), start)


def chunk_positions(valid: jax.Array, token_mask: jax.Array) -> jax.Array:
    """RoPE positions [B, C] of a chunk appended to rows whose cache validity is `valid`.

    A token's position is the number of real tokens before it in its row, so padding
    anywhere (left in prompts, right in observations) never shifts positions.
    """
    before = jnp.sum(valid, axis=-1, dtype=jnp.int32)[:, None]
    return jnp.maximum(before + jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


def chunk_extent(token_mask: jax.Array) -> jax.Array:
    """Slots a chunk consumes per row [B]: up to and including its last real token.

    Left padding (prompts) is kept, so the prompt's real tokens stay where they were written;
    trailing padding (observations shorter than the chunk) is given back, so the next write
    overwrites it.
    """
    c = token_mask.shape[1]
    idx = jnp.arange(1, c + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(token_mask.astype(bool), idx, 0), axis=-1)


def chunk_attention_mask(valid_after: jax.Array, start: jax.Array, chunk_len: int) -> jax.Array:
    """[B, C, S] bool: query j of the chunk (at slot start+j) sees valid slots up to its own."""
    slots = jnp.arange(valid_after.shape[1], dtype=jnp.int32)
    query_slot = start[:, None] + jnp.arange(chunk_len, dtype=jnp.int32)[None, :]
    return valid_after[:, None, :] & (slots[None, None, :] <= query_slot[:, :, None])
