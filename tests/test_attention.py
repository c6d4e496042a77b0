"""Every attention implementation against a plain NumPy reference, on a CPU.

Pallas kernels run in interpret mode (flash: written for GPUs, ragged: for TPUs, splash:
the TPU library kernel) and cuDNN's `jax.nn.dot_product_attention` call runs as its XLA
form, so each implementation's own arithmetic and masking are checked here; the tests at
the bottom check that the kernels also lower for the backends they are written for.

Cases: causal rows, left-padded rows, packed rows (segment ids), GQA (6 query heads over 2
KV heads everywhere, so G = 3 is not a power of two), a chunk appended against a cache,
and decode. Outputs are compared on the queries that see at least one key (the others are
padding, unused, and must only be finite); splash is compared on real queries only (its
padding queries attend to padding, see kernels/library.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searchr1_jax.config import ATTENTION_POLICIES
from searchr1_jax.models import attention
from searchr1_jax.models.kernels import flash, library, ragged
from searchr1_jax.models.kernels.common import Visibility

B, H, KVH, D = 3, 6, 2, 16
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def reference_attention(q, k, v, mask):
    """float64 NumPy: q [B, T, H, D], k and v [B, KVH, S, D], mask [B, T, S] bool →
    [B, T, H, D]; each query head h reads KV head h // G. Rows that see nothing → 0."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    mask = np.asarray(mask)
    g = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    scores = np.einsum("bthd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    probs = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bhsd->bthd", probs, v)


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)


# -- training rows ----------------------------------------------------------------------------

T = 40


def _segments(kind):
    """[B, T] attention masks: 0 padding, else the packed sequence's id."""
    seg = np.ones((B, T), np.int32)
    if kind in ("left_padded", "packed"):
        seg[1, :9] = 0
        seg[2, :T - 5] = 0
    if kind == "packed":
        seg[0, :13], seg[0, 13:31], seg[0, 31:] = 1, 2, 3
        seg[1, 9:20], seg[1, 20:36], seg[1, 36:] = 1, 2, 0  # right padding after two sequences
    return seg


SEQUENCE_IMPLEMENTATIONS = ["cpu", "naive", "flash", "splash", "cudnn"]


def _sequence_inputs(kind, dtype, seed=0):
    rng = np.random.RandomState(seed)
    q = _normal(rng, (B, T, H, D), dtype)
    k = _normal(rng, (B, T, KVH, D), dtype)
    v = _normal(rng, (B, T, KVH, D), dtype)
    return q, k, v, Visibility.for_sequences(jnp.asarray(_segments(kind)))


def _compare(got, want, compared, dtype):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    assert np.isfinite(got).all()
    err = np.abs(got - want)[compared].max()
    assert err <= TOLERANCE[dtype], err
    return err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["causal", "left_padded", "packed"])
@pytest.mark.parametrize("implementation", SEQUENCE_IMPLEMENTATIONS)
def test_training_rows_equal_reference(implementation, kind, dtype):
    q, k, v, vis = _sequence_inputs(kind, dtype)
    vis = attention.prepare(vis, implementation)
    got = jax.jit(lambda q, k, v: attention.attend_sequence(q, k, v, vis, implementation))(q, k, v)
    mask = np.asarray(vis.dense())
    want = reference_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    real = _segments(kind) > 0 if implementation == "splash" else mask.any(-1)
    _compare(got, want, real, dtype)


def _reference_loss(q, k, v, mask, weights):
    """Differentiable float32 jnp form of the reference (for gradients)."""
    g = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
    return jnp.sum(jnp.einsum("bhts,bshd->bthd", probs, vv) * weights)


@pytest.mark.parametrize("implementation", ["flash", "splash", "cudnn"])
def test_training_gradients_equal_reference(implementation):
    """dQ, dK, dV of packed, padded rows (the loss weighs real queries only, as the policy
    loss does)."""
    q, k, v, vis = _sequence_inputs("packed", jnp.float32, seed=1)
    vis = attention.prepare(vis, implementation)
    real = jnp.asarray(_segments("packed") > 0, jnp.float32)[:, :, None, None]
    weights = real * jnp.asarray(np.random.RandomState(2).normal(size=(1, 1, H, D)), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attention.attend_sequence(q, k, v, vis, implementation) * weights)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(_reference_loss, argnums=(0, 1, 2))(q, k, v, vis.dense(), weights)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=name)


# -- a chunk appended against a cache, and decode ------------------------------------------------

S = 96  # cache slots (kernels use blocks of 16 in interpret mode: 6 blocks)
CACHE_IMPLEMENTATIONS = ["cpu", "naive", "flash", "ragged"]


def _cache_inputs(chunk, dtype, layout, seed=0):
    """Rows at different lengths, one with 20 slots of left padding and one whose chunk is
    all padding (its queries see only older slots); keys in the implementation's layout."""
    rng = np.random.RandomState(seed)
    start = np.array([10, 40, 88 - chunk])
    valid = np.arange(S)[None] < (start + chunk)[:, None]
    valid[1, :20] = False
    valid[2, start[2]:] = False
    vis = Visibility.for_chunk(jnp.asarray(valid), jnp.asarray(start, jnp.int32), chunk)
    q = _normal(rng, (B, chunk, H, D), dtype)
    k = _normal(rng, (B, KVH, S, D), dtype)
    v = _normal(rng, (B, KVH, S, D), dtype)
    keys = jnp.swapaxes(k, 2, 3) if layout == "cpu" else k
    return q, k, v, keys, vis, jnp.asarray(start + chunk, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("chunk", [8, 1], ids=["append", "decode"])
@pytest.mark.parametrize("implementation", CACHE_IMPLEMENTATIONS)
def test_cache_attention_equals_reference(implementation, chunk, dtype):
    layout = "cpu" if implementation == "cpu" else "heads"
    q, k, v, keys, vis, extent = _cache_inputs(chunk, dtype, layout)
    vis = attention.prepare(vis, implementation)
    got = jax.jit(lambda q, keys, v: attention.attend_cache(q, keys, v, vis, implementation, extent))(q, keys, v)
    mask = np.asarray(vis.dense())
    _compare(got, reference_attention(q, k, v, mask), mask.any(-1), dtype)


@pytest.mark.parametrize("implementation", ["flash", "ragged"])
def test_cache_kernels_read_only_the_blocks_their_rows_use(implementation):
    """Key/value blocks past each row's last query slot, and (ragged) before its first real
    slot, are filled with NaN: a kernel that multiplied them would return NaN (0 · NaN), so
    finite outputs equal to the reference show they were never used. Decode and append."""
    block = 16
    for chunk in (1, 8):
        q, k, v, _, vis, _ = _cache_inputs(chunk, jnp.float32, "heads", seed=3)
        last = np.asarray(vis.q_slot).max(1)
        first = np.asarray(vis.kv_segment != 0).argmax(1)
        slots = np.arange(S)
        outside = slots[None] >= (last // block + 1)[:, None] * block
        if implementation == "ragged":
            outside |= slots[None] < (first // block * block)[:, None]
        poison = jnp.asarray(outside)[:, None, :, None]
        kp, vp = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
        fn = flash.flash_attention if implementation == "flash" else ragged.ragged_attention
        got = np.asarray(jax.jit(lambda q, k, v: fn(q, k, v, vis))(q, kp, vp))
        mask = np.asarray(vis.dense())
        assert np.isfinite(got).all()
        assert outside.sum() >= 2 * block  # some whole blocks were poisoned
        np.testing.assert_allclose(got[mask.any(-1)], reference_attention(q, k, v, mask)[mask.any(-1)],
                                   atol=1e-5)


def test_ragged_block_ranges_hand_values():
    """Row 0 (slots 0-9 real, one query at slot 9): block 0 only. Row 1 (left padding up to
    slot 37, query at slot 70): blocks 2-4 of 16 slots. Row 2 (nothing real): none."""
    row_slot = jnp.asarray([[[9]], [[70]], [[-1]]], jnp.int32)  # [B, R = 1, 1]
    kv_segment = np.zeros((3, 1, 96), np.int32)
    kv_segment[0, 0, :10] = 1
    kv_segment[1, 0, 37:71] = 1
    first, end = ragged.block_ranges(row_slot, jnp.asarray(kv_segment), 1, 16, 6)
    assert first.tolist()[:2] == [0, 2] and end.tolist() == [1, 5, 0]


def test_rows_that_see_nothing_get_zero():
    """A query with no visible key (all-padding chunk at the start of a row) gets 0 from
    the kernels, never NaN."""
    valid = jnp.zeros((1, 32), bool)
    vis = Visibility.for_chunk(valid, jnp.zeros((1,), jnp.int32), 4)
    rng = np.random.RandomState(0)
    q, k = _normal(rng, (1, 4, H, D), jnp.float32), _normal(rng, (1, KVH, 32, D), jnp.float32)
    for fn in (flash.flash_attention, ragged.ragged_attention):
        assert np.all(np.asarray(fn(q, k, k, vis)) == 0)


# -- the visibility rule and the choice --------------------------------------------------------

def test_visibility_rule_equals_the_decoders_masks():
    """The dense form of the rule equals the masks written out by hand: training rows
    (causal, own sequence, real keys; a padding query sees the real keys before it) and
    chunks (valid slots up to the query's own)."""
    seg = _segments("packed")
    got = np.asarray(Visibility.for_sequences(jnp.asarray(seg)).dense())
    t = np.arange(T)
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
    want = (t[None, None, :] <= t[None, :, None]) & (seg[:, None, :] > 0) & same
    np.testing.assert_array_equal(got, want)
    valid = np.random.RandomState(0).rand(2, 20) > 0.3
    start = np.array([3, 12])
    got = np.asarray(Visibility.for_chunk(jnp.asarray(valid), jnp.asarray(start), 5).dense())
    query_slot = start[:, None] + np.arange(5)[None]
    want = valid[:, None, :] & (np.arange(20)[None, None, :] <= query_slot[:, :, None])
    np.testing.assert_array_equal(got, want)


def test_policy_choice():
    assert attention.policy("auto").name == "cpu"  # this machine
    assert attention.POLICIES["cpu"].layout == "cpu"
    assert {attention.policy(n).layout for n in ("gpu", "tpu", "cudnn", "naive")} == {"heads"}
    assert attention.BACKEND_POLICY["gpu"] == "gpu" and attention.BACKEND_POLICY["tpu"] == "tpu"
    assert [attention.case_of(40, False), attention.case_of(64, True), attention.case_of(1, True)] == [
        "sequence", "append", "decode"]
    assert attention.policy("tpu").implementation("decode") == "ragged"
    with pytest.raises(ValueError, match="unknown attention policy 'fused'"):
        attention.policy("fused")
    with pytest.raises(ValueError, match="cannot read a KV cache"):
        attention.attend_cache(None, None, None, None, "splash")
    # the trainer's config accepts exactly these names
    assert set(ATTENTION_POLICIES) == {"auto", *attention.POLICIES}


# -- the kernels lower for their backends ------------------------------------------------------

def _lowered(fn, platform, *shapes):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


def _shapes(t, s, dtype=jnp.bfloat16, heads=16, kv_heads=2, head_dim=128, batch=2):
    return (jax.ShapeDtypeStruct((batch, t, heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, s, head_dim), dtype))


def test_flash_lowers_to_triton_for_cuda():
    """Forward and backward of a training row and a decode step produce Triton kernels."""
    config = flash.FlashConfig()
    q, k = _shapes(256, 256)
    seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def train(q, k, v, seg):
        def loss(q, k, v):
            return flash.flash_attention(q, k, v, Visibility.for_sequences(seg), config).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = _lowered(train, "cuda", q, k, k, seg)
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 3  # forward, dq, dkv
    assert all(f'name = "{kernel}"' in text for kernel in ("flash_forward", "flash_backward_dq",
                                                            "flash_backward_dkv"))
    q1, k1 = _shapes(1, 1024)

    def decode(q, k, v, valid, start):
        return flash.flash_attention(q, k, v, Visibility.for_chunk(valid, start, 1), config)

    assert "custom_call @__gpu$xla.gpu.triton" in _lowered(
        decode, "cuda", q1, k1, k1, jax.ShapeDtypeStruct((2, 1024), bool),
        jax.ShapeDtypeStruct((2,), jnp.int32))


@pytest.mark.parametrize("chunk", [1, 64])
def test_ragged_lowers_to_mosaic_for_tpu(chunk):
    config = ragged.default_config(chunk, backend="tpu")
    q, k = _shapes(chunk, 2048)

    def call(q, k, v, valid, start):
        return ragged.ragged_attention(q, k, v, Visibility.for_chunk(valid, start, chunk), config)

    text = _lowered(call, "tpu", q, k, k, jax.ShapeDtypeStruct((2, 2048), bool),
                    jax.ShapeDtypeStruct((2,), jnp.int32))
    assert "tpu_custom_call" in text


def test_splash_lowers_to_mosaic_for_tpu():
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 512), jnp.int32)

    def train(q, k, v, seg):
        def loss(q, k, v):
            vis = Visibility.for_sequences(seg)
            return library.splash_attention(q, k, v, vis, interpret=False).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    assert "tpu_custom_call" in _lowered(train, "tpu", q, k, k, seg)
