"""Answer metrics: exact match, substring exact match, token F1 — each the max over golds.

All compare normalised strings (see `normalize_answer`). A gold answer whose normalised
form is empty (e.g. "The", "?") is ignored, because it would match an empty prediction
(EM) or every prediction (subEM); if no gold answer is left, the call raises instead of
returning a score that means nothing. A prediction of None (no answer tag) scores 0.
"""
from __future__ import annotations

import collections
from typing import Sequence

from searchr1_jax.rewards.normalize import normalize_answer


def normalized_golds(golds: str | Sequence[str]) -> list[str]:
    """The non-empty normalised gold answers; a single str is one gold answer.

    Raises TypeError for a non-str gold and ValueError when none is left.
    """
    gold_list = [golds] if isinstance(golds, str) else list(golds)
    for gold in gold_list:
        if not isinstance(gold, str):
            raise TypeError(f"gold answers must be str, got {type(gold).__name__}: {gold!r}")
    normalized = [n for n in map(normalize_answer, gold_list) if n]
    if not normalized:
        raise ValueError(f"no usable gold answer (empty after normalisation): {gold_list!r}")
    return normalized


def exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    normalized = normalized_golds(golds)
    if pred is None:
        return 0.0
    return float(normalize_answer(pred) in normalized)


def sub_exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if a normalised gold answer is a substring of the normalised prediction.

    Plain character substring, as published (so gold "art" is found in "start").
    """
    normalized = normalized_golds(golds)
    if pred is None:
        return 0.0
    pred_norm = normalize_answer(pred)
    return float(any(gold in pred_norm for gold in normalized))


def f1(pred: str | None, golds: str | Sequence[str]) -> float:
    """Max over golds of the token-overlap F1 between normalised prediction and gold.

    Tokens are the whitespace-separated words of the normalised strings; overlap counts
    repeated tokens at most as often as they occur in both (multiset intersection).
    """
    normalized = normalized_golds(golds)
    if pred is None:
        return 0.0
    pred_tokens = normalize_answer(pred).split()
    return max(_token_f1(pred_tokens, gold.split()) for gold in normalized)


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    overlap = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)
