"""Training diagnostics, each a float32 scalar computed over policy tokens only.

All are means (or min/max/std) over the tokens where `loss_mask` is nonzero, for the arrays
given. Metrics of micro-batches can be combined into the mini-batch's by weighting each
micro-batch's means by its policy-token count (`loss_denominator(mask, "token_mean")`);
min/max combine by min/max; std does not combine exactly.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from searchr1_jax.rl.masked import (
    as_bool_mask,
    check_token_arrays,
    masked_max,
    masked_mean,
    masked_min,
    masked_var,
    select,
)
from searchr1_jax.rl.policy_loss import check_clip_config, log_ratio
from searchr1_jax.rl.value_loss import check_value_clip


def policy_metrics(
    logprobs,
    old_logprobs,
    advantages,
    loss_mask,
    *,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    entropy=None,
) -> dict[str, Array]:
    """Diagnostics of the clipped policy update; arguments as in `ppo_policy_loss`.

    Returns:
      clip_fraction: share of policy tokens where the clipped term decides the loss.
      approx_kl: mean of (r - 1) - log r, r = pi / pi_old: the k3 estimate of
        KL(pi_old || pi) from the rollout's samples, >= 0.
      dual_clip_fraction (with `dual_clip`): share of tokens capped by the dual clip.
      entropy (with `entropy` `[B, T]`): mean per-token entropy (nats).
    """
    check_clip_config(clip_low, clip_high, dual_clip)
    check_token_arrays(advantages=advantages, loss_mask=loss_mask, entropy=entropy)
    mask = as_bool_mask(loss_mask)
    logr = log_ratio(logprobs, old_logprobs, mask)
    ratio = jnp.exp(logr)
    adv = select(advantages, mask)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    metrics = {
        "clip_fraction": masked_mean(clipped > unclipped, mask),
        "approx_kl": masked_mean(ratio - 1.0 - logr, mask),
    }
    if dual_clip is not None:
        capped = (adv < 0.0) & (-adv * dual_clip < jnp.maximum(unclipped, clipped))
        metrics["dual_clip_fraction"] = masked_mean(capped, mask)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, mask)
    return metrics


def explained_variance(values, returns, loss_mask) -> Array:
    """1 - Var[returns - values] / Var[returns] over policy tokens: 1 for a perfect critic,
    0 for one that predicts the mean, negative for worse. NaN when the returns are constant
    (undefined, as in stable-baselines3)."""
    check_token_arrays(values=values, returns=returns, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(select(returns, mask) - select(values, mask), mask)
    return jnp.where(
        var_returns > 0.0, 1.0 - var_residual / jnp.where(var_returns > 0.0, var_returns, 1.0), jnp.nan
    )


def value_metrics(values, old_values, returns, loss_mask, *, clip_range) -> dict[str, Array]:
    """Critic diagnostics: explained_variance, value_mean, and value_clip_fraction (share of
    policy tokens where the clipped value term decides the loss; see value_loss)."""
    check_value_clip(clip_range)
    check_token_arrays(values=values, old_values=old_values, returns=returns, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    values, old_values, returns = (select(x, mask) for x in (values, old_values, returns))
    clipped = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
    decided_by_clip = (clipped - returns) ** 2 > (values - returns) ** 2
    return {
        "explained_variance": explained_variance(values, returns, mask),
        "value_mean": masked_mean(values, mask),
        "value_clip_fraction": masked_mean(decided_by_clip, mask),
    }


def advantage_return_stats(advantages, returns, loss_mask) -> dict[str, Array]:
    """Mean, unbiased std, min and max of advantages and returns over policy tokens; keys
    `advantages/mean`, ..., `returns/max`."""
    check_token_arrays(advantages=advantages, returns=returns, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    stats = {}
    for name, x in (("advantages", advantages), ("returns", returns)):
        stats[f"{name}/mean"] = masked_mean(x, mask)
        stats[f"{name}/std"] = jnp.sqrt(masked_var(x, mask))
        stats[f"{name}/min"] = masked_min(x, mask)
        stats[f"{name}/max"] = masked_max(x, mask)
    return stats
