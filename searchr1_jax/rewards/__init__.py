"""Rewards computed on the decoded response: answer extraction, EM/subEM/F1, format rewards."""
from searchr1_jax.rewards.config import REWARD_NAMES, RewardFn, default_reward_config, make_reward_fn
from searchr1_jax.rewards.format_reward import format_reward, gold_in_information
from searchr1_jax.rewards.metrics import exact_match, f1, normalized_golds, sub_exact_match
from searchr1_jax.rewards.normalize import normalize_answer
from searchr1_jax.rewards.parse import count_searches, extract_answer, information_blocks, is_valid_format
from searchr1_jax.rewards.r1_searcher import r1_searcher_stage1, r1_searcher_stage2

__all__ = [
    "REWARD_NAMES",
    "RewardFn",
    "count_searches",
    "default_reward_config",
    "exact_match",
    "extract_answer",
    "f1",
    "format_reward",
    "gold_in_information",
    "information_blocks",
    "is_valid_format",
    "make_reward_fn",
    "normalize_answer",
    "normalized_golds",
    "r1_searcher_stage1",
    "r1_searcher_stage2",
    "sub_exact_match",
]
