"""What is appended to a sequence after a turn: the retrieved passages or a corrective message.

Both are wrapped as `\\n\\n<information>…</information>\\n\\n` blocks. Search-R1 appends the
corrective message bare, but it contains the tags themselves ("put the answer between
<answer> and </answer>"), so the reward functions would read "and" as an answer and count
a search call the policy never made; inside an information block they treat it as opaque.
"""
from __future__ import annotations

from typing import Sequence

from searchr1_jax.retrieval.observation import format_passages, wrap_information
from searchr1_jax.retrieval.types import Passage


def corrective_text(search_open: str, search_stop: str, answer_open: str, answer_stop: str) -> str:
    """Search-R1's message after a turn that neither searched nor answered, wrapped."""
    return wrap_information(
        f"My previous action is invalid. If I want to search, I should put the query between "
        f"{search_open} and {search_stop}. If I want to give the final answer, I should put the "
        f"answer between {answer_open} and {answer_stop}. Let me try again.")


def passages_text(passages: Sequence[Passage]) -> str:
    """The observation after a search: the formatted passages, wrapped."""
    return wrap_information(format_passages(passages))


def closing_text() -> str:
    """The tail every observation ends with (`</information>\\n\\n`)."""
    marker = "\x00"
    return wrap_information(marker).split(marker, 1)[1]


def observation_ids(tokenizer, texts: Sequence[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each observation, at most `max_tokens` long, and how many were truncated.

    A longer observation loses the end of its passage text but keeps the closing tag and
    newlines, so the policy always sees a closed block.
    """
    if not texts:
        return [], 0
    tail = closing_text()
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if len(tail_ids) >= max_tokens:
        raise ValueError(f"rollout config field 'max_obs_tokens' ({max_tokens}) is too small to "
                         f"hold the closing {tail!r} ({len(tail_ids)} tokens)")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    long_rows = [i for i, ids in enumerate(encoded) if len(ids) > max_tokens]
    for i in long_rows:
        if not texts[i].endswith(tail):
            raise ValueError(f"observation {i} does not end with {tail!r}: {texts[i][-80:]!r}")
    if long_rows:
        heads = tokenizer([texts[i][: len(texts[i]) - len(tail)] for i in long_rows],
                          add_special_tokens=False)["input_ids"]
        for i, head in zip(long_rows, heads):
            encoded[i] = list(head[: max_tokens - len(tail_ids)]) + list(tail_ids)
    return [list(ids) for ids in encoded], len(long_rows)
