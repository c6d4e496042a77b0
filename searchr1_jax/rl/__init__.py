"""Advantage estimators and PPO-family losses: pure, jittable functions on `[B, T]` arrays.

Every function takes a `loss_mask` `[B, T]` that is nonzero only on tokens the policy
generated; prompt, padding and retrieved-observation tokens contribute nothing to any loss,
KL, entropy, whitening statistic or metric. Losses return `Aggregated(numerator,
denominator)` so that micro-batch gradient accumulation is exact (see `aggregation`).
"""

from searchr1_jax.rl.advantages import (
    ESTIMATORS,
    compute_advantages,
    drgrpo_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_level_rewards,
)
from searchr1_jax.rl.aggregation import (
    AGGREGATIONS,
    Aggregated,
    aggregate,
    aggregated_value,
    loss_denominator,
)
from searchr1_jax.rl.kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_loss,
    make_kl_controller,
)
from searchr1_jax.rl.masked import masked_mean, masked_var, masked_whiten
from searchr1_jax.rl.metrics import advantage_return_stats, explained_variance, policy_metrics, value_metrics
from searchr1_jax.rl.policy_loss import clipped_surrogate, ppo_policy_loss, token_entropy
from searchr1_jax.rl.value_loss import clipped_value_loss, clipped_value_per_token

__all__ = [
    "AGGREGATIONS",
    "ESTIMATORS",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "Aggregated",
    "FixedKLController",
    "advantage_return_stats",
    "aggregate",
    "aggregated_value",
    "clipped_surrogate",
    "clipped_value_loss",
    "clipped_value_per_token",
    "compute_advantages",
    "drgrpo_advantages",
    "explained_variance",
    "gae_advantages",
    "grpo_advantages",
    "kl_estimate",
    "kl_loss",
    "loss_denominator",
    "make_kl_controller",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_metrics",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_entropy",
    "token_level_rewards",
    "value_metrics",
]
