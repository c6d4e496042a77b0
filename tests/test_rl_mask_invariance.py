"""Whatever sits at loss_mask = 0 (observations, prompt, padding) changes no output or gradient.

Masked positions are overwritten with large numbers, +-inf and NaN; every advantage, loss,
KL, metric and gradient must stay bit-identical, and gradients there must be exactly 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searchr1_jax import rl

TOKEN_INPUTS = (
    "logprobs",
    "old_logprobs",
    "ref_logprobs",
    "values",
    "old_values",
    "returns",
    "advantages",
    "entropy",
    "token_kl",
)


def all_outputs(x, mask, scores, group_ids):
    """Every public rl output (and loss gradients) on one batch, as a flat dict."""
    out = {}
    for name in rl.ESTIMATORS:
        adv, ret = rl.compute_advantages(
            name,
            scores=scores,
            loss_mask=mask,
            group_ids=group_ids,
            values=x["values"],
            token_kl=x["token_kl"],
            kl_coef=0.1,
            gamma=0.9,
            lam=0.95,
        )
        out[f"{name}/adv"], out[f"{name}/ret"] = adv, ret

    def policy(logprobs, mode):
        pg = rl.ppo_policy_loss(
            logprobs,
            x["old_logprobs"],
            x["advantages"],
            mask,
            aggregation=mode,
            clip_low=0.2,
            clip_high=0.28,
            dual_clip=3.0,
            entropy=x["entropy"],
            entropy_coef=0.01,
        )
        kl = rl.kl_loss(logprobs, x["ref_logprobs"], mask, "k3", mode)
        return (pg.numerator + 0.1 * kl.numerator) / pg.denominator

    def value(values, mode):
        return rl.aggregated_value(
            rl.clipped_value_loss(
                values, x["old_values"], x["returns"], mask, clip_range=0.2, aggregation=mode
            )
        )

    for mode in rl.AGGREGATIONS:
        out[f"pg/{mode}"], out[f"pg_grad/{mode}"] = jax.value_and_grad(policy)(x["logprobs"], mode)
        out[f"vf/{mode}"], out[f"vf_grad/{mode}"] = jax.value_and_grad(value)(x["values"], mode)
    for est in rl.KL_ESTIMATORS:
        out[f"kl/{est}"] = rl.kl_estimate(x["logprobs"], x["ref_logprobs"], mask, est)
    out["gae_grad"] = jax.grad(
        lambda v: jnp.sum(rl.compute_advantages("gae", scores=scores, loss_mask=mask, values=v)[0] ** 2)
    )(x["values"])
    metrics = {
        **rl.policy_metrics(
            x["logprobs"], x["old_logprobs"], x["advantages"], mask, dual_clip=3.0, entropy=x["entropy"]
        ),
        **rl.value_metrics(x["values"], x["old_values"], x["returns"], mask, clip_range=0.2),
        **rl.advantage_return_stats(x["advantages"], x["returns"], mask),
    }
    out.update({f"metric/{k}": v for k, v in metrics.items()})
    return out


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    mask = np.array(
        [[1, 1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 1], [0] * 7],
        bool,
    )
    x = {k: rng.normal(size=mask.shape).astype(np.float32) for k in TOKEN_INPUTS}
    x["logprobs"] -= 2.0
    x["entropy"] = np.abs(x["entropy"])
    garbage = rng.choice(np.array([1e4, -1e4, 88.0, np.inf, -np.inf, np.nan], np.float32), size=mask.shape)
    corrupted = {k: np.where(mask, v, garbage) for k, v in x.items()}
    scores = rng.normal(size=5).astype(np.float32)
    group_ids = np.array([3, 3, 1, 3, 1], np.int32)
    # Tiny graph: LLVM's optimisation passes would be most of the test's time.
    fn = jax.jit(all_outputs, compiler_options={"xla_backend_optimization_level": 0})
    return fn(x, mask, scores, group_ids), fn(corrupted, mask, scores, group_ids), mask


def test_masked_positions_change_no_output(batch):
    clean, corrupted, _ = batch
    assert len(clean) > 40
    for key in clean:
        np.testing.assert_array_equal(clean[key], corrupted[key], err_msg=key)


def test_outputs_are_finite_and_zero_off_the_mask(batch):
    clean, _, mask = batch
    for key, value in clean.items():
        value = np.asarray(value)
        assert np.all(np.isfinite(value)), key
        if value.shape == mask.shape:
            assert np.all(value[~mask] == 0.0), key
        if "grad" in key:
            assert np.abs(value[mask]).max() > 0.0, key  # the gradient is not trivially zero
