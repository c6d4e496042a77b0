"""Policy, value and KL losses, aggregation and KL controllers: hand values and NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searchr1_jax import rl

# One compiled program per function and shape instead of one per primitive (eager mode), at
# XLA's cheapest optimisation level: several times faster for these tiny arrays.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_CLIPS = ("clip_low", "clip_high", "dual_clip")
clipped_surrogate = _jit(rl.clipped_surrogate, static_argnames=_CLIPS)
aggregate = _jit(rl.aggregate, static_argnums=2)
ppo_policy_loss = _jit(rl.ppo_policy_loss, static_argnames=("aggregation", *_CLIPS))
clipped_value_per_token = _jit(rl.clipped_value_per_token, static_argnames="clip_range")
clipped_value_loss = _jit(rl.clipped_value_loss, static_argnames=("clip_range", "aggregation"))
kl_estimate = _jit(rl.kl_estimate, static_argnums=3)
kl_loss = _jit(rl.kl_loss, static_argnums=(3, 4))

MASK = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)


def np_aggregate(x, mask, mode):
    x = np.where(mask, x, 0.0)
    rows = mask.any(-1)
    if mode == "token_mean":
        return x.sum(), mask.sum()
    if mode == "seq_mean_token_sum":
        return x.sum(), rows.sum()
    return sum(x[b].sum() / mask[b].sum() for b in range(len(x)) if rows[b]), rows.sum()


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    shape = MASK.shape
    draw = lambda scale=1.0: (scale * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
    return dict(
        logprobs=draw() - 2,
        old_logprobs=draw() - 2,
        ref_logprobs=draw() - 2,
        advantages=draw(),
        entropy=np.abs(draw()),
        values=draw(),
        old_values=draw(),
        returns=draw(),
    )


def test_clipped_surrogate_by_hand():
    ratios = np.array([1.5, 0.5, 1.5, 5.0, 0.5, 1.1])
    adv = np.array([1.0, 1.0, -1.0, -1.0, -1.0, 2.0])
    logp = jnp.log(jnp.array([ratios], jnp.float32))
    args = (logp, jnp.zeros_like(logp), jnp.array([adv], jnp.float32), np.ones((1, 6), bool))
    loss = clipped_surrogate(*args, clip_low=0.2, clip_high=0.2)
    # max(-A r, -A clip(r, .8, 1.2)) per token.
    np.testing.assert_allclose(loss[0], [-1.2, -0.5, 1.5, 5.0, 0.8, -2.2], rtol=1e-6)
    loss = clipped_surrogate(*args, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # Clip-higher lifts the cap for A > 0 to 1.28; the dual clip caps the A < 0, r = 5 token at 3.
    np.testing.assert_allclose(loss[0], [-1.28, -0.5, 1.5, 3.0, 0.8, -2.2], rtol=1e-6)


def test_clipped_tokens_get_no_gradient_and_the_rest_get_minus_a_r():
    ratios = jnp.array([[1.5, 1.1, 0.5, 5.0]])
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    mask = np.ones((1, 4), bool)
    loss = lambda lp: rl.clipped_surrogate(lp, jnp.zeros((1, 4)), adv, mask, dual_clip=3.0).sum()  # noqa: E731
    grad = _jit(jax.grad(loss))(jnp.log(ratios))
    # d(-A r)/d log r = -A r where the unclipped term decides; 0 where clip or dual clip decides.
    np.testing.assert_allclose(grad, [[0.0, -1.1, 0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
def test_aggregate_and_denominator_match_numpy(arrays, mode):
    num, den = aggregate(arrays["values"], MASK, mode)
    ref_num, ref_den = np_aggregate(arrays["values"], MASK, mode)
    np.testing.assert_allclose(num, ref_num, rtol=1e-6)
    assert float(den) == ref_den == float(rl.loss_denominator(MASK, mode))
    assert float(rl.aggregated_value(rl.Aggregated(num, den))) == pytest.approx(ref_num / ref_den, rel=1e-6)


def test_denominators_by_hand():
    assert float(rl.loss_denominator(MASK, "token_mean")) == 10.0
    assert float(rl.loss_denominator(MASK, "seq_mean_token_mean")) == 3.0  # the filler row is not a sequence
    assert float(rl.aggregated_value(aggregate(np.ones((2, 2)), np.zeros((2, 2)), "token_mean"))) == 0.0


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
def test_policy_loss_matches_numpy(arrays, mode):
    a = arrays
    out = ppo_policy_loss(
        a["logprobs"],
        a["old_logprobs"],
        a["advantages"],
        MASK,
        aggregation=mode,
        clip_low=0.2,
        clip_high=0.3,
        dual_clip=3.0,
        entropy=a["entropy"],
        entropy_coef=0.01,
    )
    r = np.exp(a["logprobs"].astype(np.float64) - a["old_logprobs"])
    adv = a["advantages"]
    pg = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.3))
    pg = np.where(adv < 0, np.minimum(pg, -3.0 * adv), pg)
    ref_num, ref_den = np_aggregate(pg - 0.01 * a["entropy"], MASK, mode)
    np.testing.assert_allclose(out.numerator, ref_num, rtol=1e-5)
    assert float(out.denominator) == ref_den


def test_value_loss_by_hand_and_against_numpy(arrays):
    values, old, ret = (
        jnp.array([[1.0, 1.0, 0.2]]),
        jnp.array([[0.0, 0.0, 0.0]]),
        jnp.array([[2.0, 0.0, 0.1]]),
    )
    per_token = clipped_value_per_token(values, old, ret, np.ones((1, 3), bool), clip_range=0.5)
    # Clipped prediction 0.5: max((1-2)^2, (.5-2)^2)/2 = 1.125; max((1-0)^2, (.5-0)^2)/2 = .5; unclipped .005.
    np.testing.assert_allclose(per_token, [[1.125, 0.5, 0.005]], rtol=1e-6)

    a = arrays
    out = clipped_value_loss(
        a["values"], a["old_values"], a["returns"], MASK, clip_range=0.2, aggregation="token_mean"
    )
    v, vo, rt = (a[k].astype(np.float64) for k in ("values", "old_values", "returns"))
    ref = 0.5 * np.maximum((v - rt) ** 2, (vo + np.clip(v - vo, -0.2, 0.2) - rt) ** 2)
    np.testing.assert_allclose(out.numerator, np_aggregate(ref, MASK, "token_mean")[0], rtol=1e-5)


def test_kl_estimators_by_hand():
    logp, ref = jnp.array([[-1.0, -2.0, -1.0, -30.0]]), jnp.array([[-2.0, -1.0, -6.0, -1.0]])
    mask = np.ones((1, 4), bool)
    np.testing.assert_allclose(kl_estimate(logp, ref, mask, "k1"), [[1.0, -1.0, 5.0, -29.0]], rtol=1e-6)
    np.testing.assert_allclose(kl_estimate(logp, ref, mask, "k2"), [[0.5, 0.5, 12.5, 420.5]], rtol=1e-6)
    # k3 = exp(-d) + d - 1: 1/e; e - 2; e^-5 + 4; e^29 - 30 clipped to 10.
    k3 = [np.exp(-1.0), np.e - 2.0, np.exp(-5.0) + 4.0, 10.0]
    np.testing.assert_allclose(kl_estimate(logp, ref, mask, "k3"), [k3], rtol=1e-6)
    grad = _jit(jax.grad(lambda lp: rl.kl_estimate(lp, ref, mask, "k3").sum()))(logp)
    # dk3/dd = 1 - exp(-d), and 0 where clipped.
    np.testing.assert_allclose(grad, [[1 - np.exp(-1.0), 1 - np.e, 1 - np.exp(-5.0), 0.0]], rtol=1e-6)


def test_kl_k3_stays_finite_for_extreme_log_ratios():
    logp = jnp.array([[-200.0, 0.0]])
    ref = jnp.array([[0.0, -200.0]])
    mask = np.ones((1, 2), bool)
    kl, grad = _jit(jax.value_and_grad(lambda lp: rl.kl_estimate(lp, ref, mask, "k3").sum()))(logp)
    assert float(kl) == 20.0
    np.testing.assert_array_equal(grad, [[0.0, 0.0]])


@pytest.mark.parametrize("estimator", rl.KL_ESTIMATORS)
def test_kl_loss_aggregates_the_estimate(arrays, estimator):
    a = arrays
    d = a["logprobs"].astype(np.float64) - a["ref_logprobs"]
    ref = {"k1": d, "k2": 0.5 * d**2, "k3": np.clip(np.exp(-d) + d - 1, -10, 10)}[estimator]
    out = kl_loss(a["logprobs"], a["ref_logprobs"], MASK, estimator, "seq_mean_token_mean")
    ref_num, ref_den = np_aggregate(ref, MASK, "seq_mean_token_mean")
    np.testing.assert_allclose(out.numerator, ref_num, rtol=1e-5)
    assert float(out.denominator) == ref_den


def test_kl_controllers():
    fixed = rl.make_kl_controller("fixed", 0.001)
    fixed.update(5.0, 100)
    assert fixed.value == 0.001
    ctl = rl.make_kl_controller("adaptive", 0.1, target=0.01, horizon=100)
    ctl.update(0.02, 10)  # error 1.0 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl = rl.AdaptiveKLController(0.1, target=0.01, horizon=100)
    ctl.update(0.011, 10)  # error 0.1, within the clip
    assert ctl.value == pytest.approx(0.1 * 1.01)
    ctl.update(0.0, 50)  # error -1 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.01 * 0.9)


def test_bad_configuration_is_rejected_with_a_clear_message(arrays):
    a = arrays
    args = (a["logprobs"], a["old_logprobs"], a["advantages"], MASK)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        rl.ppo_policy_loss(*args, aggregation="mean")
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        rl.ppo_policy_loss(*args, aggregation="token_mean", dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low must be in"):
        rl.ppo_policy_loss(*args, aggregation="token_mean", clip_low=1.0)
    with pytest.raises(ValueError, match="unknown KL estimator 'low_var'"):
        rl.kl_loss(a["logprobs"], a["ref_logprobs"], MASK, "low_var", "token_mean")
    with pytest.raises(ValueError, match="unknown KL controller 'pid'"):
        rl.make_kl_controller("pid", 0.1)
    with pytest.raises(ValueError, match="needs `target` and `horizon`"):
        rl.make_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        rl.clipped_value_loss(
            a["values"], a["old_values"], a["returns"], MASK, clip_range=0.0, aggregation="token_mean"
        )
    with pytest.raises(ValueError, match=r"\[B, T\] array, got shape \(4,\)"):
        rl.kl_estimate(np.zeros(4), np.zeros(4), np.ones(4), "k1")
