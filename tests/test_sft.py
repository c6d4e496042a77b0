"""SFT: packing several trajectories into one row changes nothing but the cost; masks and training."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from searchr1_jax.models import Decoder, load_tokenizer
from searchr1_jax.models.config import config_from_hf_dict
from searchr1_jax.models.decoder import set_attention
from searchr1_jax.sft import pack_batch, read_trajectories, run_sft, tokenize_trajectory
from searchr1_jax.train_step import SequenceBatch, sequence_logprobs
from tests.conftest import make_tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("sft_world"))


@pytest.fixture(scope="module")
def tokenizer(world):
    return load_tokenizer(world["paths"].tokenizer)


def tiny_decoder(world, seed: int) -> Decoder:
    raw = json.loads(world["paths"].model_config.read_text())
    raw.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return Decoder(config_from_hf_dict(raw), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model(world):
    return tiny_decoder(world, 3)


def one_per_row(examples, length, pad_id):
    b = len(examples)
    tokens = np.full((b, length), pad_id, np.int32)
    attn = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length), np.float32)
    for i, (ids, mask) in enumerate(examples):
        tokens[i, :len(ids)], attn[i, :len(ids)], loss[i, :len(ids)] = ids, 1, mask
    positions = np.maximum(np.cumsum(attn, 1) - 1, 0).astype(np.int32)
    return SequenceBatch(*(jnp.asarray(x) for x in (tokens, attn, positions, loss)))


def test_trajectory_mask_is_one_exactly_on_policy_text(world, tokenizer):
    row = read_trajectories(world["paths"].sft)[0]
    ids, mask = tokenize_trajectory(row, tokenizer)
    policy = "".join(s["text"] for s in row["segments"] if s["kind"] == "policy")
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == policy
    assert sum(mask) < len(ids)


def test_packed_rows_give_each_trajectory_its_own_logprobs(world, tokenizer, model):
    rows = read_trajectories(world["paths"].sft)[:7]
    examples = [tokenize_trajectory(r, tokenizer) for r in rows]
    width = -(-max(len(ids) for ids, _ in examples) // 64) * 64 * 2
    packed = pack_batch(examples, width, tokenizer.pad_token_id, row_multiple=2)
    assert packed.tokens.shape[0] % 2 == 0 and packed.tokens.shape[0] < len(examples)
    assert int(packed.loss_mask.sum()) == sum(sum(m) for _, m in examples)
    alone = one_per_row(examples, width, tokenizer.pad_token_id)
    logp_packed = np.asarray(sequence_logprobs(model, packed)[0])
    logp_alone = np.asarray(sequence_logprobs(model, alone)[0])
    # Every trajectory's policy-token logprobs, found by its segment id in the packed rows.
    seg, toks = np.asarray(packed.attention_mask), np.asarray(packed.tokens)
    found = 0
    for i, (ids, mask) in enumerate(examples):
        for r in range(seg.shape[0]):
            for k in range(1, seg[r].max() + 1):
                where = np.nonzero(seg[r] == k)[0]
                if len(where) == len(ids) and (toks[r, where] == ids).all():
                    # slot 0 (a prompt token, never a target) follows the previous sequence
                    np.testing.assert_allclose(logp_packed[r, where[1:]], logp_alone[i, 1:len(ids)], atol=1e-5)
                    found += 1
    assert found >= len(examples)


@pytest.mark.parametrize("policy", ["gpu", "tpu", "cudnn"])
def test_packed_rows_on_every_attention_policy(world, tokenizer, model, policy):
    """Packed rows (segment ids) give the same logprobs through the GPU and TPU kernels
    (interpreted here) as through the CPU path, which the test above ties to one trajectory
    per row."""
    examples = [tokenize_trajectory(r, tokenizer) for r in read_trajectories(world["paths"].sft)[:4]]
    width = -(-max(len(ids) for ids, _ in examples) // 64) * 64 * 2
    packed = pack_batch(examples, width, tokenizer.pad_token_id, row_multiple=2)
    other = nnx.clone(model)
    set_attention(other, policy)
    want = np.asarray(sequence_logprobs(model, packed)[0])
    got = np.asarray(sequence_logprobs(other, packed)[0])
    real = np.asarray(packed.attention_mask) > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)


def test_pack_batch_cuts_long_sequences_and_pads_rows(tokenizer):
    batch = pack_batch([([5] * 10, [1] * 10), ([6] * 3, [0, 1, 1])], 8, tokenizer.pad_token_id, row_multiple=4)
    assert batch.tokens.shape == (4, 8)
    assert np.asarray(batch.attention_mask).tolist()[:2] == [[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]
    assert np.asarray(batch.positions)[1, :3].tolist() == [0, 1, 2]
    assert np.asarray(batch.loss_mask)[1, :3].tolist() == [0, 1, 1]


def test_run_sft_lowers_the_loss(world, tokenizer):
    fresh = tiny_decoder(world, 0)
    losses = run_sft(fresh, tokenizer, read_trajectories(world["paths"].sft), steps=30, lr=3e-3, batch_size=8,
                     max_len=640, show_progress=False)
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
