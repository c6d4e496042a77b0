"""The format-aware outcome reward of Search-R1's second paper (arXiv 2505.15117).

Correctness is exact match of the last `<answer>` (see `exact_match`); validity is
`is_valid_format`. The five branches, in the order they are tested:

| answer             | format  | reward                                                 |
|--------------------|---------|--------------------------------------------------------|
| correct            | valid   | 1.0                                                    |
| correct            | invalid | 1 − lambda_f                                           |
| wrong or none      | valid   | lambda_s (+ retrieval_bonus if a gold answer is in an   |
|                    |         | `<information>` block)                                 |
| wrong              | invalid | wrong_invalid_score                                    |
| none               | invalid | 0.0                                                    |

No chat-template marker is looked for: the response alone decides.
"""
from __future__ import annotations

from typing import Sequence

from searchr1_jax.rewards.metrics import exact_match, normalized_golds
from searchr1_jax.rewards.normalize import normalize_answer
from searchr1_jax.rewards.parse import extract_answer, information_blocks, is_valid_format


def format_reward(
    response: str,
    golds: str | Sequence[str],
    lambda_f: float = 0.2,
    lambda_s: float = 0.2,
    retrieval_bonus: float = 0.0,
    wrong_invalid_score: float = 0.1,
) -> float:
    """Reward of one response (text after the prompt, information blocks included).

    The published runs use lambda_f = lambda_s = 0.2, retrieval_bonus = 0 and
    wrong_invalid_score = 0.1.
    """
    answer = extract_answer(response)
    correct = exact_match(answer, golds) == 1.0  # also rejects unusable golds
    valid = is_valid_format(response)
    if correct and valid:
        return 1.0
    if correct:
        return 1.0 - lambda_f
    if valid:
        return lambda_s + (retrieval_bonus if gold_in_information(response, golds) else 0.0)
    if answer is not None:
        return wrong_invalid_score
    return 0.0


def gold_in_information(response: str, golds: str | Sequence[str]) -> bool:
    """Whether a normalised gold answer occurs as whole words in a normalised information block.

    Whole words rather than a character substring, because retrieved passages are long and a
    short gold ("1", "art") would otherwise be found inside unrelated words ("1999", "start").
    """
    padded_golds = [f" {gold} " for gold in normalized_golds(golds)]
    for block in information_blocks(response):
        padded_block = f" {normalize_answer(block)} "
        if any(gold in padded_block for gold in padded_golds):
            return True
    return False
