"""A per-sequence KV cache that chunks of any length can be appended to.

Each row (sequence) writes into its own slots from `length[b]` on, so rows advance
independently: a prompt, then generated tokens, then an observation of a different length
per row, then more generated tokens — nothing is ever recomputed. `valid[b, s]` marks the
slots that hold real tokens; attention reads only those, so left padding in a prompt and
right padding in an appended chunk cost slots but change nothing.

Slot order is time order within a row, so "slot s is not in the future of the query at
slot q" is simply `s <= q`.

Layouts (`KVCache.layout`, fixed by the attention policy that reads the cache, see
`models.attention`): values are [B, KVH, S, D] in both; keys are
  "cpu":   [B, KVH, D, S], transposed, so that a decode step's q·K on a CPU is a
           vector-matrix product along contiguous slots (XLA's CPU dot ran it 1.3-2x faster
           than any form over keys [S, D]; benchmarks/README.md, "Rollout");
  "heads": [B, KVH, S, D], the layout the GPU/TPU kernels read: per (row, KV head) a
           contiguous [S, D] matrix whose key blocks they fetch as whole tiles.
Code outside models/ never indexes the key arrays itself: it uses `window`,
`merge_window`, `repeat` and row gathers on the leading axis, which every layout keeps.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from searchr1_jax.models.kernels.common import Visibility

LAYOUTS = ("cpu", "heads")
# Slot axis of the key arrays per layout (values: always axis 2).
KEY_SLOT_AXIS = {"cpu": 3, "heads": 2}
VALUE_SLOT_AXIS = 2


def keys_in_layout(k: jax.Array, layout: str) -> jax.Array:
    """Keys of a chunk as projected, [B, C, KVH, D], in the cache's layout."""
    return jnp.transpose(k, (0, 2, 3, 1) if layout == "cpu" else (0, 2, 1, 3))


def values_in_layout(v: jax.Array) -> jax.Array:
    """Values of a chunk as projected, [B, C, KVH, D] → [B, KVH, C, D]."""
    return jnp.swapaxes(v, 1, 2)


def key_axes(layout: str) -> tuple[str, ...]:
    """Logical axis names of a key array (for sharding rules)."""
    if layout == "cpu":
        return ("batch", "act_kv_heads", "head_dim", "length")
    return ("batch", "act_kv_heads", "length", "head_dim")


VALUE_AXES = ("batch", "act_kv_heads", "length", "head_dim")


@flax.struct.dataclass
class KVCache:
    """keys: one array per layer in `layout` (module doc); values: one [B, KVH, S, D] array
    per layer; valid: [B, S] bool; length: [B] int32."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    length: jax.Array
    layout: str = flax.struct.field(pytree_node=False, default="cpu")

    @classmethod
    def create(cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int,
               head_dim: int, dtype, layout: str = "cpu") -> "KVCache":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown KV cache layout {layout!r} (one of {LAYOUTS})")
        key_shape = ((batch, num_kv_heads, head_dim, capacity) if layout == "cpu"
                     else (batch, num_kv_heads, capacity, head_dim))
        value_shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            keys=tuple(jnp.zeros(key_shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(value_shape, dtype) for _ in range(num_layers)),
            valid=jnp.zeros((batch, capacity), bool),
            length=jnp.zeros((batch,), jnp.int32),
            layout=layout,
        )

    @property
    def key_slot_axis(self) -> int:
        return KEY_SLOT_AXIS[self.layout]

    def window(self, width: int) -> "KVCache":
        """The cache restricted to slots [0, width) (lengths unchanged)."""
        def first(x, axis):
            return jax.lax.slice_in_dim(x, 0, width, axis=axis)

        return self.replace(keys=tuple(first(k, self.key_slot_axis) for k in self.keys),
                            values=tuple(first(v, VALUE_SLOT_AXIS) for v in self.values),
                            valid=self.valid[:, :width])

    def merge_window(self, part: "KVCache") -> "KVCache":
        """This cache with its first slots replaced by `part` (a `window` of it, updated),
        and part's lengths."""
        def put(whole, piece, axis):
            return jax.lax.dynamic_update_slice_in_dim(whole, piece, 0, axis=axis)

        return self.replace(
            keys=tuple(put(k, p, self.key_slot_axis) for k, p in zip(self.keys, part.keys)),
            values=tuple(put(v, p, VALUE_SLOT_AXIS) for v, p in zip(self.values, part.values)),
            valid=put(self.valid, part.valid, 1), length=part.length)

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
    """[B, C, S] bool: query j of the chunk (at slot start+j) sees valid slots up to its own
    (`Visibility.for_chunk` written out)."""
    return Visibility.for_chunk(valid_after, start, chunk_len).dense()
