"""The PPO clipped policy loss with asymmetric clipping, dual clip and an entropy bonus.

Per policy token, with ratio r = pi(a|s) / pi_old(a|s) and advantage A:
    loss = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))
(separate low/high epsilons: DAPO's "clip-higher"). With `dual_clip = c > 1` (Ye et al. 2020),
a token with A < 0 has its loss capped at -A * c, so a huge ratio on a bad action cannot
produce an unbounded update. The entropy bonus subtracts `entropy_coef * H` per token.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import Array

from searchr1_jax.rl.aggregation import Aggregated, aggregate
from searchr1_jax.rl.masked import as_bool_mask, check_token_arrays, select

# A ratio beyond e^20 means the update has already diverged; bounding the log ratio keeps the
# loss finite and its gradient 0 there, where exp would give inf and then NaN gradients.
LOG_RATIO_BOUND = 20.0


def check_clip_config(clip_low, clip_high, dual_clip) -> None:
    """Raise ValueError for impossible clipping settings given as Python numbers."""
    if isinstance(clip_low, numbers.Real) and not 0.0 <= clip_low < 1.0:
        raise ValueError(f"searchr1_jax.rl: clip_low must be in [0, 1), got {clip_low}")
    if isinstance(clip_high, numbers.Real) and clip_high < 0.0:
        raise ValueError(f"searchr1_jax.rl: clip_high must be >= 0, got {clip_high}")
    if isinstance(dual_clip, numbers.Real) and dual_clip <= 1.0:
        raise ValueError(f"searchr1_jax.rl: dual_clip must be > 1 (or None to disable), got {dual_clip}")


def log_ratio(logprobs, old_logprobs, loss_mask) -> Array:
    """`log pi - log pi_old` `[B, T]` float32, bounded to +-LOG_RATIO_BOUND; 0 off policy tokens."""
    check_token_arrays(logprobs=logprobs, old_logprobs=old_logprobs, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    diff = select(logprobs, mask) - select(old_logprobs, mask)
    return jnp.clip(diff, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def clipped_surrogate(
    logprobs, old_logprobs, advantages, loss_mask, clip_low=0.2, clip_high=0.2, dual_clip=None
) -> Array:
    """Per-token clipped policy loss `[B, T]` float32 (to minimise); 0 off policy tokens.

    `logprobs` (differentiated), `old_logprobs` (sampling policy), `advantages`: `[B, T]`.
    """
    check_clip_config(clip_low, clip_high, dual_clip)
    check_token_arrays(advantages=advantages, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    ratio = jnp.exp(log_ratio(logprobs, old_logprobs, mask))
    adv = select(advantages, mask)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(adv < 0.0, jnp.minimum(loss, -adv * dual_clip), loss)
    return select(loss, mask)


def token_entropy(logits) -> Array:
    """Entropy (nats) of the categorical over the last axis: `[..., V]` logits -> `[...]` float32."""
    log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    loss_mask,
    *,
    aggregation: str,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    entropy=None,
    entropy_coef=0.0,
) -> Aggregated:
    """Clipped policy loss minus the entropy bonus, as `Aggregated(numerator, denominator)`.

    `entropy` `[B, T]` (optional, e.g. `token_entropy(logits)`): per-token policy entropy.
    `aggregation`: one of AGGREGATIONS. To add KL as a loss term, add
    `kl_coef * kl_loss(...).numerator` to the numerator: the denominators are identical.
    """
    per_token = clipped_surrogate(
        logprobs, old_logprobs, advantages, loss_mask, clip_low, clip_high, dual_clip
    )
    if entropy is not None:
        check_token_arrays(entropy=entropy, loss_mask=loss_mask)
        per_token = per_token - entropy_coef * select(entropy, as_bool_mask(loss_mask))
    return aggregate(per_token, loss_mask, aggregation)
