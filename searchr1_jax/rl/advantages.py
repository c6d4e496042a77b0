"""Advantage estimators on `[B, T]` token arrays with a `loss_mask`.

Config names (`compute_advantages(name, ...)`):
- `gae`: generalised advantage estimation with a critic (PPO); advantages whitened over the
  batch's policy tokens.
- `grpo`: outcome score minus its prompt group's mean, divided by the group's std (+eps).
- `drgrpo`: Dr.GRPO, the group mean only (no std); pair it with the `seq_mean_token_sum`
  aggregation, which removes the length normalisation.
- `reinforce_pp`: REINFORCE++, discounted returns whitened over the batch's policy tokens.
- `rloo`: outcome score minus the mean of the *other* samples of its group.

Conventions shared by all of them:
- `loss_mask` `[B, T]` is nonzero only on tokens the policy generated. Search-R1 sequences
  interleave policy tokens with retrieved observations, so policy tokens are not contiguous.
  Recursions over time (GAE, discounted returns) run over policy tokens only: a masked token
  is skipped, and the step after a policy token is the next *policy* token. Observation tokens
  are the environment's response, not actions, so they neither pay reward nor are discounted.
- The outcome score of a sequence `[B]` is paid at its last policy token; per-token KL
  penalties (when KL is in the reward) are paid at every policy token.
- Prompt groups are named by an explicit integer `group_ids` `[B]` (e.g. the prompt's index
  in the data set); rows may come in any order. Nothing assumes that a group's samples are
  adjacent or that the batch holds `n` samples per prompt.
- Rows with no policy token at all (filler) get advantage 0 and take no part in any group or
  batch statistic.
- Results are float32 `[B, T]`, 0 where `loss_mask` is 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from searchr1_jax.rl.masked import (
    as_bool_mask,
    check_sequence_array,
    check_token_arrays,
    masked_sum,
    masked_whiten,
    select,
)

ESTIMATORS = ("gae", "grpo", "drgrpo", "reinforce_pp", "rloo")
GROUP_ESTIMATORS = ("grpo", "drgrpo", "rloo")


def token_level_rewards(scores, loss_mask, token_kl=None, kl_coef=0.0) -> Array:
    """Rewards per token `[B, T]` float32.

    `scores` `[B]`: outcome reward of each sequence, paid at its last policy token (dropped
    for a row with none). `token_kl` `[B, T]` (optional): per-token KL to the reference, from
    `kl_estimate`; `kl_coef * token_kl` is subtracted on every policy token. `kl_coef` may be
    a traced scalar, so an adaptive coefficient does not recompile.
    """
    check_token_arrays(loss_mask=loss_mask, token_kl=token_kl)
    mask = as_bool_mask(loss_mask)
    batch, length = mask.shape
    check_sequence_array("scores", scores, batch)
    last = length - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    at_last = jax.nn.one_hot(last, length, dtype=bool) & mask
    rewards = jnp.where(at_last, jnp.asarray(scores, jnp.float32)[:, None], 0.0)
    if token_kl is not None:
        rewards = rewards - kl_coef * select(token_kl, mask)
    return rewards


def _policy_token_recursion(rewards: Array, values: Array, mask: Array, gamma, lam) -> Array:
    """GAE advantages `[B, T]` with the recursion stepping from policy token to policy token.

    delta_t = r_t + gamma * V_next - V_t and A_t = delta_t + gamma * lam * A_next, where `next`
    is the next policy token of the row (V_next = A_next = 0 after the last one).
    """

    def step(carry, xs):
        next_value, next_adv = carry
        reward, value, is_policy = xs
        adv = reward + gamma * next_value - value + gamma * lam * next_adv
        carry = (jnp.where(is_policy, value, next_value), jnp.where(is_policy, adv, next_adv))
        return carry, jnp.where(is_policy, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    return adv_tb.T


def gae_advantages(token_rewards, values, loss_mask, gamma=1.0, lam=1.0, whiten=True):
    """GAE over policy tokens. Returns `(advantages, returns)`, each `[B, T]` float32.

    `token_rewards` `[B, T]` from `token_level_rewards`; `values` `[B, T]`: critic value of the
    state before each token. `returns = advantages + values` (before whitening) are the critic
    targets. With `whiten`, advantages are whitened over the batch's policy tokens (standard
    PPO practice; the returns are not).
    """
    check_token_arrays(token_rewards=token_rewards, values=values, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    values = select(values, mask)
    advantages = _policy_token_recursion(select(token_rewards, mask), values, mask, gamma, lam)
    returns = select(advantages + values, mask)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def reinforce_pp_advantages(token_rewards, loss_mask, gamma=1.0):
    """REINFORCE++ (Hu 2025). Returns `(advantages, returns)`, each `[B, T]` float32.

    returns_t = sum of gamma^k * r over the following policy tokens (k counts policy tokens);
    advantages are the returns whitened over the batch's policy tokens. Put KL in the reward
    through `token_level_rewards(..., token_kl, kl_coef)`.
    """
    check_token_arrays(token_rewards=token_rewards, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    zeros = jnp.zeros(mask.shape, jnp.float32)
    returns = _policy_token_recursion(select(token_rewards, mask), zeros, mask, gamma, 1.0)
    return masked_whiten(returns, mask), returns


def _group_membership(group_ids, mask: Array) -> Array:
    """`[B, B]` bool: entry (i, j) is True when row j is a real row in row i's group.

    Pairwise comparison works for any integer ids (no `num_segments` bound, no sorting); its
    B^2 memory is 26 MB in float32 for a 2,560-row batch (512 prompts x 5 samples).
    """
    batch = mask.shape[0]
    check_sequence_array("group_ids", group_ids, batch)
    group_ids = jnp.asarray(group_ids)
    if not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise ValueError(f"searchr1_jax.rl: `group_ids` must be integers, got dtype {group_ids.dtype}")
    has_tokens = jnp.any(mask, axis=-1)
    return (group_ids[:, None] == group_ids[None, :]) & has_tokens[None, :]


def _group_sum(same: Array, x: Array) -> Array:
    # A select-and-sum rather than a matmul: exact in float32 on every backend (TPU matmuls
    # default to bfloat16 passes).
    return jnp.sum(jnp.where(same, x[None, :], 0.0), axis=-1)


def _broadcast_to_tokens(per_sequence: Array, mask: Array) -> Array:
    return jnp.where(mask, per_sequence[:, None], 0.0)


def grpo_advantages(scores, group_ids, loss_mask, scale_by_std=True, eps=1e-6) -> Array:
    """GRPO group normalisation. Returns advantages `[B, T]` float32.

    A_i = (s_i - mean_g) / (std_g + eps) over the rows of row i's group g (`group_ids` `[B]`
    integers), std unbiased (torch.std). Without `scale_by_std` (Dr.GRPO): A_i = s_i - mean_g.
    A group whose scores are all equal, or a group of one, gets advantage 0.
    """
    check_token_arrays(loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    same = _group_membership(group_ids, mask)
    scores = jnp.asarray(scores, jnp.float32)
    count = jnp.sum(same, axis=-1).astype(jnp.float32)
    mean = _group_sum(same, scores) / jnp.maximum(count, 1.0)
    centred = scores - mean
    if scale_by_std:
        sq_dev = jnp.where(same, (scores[None, :] - mean[:, None]) ** 2, 0.0)
        std = jnp.sqrt(jnp.sum(sq_dev, axis=-1) / jnp.maximum(count - 1.0, 1.0))
        centred = centred / (std + eps)
    return _broadcast_to_tokens(centred, mask)


def drgrpo_advantages(scores, group_ids, loss_mask) -> Array:
    """Dr.GRPO (Liu et al. 2025): `s_i - mean_g`, no std. Returns `[B, T]` float32."""
    return grpo_advantages(scores, group_ids, loss_mask, scale_by_std=False)


def rloo_advantages(scores, group_ids, loss_mask) -> Array:
    """RLOO (Ahmadian et al. 2024). Returns advantages `[B, T]` float32.

    A_i = s_i - mean of the other n - 1 scores of row i's group; 0 for a group of one.
    """
    check_token_arrays(loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    same = _group_membership(group_ids, mask)
    scores = jnp.asarray(scores, jnp.float32)
    count = jnp.sum(same, axis=-1).astype(jnp.float32)
    others_mean = (_group_sum(same, scores) - scores) / jnp.maximum(count - 1.0, 1.0)
    advantage = jnp.where(count > 1.0, scores - others_mean, 0.0)
    return _broadcast_to_tokens(advantage, mask)


def compute_advantages(
    name: str,
    *,
    scores,
    loss_mask,
    group_ids=None,
    values=None,
    token_kl=None,
    kl_coef=0.0,
    gamma=1.0,
    lam=1.0,
):
    """Advantages and returns for the estimator `name` (one of ESTIMATORS).

    Args:
      scores: `[B]` outcome reward per sequence.
      loss_mask: `[B, T]` nonzero on policy tokens.
      group_ids: `[B]` integer prompt-group id; required by `grpo`, `drgrpo`, `rloo`.
      values: `[B, T]` critic values; required by `gae`.
      token_kl, kl_coef: KL in the reward (see `token_level_rewards`); for the group
        estimators the sequence's score becomes its summed token rewards.
      gamma, lam: discount and GAE lambda (`lam` is used by `gae` only).
    Returns:
      `(advantages, returns)`, each `[B, T]` float32, 0 off the policy tokens. The group
      estimators have no critic: their returns equal their advantages.
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"searchr1_jax.rl: unknown advantage estimator {name!r}; expected one of {ESTIMATORS}"
        )
    if name == "gae" and values is None:
        raise ValueError("searchr1_jax.rl: advantage estimator 'gae' needs `values` (a critic)")
    if name in GROUP_ESTIMATORS and group_ids is None:
        raise ValueError(f"searchr1_jax.rl: advantage estimator {name!r} needs `group_ids`")
    rewards = token_level_rewards(scores, loss_mask, token_kl, kl_coef)
    if name == "gae":
        return gae_advantages(rewards, values, loss_mask, gamma, lam)
    if name == "reinforce_pp":
        return reinforce_pp_advantages(rewards, loss_mask, gamma)
    sequence_scores = masked_sum(rewards, as_bool_mask(loss_mask), axis=-1)
    if name == "rloo":
        advantages = rloo_advantages(sequence_scores, group_ids, loss_mask)
    else:
        advantages = grpo_advantages(sequence_scores, group_ids, loss_mask, scale_by_std=name == "grpo")
    return advantages, advantages
