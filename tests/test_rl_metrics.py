"""Diagnostics: hand-computed values and NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searchr1_jax import rl

# One compiled program per function and shape instead of one per primitive (eager mode), at
# XLA's cheapest optimisation level: several times faster for these tiny arrays.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
policy_metrics = _jit(rl.policy_metrics, static_argnames=("clip_low", "clip_high", "dual_clip"))
value_metrics = _jit(rl.value_metrics, static_argnames="clip_range")
explained_variance = _jit(rl.explained_variance)
advantage_return_stats = _jit(rl.advantage_return_stats)
token_entropy = _jit(rl.token_entropy)


def test_policy_metrics_by_hand():
    ratios = np.array([[1.5, 0.5, 1.5, 5.0, 0.5, 1.1, 1.0]])
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0, 7.0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 0]], bool)
    entropy = jnp.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 100.0]])
    m = policy_metrics(jnp.log(ratios), jnp.zeros((1, 7)), adv, mask, dual_clip=3.0, entropy=entropy)
    # The clip decides tokens 0 (A > 0, r > 1.2) and 4 (A < 0, r < 0.8); the dual clip token 3.
    assert float(m["clip_fraction"]) == pytest.approx(2 / 6)
    assert float(m["dual_clip_fraction"]) == pytest.approx(1 / 6)
    r = ratios[0, :6]
    assert float(m["approx_kl"]) == pytest.approx(np.mean(r - 1 - np.log(r)), rel=1e-5)
    assert float(m["entropy"]) == pytest.approx(0.35, rel=1e-6)
    assert set(policy_metrics(jnp.log(ratios), jnp.zeros((1, 7)), adv, mask)) == {
        "clip_fraction",
        "approx_kl",
    }


def test_token_entropy():
    np.testing.assert_allclose(token_entropy(jnp.zeros((2, 3, 5))), np.full((2, 3), np.log(5)), rtol=1e-6)
    logits = np.random.default_rng(0).normal(size=(4, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(token_entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)


def test_explained_variance():
    rng = np.random.default_rng(1)
    mask = rng.random((4, 6)) < 0.7
    returns = rng.normal(size=(4, 6)).astype(np.float32)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    mean_pred = np.full_like(returns, returns[mask].mean())
    assert float(explained_variance(mean_pred, returns, mask)) == pytest.approx(0.0, abs=1e-6)
    values = rng.normal(size=(4, 6)).astype(np.float32)
    ref = 1 - np.var(returns[mask] - values[mask]) / np.var(returns[mask])
    assert float(explained_variance(values, returns, mask)) == pytest.approx(ref, rel=1e-5)
    assert np.isnan(float(explained_variance(values, np.ones((4, 6)), mask)))


def test_value_metrics_by_hand():
    values, old, ret = (
        jnp.array([[1.0, 1.0, 0.2, 50.0]]),
        jnp.zeros((1, 4)),
        jnp.array([[2.0, 0.0, 0.1, 0.0]]),
    )
    m = value_metrics(values, old, ret, np.array([[1, 1, 1, 0]], bool), clip_range=0.5)
    assert float(m["value_clip_fraction"]) == pytest.approx(1 / 3)
    assert float(m["value_mean"]) == pytest.approx(2.2 / 3)
    ref_ev = 1 - np.var([-1.0, 1.0, 0.1], ddof=1) / np.var([2.0, 0.0, 0.1], ddof=1)
    assert float(m["explained_variance"]) == pytest.approx(ref_ev, rel=1e-5)


def test_advantage_return_stats_match_numpy():
    rng = np.random.default_rng(2)
    mask = rng.random((5, 4)) < 0.6
    adv, ret = rng.normal(size=(2, 5, 4)).astype(np.float32)
    stats = advantage_return_stats(adv, ret, mask)
    for name, x in (("advantages", adv), ("returns", ret)):
        sel = x[mask]
        ref = {"mean": sel.mean(), "std": sel.std(ddof=1), "min": sel.min(), "max": sel.max()}
        for key, value in ref.items():
            assert float(stats[f"{name}/{key}"]) == pytest.approx(value, rel=1e-5), (name, key)
    empty = advantage_return_stats(adv, ret, np.zeros((5, 4), bool))
    assert all(float(v) == 0.0 for v in empty.values())


def test_masked_reductions_match_numpy():
    rng = np.random.default_rng(3)
    mask = rng.random((4, 5)) < 0.5
    x = rng.normal(size=(4, 5)).astype(np.float32)
    sel = x[mask].astype(np.float64)
    assert float(rl.masked_mean(x, mask)) == pytest.approx(sel.mean(), abs=1e-6)
    assert float(rl.masked_var(x, mask)) == pytest.approx(sel.var(ddof=1), rel=1e-5)
    white = np.where(mask, (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8), 0.0)
    np.testing.assert_allclose(rl.masked_whiten(x, mask), white, atol=1e-6)
    np.testing.assert_allclose(
        rl.masked_mean(x, mask, axis=-1),
        [x[b][mask[b]].mean() if mask[b].any() else 0.0 for b in range(4)],
        rtol=1e-6,
    )
    one = np.zeros((4, 5), bool)
    one[1, 2] = True
    assert float(rl.masked_var(x, one)) == 0.0  # fewer than two entries: no spread
    assert float(rl.masked_mean(x, np.zeros((4, 5), bool))) == 0.0
