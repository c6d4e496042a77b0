"""The rollout's output: what the trainer scores, rewards and learns from.

Row layout (slots 0 … S-1, S = RolloutConfig.context_tokens): the prompt in slots
0 … prompt_len-1, then the response, in which policy tokens and observation tokens follow
one another as they were produced, ending at slot response_end-1; padding after that.
There is no padding inside a row, so positions are simply 0 … response_end-1.

Logprob alignment: `logprobs[b, s]` is the sampling logprob of the token at slot s given
slots < s, i.e. it comes from the logits computed at slot s-1. A teacher-forced pass gives
the same number as `log_softmax(model(tokens, attention_mask)[b, s-1] / T)[tokens[b, s]]`.

The last real slot of every row holds a policy token (an observation is only appended when
the policy gets to respond to it), so the token-level reward goes at response_end - 1.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

FINISH_REASONS = ("answer", "max_turns", "context_budget")


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Device arrays (sharded like the rollout's rows when a mesh was given), R rows × S slots:

    tokens [R, S] int32 (pad id outside attention_mask); attention_mask [R, S] int32 (1 on
    real tokens); positions [R, S] int32; loss_mask [R, S] int32 (1 exactly on tokens the
    policy sampled: not prompt, observation or padding); logprobs [R, S] float32 (sampling
    logprobs at loss_mask slots, 0 elsewhere); prompt_len [R] int32; response_end [R] int32.

    Host numpy arrays [R]: turns (generation turns), searches (queries sent to the
    retriever), valid_actions (turns that ended in a well-formed search or answer),
    finish_reason (one of FINISH_REASONS); responses: the decoded text of slots
    prompt_len … response_end-1 (observations included, special tokens skipped), which is
    what the reward functions read; stats: rollout-wide counters and timings.
    Row b * n_samples + i is sample i of prompt b.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    positions: jax.Array
    loss_mask: jax.Array
    logprobs: jax.Array
    prompt_len: jax.Array
    response_end: jax.Array
    turns: np.ndarray
    searches: np.ndarray
    valid_actions: np.ndarray
    finish_reason: np.ndarray
    responses: list[str]
    stats: dict[str, float]


@functools.partial(jax.jit, static_argnames=("width", "pad_id"))
def trajectory_arrays(cache_valid, cache_length, slot_tokens, slot_logprobs, slot_policy,
                      prompt_len, *, width: int, pad_id: int) -> dict[str, jax.Array]:
    """The device fields of a Trajectory from a finished RolloutState's arrays (all [R, ≥width])."""
    valid = cache_valid[:, :width]
    policy = slot_policy[:, :width] & valid
    return dict(
        tokens=jnp.where(valid, slot_tokens[:, :width], pad_id).astype(jnp.int32),
        attention_mask=valid.astype(jnp.int32),
        positions=jnp.maximum(jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1, 0),
        loss_mask=policy.astype(jnp.int32),
        logprobs=jnp.where(policy, slot_logprobs[:, :width], 0.0),
        prompt_len=prompt_len.astype(jnp.int32),
        response_end=cache_length.astype(jnp.int32),
    )
