"""Advantage estimators against hand-computed values and plain-NumPy loop references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searchr1_jax import rl

# One compiled program per function and shape instead of one per primitive (eager mode), at
# XLA's cheapest optimisation level: several times faster for these tiny arrays.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
token_level_rewards = _jit(rl.token_level_rewards)
gae_advantages = _jit(rl.gae_advantages, static_argnames="whiten")
reinforce_pp_advantages = _jit(rl.reinforce_pp_advantages)
grpo_advantages = _jit(rl.grpo_advantages)
drgrpo_advantages = _jit(rl.drgrpo_advantages)
rloo_advantages = _jit(rl.rloo_advantages)
compute_advantages = _jit(rl.compute_advantages, static_argnums=0)

# Search-R1 layout: policy tokens, an observation (mask 0), policy tokens, padding.
MASK = np.array(
    [
        [1, 1, 0, 0, 1, 1, 0],
        [1, 0, 1, 0, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],  # filler row: no policy token
    ],
    dtype=bool,
)


def np_gae(rewards, values, mask, gamma, lam):
    """Reference: GAE stepping from policy token to policy token, float64."""
    adv = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        next_value = next_adv = 0.0
        for t in np.flatnonzero(mask[b])[::-1]:
            next_adv = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    return adv, np.where(mask, adv + values, 0.0)


def np_whiten(x, mask):
    sel = x[mask]
    return np.where(mask, (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8), 0.0)


def np_group_advantages(scores, ids, mask, kind, eps=1e-6):
    has = mask.any(axis=1)
    out = np.zeros(len(scores))
    for i in range(len(scores)):
        if not has[i]:
            continue
        group = np.array([scores[j] for j in range(len(scores)) if ids[j] == ids[i] and has[j]])
        n = len(group)
        if kind == "rloo":
            out[i] = 0.0 if n == 1 else scores[i] - (group.sum() - scores[i]) / (n - 1)
        elif kind == "drgrpo":
            out[i] = scores[i] - group.mean()
        else:
            std = group.std(ddof=1) if n > 1 else 0.0
            out[i] = (scores[i] - group.mean()) / (std + eps)
    return np.where(mask, out[:, None], 0.0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    b, t = MASK.shape
    return dict(
        scores=rng.normal(size=b).astype(np.float32),
        values=rng.normal(size=(b, t)).astype(np.float32),
        token_kl=rng.normal(size=(b, t)).astype(np.float32),
        group_ids=np.array([7, 2, 7, 2, 7, 7], np.int32),
    )


def test_token_level_rewards_pays_score_at_last_policy_token_minus_kl():
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    kl = np.array([[0.1, 0.2, 5.0, 0.3, 5.0], [5.0, 0.4, 5.0, 5.0, 5.0], [5.0] * 5], np.float32)
    rewards = token_level_rewards(jnp.array([1.0, 2.0, 3.0]), mask, kl, kl_coef=0.5)
    expected = [[-0.05, -0.1, 0, 1 - 0.15, 0], [0, 2 - 0.2, 0, 0, 0], [0, 0, 0, 0, 0]]
    np.testing.assert_allclose(rewards, expected, atol=1e-7)


def test_gae_by_hand_with_observation_tokens_skipped():
    mask = np.array([[1, 1, 0, 1]], bool)
    values = np.array([[0.5, 0.2, 9.0, 0.4]], np.float32)  # 9.0 sits on the observation
    rewards = token_level_rewards(jnp.array([1.0]), mask)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    # gamma = lam = 1: A_t = R - V_t and every return is the outcome.
    np.testing.assert_allclose(adv, [[0.5, 0.8, 0.0, 0.6]], atol=1e-7)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 0.0, 1.0]], atol=1e-7)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5, whiten=False)
    # delta_3 = 1 - .4 = .6; delta_1 = .5*.4 - .2 = 0, A_1 = .25*.6; delta_0 = .5*.2 - .5 = -.4.
    np.testing.assert_allclose(adv, [[-0.4 + 0.25 * 0.15, 0.15, 0.0, 0.6]], atol=1e-7)
    np.testing.assert_allclose(ret, [[-0.3625 + 0.5, 0.35, 0.0, 1.0]], atol=1e-7)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.7, 0.0)])
def test_gae_matches_numpy_loop(batch, gamma, lam):
    rewards = token_level_rewards(batch["scores"], MASK, batch["token_kl"], kl_coef=0.1)
    adv, ret = gae_advantages(rewards, batch["values"], MASK, gamma, lam, whiten=False)
    ref_adv, ref_ret = np_gae(np.asarray(rewards, np.float64), batch["values"], MASK, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)
    white, _ = gae_advantages(rewards, batch["values"], MASK, gamma, lam)
    np.testing.assert_allclose(white, np_whiten(ref_adv, MASK), atol=1e-5)


def test_reinforce_pp_by_hand_and_against_numpy(batch):
    mask = np.array([[1, 0, 1, 1], [1, 1, 0, 0]], bool)
    rewards = token_level_rewards(jnp.array([1.0, 0.0]), mask)
    _, returns = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    # The observation at t=1 is not a step: token 0 is two policy steps from the outcome.
    np.testing.assert_allclose(returns, [[0.25, 0, 0.5, 1.0], [0, 0, 0, 0]], atol=1e-7)

    rewards = token_level_rewards(batch["scores"], MASK, batch["token_kl"], kl_coef=0.1)
    adv, returns = reinforce_pp_advantages(rewards, MASK, gamma=0.9)
    ref_returns, _ = np_gae(np.asarray(rewards, np.float64), np.zeros(MASK.shape), MASK, 0.9, 1.0)
    np.testing.assert_allclose(returns, ref_returns, atol=1e-5)
    np.testing.assert_allclose(adv, np_whiten(ref_returns, MASK), atol=1e-5)


def test_grpo_by_hand():
    mask = np.ones((6, 2), bool)
    scores = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 0.5])
    ids = jnp.array([4, 4, 4, 4, 9, 2])
    adv = grpo_advantages(scores, ids, mask)
    # Group 4: mean .5, unbiased std sqrt(1/3); groups of one get 0.
    expected = 0.5 / (np.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(adv[:, 0], [expected, -expected, -expected, expected, 0, 0], rtol=1e-6)
    same = grpo_advantages(jnp.array([2.0, 2.0]), jnp.array([0, 0]), np.ones((2, 3), bool))
    np.testing.assert_array_equal(same, np.zeros((2, 3)))


def test_rloo_and_drgrpo_by_hand():
    mask = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], bool)
    scores, ids = jnp.array([1.0, 0.0, 0.0, 5.0]), jnp.array([1, 1, 1, 3])
    rloo = rloo_advantages(scores, ids, mask)
    np.testing.assert_allclose(rloo, [[1.0, 1.0], [-0.5, 0], [0, -0.5], [0, 0]], atol=1e-7)
    dr = drgrpo_advantages(scores, ids, mask)
    np.testing.assert_allclose(dr, [[2 / 3, 2 / 3], [-1 / 3, 0], [0, -1 / 3], [0, 0]], atol=1e-7)


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
def test_group_estimators_match_numpy_on_interleaved_uneven_groups(kind):
    rng = np.random.default_rng(1)
    b, t = 24, 5
    mask = rng.random((b, t)) < 0.6
    mask[3] = False  # a filler row inside group ids[3]
    ids = rng.integers(100, 105, size=b).astype(np.int32)
    scores = rng.normal(size=b).astype(np.float32)
    got, _ = compute_advantages(kind, scores=scores, loss_mask=mask, group_ids=ids)
    np.testing.assert_allclose(got, np_group_advantages(scores, ids, mask, kind), atol=2e-5)


def test_filler_rows_take_no_part_in_group_statistics():
    scores = jnp.array([1.0, 0.0, 0.0, 123.0])
    ids = jnp.array([0, 0, 0, 0])
    mask = np.array([[1, 1], [1, 1], [1, 0], [0, 0]], bool)
    with_filler = grpo_advantages(scores, ids, mask)
    without = grpo_advantages(scores[:3], ids[:3], mask[:3])
    np.testing.assert_array_equal(with_filler[:3], without)
    np.testing.assert_array_equal(with_filler[3], 0.0)


@pytest.mark.parametrize("name", rl.ESTIMATORS)
def test_shuffled_batch_with_explicit_ids_gives_the_same_advantages(batch, name):
    rng = np.random.default_rng(2)
    b, t = 20, 6
    mask = rng.random((b, t)) < 0.7
    ids = np.repeat(np.arange(5), 4).astype(np.int32)  # sorted: 4 samples per prompt
    scores = rng.integers(0, 2, size=b).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    kwargs = dict(group_ids=ids, values=values, gamma=0.9, lam=0.95)
    adv, ret = compute_advantages(name, scores=scores, loss_mask=mask, **kwargs)
    perm = rng.permutation(b)
    shuffled = dict(group_ids=ids[perm], values=values[perm], gamma=0.9, lam=0.95)
    adv_p, ret_p = compute_advantages(name, scores=scores[perm], loss_mask=mask[perm], **shuffled)
    np.testing.assert_allclose(adv_p, np.asarray(adv)[perm], atol=1e-6)
    np.testing.assert_allclose(ret_p, np.asarray(ret)[perm], atol=1e-6)
    assert np.abs(np.asarray(adv)).max() > 0.1  # the comparison is not between zeros


def test_dispatcher_matches_individual_functions(batch):
    kw = dict(scores=batch["scores"], loss_mask=MASK, token_kl=batch["token_kl"], kl_coef=0.05)
    rewards = token_level_rewards(batch["scores"], MASK, batch["token_kl"], 0.05)
    seq = np.asarray(rewards).sum(-1)
    ids = batch["group_ids"]
    pairs = {
        "gae": gae_advantages(rewards, batch["values"], MASK, 0.9, 0.8)[0],
        "reinforce_pp": reinforce_pp_advantages(rewards, MASK, 0.9)[0],
        "grpo": grpo_advantages(seq, ids, MASK),
        "drgrpo": drgrpo_advantages(seq, ids, MASK),
        "rloo": rloo_advantages(seq, ids, MASK),
    }
    for name, expected in pairs.items():
        adv, _ = compute_advantages(name, group_ids=ids, values=batch["values"], gamma=0.9, lam=0.8, **kw)
        np.testing.assert_allclose(adv, expected, atol=1e-6, err_msg=name)


def test_group_estimators_use_kl_penalised_sequence_scores():
    mask = np.array([[1, 1], [1, 0]], bool)
    kl = np.array([[1.0, 1.0], [0.0, 9.0]], np.float32)
    adv, ret = compute_advantages(
        "drgrpo",
        scores=jnp.array([1.0, 1.0]),
        loss_mask=mask,
        group_ids=jnp.array([0, 0]),
        token_kl=kl,
        kl_coef=0.5,
    )
    # Sequence scores 1 - 0.5*2 = 0 and 1 - 0 = 1; mean 0.5.
    np.testing.assert_allclose(adv, [[-0.5, -0.5], [0.5, 0.0]], atol=1e-7)
    np.testing.assert_array_equal(adv, ret)


def test_bad_input_is_rejected_with_a_clear_message(batch):
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        rl.compute_advantages("ppo", scores=batch["scores"], loss_mask=MASK)
    with pytest.raises(ValueError, match="'gae' needs `values`"):
        rl.compute_advantages("gae", scores=batch["scores"], loss_mask=MASK)
    with pytest.raises(ValueError, match="'rloo' needs `group_ids`"):
        rl.compute_advantages("rloo", scores=batch["scores"], loss_mask=MASK)
    with pytest.raises(ValueError, match="`group_ids` must be integers"):
        rl.grpo_advantages(batch["scores"], np.zeros(6, np.float32), MASK)
    with pytest.raises(ValueError, match=r"`scores` must hold one value per sequence, shape \(6,\)"):
        rl.token_level_rewards(np.zeros(5), MASK)
    with pytest.raises(ValueError, match="values=\\(6, 3\\)"):
        rl.gae_advantages(np.zeros(MASK.shape), np.zeros((6, 3)), MASK)
