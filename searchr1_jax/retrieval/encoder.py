"""Flax NNX BERT-family text encoder (e5, bge, MiniLM) loaded from a local HF directory.

A model directory holds ``config.json`` (``model_type: "bert"``), ``model.safetensors`` (or
``model.safetensors.index.json`` plus its shards) and a tokenizer that
``transformers.AutoTokenizer`` reads offline. :func:`load_encoder` returns the network, the
tokenizer and an :class:`EncoderConfig` that fixes the retrieval conventions of the family:

- ``e5`` (e.g. e5-base-v2): queries ``"query: "``, passages ``"passage: "``, mean pooling;
- ``bge`` (e.g. bge-base-en-v1.5): queries ``"Represent this sentence for searching relevant
  passages: "``, passages unprefixed, CLS pooling;
- ``minilm`` / ``sentence-transformers`` (e.g. all-MiniLM-L6-v2): no prefixes, mean pooling.

The family is read from the nearest path component that names it. Pooling and both prefixes can
also be given explicitly; a directory that matches no family takes its
pooling from a sentence-transformers ``1_Pooling/config.json`` if present, else it is an
error. :class:`TextEmbedder` turns strings into L2-normalised float32 embeddings with
fixed-shape jitted batches (lengths bucketed to powers of two) so XLA compiles a handful of
programs rather than one per batch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import unflatten_dict
from safetensors import safe_open

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
POOLINGS = ("mean", "cls")
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "

# family -> (query_prefix, passage_prefix, pooling)
_FAMILY_CONVENTIONS = {
    "e5": ("query: ", "passage: ", "mean"),
    "bge": (BGE_QUERY_INSTRUCTION, "", "cls"),
    "sentence-transformers": ("", "", "mean"),
}
# A family name must stand as its own token in a path component ("multilingual-e5-base",
# "models--BAAI--bge-small-en-v1.5"), so "e5" inside e.g. "base5" does not count.
_FAMILY_PATTERNS = [
    ("e5", re.compile(r"(?:^|[^a-z0-9])e5(?:[^a-z0-9]|$)")),
    ("bge", re.compile(r"(?:^|[^a-z0-9])bge(?:[^a-z0-9]|$)")),
    ("sentence-transformers", re.compile(r"minilm|sentence-transformers")),
]
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
# Checkpoint keys that BertModel carries but an encoder does not use.
_UNUSED_KEYS = frozenset({"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"})
_MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a HF ``BertConfig``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "BertConfig":
        """From a parsed HF ``config.json``; errors name `where` and the field."""
        if raw.get("model_type") != "bert":
            raise ValueError(f"{where}: field 'model_type' must be 'bert' for this encoder, got {raw.get('model_type')!r}")
        fields = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
        }
        missing = [key for key in fields.values() if not isinstance(raw.get(key), int)]
        if missing:
            raise ValueError(f"{where}: missing or non-integer field(s) {missing}")
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"{where}: field 'position_embedding_type' = {position_type!r} is not supported (only 'absolute')")
        act = raw.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"{where}: field 'hidden_act' = {act!r} is not supported (one of {sorted(_ACTIVATIONS)})")
        config = cls(
            **{name: raw[key] for name, key in fields.items()},
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
        )
        if config.hidden_size % config.num_heads:
            raise ValueError(f"{where}: hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_heads}")
        return config


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What a retriever needs to know about an encoder besides its weights."""

    model: BertConfig
    path: str  # absolute model directory
    family: str  # "e5" | "bge" | "sentence-transformers" | "custom"
    pooling: str  # "mean" | "cls"
    query_prefix: str
    passage_prefix: str


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.word = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)
        self.token_type = nnx.Embed(config.type_vocab_size, config.hidden_size, **kw)
        self.norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        # Single-segment inputs: every token has token type 0.
        summed = self.word(input_ids) + self.position(positions) + self.token_type(jnp.zeros_like(input_ids))
        return self.norm(summed)


class BertLayer(nnx.Module):
    """One post-LayerNorm transformer block, as in transformers' ``BertLayer``."""

    def __init__(self, config: BertConfig, dtype, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        dense = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        norm = dict(epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=dtype, rngs=rngs)
        self.num_heads = config.num_heads
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.query = nnx.Linear(hidden, hidden, **dense)
        self.key = nnx.Linear(hidden, hidden, **dense)
        self.value = nnx.Linear(hidden, hidden, **dense)
        self.attn_out = nnx.Linear(hidden, hidden, **dense)
        self.attn_norm = nnx.LayerNorm(hidden, **norm)
        self.ffn_in = nnx.Linear(hidden, inner, **dense)
        self.ffn_out = nnx.Linear(inner, hidden, **dense)
        self.ffn_norm = nnx.LayerNorm(hidden, **norm)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        batch, length, hidden = x.shape
        head_dim = hidden // self.num_heads

        def heads(t):
            return t.reshape(batch, length, self.num_heads, head_dim)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        context = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(batch, length, hidden)
        x = self.attn_norm(self.attn_out(context) + x)
        return self.ffn_norm(self.ffn_out(self.activation(self.ffn_in(x))) + x)


class BertEncoder(nnx.Module):
    """BERT without the pooler: token ids -> last hidden states."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(config, dtype, rngs)
        self.layers = nnx.List([BertLayer(config, dtype, rngs) for _ in range(config.num_layers)])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids [B, T] int32, attention_mask [B, T] (1 = token, 0 = padding) -> [B, T, H] float32."""
        mask = attention_mask.astype(bool)
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x.astype(jnp.float32)


def pool_and_normalize(hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """[B, T, H] hidden states, [B, T] mask -> [B, H] float32 unit vectors.

    "mean" averages the unmasked tokens; "cls" takes token 0. A row with no tokens (batch
    padding) comes out as zeros rather than NaN.
    """
    hidden = hidden.astype(jnp.float32)
    if pooling == "mean":
        mask = attention_mask.astype(jnp.float32)[..., None]
        pooled = (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


def _checkpoint_key_map(config: BertConfig) -> dict[str, tuple[tuple, bool]]:
    """HF BertModel key -> (path in BertEncoder's state, whether to transpose)."""
    mapping = {
        "embeddings.word_embeddings.weight": (("embeddings", "word", "embedding"), False),
        "embeddings.position_embeddings.weight": (("embeddings", "position", "embedding"), False),
        "embeddings.token_type_embeddings.weight": (("embeddings", "token_type", "embedding"), False),
        "embeddings.LayerNorm.weight": (("embeddings", "norm", "scale"), False),
        "embeddings.LayerNorm.bias": (("embeddings", "norm", "bias"), False),
    }
    dense = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attn_out",
        "intermediate.dense": "ffn_in",
        "output.dense": "ffn_out",
    }
    norms = {"attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "ffn_norm"}
    for i in range(config.num_layers):
        prefix = f"encoder.layer.{i}."
        for hf, ours in dense.items():
            mapping[f"{prefix}{hf}.weight"] = (("layers", i, ours, "kernel"), True)  # torch Linear is [out, in]
            mapping[f"{prefix}{hf}.bias"] = (("layers", i, ours, "bias"), False)
        for hf, ours in norms.items():
            mapping[f"{prefix}{hf}.weight"] = (("layers", i, ours, "scale"), False)
            mapping[f"{prefix}{hf}.bias"] = (("layers", i, ours, "bias"), False)
    return mapping


def _canonical_key(key: str) -> str:
    """Strip a task-model ``bert.`` prefix and rename old-style LayerNorm ``gamma``/``beta``."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if ".LayerNorm." in key:
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
    return key


def _weight_files(model_dir: str) -> list[str]:
    single = os.path.join(model_dir, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index_path = os.path.join(model_dir, WEIGHTS_INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path}: expected a JSON object with a 'weight_map' ({err})") from None
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"{index_path} names weight shards that do not exist: {absent}")
        return files
    raise FileNotFoundError(f"{model_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} (only safetensors checkpoints are read)")


def _format_keys(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model_dir: str, config: BertConfig, expected_shapes: dict[tuple, tuple], dtype) -> dict:
    """Read the safetensors checkpoint into BertEncoder's nested state dict (cast to `dtype`).

    `expected_shapes` maps each state path of the BertEncoder to its shape. Every weight it
    needs must be present with that shape, and every key in the checkpoint must be one it
    uses or a known-unused one (pooler, position_ids); otherwise a ValueError lists the
    offending keys.
    """
    key_map = _checkpoint_key_map(config)
    found: dict[tuple, jax.Array] = {}
    seen: set[str] = set()
    unexpected, bad_shapes = [], []
    for path in _weight_files(model_dir):
        with safe_open(path, framework="flax") as handle:
            for raw_key in handle.keys():
                key = _canonical_key(raw_key)
                if key in _UNUSED_KEYS:
                    continue
                if key not in key_map:
                    unexpected.append(raw_key)
                    continue
                seen.add(key)
                target, transpose = key_map[key]
                tensor = handle.get_tensor(raw_key)
                tensor = tensor.T if transpose else tensor
                if tuple(tensor.shape) != expected_shapes[target]:
                    bad_shapes.append(f"{raw_key}: {tuple(tensor.shape)} != {expected_shapes[target]}")
                    continue
                found[target] = tensor.astype(dtype)
    missing = [key for key in key_map if key not in seen]
    problems = []
    if missing:
        problems.append(f"missing weights: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_format_keys(unexpected)}")
    if bad_shapes:
        problems.append(f"wrong shapes (transposed to flax layout): {'; '.join(bad_shapes)}")
    if problems:
        raise ValueError(f"{model_dir}: checkpoint does not match config.json's BERT: " + " | ".join(problems))
    return unflatten_dict(found)


def resolve_conventions(
    model_dir: str,
    *,
    name_or_path: str = "",
    pooling: str | None = None,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
) -> tuple[str, str, str, str]:
    """-> (family, query_prefix, passage_prefix, pooling) for the model in `model_dir`.

    Explicit arguments win field by field. Otherwise the family is taken from the nearest
    path component that names one (so HF cache paths like ``models--intfloat--e5-base-v2``
    work), then from `name_or_path` (config.json's ``_name_or_path``); failing both, pooling
    comes from ``1_Pooling/config.json`` and prefixes are empty.
    """
    family = "custom"
    defaults: tuple[str | None, str | None, str | None] = (None, None, None)
    components = os.path.abspath(model_dir).lower().split(os.sep)[::-1] + name_or_path.lower().split("/")[::-1]
    for component in components:
        matched = next((name for name, pattern in _FAMILY_PATTERNS if pattern.search(component)), None)
        if matched:
            family, defaults = matched, _FAMILY_CONVENTIONS[matched]
            break
    else:
        defaults = ("", "", _sentence_transformers_pooling(model_dir))
    query_prefix = defaults[0] if query_prefix is None else query_prefix
    passage_prefix = defaults[1] if passage_prefix is None else passage_prefix
    pooling = defaults[2] if pooling is None else pooling
    if pooling is None:
        raise ValueError(
            f"{model_dir}: cannot tell the model family (e5, bge, MiniLM) from the path and there is no "
            f"1_Pooling/config.json; pass pooling ('mean' or 'cls') and the query/passage prefixes explicitly"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return family, query_prefix, passage_prefix, pooling


def _sentence_transformers_pooling(model_dir: str) -> str | None:
    path = os.path.join(model_dir, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    if raw.get("pooling_mode_cls_token"):
        return "cls"
    if raw.get("pooling_mode_mean_tokens"):
        return "mean"
    raise ValueError(f"{path}: only pooling_mode_mean_tokens or pooling_mode_cls_token is supported")


def load_encoder(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    pooling: str | None = None,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
):
    """Load a BERT-family encoder from a local HF directory.

    Returns ``(encoder, tokenizer, encoder_config)``: a :class:`BertEncoder` with parameters in
    `dtype`, the ``transformers`` fast tokenizer, and the :class:`EncoderConfig` with the
    family's (or the explicit) pooling and prefixes.
    """
    model_dir = os.path.abspath(os.fspath(path))
    config_path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"encoder directory {model_dir} has no {CONFIG_FILE}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            raw_config = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw_config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    model_config = BertConfig.from_dict(raw_config, config_path)
    family, query_prefix, passage_prefix, pooling = resolve_conventions(
        model_dir, name_or_path=str(raw_config.get("_name_or_path", "")),
        pooling=pooling, query_prefix=query_prefix, passage_prefix=passage_prefix,
    )
    # Built abstractly (shapes only): every parameter is then filled from the checkpoint.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: BertEncoder(model_config, dtype=dtype, rngs=nnx.Rngs(0))))
    shapes = {path: tuple(var.shape) for path, var in nnx.to_flat_state(state)}
    nnx.replace_by_pure_dict(state, load_weights(model_dir, model_config, shapes, dtype))
    encoder = nnx.merge(graphdef, state)
    tokenizer = _load_tokenizer(model_dir)
    encoder_config = EncoderConfig(
        model=model_config, path=model_dir, family=family, pooling=pooling,
        query_prefix=query_prefix, passage_prefix=passage_prefix,
    )
    return encoder, tokenizer, encoder_config


def _load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer  # heavy import, only needed when a model is loaded

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{model_dir}: cannot load the tokenizer ({err})") from None


def bucket_sizes(limit: int, smallest: int, factor: int) -> list[int]:
    """Padded sizes: smallest, smallest·factor, ... while below `limit`, then `limit`."""
    sizes, n = [], smallest
    while n < limit:
        sizes.append(n)
        n *= factor
    return sizes + [limit]


def bucket_lengths(max_length: int) -> list[int]:
    """Padded sequence lengths: powers of two from 16 below `max_length`, then `max_length`."""
    return bucket_sizes(max_length, _MIN_BUCKET, 2)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _embed_batch(graphdef, pooling: str, state, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """One padded batch -> [B, H] unit vectors. Module-level so that encoders of the same
    architecture (e.g. a retriever reloaded) share compiled programs."""
    model = nnx.merge(graphdef, state)
    return pool_and_normalize(model(input_ids, attention_mask), attention_mask, pooling)


class TextEmbedder:
    """Strings -> L2-normalised embeddings, with the encoder's prefixes and pooling.

    Texts are tokenized (truncated to `max_length` tokens including specials), sorted by
    length and cut into batches of `batch_size` rows. Each batch is padded to the smallest
    bucket length that fits, and its rows to 1, 4, 16, ... or `batch_size` (so one query does
    not cost a full batch): a handful of compiled programs, shared by every encoder of the
    same architecture.
    """

    def __init__(self, encoder: BertEncoder, tokenizer, config: EncoderConfig, *, max_length: int = 256, batch_size: int = 64):
        if max_length > config.model.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the encoder's max_position_embeddings "
                f"{config.model.max_position_embeddings} ({config.path})"
            )
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        self.tokenizer = tokenizer
        self.config = config
        self.max_length = max_length
        self.batch_size = batch_size
        self.buckets = bucket_lengths(max_length)
        self.row_buckets = bucket_sizes(batch_size, 1, 4)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._graphdef, self._state = nnx.split(encoder)
        self._tokenizer_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.config.model.hidden_size

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """[N] queries -> [N, D] float32, with the query prefix."""
        return self.embed(queries, self.config.query_prefix)

    def embed_passages(self, contents: Sequence[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """[N] passage strings (wiki-18 ``contents``) -> [N, D] float32, with the passage prefix."""
        return self.embed(contents, self.config.passage_prefix, on_batch)

    def embed(self, texts: Sequence[str], prefix: str = "", on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """[N] strings -> [N, D] float32 unit vectors of ``prefix + text``.

        on_batch, if given, is called with the number of texts each batch embedded (for
        progress bars).
        """
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        # HF fast tokenizers set truncation state per call and fail ("Already borrowed") when two
        # threads (e.g. a server's worker pool) call one at once.
        with self._tokenizer_lock:
            ids = self.tokenizer([prefix + t for t in texts], truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            longest = max(len(ids[r]) for r in rows)
            length = next(b for b in self.buckets if b >= longest)
            num_rows = next(b for b in self.row_buckets if b >= len(rows))
            input_ids = np.full((num_rows, length), self.pad_id, np.int32)
            mask = np.zeros((num_rows, length), np.int32)
            for slot, r in enumerate(rows):
                input_ids[slot, :len(ids[r])] = ids[r]
                mask[slot, :len(ids[r])] = 1
            vectors = _embed_batch(self._graphdef, self.config.pooling, self._state, input_ids, mask)
            out[rows] = np.asarray(vectors)[:len(rows)]
            if on_batch is not None:
                on_batch(len(rows))
        return out
