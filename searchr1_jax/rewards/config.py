"""The reward function chosen per data_source by an ml_collections config.

    cfg = default_reward_config()
    cfg.name = "format"
    cfg.per_source = {"hotpotqa": "f1"}
    reward = make_reward_fn(cfg)
    reward(response, golden_answers, data_source)  # -> float

Names: em, subem, f1 (metric of the last `<answer>`, 0 when there is none), format (the
format-aware reward, using lambda_f, lambda_s, retrieval_bonus, wrong_invalid_score),
r1_stage1, r1_stage2 (R1-Searcher). A data_source absent from per_source uses `name`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Mapping, Sequence

import ml_collections

from searchr1_jax.rewards.format_reward import format_reward
from searchr1_jax.rewards.metrics import exact_match, f1, sub_exact_match
from searchr1_jax.rewards.parse import extract_answer
from searchr1_jax.rewards.r1_searcher import r1_searcher_stage1, r1_searcher_stage2

REWARD_NAMES = ("em", "subem", "f1", "format", "r1_stage1", "r1_stage2")
_FORMAT_FIELDS = ("lambda_f", "lambda_s", "retrieval_bonus", "wrong_invalid_score")

RewardFn = Callable[[str, Sequence[str], str], float]


def default_reward_config() -> ml_collections.ConfigDict:
    """Exact match everywhere, with the published format-reward values ready for `format`."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "em"
    cfg.lambda_f = 0.2
    cfg.lambda_s = 0.2
    cfg.retrieval_bonus = 0.0
    cfg.wrong_invalid_score = 0.1
    cfg.per_source = {}
    return cfg


def make_reward_fn(config: ml_collections.ConfigDict) -> RewardFn:
    """A picklable callable (response, golden_answers, data_source) -> float.

    Fields missing from `config` take their default; unknown fields, unknown reward names
    and non-numeric or non-finite lambdas raise ValueError naming the field.
    """
    defaults = default_reward_config()
    unknown = sorted(set(config.keys()) - set(defaults.keys()))
    if unknown:
        raise ValueError(f"unknown reward config field(s) {unknown}; valid: {sorted(defaults.keys())}")
    merged = {key: config.get(key, defaults[key]) for key in defaults.keys()}
    params = {}
    for field in _FORMAT_FIELDS:
        value = merged[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"reward config field {field!r} must be a finite number, got {value!r}")
        params[field] = float(value)
    per_source = merged["per_source"]
    if isinstance(per_source, ml_collections.ConfigDict):
        per_source = per_source.to_dict()
    if not isinstance(per_source, Mapping):
        raise ValueError(
            f"reward config field 'per_source' must map data_source -> name, got {per_source!r}")
    per_source = {str(source): _check_name(name, f"per_source[{source!r}]")
                  for source, name in per_source.items()}
    return _PerSourceReward(
        default=_check_name(merged["name"], "name"),
        per_source=per_source,
        format_params=params,
    )


def _check_name(name, field: str) -> str:
    if name not in REWARD_NAMES:
        raise ValueError(
            f"reward config field {field}: unknown reward {name!r}; valid: {', '.join(REWARD_NAMES)}")
    return name


def _answer_metric(metric, response: str, golds: Sequence[str]) -> float:
    return metric(extract_answer(response), golds)


# Every reward but "format", which also takes the configured lambdas.
_PLAIN_REWARDS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "em": functools.partial(_answer_metric, exact_match),
    "subem": functools.partial(_answer_metric, sub_exact_match),
    "f1": functools.partial(_answer_metric, f1),
    "r1_stage1": r1_searcher_stage1,
    "r1_stage2": r1_searcher_stage2,
}


@dataclasses.dataclass(frozen=True)
class _PerSourceReward:
    default: str
    per_source: dict[str, str]
    format_params: dict[str, float]

    def __call__(self, response: str, golden_answers: Sequence[str], data_source: str) -> float:
        name = self.per_source.get(data_source, self.default)
        if name == "format":
            return format_reward(response, golden_answers, **self.format_params)
        return _PLAIN_REWARDS[name](response, golden_answers)
