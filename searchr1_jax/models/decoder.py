"""The causal decoder (Qwen2/2.5, Qwen3, Llama 3.x) and the value model built on its trunk.

Attribute names mirror transformers' module tree (`model.layers[i].self_attn.q_proj`, …)
so the HF key map in `hf_io.py` reads as a plain table.

Call modes of `Decoder`:
  * `model(tokens, attention_mask)` → logits [B, T, V] (training / scoring);
  * `model.extend(tokens, token_mask, cache)` → (logits [B, C, V], cache): prefill a prompt
    or append any chunk (one decoded token, an observation) to each row's cache;
    `model.extend_hidden` does the same and returns final hidden states instead of logits.

Attention goes through `models.attention`: the model's `attention` policy ("auto": by
backend) names the implementation of each call and the cache layout `init_cache` makes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from searchr1_jax.models import attention
from searchr1_jax.models.config import ModelConfig
from searchr1_jax.models.kernels.common import Visibility
from searchr1_jax.models.kv_cache import (VALUE_SLOT_AXIS, KEY_SLOT_AXIS, KVCache, chunk_extent,
                                          chunk_positions, keys_in_layout, values_in_layout,
                                          write_rows)
from searchr1_jax.models.layers import Linear, RMSNorm, apply_rope, rope_inverse_frequencies


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] positions counting only real tokens (left padding gets position 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T, T] bool: query t sees real keys s <= t of its own sequence.

    attention_mask [B, T]: 0 for padding, else the id of the packed sequence the token belongs
    to (a plain 0/1 mask is one sequence per row). Packed sequences never see each other; a
    padding query sees every real key before it (its output is never used).
    """
    return Visibility.for_sequences(attention_mask).dense()


def set_attention(model: nnx.Module, policy: str) -> None:
    """Switch a Decoder or ValueModel to another attention policy (models/attention.py),
    e.g. after `load_hf`. Caches made before keep their layout and no longer fit."""
    attention.policy(policy)  # an unknown name fails here, not at the first call
    model.model.attention = policy


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(h, cfg.num_heads * d, axes=("embed", "q_heads"), use_bias=cfg.qkv_bias, **lin)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **lin)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **lin)
        self.o_proj = Linear(cfg.num_heads * d, h, axes=("q_heads", "embed"), use_bias=cfg.o_bias, **lin)
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(d, **norm) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, **norm) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d

    def project(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array):
        """x [B, T, E] → q [B, T, H, D], k and v [B, T, KVH, D], RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def output(self, attn: jax.Array) -> jax.Array:
        b, t = attn.shape[:2]
        return self.o_proj(attn.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **lin)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **lin)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, vis, inv_freq, kv=None, start=None, *, implementation: str,
                 layout: str = "cpu"):
        """One block. Without `kv`: attend within x. With kv = (keys, values) in the cache's
        `layout` (kv_cache): write this chunk's keys/values at slots `start` and attend over
        the whole buffer. vis: the queries' `Visibility`; implementation: the attention
        implementation (models/attention.py). Returns (x, kv) with kv the updated buffers
        (or None)."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), positions, inv_freq)
        if kv is None:
            out = attention.attend_sequence(q, k, v, vis, implementation)
        else:
            kv = (write_rows(kv[0], keys_in_layout(k, layout), start, slot_axis=KEY_SLOT_AXIS[layout]),
                  write_rows(kv[1], values_in_layout(v), start, slot_axis=VALUE_SLOT_AXIS))
            # A chunk written at slots start … start+T-1 sees no slot past its own.
            out = attention.attend_cache(q, *kv, vis, implementation, extent=start + x.shape[1])
        x = x + self.self_attn.output(out)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Transformer(nnx.Module):
    """Embeddings, decoder layers and final norm: tokens → hidden states [B, T, E]."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, remat: bool = False,
                 attention: str = "auto"):
        emb = 0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32)
        self.embed_tokens = nnx.Param(emb.astype(param_dtype), logical_axes=("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.remat = remat
        self.head_dim = cfg.head_dim
        self.rope = cfg.rope
        self.attention = attention  # a policy name of models/attention.py

    def __call__(self, tokens, positions, vis: Visibility, cache: KVCache | None = None, start=None):
        """tokens, positions [B, T] → (hidden [B, T, E], (keys, values) of the updated cache,
        empty without one). vis: which slots each query sees."""
        inv_freq = rope_inverse_frequencies(self.head_dim, self.rope)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)
        policy = attention.policy(self.attention)
        implementation = policy.implementation(attention.case_of(tokens.shape[1], cache is not None))
        if cache is not None and cache.layout != policy.layout:
            raise ValueError(f"a {cache.layout!r}-layout KV cache cannot serve attention policy "
                             f"{policy.name!r} (layout {policy.layout!r}): make it with init_cache")
        vis = attention.prepare(vis, implementation)  # one dense mask for all layers, if needed
        layer_args = dict(implementation=implementation, layout=policy.layout)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            # Remat saves activations for a backward pass; a cached call (rollout) never has one,
            # and nnx.remat inside the rollout's scan would trace the module at a foreign level.
            if self.remat and cache is None:
                call = nnx.remat(lambda lyr, h, kv_: lyr(h, positions, vis, inv_freq, kv_, start,
                                                         **layer_args))
                x, kv = call(layer, x, kv)
            else:
                x, kv = layer(x, positions, vis, inv_freq, kv, start, **layer_args)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        return self.norm(x), (tuple(new_keys), tuple(new_values))


class Decoder(nnx.Module):
    """Causal LM. Parameters in `param_dtype`, matmuls in `dtype`, logits always float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, attention: str = "auto"):
        self.config = cfg
        self.model = Transformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat,
                                 attention=attention)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                               use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., E] → float32 logits [..., V]."""
        if self.lm_head is None:
            emb = self.model.embed_tokens[...].astype(hidden.dtype)
            out = jnp.einsum("...e,ve->...v", hidden, emb, preferred_element_type=jnp.float32)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def hidden_states(self, tokens, attention_mask=None, positions=None) -> jax.Array:
        """Final-norm hidden states [B, T, E] of a full (left- or right-padded) sequence."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        hidden, _ = self.model(tokens, positions, Visibility.for_sequences(attention_mask))
        return hidden

    def __call__(self, tokens, attention_mask=None, positions=None) -> jax.Array:
        """tokens, attention_mask: int32 [B, T] → logits float32 [B, T, V].

        Positions default to the count of real tokens before each one, so left padding
        works; logits at padding positions are meaningless.
        """
        return self.logits(self.hidden_states(tokens, attention_mask, positions))

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        """An empty cache in the layout of the model's attention policy."""
        cfg = self.config
        return KVCache.create(num_layers=cfg.num_layers, batch=batch, capacity=capacity,
                              num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                              dtype=dtype or self.model.dtype,
                              layout=attention.policy(self.model.attention).layout)

    def extend(self, tokens, token_mask, cache: KVCache):
        """Append a chunk to every row's cache and return its logits.

        tokens, token_mask: int32 [B, C]; token_mask = 0 marks padding (left or right).
        Row b's chunk is written at slots cache.length[b] …; each row needs
        cache.length + C <= capacity. Returns (logits float32 [B, C, V], updated cache).
        """
        hidden, new_cache = self.extend_hidden(tokens, token_mask, cache)
        return self.logits(hidden), new_cache

    def extend_hidden(self, tokens, token_mask, cache: KVCache):
        """`extend` returning final hidden states [B, C, E] instead of logits, so a caller can
        project only the positions whose next token it needs (a [B, C, V] logits array of a
        long chunk does not fit at a 150k vocabulary)."""
        start = cache.length
        positions = chunk_positions(cache.valid, token_mask)
        valid = write_rows(cache.valid, token_mask.astype(bool), start)
        vis = Visibility.for_chunk(valid, start, tokens.shape[1])
        hidden, (keys, values) = self.model(tokens, positions, vis, cache, start)
        return hidden, cache.replace(keys=keys, values=values, valid=valid,
                                     length=start + chunk_extent(token_mask))


class ValueModel(nnx.Module):
    """The decoder trunk with a scalar head: tokens → values float32 [B, T]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, attention: str = "auto"):
        self.config = cfg
        self.model = Transformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat,
                                 attention=attention)
        self.value_head = Linear(cfg.hidden_size, 1, axes=("embed", "scalar"), use_bias=True,
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @classmethod
    def from_decoder(cls, decoder: Decoder, *, rngs: nnx.Rngs, dtype=None, param_dtype=None,
                     remat: bool = False) -> "ValueModel":
        """A critic whose trunk is a copy of `decoder`'s weights and whose head is fresh."""
        trunk_state = nnx.state(decoder.model, nnx.Param)
        param_dtype = param_dtype or jax.tree.leaves(trunk_state)[0].dtype
        critic = nnx.eval_shape(lambda: cls(decoder.config, rngs=nnx.Rngs(0), remat=remat,
                                            dtype=dtype or decoder.model.dtype,
                                            param_dtype=param_dtype,
                                            attention=decoder.model.attention))
        head = Linear(decoder.config.hidden_size, 1, axes=("embed", "scalar"), use_bias=True,
                      dtype=dtype or decoder.model.dtype, param_dtype=param_dtype, rngs=rngs)
        # Copies, not aliases: the policy's buffers may be donated by its own update step.
        nnx.update(critic.model, jax.tree.map(lambda x: jnp.array(x, dtype=param_dtype, copy=True),
                                              trunk_state))
        critic.value_head = head
        return critic

    def __call__(self, tokens, attention_mask=None, positions=None) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        hidden, _ = self.model(tokens, positions, Visibility.for_sequences(attention_mask))
        return self.value_head(hidden)[..., 0].astype(jnp.float32)
