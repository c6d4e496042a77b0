"""KL between the policy and a frozen reference, per token, and the coefficient controllers.

Per-token estimators of KL(pi || pi_ref) from a sample of pi (Schulman, "Approximating KL
divergence", 2020); with d = log pi(x) - log pi_ref(x):
- `k1`: d. Unbiased, high variance, can be negative. The usual choice for KL in the reward.
- `k2`: d^2 / 2. Biased, low variance, non-negative.
- `k3`: exp(-d) + d - 1 (`low_var_kl`). Unbiased, non-negative; clipped to [-10, 10] as in
  the published GRPO runs, so one token whose probability collapsed cannot dominate the loss.

KL enters training in one of two places (config chooses):
- in the reward: `token_level_rewards(..., token_kl=kl_estimate(old_logprobs, ref_logprobs,
  mask, "k1"), kl_coef=controller.value)` (searchr1_jax.rl.advantages), with a `fixed` or
  `adaptive` controller;
- as a loss term: `kl_loss(logprobs, ref_logprobs, mask, "k3", mode)` added to the policy loss
  numerator with its coefficient (same denominator, same aggregation mode).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import Array

from searchr1_jax.rl.aggregation import Aggregated, aggregate
from searchr1_jax.rl.masked import as_bool_mask, check_token_arrays, select

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")
K3_CLIP = 10.0
# Bound on the log ratio fed to exp in k3: k3 already exceeds K3_CLIP for d < -2.6 or
# d > 11, so values are unchanged, and exp can neither overflow nor send NaN into a gradient.
_K3_LOG_RATIO_BOUND = 20.0


def kl_estimate(logprobs, ref_logprobs, loss_mask, estimator: str) -> Array:
    """Per-token KL estimate `[B, T]` float32 (nats); 0 where `loss_mask` is 0.

    `logprobs`, `ref_logprobs`: `[B, T]` log-probabilities of the sampled tokens under the
    policy and the reference. `estimator`: one of KL_ESTIMATORS.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"searchr1_jax.rl: unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}"
        )
    check_token_arrays(logprobs=logprobs, ref_logprobs=ref_logprobs, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    log_ratio = select(logprobs, mask) - select(ref_logprobs, mask)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    else:
        bounded = jnp.clip(log_ratio, -_K3_LOG_RATIO_BOUND, _K3_LOG_RATIO_BOUND)
        kl = jnp.clip(jnp.exp(-bounded) + bounded - 1.0, -K3_CLIP, K3_CLIP)
    return select(kl, mask)


def kl_loss(logprobs, ref_logprobs, loss_mask, estimator: str, aggregation: str) -> Aggregated:
    """KL as a loss term: `aggregate(kl_estimate(...), loss_mask, aggregation)`.

    Multiply the numerator by the KL coefficient and add it to the policy-loss numerator.
    """
    kl = kl_estimate(logprobs, ref_logprobs, loss_mask, estimator)
    return aggregate(kl, loss_mask, aggregation)


@dataclasses.dataclass
class FixedKLController:
    """A constant KL-in-reward coefficient `value`; `update` is a no-op."""

    value: float

    def __post_init__(self):
        if self.value < 0:
            raise ValueError(f"searchr1_jax.rl: KL coefficient must be >= 0, got {self.value}")

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps


@dataclasses.dataclass
class AdaptiveKLController:
    """Proportional controller of the KL coefficient (Ziegler et al. 2019, "Fine-tuning
    language models from human preferences", section 2.2).

    After a batch whose measured KL was `current_kl` (mean per-token KL, nats), over `n_steps`
    samples: e = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.
    The coefficient grows while the policy drifts past `target` and shrinks below it. Host-side
    state: save `value` with the checkpoint.
    """

    value: float
    target: float
    horizon: int

    def __post_init__(self):
        if self.value < 0:
            raise ValueError(f"searchr1_jax.rl: KL coefficient must be >= 0, got {self.value}")
        if self.target <= 0:
            raise ValueError(f"searchr1_jax.rl: adaptive KL target must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"searchr1_jax.rl: adaptive KL horizon must be > 0, got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        error = float(np.clip(float(current_kl) / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(
    kind: str, coef: float, target: float | None = None, horizon: int | None = None
) -> FixedKLController | AdaptiveKLController:
    """The controller named `kind` (one of KL_CONTROLLERS) starting at coefficient `coef`.

    `target` and `horizon` are required for `adaptive` and ignored for `fixed`.
    """
    if kind == "fixed":
        return FixedKLController(coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("searchr1_jax.rl: the adaptive KL controller needs `target` and `horizon`")
        return AdaptiveKLController(coef, target, horizon)
    raise ValueError(f"searchr1_jax.rl: unknown KL controller {kind!r}; expected one of {KL_CONTROLLERS}")
