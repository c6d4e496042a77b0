"""The one place where attention is chosen: which implementation serves which call, per
backend, and the cache layout those implementations read.

A decoder call is one of three cases, told apart by its shape:
  sequence  training and scoring rows, no cache (q and keys are the same T tokens);
  append    a chunk of C > 1 tokens per row written into the cache and attending over it
            (prefill pieces, observations);
  decode    one token per row against the cache.
A `Policy` names an implementation for each case and the cache layout they share:

  policy  sequence  append  decode  layout  when
  cpu     cpu       cpu     cpu     cpu     default on CPU: blocked attention over the
                                            transposed-key cache (layers.attend), unchanged
  gpu     flash     flash   flash   heads   default on GPU: our Pallas/Triton kernels (flash.py)
  tpu     splash    ragged  ragged  heads   default on TPU: library splash for training rows,
                                            our Pallas/Mosaic cache kernel (ragged.py)
  cudnn   cudnn     flash   flash   heads   GPU, training rows through cuDNN instead
  naive   naive     naive   naive   heads   full float32 scores (the path accelerators had
                                            before; the benchmark's baseline)

Why: on a CPU the blocked path is what the rollout benchmark was tuned on, and Pallas only
interprets there. On a GPU, cuDNN's fused attention takes no segment ids through
`jax.nn.dot_product_attention` in this jax version (a packed or left-padded row must pass a
dense T × T mask) and has no ragged cache read, so our flash kernel serves every case: its
masks come from two vectors per row and its key loop stops at each row's last visible slot,
so a decode step reads only the slots its row uses. On a TPU, splash attention is the tuned
training kernel and supports segment ids natively; cache calls go to the ragged kernel,
which fetches only the key blocks each row uses. `benchmarks/gpu.py` measures flash,
cudnn and naive side by side on a GPU so that the default can follow the figures.

`Decoder(..., attention=NAME)` selects a policy ("auto": by `jax.default_backend()`); tests
run every policy on a CPU (Pallas in interpret mode, cuDNN's call as its XLA form).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from searchr1_jax.models import layers
from searchr1_jax.models.kernels import flash, library, ragged
from searchr1_jax.models.kernels.common import Visibility
from searchr1_jax.models.kv_cache import keys_in_layout, values_in_layout

CASES = ("sequence", "append", "decode")


@dataclasses.dataclass(frozen=True)
class Policy:
    """An implementation per case (module doc) and the cache layout they read."""

    name: str
    sequence: str
    append: str
    decode: str
    layout: str

    def implementation(self, case: str) -> str:
        return getattr(self, case)


POLICIES = {
    "cpu": Policy("cpu", sequence="cpu", append="cpu", decode="cpu", layout="cpu"),
    "gpu": Policy("gpu", sequence="flash", append="flash", decode="flash", layout="heads"),
    "tpu": Policy("tpu", sequence="splash", append="ragged", decode="ragged", layout="heads"),
    "cudnn": Policy("cudnn", sequence="cudnn", append="flash", decode="flash", layout="heads"),
    "naive": Policy("naive", sequence="naive", append="naive", decode="naive", layout="heads"),
}
# jax.default_backend() → the policy "auto" picks (other platforms: the naive path).
BACKEND_POLICY = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
# Implementations that read the dense [B, T, S] mask rather than the visibility vectors.
DENSE_MASK = {"cpu", "naive", "cudnn"}


def policy(name: str = "auto") -> Policy:
    """The policy called `name`; "auto": the current backend's."""
    if name == "auto":
        name = BACKEND_POLICY.get(jax.default_backend(), "naive")
    if name not in POLICIES:
        raise ValueError(f"unknown attention policy {name!r}: expected 'auto' or one of "
                         f"{sorted(POLICIES)}")
    return POLICIES[name]


def case_of(query_len: int, cached: bool) -> str:
    if not cached:
        return "sequence"
    return "decode" if query_len == 1 else "append"


def prepare(vis: Visibility, implementation: str) -> Visibility:
    """`vis` with its dense mask computed once for all layers when the implementation reads
    one, and without it otherwise (the kernels build their masks from the vectors)."""
    return vis.with_dense() if implementation in DENSE_MASK else vis.without_dense()


def attend_sequence(q, k, v, vis: Visibility, implementation: str) -> jax.Array:
    """Attention of training rows. q [B, T, H, D]; k, v [B, T, KVH, D] as projected.
    Returns [B, T, H, D]."""
    if implementation == "cpu":
        return layers.attend(q, keys_in_layout(k, "cpu"), values_in_layout(v), vis.dense())
    if implementation == "splash":
        return library.splash_attention(q, k, v, vis)
    if implementation == "cudnn":
        return library.cudnn_attention(q, k, v, vis)
    return attend_cache(q, keys_in_layout(k, "heads"), values_in_layout(v), vis, implementation)


def attend_cache(q, keys, values, vis: Visibility, implementation: str,
                 extent: jax.Array | None = None) -> jax.Array:
    """Attention over keys and values in the implementation's cache layout (keys
    [B, KVH, D, S] for "cpu", else [B, KVH, S, D]; values [B, KVH, S, D]).
    extent: optional [B], a bound on each row's visible slots (the CPU path skips past it).
    Returns [B, T, H, D]."""
    if implementation == "cpu":
        return layers.attend(q, keys, values, vis.dense(), extent)
    if implementation == "naive":
        return naive_attention(q, keys, values, vis.dense())
    if implementation == "flash":
        return flash.flash_attention(q, keys, values, vis)
    if implementation == "ragged":
        return ragged.ragged_attention(q, keys, values, vis)
    raise ValueError(f"attention implementation {implementation!r} cannot read a KV cache")


def naive_attention(q, k, v, mask) -> jax.Array:
    """Full float32 scores [B, KVH, G·T, S], masked, softmax: q [B, T, H, D], k and v
    [B, KVH, S, D], mask [B, T, S] → [B, T, H, D] (a query that sees nothing averages all
    slots, as layers._attend_all)."""
    b, t, h, d = q.shape
    kvh = k.shape[1]
    rows = layers._grouped_queries(q, kvh)  # [B, KVH, G·T, D], g-major
    scores = jnp.einsum("bkqd,bksd->bkqs", rows, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores.reshape(b, kvh, h // kvh, t, -1) / math.sqrt(d),
                       layers.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kvh, h // kvh * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v)
    return layers._ungrouped(out, t)
