"""Multi-turn Search-R1 rollouts: jitted prefill/decode over a KV cache kept across turns,
stop strings matched inside the decode loop, a retriever called once per turn for the batch."""
from searchr1_jax.rollout.actions import Action, read_action
from searchr1_jax.rollout.config import RolloutConfig
from searchr1_jax.rollout.driver import RolloutDriver
from searchr1_jax.rollout.engine import RolloutEngine, RolloutState, TurnResult, chunk_width
from searchr1_jax.rollout.observations import corrective_text, observation_ids, passages_text
from searchr1_jax.rollout.sampling import SamplingParams, filter_logits, sample_tokens
from searchr1_jax.rollout.stops import (StopTable, build_stop_table, check_token_texts,
                                        token_texts)
from searchr1_jax.rollout.trajectory import FINISH_REASONS, Trajectory

__all__ = [
    "Action", "FINISH_REASONS", "RolloutConfig", "RolloutDriver", "RolloutEngine",
    "RolloutState", "SamplingParams", "StopTable", "Trajectory", "TurnResult", "chunk_width",
    "build_stop_table", "check_token_texts", "corrective_text", "filter_logits",
    "observation_ids", "passages_text", "read_action", "sample_tokens", "token_texts",
]
