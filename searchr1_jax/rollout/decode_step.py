"""One decode step (one token per row) over a head-major KV cache.

`Decoder.extend` keeps keys/values as [B, S, KVH, D]; attention wants the heads before the
slots, so XLA transposes the whole cache of every layer at every step, which on CPU costs
more than the attention itself. The decode loop therefore converts its window of the cache
to [B, KVH, S, D] once per turn and runs this step, which is `Decoder.extend` for a
one-token chunk computed with the decoder's own submodules (norms, projections with RoPE
and q/k norms, MLP, LM head), only with that layout. The rollout tests check it against
full-context recomputation.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from searchr1_jax.models.decoder import Decoder
from searchr1_jax.models.kv_cache import KVCache
from searchr1_jax.models.layers import MASK_VALUE, rope_inverse_frequencies


@flax.struct.dataclass
class HeadMajorCache:
    """keys/values: one [B, KVH, S, D] array per layer; valid [B, S] bool; length [B] int32."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    length: jax.Array

    @classmethod
    def from_cache(cls, cache: KVCache) -> "HeadMajorCache":
        return cls(keys=tuple(jnp.swapaxes(k, 1, 2) for k in cache.keys),
                   values=tuple(jnp.swapaxes(v, 1, 2) for v in cache.values),
                   valid=cache.valid, length=cache.length)

    def to_cache(self) -> KVCache:
        return KVCache(keys=tuple(jnp.swapaxes(k, 1, 2) for k in self.keys),
                       values=tuple(jnp.swapaxes(v, 1, 2) for v in self.values),
                       valid=self.valid, length=self.length)


def _write_slot(buffer: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:
    """buffer [B, KVH, S, D] with new [B, KVH, D] written at slot[b] of each row."""
    return jax.vmap(lambda row, piece, s: jax.lax.dynamic_update_slice_in_dim(
        row, piece[:, None, :].astype(row.dtype), s, axis=1))(buffer, new, slot)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, H, D]; k, v [B, KVH, S, D]; mask [B, S] → [B, H, D] (float32 scores)."""
    b, h, d = q.shape
    kvh = k.shape[1]
    q = q.reshape(b, kvh, h // kvh, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :], scores * (1.0 / math.sqrt(d)), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, h, d)


def decode_step(model: Decoder, tokens: jax.Array, active: jax.Array, cache: HeadMajorCache):
    """Append one token per row → (logits [B, V] float32, cache).

    tokens [B] int32; active [B] bool: inactive rows neither advance nor become valid (their
    scratch slot at `length` is overwritten, as a padding token of `Decoder.extend` would).
    """
    trunk = model.model
    slots = jnp.arange(cache.valid.shape[1], dtype=jnp.int32)
    at_slot = slots[None, :] == cache.length[:, None]
    positions = jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)[:, None]
    valid = cache.valid | (at_slot & active[:, None])
    sees = valid & (slots[None, :] <= cache.length[:, None])
    inv_freq = rope_inverse_frequencies(trunk.head_dim, trunk.rope)
    x = jnp.take(trunk.embed_tokens[...], tokens[:, None], axis=0).astype(trunk.dtype)
    keys, values = [], []
    for layer, layer_keys, layer_values in zip(trunk.layers, cache.keys, cache.values):
        q, k, v = layer.self_attn.project(layer.input_layernorm(x), positions, inv_freq)
        layer_keys = _write_slot(layer_keys, k[:, 0], cache.length)
        layer_values = _write_slot(layer_values, v[:, 0], cache.length)
        attn = _attend_one(q[:, 0], layer_keys, layer_values, sees)
        x = x + layer.self_attn.output(attn[:, None])
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        keys.append(layer_keys)
        values.append(layer_values)
    logits = model.logits(trunk.norm(x))[:, 0]
    new_cache = HeadMajorCache(keys=tuple(keys), values=tuple(values), valid=valid,
                               length=cache.length + active.astype(jnp.int32))
    return logits, new_cache
