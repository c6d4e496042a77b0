"""The two-stage reward of R1-Searcher (arXiv 2503.05592), on this project's tags.

Stage 1 teaches the model to call the search engine at all: 0.5 for a valid format plus 0.5
for at least one `<search>…</search>` call; the answer is not scored. Stage 2 scores the
answer by token F1 and subtracts 2 when the format is invalid. Format validity is
`is_valid_format` (think → (search → information → think)* → answer).
"""
from __future__ import annotations

from typing import Sequence

from searchr1_jax.rewards.metrics import f1, normalized_golds
from searchr1_jax.rewards.parse import count_searches, extract_answer, is_valid_format

STAGE1_FORMAT_REWARD = 0.5
STAGE1_SEARCH_REWARD = 0.5
STAGE2_FORMAT_PENALTY = -2.0


def r1_searcher_stage1(response: str, golds: str | Sequence[str]) -> float:
    """0.5·[valid format] + 0.5·[searched at least once]; in {0, 0.5, 1}.

    `golds` is validated (so a row without gold answers still fails loudly) but not used.
    """
    normalized_golds(golds)
    format_part = STAGE1_FORMAT_REWARD if is_valid_format(response) else 0.0
    search_part = STAGE1_SEARCH_REWARD if count_searches(response) > 0 else 0.0
    return format_part + search_part


def r1_searcher_stage2(response: str, golds: str | Sequence[str]) -> float:
    """F1 of the last answer against the golds, minus 2 if the format is invalid; in [−2, 1]."""
    answer_part = f1(extract_answer(response), golds)
    return answer_part + (0.0 if is_valid_format(response) else STAGE2_FORMAT_PENALTY)
