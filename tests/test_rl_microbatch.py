"""Gradient accumulation: summed micro-batch numerators over the up-front mini-batch
denominator give the full-batch loss and gradient (<= 1e-6), in every aggregation mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searchr1_jax import rl

B, T, D, V = 8, 6, 5, 7
# Tiny graphs: compile time dominates the test, and LLVM's optimisation passes dominate it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def objective_parts(params, batch, mode):
    """(numerator, denominator) of policy + KL - entropy + value loss for a linear policy/critic."""
    logits = batch["features"] @ params["w_policy"]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    logprobs = jnp.take_along_axis(log_p, batch["tokens"][..., None], axis=-1)[..., 0]
    values = batch["features"] @ params["w_value"]
    mask = batch["loss_mask"]
    pg = rl.ppo_policy_loss(
        logprobs,
        batch["old_logprobs"],
        batch["advantages"],
        mask,
        aggregation=mode,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=3.0,
        entropy=rl.token_entropy(logits),
        entropy_coef=0.01,
    )
    kl = rl.kl_loss(logprobs, batch["ref_logprobs"], mask, "k3", mode)
    vf = rl.clipped_value_loss(
        values, batch["old_values"], batch["returns"], mask, clip_range=0.2, aggregation=mode
    )
    return pg.numerator + 0.1 * kl.numerator + 0.5 * vf.numerator, pg.denominator


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def scaled_losses_and_grads(params, batch, denominators):
    """Per mode: value and gradient of numerator / denominators[mode]. One compile per shape."""
    return {
        mode: jax.value_and_grad(lambda p, m=mode: objective_parts(p, batch, m)[0] / denominators[m])(params)
        for mode in rl.AGGREGATIONS
    }


def denominators_of(mask):
    return {mode: rl.loss_denominator(mask, mode) for mode in rl.AGGREGATIONS}


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    mask = rng.random((B, T)) < 0.6
    mask[2] = False  # a filler row
    mask[5] = [1, 0, 0, 1, 1, 0]  # policy tokens around an observation
    params = {
        "w_policy": rng.normal(size=(D, V)).astype(np.float32),
        "w_value": rng.normal(size=D).astype(np.float32),
    }
    batch = {
        "features": rng.normal(size=(B, T, D)).astype(np.float32),
        "tokens": rng.integers(0, V, size=(B, T)).astype(np.int32),
        "loss_mask": mask,
        "advantages": rng.normal(size=(B, T)).astype(np.float32),
        "returns": rng.normal(size=(B, T)).astype(np.float32),
        "old_values": rng.normal(size=(B, T)).astype(np.float32),
    }
    # Old and reference logprobs near the current policy, so some ratios clip and some do not.
    logits = batch["features"] @ params["w_policy"]
    current = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), batch["tokens"][..., None], -1)[
        ..., 0
    ]
    batch["old_logprobs"] = (current + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
    batch["ref_logprobs"] = (current + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
    return params, batch


@pytest.mark.parametrize("n_micro", [2, 4])
def test_micro_batch_accumulation_equals_full_batch(setup, n_micro):
    params, batch = setup
    denominators = denominators_of(batch["loss_mask"])  # from masks, before any forward
    full = scaled_losses_and_grads(params, batch, denominators)
    accumulated = {mode: (0.0, jax.tree.map(jnp.zeros_like, params)) for mode in rl.AGGREGATIONS}
    for idx in np.array_split(np.arange(B), n_micro):
        micro = scaled_losses_and_grads(params, {k: v[idx] for k, v in batch.items()}, denominators)
        accumulated = jax.tree.map(jnp.add, accumulated, micro)

    for mode in rl.AGGREGATIONS:
        (full_loss, full_grad), (loss, grad) = full[mode], accumulated[mode]
        assert float(full_loss) != 0.0
        assert abs(float(loss) - float(full_loss)) <= 1e-6, mode
        for name in full_grad:
            np.testing.assert_allclose(
                grad[name], full_grad[name], atol=1e-6, rtol=0, err_msg=f"{mode} {name}"
            )
            assert np.abs(np.asarray(full_grad[name])).max() > 1e-3


def test_averaging_per_micro_batch_means_would_be_wrong(setup):
    """The numerator/denominator split matters: the mean of micro-batch means differs."""
    params, batch = setup
    full = scaled_losses_and_grads(params, batch, denominators_of(batch["loss_mask"]))
    halves = []
    for idx in np.array_split(np.arange(B), 2):
        micro = {k: v[idx] for k, v in batch.items()}
        halves.append(scaled_losses_and_grads(params, micro, denominators_of(micro["loss_mask"])))
    for mode in ("token_mean", "seq_mean_token_mean"):
        naive = np.mean([float(half[mode][0]) for half in halves])
        assert abs(naive - float(full[mode][0])) > 1e-3, mode
