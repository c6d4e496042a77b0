"""The jitted model-side math of a training step: teacher-forced log-probs, values, and one
optimizer update of the policy or the critic over a mini-batch of micro-batches.

Functions take `(graphdef, params)` rather than NNX modules so that parameters and
optimizer states are plain pytrees that jit can shard and donate.

Alignment convention (shared with the rollout's Trajectory): the log-prob stored at slot
`s` is of the token at slot `s` given slots `< s`; slot 0 gets 0 (a prompt slot, never a
policy token).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from searchr1_jax import rl


class SequenceBatch(NamedTuple):
    """Fixed-shape arrays of trajectories: every field [B, S] (int32 tokens, float masks)."""

    tokens: jax.Array
    attention_mask: jax.Array
    positions: jax.Array
    loss_mask: jax.Array


class PolicyBatch(NamedTuple):
    seq: SequenceBatch
    old_logprobs: jax.Array  # [B, S]
    ref_logprobs: jax.Array  # [B, S] (zeros when no KL loss)
    advantages: jax.Array  # [B, S]


class CriticBatch(NamedTuple):
    seq: SequenceBatch
    old_values: jax.Array  # [B, S]
    returns: jax.Array  # [B, S]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static hyperparameters of the losses (hashable: part of the jit cache key)."""

    aggregation: str = "token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    entropy_coef: float = 0.0
    kl_loss_coef: float = 0.0  # 0: no KL term in the loss
    kl_estimator: str = "k3"
    value_clip: float = 0.5
    temperature: float = 1.0
    logit_chunk: int = 1024  # sequence chunk for the [B, chunk, V] logits (memory bound)


def _logprobs_and_entropy(model, hidden, targets, temperature: float):
    logits = model.logits(hidden) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def sequence_logprobs(model, seq: SequenceBatch, temperature: float = 1.0, chunk: int = 1024):
    """Teacher-forced log-probs and entropies, both float32 [B, S] (slot 0 is 0).

    The [B, S, V] logits are never materialised at once: the sequence is cut into chunks of
    `chunk` slots, each rematerialised in the backward pass.
    """
    hidden = model.hidden_states(seq.tokens, seq.attention_mask, seq.positions)[:, :-1]
    targets = seq.tokens[:, 1:]
    b, s1, e = hidden.shape
    if s1 <= chunk:
        logp, ent = _logprobs_and_entropy(model, hidden, targets, temperature)
    else:
        n = -(-s1 // chunk)
        pad = n * chunk - s1
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, e).swapaxes(0, 1)
        t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
        body = jax.checkpoint(lambda xs: _logprobs_and_entropy(model, xs[0], xs[1], temperature))
        logp, ent = jax.lax.map(body, (h, t))
        logp = logp.swapaxes(0, 1).reshape(b, -1)[:, :s1]
        ent = ent.swapaxes(0, 1).reshape(b, -1)[:, :s1]
    zero = jnp.zeros((b, 1), jnp.float32)
    return jnp.concatenate([zero, logp], axis=1), jnp.concatenate([zero, ent], axis=1)


def compute_logprobs(graphdef, params, seq: SequenceBatch, temperature: float = 1.0, chunk: int = 1024):
    """Log-probs [B, S] of `seq` under the policy `(graphdef, params)` (no gradient)."""
    return sequence_logprobs(nnx.merge(graphdef, params), seq, temperature, chunk)[0]


def compute_values(graphdef, params, seq: SequenceBatch):
    """Critic values [B, S]; the value at slot s estimates the return from slot s on."""
    return nnx.merge(graphdef, params)(seq.tokens, seq.attention_mask, seq.positions)


def make_optimizer(lr: float, warmup_steps: int, *, weight_decay: float, grad_clip: float,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a linear warmup to a constant rate (veRL's schedule)."""
    schedule = (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0
                else optax.constant_schedule(lr))
    if warmup_steps > 0:
        schedule = optax.join_schedules([schedule, optax.constant_schedule(lr)], [warmup_steps])
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def _split_micro(tree, num_micro: int):
    """Leading batch axis B → [num_micro, B // num_micro]."""
    return jax.tree.map(lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), tree)


def _accumulate(loss_fn, params, micro_batches):
    """Sum over micro-batches of value_and_grad(loss_fn) (loss already divided by the
    mini-batch denominator, so the sums are the full mini-batch's loss and gradient)."""
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def step(carry, mb):
        grads, total = carry
        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        return (jax.tree.map(jnp.add, grads, g), total + loss), metrics

    (grads, loss), metrics = jax.lax.scan(step, (zero_grads, jnp.zeros((), jnp.float32)), micro_batches)
    return grads, loss, jax.tree.map(jnp.mean, metrics)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _step(tx, params, opt_state, grads, loss, metrics, prefix: str):
    """Apply accumulated gradients; metrics named `<prefix>/…` with loss and grad norm.

    Guarded: when the loss, the gradient norm or the updated parameters are not finite (a
    bad batch, a NaN learning rate), the update is not applied (parameters and optimizer
    state stay as they were) and `<prefix>/skipped_update` is 1.
    """
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
    metrics[f"{prefix}/loss"] = loss
    metrics[f"{prefix}/grad_norm"] = grad_norm
    metrics[f"{prefix}/skipped_update"] = 1.0 - finite.astype(jnp.float32)
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics


def policy_update(graphdef, params, opt_state, batch: PolicyBatch, *, tx: optax.GradientTransformation,
                  cfg: LossConfig, num_micro: int):
    """One optimizer step of the policy on a mini-batch split into `num_micro` micro-batches.

    Returns (params, opt_state, metrics) with metrics averaged over micro-batches.
    """
    denominator = rl.loss_denominator(batch.seq.loss_mask, cfg.aggregation)

    def loss_fn(p, mb: PolicyBatch):
        logp, entropy = sequence_logprobs(nnx.merge(graphdef, p), mb.seq, cfg.temperature, cfg.logit_chunk)
        mask = mb.seq.loss_mask
        parts = rl.ppo_policy_loss(logp, mb.old_logprobs, mb.advantages, mask, aggregation=cfg.aggregation,
                                   clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                   entropy=entropy, entropy_coef=cfg.entropy_coef)
        numerator = parts.numerator
        metrics = rl.policy_metrics(logp, mb.old_logprobs, mb.advantages, mask, clip_low=cfg.clip_low,
                                    clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, entropy=entropy)
        if cfg.kl_loss_coef > 0:
            kl = rl.kl_loss(logp, mb.ref_logprobs, mask, cfg.kl_estimator, cfg.aggregation)
            numerator = numerator + cfg.kl_loss_coef * kl.numerator
            metrics["kl_loss"] = rl.aggregated_value(kl)
        return numerator / jnp.maximum(denominator, 1.0), metrics

    return _step(tx, params, opt_state, *_accumulate(loss_fn, params, _split_micro(batch, num_micro)), "actor")


def critic_update(graphdef, params, opt_state, batch: CriticBatch, *, tx: optax.GradientTransformation,
                  cfg: LossConfig, num_micro: int):
    """One optimizer step of the critic (clipped value loss), like `policy_update`."""
    denominator = rl.loss_denominator(batch.seq.loss_mask, cfg.aggregation)

    def loss_fn(p, mb: CriticBatch):
        values = compute_values(graphdef, p, mb.seq)
        parts = rl.clipped_value_loss(values, mb.old_values, mb.returns, mb.seq.loss_mask,
                                      clip_range=cfg.value_clip, aggregation=cfg.aggregation)
        metrics = rl.value_metrics(values, mb.old_values, mb.returns, mb.seq.loss_mask,
                                   clip_range=cfg.value_clip)
        return parts.numerator / jnp.maximum(denominator, 1.0), metrics

    return _step(tx, params, opt_state, *_accumulate(loss_fn, params, _split_micro(batch, num_micro)), "critic")
