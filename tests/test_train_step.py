"""Teacher-forced log-probs and the accumulated policy/critic updates of train_step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from searchr1_jax.models import Decoder, ValueModel
from searchr1_jax.models.config import config_from_hf_dict
from searchr1_jax.models.decoder import set_attention
from searchr1_jax.train_step import (CriticBatch, LossConfig, PolicyBatch, SequenceBatch, compute_logprobs,
                                     critic_update, make_optimizer, policy_update, sequence_logprobs)

V = 61


@pytest.fixture(scope="module")
def tiny():
    cfg = config_from_hf_dict(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2).to_dict())
    policy = Decoder(cfg, rngs=nnx.Rngs(0))
    critic = ValueModel.from_decoder(policy, rngs=nnx.Rngs(1))
    return policy, critic


def _batch(seed=0, b=4, s=12):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, V, (b, s)).astype(np.int32)
    attn = np.ones((b, s), np.int32)
    attn[1, :3] = 0  # left padding
    attn[2, -2:] = 0  # right padding
    loss_mask = np.zeros((b, s), np.float32)
    loss_mask[:, 5:9] = 1
    loss_mask[3, 6] = 0  # an observation token inside the response
    loss_mask *= attn
    positions = np.maximum(np.cumsum(attn, -1) - 1, 0).astype(np.int32)
    return SequenceBatch(*(jnp.asarray(x) for x in (tokens, attn, positions, loss_mask))), rng


def test_logprobs_match_direct_log_softmax_and_chunking(tiny):
    policy, _ = tiny
    seq, _ = _batch()
    logits = policy(seq.tokens, seq.attention_mask, seq.positions) / 0.7
    direct = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), seq.tokens[:, 1:, None], -1)[..., 0]
    whole, ent = sequence_logprobs(policy, seq, temperature=0.7, chunk=1024)
    chunked, ent_c = sequence_logprobs(policy, seq, temperature=0.7, chunk=5)
    np.testing.assert_allclose(whole[:, 1:], direct, atol=1e-5)
    np.testing.assert_array_equal(whole[:, 0], 0)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    np.testing.assert_allclose(ent_c, ent, atol=1e-5)
    assert float(ent.min()) >= 0


@pytest.mark.parametrize("policy", ["gpu", "tpu"])
def test_remat_gradients_equal_on_every_attention_policy(tiny, policy):
    """Gradients of the teacher-forced log-probs through rematerialised layers and the
    GPU/TPU training kernels (their custom backward passes, interpreted here) equal the CPU
    path's, on rows with left and right padding. (cuDNN's call is differentiated by JAX
    itself; tests/test_attention.py checks its gradients.)"""
    model, _ = tiny
    seq, _ = _batch(seed=4)
    weights = seq.loss_mask[:, 1:]

    def grads(m):
        graphdef, params = nnx.split(m)

        def loss(p):
            return jnp.sum(sequence_logprobs(nnx.merge(graphdef, p), seq)[0][:, 1:] * weights)

        return jax.jit(jax.grad(loss))(params)

    other = nnx.clone(model)
    other.model.remat = True
    set_attention(other, policy)
    want, got = grads(model), grads(other)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_update_equals_full_batch(tiny, aggregation):
    policy, _ = tiny
    graphdef, params = nnx.split(policy)
    seq, rng = _batch(seed=1)
    old = compute_logprobs(graphdef, params, seq) + 0.05 * jnp.asarray(rng.randn(*seq.tokens.shape), jnp.float32)
    batch = PolicyBatch(seq, old, old - 0.1, jnp.asarray(rng.randn(*seq.tokens.shape), jnp.float32))
    cfg = LossConfig(aggregation=aggregation, kl_loss_coef=0.01, entropy_coef=0.001)
    tx = optax.sgd(1.0)  # parameter differences are then exactly gradient differences
    outs = []
    for num_micro in (1, 4):
        p, _, m = policy_update(graphdef, params, tx.init(params), batch, tx=tx, cfg=cfg, num_micro=num_micro)
        outs.append((p, m["actor/loss"], m["actor/grad_norm"]))
    for p, loss, gnorm in outs[1:]:
        np.testing.assert_allclose(loss, outs[0][1], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(gnorm, outs[0][2], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p, outs[0][0])
    # The update moved the parameters at all.
    assert not np.allclose(outs[0][0]["lm_head"]["kernel"][...], params["lm_head"]["kernel"][...])


def test_critic_update_reduces_value_loss(tiny):
    _, critic = tiny
    graphdef, params = nnx.split(critic)
    seq, rng = _batch(seed=2)
    returns = jnp.asarray(rng.rand(*seq.tokens.shape), jnp.float32) * seq.loss_mask
    old_values = nnx.merge(graphdef, params)(seq.tokens, seq.attention_mask, seq.positions)
    batch = CriticBatch(seq, old_values, returns)
    tx = make_optimizer(3e-3, 0, weight_decay=0.0, grad_clip=1.0)
    opt = tx.init(params)
    update = jax.jit(lambda p, o: critic_update(graphdef, p, o, batch, tx=tx, cfg=LossConfig(value_clip=10.0),
                                                num_micro=2))
    losses = []
    for _ in range(30):
        params, opt, m = update(params, opt)
        losses.append(float(m["critic/loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
