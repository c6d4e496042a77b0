"""A toy search-like sequence task on which PPO, GRPO, Dr.GRPO, REINFORCE++ and RLOO must each
raise the exact expected reward within 200 optax steps.

Each episode: prompt p; the policy emits a0; the environment appends an observation o
(uniform, loss_mask 0, like a retrieved passage); the policy emits a1. Reward (outcome only,
paid at the last policy token) = (1[a0 = t(p)] + 1[a1 = o]) / 2: recall a fact about the
prompt, then use what was retrieved. The policy's logits for the next token are a
prompt-specific table plus a shared one, each indexed by (position, previous token): a tiny
model that can learn copying once for all prompts. The PPO critic is a table of values over
(prompt, position, previous token). Uniform start: expected reward 1 / vocab, computed
exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from searchr1_jax import rl

PROMPTS, GROUP, LENGTH = 4, 4, 3
LOSS_MASK_ROW = np.array([1, 0, 1], bool)
ITERATIONS, EPOCHS = 100, 2  # 200 optax steps
CLIP = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)

ALGOS = {
    "ppo": dict(estimator="gae", aggregation="token_mean", kl_in_reward="adaptive"),
    "grpo": dict(estimator="grpo", aggregation="seq_mean_token_mean", kl_loss="k3"),
    "drgrpo": dict(estimator="drgrpo", aggregation="seq_mean_token_sum", kl_loss="k3"),
    "reinforce_pp": dict(estimator="reinforce_pp", aggregation="token_mean", kl_in_reward="fixed"),
    "rloo": dict(estimator="rloo", aggregation="seq_mean_token_mean"),
}
KL_COEF = 0.001
POLICY_OPT, CRITIC_OPT = optax.adam(0.1), optax.adam(0.1)
# These graphs run in microseconds; compiling them dominates the test, and LLVM's
# optimisation passes are most of the compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def targets(vocab):
    """The token each prompt must answer first: [P]."""
    return (3 * jnp.arange(PROMPTS) + 1) % vocab


def states(prompts, tokens):
    """Index of (prompt, position, previous token) for every position: [B, LENGTH] each."""
    prev = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    return prompts[:, None], jnp.arange(LENGTH)[None, :], prev


def logit_table(params):
    """Logits over the next token for every (prompt, position, previous token): [P, LENGTH, V, V]."""
    return params["per_prompt"] + params["shared"][None]


def init_params(vocab):
    return {
        "per_prompt": jnp.zeros((PROMPTS, LENGTH, vocab, vocab)),
        "shared": jnp.zeros((LENGTH, vocab, vocab)),
    }


def token_logits(params, prompts, tokens):
    return logit_table(params)[states(prompts, tokens)]


def sample(params, prompts, key, vocab):
    table = logit_table(params)
    k0, k_obs, k1 = jax.random.split(key, 3)
    a0 = jax.random.categorical(k0, table[prompts, 0, 0])
    obs = jax.random.randint(k_obs, prompts.shape, 0, vocab)
    a1 = jax.random.categorical(k1, table[prompts, 2, obs])
    return jnp.stack([a0, obs, a1], axis=1)


def scores_of(prompts, tokens, vocab):
    hits = (tokens[:, 0] == targets(vocab)[prompts]).astype(jnp.float32) + (tokens[:, 2] == tokens[:, 1])
    return hits / 2.0


@functools.partial(jax.jit, static_argnums=1, compiler_options=FAST_COMPILE)
def expected_reward(params, vocab):
    """Exact expected reward over prompts and observations."""
    pi = jax.nn.softmax(logit_table(params), axis=-1)  # [P, LENGTH, prev, next]
    recall = pi[jnp.arange(PROMPTS), 0, 0, targets(vocab)]
    copy = jnp.mean(jnp.diagonal(pi[:, 2], axis1=1, axis2=2), axis=-1)
    return jnp.mean(recall + copy) / 2.0


@functools.cache
def make_iteration(algo, vocab):
    """One jitted rollout + EPOCHS optax steps of `algo`; compiled once per (algo, vocab)."""
    cfg = ALGOS[algo]
    mode = cfg["aggregation"]

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def iteration(state, key, kl_coef):
        params, opt_state, critic, critic_state = state
        k_perm, k_sample = jax.random.split(key)
        # Rows shuffled: groups are found by id, never by position.
        prompts = jax.random.permutation(k_perm, jnp.repeat(jnp.arange(PROMPTS), GROUP))
        tokens = sample(params, prompts, k_sample, vocab)
        mask = jnp.broadcast_to(LOSS_MASK_ROW, tokens.shape)
        old_logits = token_logits(params, prompts, tokens)
        old_logprobs = jnp.take_along_axis(jax.nn.log_softmax(old_logits), tokens[..., None], -1)[..., 0]
        ref_logprobs = jnp.full(tokens.shape, -jnp.log(vocab))  # the uniform initial policy
        old_values = critic[states(prompts, tokens)]
        token_kl = rl.kl_estimate(old_logprobs, ref_logprobs, mask, "k1") if "kl_in_reward" in cfg else None
        advantages, returns = rl.compute_advantages(
            cfg["estimator"],
            scores=scores_of(prompts, tokens, vocab),
            loss_mask=mask,
            group_ids=prompts,
            values=old_values,
            token_kl=token_kl,
            kl_coef=kl_coef,
        )
        denominator = rl.loss_denominator(mask, mode)

        def policy_loss(p):
            logits = token_logits(p, prompts, tokens)
            logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
            parts = rl.ppo_policy_loss(
                logprobs,
                old_logprobs,
                advantages,
                mask,
                aggregation=mode,
                entropy=rl.token_entropy(logits),
                entropy_coef=0.001,
                **CLIP,
            )
            numerator = parts.numerator
            if "kl_loss" in cfg:
                numerator += (
                    KL_COEF * rl.kl_loss(logprobs, ref_logprobs, mask, cfg["kl_loss"], mode).numerator
                )
            return numerator / denominator

        def value_loss(crit):
            values = crit[states(prompts, tokens)]
            parts = rl.clipped_value_loss(values, old_values, returns, mask, clip_range=0.5, aggregation=mode)
            return parts.numerator / denominator

        def epoch(_, carry):
            params, opt_state, critic, critic_state = carry
            updates, opt_state = POLICY_OPT.update(jax.grad(policy_loss)(params), opt_state)
            params = optax.apply_updates(params, updates)
            if cfg["estimator"] == "gae":
                updates, critic_state = CRITIC_OPT.update(jax.grad(value_loss)(critic), critic_state)
                critic = optax.apply_updates(critic, updates)
            return params, opt_state, critic, critic_state

        params, opt_state, critic, critic_state = jax.lax.fori_loop(
            0, EPOCHS, epoch, (params, opt_state, critic, critic_state)
        )
        rollout_kl = rl.masked_mean(rl.kl_estimate(old_logprobs, ref_logprobs, mask, "k1"), mask)
        return (params, opt_state, critic, critic_state), rollout_kl

    return iteration


def train(algo, seed, vocab):
    """Train from the uniform policy; return expected reward before and after, and the
    controller's final coefficient."""
    params = init_params(vocab)
    critic = jnp.zeros((PROMPTS, LENGTH, vocab))
    state = (params, POLICY_OPT.init(params), critic, CRITIC_OPT.init(critic))
    controller = rl.make_kl_controller(
        ALGOS[algo].get("kl_in_reward", "fixed"), KL_COEF, target=0.05, horizon=1000
    )
    iteration = make_iteration(algo, vocab)
    before = float(expected_reward(params, vocab))
    for key in jax.random.split(jax.random.key(seed), ITERATIONS):
        state, rollout_kl = iteration(state, key, jnp.float32(controller.value))
        controller.update(float(rollout_kl), PROMPTS * GROUP)
    return before, float(expected_reward(state[0], vocab)), controller.value


@functools.cache
def result(algo, seed, vocab):
    return train(algo, seed, vocab)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_each_algorithm_raises_expected_reward(algo):
    before, after, _ = result(algo, seed=0, vocab=8)
    print(f"{algo}: expected reward {before:.3f} -> {after:.3f}")
    assert before == pytest.approx(1 / 8)
    assert after > 0.9


def test_adaptive_kl_controller_reacts_to_the_policy_drifting_from_the_reference():
    # The learned policy is far from uniform (KL > target), so the coefficient must have grown.
    _, _, coef = result("ppo", seed=0, vocab=8)
    assert coef > KL_COEF


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_algorithm_raises_expected_reward_larger_vocab(algo, seed):
    before, after, _ = result(algo, seed=seed, vocab=16)
    print(f"{algo} seed {seed}: expected reward {before:.3f} -> {after:.3f}")
    assert before == pytest.approx(1 / 16)
    assert after > 0.7
