"""Turn limits, token budgets and sampling settings of a rollout.

The trainer builds it from the `rollout` block of its ml_collections config, whose fields
carry the same names: `RolloutConfig.from_mapping(config.rollout)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """All lengths are in tokens.

    max_turns: generation turns that may end in a search (an invalid action also uses one);
        one more, final turn follows in which `search_stop` no longer stops generation.
    max_new_tokens: most tokens the policy generates in one turn.
    max_obs_tokens: longest observation (retrieved passages or corrective message) appended
        after a turn; longer ones are truncated inside, keeping their closing tag.
    max_prompt_tokens: longest accepted prompt.
    max_context_tokens: slots per sequence (prompt + every turn + every observation); the
        trajectory arrays are this wide. 0 means room for every turn and observation at full
        length: max_prompt_tokens + (max_turns + 1) * max_new_tokens + max_turns * max_obs_tokens.
    temperature, top_p, top_k: sampling (top_k = 0 and top_p = 1 switch those filters off).
    greedy: argmax decoding; the logprobs recorded are then those of temperature 1.
    n_samples: sequences sampled per prompt (the GRPO group size); they share one prefill.
    topk: passages retrieved per query.
    search_stop, answer_stop: the closing tags that end a turn; the opening tags are the
        same names without the slash.
    """

    max_turns: int = 4
    max_new_tokens: int = 500
    max_obs_tokens: int = 500
    max_prompt_tokens: int = 4096
    max_context_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    n_samples: int = 1
    topk: int = 3
    search_stop: str = "</search>"
    answer_stop: str = "</answer>"

    def __post_init__(self):
        for name in ("max_new_tokens", "max_obs_tokens", "max_prompt_tokens", "n_samples", "topk"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                     name, "must be an integer >= 1")
        _require(isinstance(self.max_turns, int) and self.max_turns >= 0, "max_turns",
                 "must be an integer >= 0")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        _require(isinstance(self.max_context_tokens, int) and self.max_context_tokens >= 0,
                 "max_context_tokens", "must be an integer >= 0 (0: derived from the other limits)")
        _require(self.context_tokens > self.max_prompt_tokens, "max_context_tokens",
                 f"must exceed max_prompt_tokens ({self.max_prompt_tokens})")
        _require(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
                 "must be a finite number > 0")
        _require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _require(isinstance(self.greedy, bool), "greedy", "must be a bool")
        for name in ("search_stop", "answer_stop"):
            tag = getattr(self, name)
            _require(isinstance(tag, str) and tag.startswith("</") and tag.endswith(">")
                     and len(tag) > 3 and tag.isascii(), name,
                     "must be an ASCII closing tag such as '</search>'")
        _require(self.search_stop != self.answer_stop, "answer_stop", "must differ from search_stop")

    @property
    def context_tokens(self) -> int:
        """Slots per sequence: max_context_tokens, or the derived default when it is 0."""
        if self.max_context_tokens:
            return self.max_context_tokens
        return (self.max_prompt_tokens + (self.max_turns + 1) * self.max_new_tokens
                + self.max_turns * self.max_obs_tokens)

    @property
    def search_open(self) -> str:
        return self.search_stop.replace("</", "<", 1)

    @property
    def answer_open(self) -> str:
        return self.answer_stop.replace("</", "<", 1)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "RolloutConfig":
        """From a dict or ml_collections.ConfigDict; missing fields take their defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping.keys()) - fields)
        if unknown:
            raise ValueError(f"unknown rollout config field(s) {unknown}; valid: {sorted(fields)}")
        return cls(**{key: mapping[key] for key in mapping.keys()})


def _require(ok: bool, field: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"rollout config field {field!r} {rule}")
