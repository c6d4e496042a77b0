"""Decoder parity with transformers, KV-cache equivalence, HF import/export round trip."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from searchr1_jax.models import Decoder, ValueModel, load_config, load_hf, save_hf
from searchr1_jax.models.config import config_from_hf_dict
from searchr1_jax.models.decoder import positions_from_mask, set_attention

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=False),
    "qwen2_tied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
    "llama3": lambda: transformers.LlamaConfig(
        **SMALL, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}


def _hf_model(hf_config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():  # larger than the default init so differences are not hidden
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_checkpoint(request, tmp_path_factory):
    """(family name, torch model, saved directory) for each family."""
    model = _hf_model(FAMILIES[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path


def load_config_from(hf_config):
    """Our ModelConfig for a transformers config, with no original config.json attached."""
    return dataclasses.replace(config_from_hf_dict(hf_config.to_dict()), hf_config={})


def _left_padded_batch(seed=0, batch=4, length=24):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, VOCAB, (batch, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    for b, pad in enumerate([0, 3, 11, 20][:batch]):
        mask[b, :pad] = 0
    return tokens, mask


def _torch_logits(model, tokens, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def test_logits_match_transformers_with_left_padding(hf_checkpoint):
    name, torch_model, path = hf_checkpoint
    model, cfg = load_hf(path)
    tokens, mask = _left_padded_batch()
    ours = np.asarray(jax.jit(lambda m, t, a: m(t, a))(model, tokens, mask))
    ref = _torch_logits(torch_model, tokens, mask)
    diff = np.abs(ours - ref)[mask.astype(bool)].max()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("family, policy", [("qwen2", "naive"), ("qwen2", "gpu"), ("qwen2", "tpu"),
                                            ("qwen2", "cudnn"), ("qwen3", "gpu"), ("qwen3", "tpu")])
def test_every_attention_policy_matches_transformers(family, policy, tmp_path):
    """The GPU and TPU policies (Pallas kernels interpreted on this CPU, cuDNN's call in its
    XLA form) and the naive path give transformers' logits: a left-padded full pass, and a
    prefill then one token at a time through their own cache layout (qwen3: head_dim 32,
    q/k norms)."""
    torch_model = _hf_model(FAMILIES[family]())
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_hf(tmp_path)
    set_attention(model, policy)
    tokens, mask = _left_padded_batch(seed=5)
    ref = _torch_logits(torch_model, tokens, mask)
    full = np.asarray(jax.jit(lambda m, t, a: m(t, a))(model, tokens, mask))
    extend = jax.jit(lambda m, t, a, c: m.extend(t, a, c))
    cache = model.init_cache(tokens.shape[0], capacity=32)
    assert cache.layout == "heads"
    logits, cache = extend(model, tokens[:, :14], mask[:, :14], cache)
    steps = [np.asarray(logits)]
    for t in range(14, tokens.shape[1]):
        logits, cache = extend(model, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    assert np.abs(full - ref)[real].max() <= 1e-4
    assert np.abs(cached - ref)[real].max() <= 1e-4


def test_a_cache_of_another_layout_is_refused(tmp_path):
    model = Decoder(load_config_from(FAMILIES["qwen2"]()), rngs=nnx.Rngs(0))
    cache = model.init_cache(2, capacity=16)
    set_attention(model, "gpu")
    with pytest.raises(ValueError, match="'cpu'-layout KV cache cannot serve attention policy 'gpu'"):
        model.extend(jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1), jnp.int32), cache)
    with pytest.raises(ValueError, match="unknown attention policy"):
        set_attention(model, "fast")


def test_family_specific_parameters_are_loaded(hf_checkpoint):
    name, _, path = hf_checkpoint
    model, cfg = load_hf(path)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == name.startswith("qwen2")
    assert (attn.q_norm is not None) == (name == "qwen3")
    assert (model.lm_head is None) == cfg.tie_word_embeddings
    if name == "llama3":
        assert cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0


def test_prefill_then_decode_matches_full_forward(hf_checkpoint):
    """Left-padded prefill, then one token at a time: every position's logits equal the full pass."""
    _, _, path = hf_checkpoint
    model, _ = load_hf(path)
    tokens, mask = _left_padded_batch(seed=3)
    prompt_len = 14
    full = np.asarray(model(tokens, mask))

    extend = jax.jit(lambda m, t, a, c: m.extend(t, a, c))
    cache = model.init_cache(tokens.shape[0], capacity=32)
    logits, cache = extend(model, tokens[:, :prompt_len], mask[:, :prompt_len], cache)
    step_logits = [np.asarray(logits)]
    for t in range(prompt_len, tokens.shape[1]):
        logits, cache = extend(model, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
        step_logits.append(np.asarray(logits))
    cached = np.concatenate(step_logits, axis=1)
    diff = np.abs(cached - full)[mask.astype(bool)].max()
    assert diff <= 1e-4, diff


def test_ragged_chunks_append_without_recompute():
    """Rows append chunks of different real lengths (right-padded), as observations are.

    The cached logits of each real token must equal a full forward over the row's real
    tokens alone, proving padding slots are reused and positions stay contiguous.
    """
    model = Decoder(load_config_from(FAMILIES["qwen3"]()), rngs=nnx.Rngs(0))
    rng = np.random.RandomState(7)
    chunks = [(6, [6, 4]), (5, [2, 5]), (1, [1, 1]), (4, [0, 3])]  # (chunk width, real lengths per row)
    cache = model.init_cache(2, capacity=20)
    extend = jax.jit(lambda m, t, a, c: m.extend(t, a, c))
    rows = [[], []]
    got = [[], []]
    for width, lengths in chunks:
        toks = rng.randint(0, VOCAB, (2, width)).astype(np.int32)
        m = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
        logits, cache = extend(model, toks, m, cache)
        for b in range(2):
            rows[b].extend(toks[b, :lengths[b]])
            got[b].extend(np.asarray(logits)[b, :lengths[b]])
    assert list(np.asarray(cache.length)) == [len(rows[0]), len(rows[1])]
    for b in range(2):
        seq = np.array(rows[b], np.int32)[None]
        ref = np.asarray(model(seq))[0]
        np.testing.assert_allclose(np.stack(got[b]), ref, atol=1e-4)


def test_round_trip_through_save_hf(hf_checkpoint, tmp_path):
    """HF dir → load_hf → save_hf → transformers.from_pretrained → same logits."""
    name, torch_model, path = hf_checkpoint
    model, cfg = load_hf(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    out = save_hf(model, cfg, tmp_path / "export", tokenizer_dir=path)
    assert (out / "tokenizer_config.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask = _left_padded_batch(seed=5)
    np.testing.assert_allclose(_torch_logits(reloaded, tokens, mask)[mask.astype(bool)],
                               _torch_logits(torch_model, tokens, mask)[mask.astype(bool)], atol=1e-5)


def test_model_built_here_exports_to_transformers(tmp_path):
    """A randomly initialised Decoder (no original config.json) exports loadable weights."""
    cfg = load_config_from(FAMILIES["llama3"]())
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    out = save_hf(model, cfg, tmp_path / "fresh", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file(), "expected several shards"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask = _left_padded_batch(seed=2)
    ours = np.asarray(model(tokens, mask))
    np.testing.assert_allclose(_torch_logits(reloaded, tokens, mask)[mask.astype(bool)],
                               ours[mask.astype(bool)], atol=1e-4)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = _hf_model(FAMILIES["qwen2"]())
    model.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_hf(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.0.extra.weight" in str(err.value)


def test_unsupported_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json.*gpt2"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path / "nowhere")


def test_value_model_starts_from_base_weights(hf_checkpoint):
    _, _, path = hf_checkpoint
    policy, _ = load_hf(path)
    critic = ValueModel.from_decoder(policy, rngs=nnx.Rngs(0))
    tokens, mask = _left_padded_batch()
    values = critic(tokens, mask)
    assert values.shape == tokens.shape and values.dtype == jnp.float32
    hidden = policy.hidden_states(tokens, mask)
    head = critic.value_head
    expected = hidden @ head.kernel[...] + head.bias[...]
    np.testing.assert_allclose(np.asarray(values), np.asarray(expected[..., 0]), atol=1e-5)
    # A copy, not an alias: changing the critic leaves the policy alone.
    critic.model.norm.scale[...] = critic.model.norm.scale[...] * 2
    assert not np.allclose(np.asarray(critic.model.norm.scale[...]),
                           np.asarray(policy.model.norm.scale[...]))


def test_positions_from_mask_counts_real_tokens():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_cpu_row_blocks_divide_the_batch_and_keep_its_shards():
    from searchr1_jax.models.layers import CPU_SCORE_BLOCK_BYTES, cpu_rows_per_block
    quarter = CPU_SCORE_BLOCK_BYTES // 4
    assert [cpu_rows_per_block(16, quarter), cpu_rows_per_block(12, quarter),
            cpu_rows_per_block(16, 3 * quarter), cpu_rows_per_block(7, quarter)] == [4, 4, 1, 1]
    # rows sharded over 2 or 8 devices: blocks hold a multiple of that many rows, even when
    # fewer rows' scores would fit
    assert [cpu_rows_per_block(16, quarter, 2), cpu_rows_per_block(16, 3 * quarter, 2),
            cpu_rows_per_block(16, quarter, 8), cpu_rows_per_block(12, 2 * quarter, 6)] == [4, 2, 8, 6]


def test_cpu_attention_over_visible_slots_equals_full_attention(monkeypatch):
    """The CPU path for long chunks (row blocks, KV_BLOCK-slot steps up to each block's extent,
    running softmax) gives the one-call attention: 6 rows at different lengths over a
    600-slot window (the last step overlaps the one before), one row whose first 300 slots
    are padding (a first step that sees nothing), one whose chunk is all padding."""
    from searchr1_jax.models import layers
    from searchr1_jax.models.kv_cache import chunk_attention_mask

    b, t, h, kvh, d, slots = 6, 8, 4, 2, 16, 600
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kvh, d, slots)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kvh, slots, d)), jnp.float32)
    start = jnp.asarray([10, 250, 591, 400, 120, 300], jnp.int32)
    valid = np.arange(slots)[None, :] < (np.asarray(start) + t)[:, None]
    valid[3, :300] = False  # left padding
    valid[5, 300:] = False  # nothing appended: every query of this row is padding
    mask = chunk_attention_mask(jnp.asarray(valid), start, t)
    want = layers._attend_all(q, k, v, mask)
    monkeypatch.setattr(layers, "CPU_SCORE_BLOCK_BYTES", h * t * slots * 4)  # one row at a time
    got = layers.attend(q, k, v, mask, start + t)
    assert layers.cpu_rows_per_block(b, h * t * slots * 4) == 1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
