"""Reading a generated response: the final answer, the retrieved blocks, the format.

The response handed to reward functions is the text after the prompt: the model's own
tokens interleaved with the `<information>…</information>` blocks the rollout engine
inserted after each `</search>`, decoded without special tokens. Information blocks hold
corpus text, which may contain anything (even tag-like text), so every function here treats
their content as opaque and never reads answers or actions from it.
Any other text the engine inserts (e.g. a corrective message after an invalid action) is
read as the model's own; if it contains tags, wrap it in an information block.
"""
from __future__ import annotations

import re

_INFORMATION_BLOCK = re.compile(r"<information>(.*?)</information>", re.DOTALL)
_SEARCH_CALL = re.compile(r"<search>.*?</search>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def information_blocks(response: str) -> list[str]:
    """Contents of the closed `<information>…</information>` blocks, in order."""
    return _INFORMATION_BLOCK.findall(response)


def _without_information(response: str) -> str:
    # A space keeps the text on either side of a removed block from fusing into one tag.
    return _INFORMATION_BLOCK.sub(" ", response)


def extract_answer(response: str) -> str | None:
    """Stripped content of the last complete `<answer>…</answer>` pair outside information blocks.

    The original's rule: match `<answer>(.*?)</answer>` non-greedily from left to right and
    keep the last match, so a stray `</answer>` after the answer changes nothing
    (`<answer> Paris </answer>\\n</answer>` gives "Paris") and a nested opening stays in
    the content (`<answer>a <answer>b</answer>` gives "a <answer>b"). Only the response is
    searched, so the `<answer> Beijing </answer>` example inside the prompt can never be
    mistaken for the model's answer. Returns None when there is no complete pair; an empty
    pair gives "".
    """
    matches = _ANSWER.findall(_without_information(response))
    return matches[-1].strip() if matches else None


def count_searches(response: str) -> int:
    """Number of closed `<search>…</search>` calls the model made (information excluded)."""
    return len(_SEARCH_CALL.findall(_without_information(response)))


def is_valid_format(response: str) -> bool:
    """Whether the response follows think → (search → information → think)* → answer.

    Accepted, precisely (the whole response must match):
      [<think>] T </think> ( <search> T </search> <information> I </information>
                              <think> T </think> )* <answer> T </answer>
    where T is any text holding none of the eight tags (it may be empty), I is any text but
    `</information>` (retrieved passages are opaque), and only whitespace may stand between
    two blocks, before the first and after the last. The first `<think>` may be absent
    because some chat templates end the prompt with it already opened; its `</think>` may
    not. Tags are matched exactly (lower-case, no inner spaces).
    """
    return _VALID_FORMAT.fullmatch(response) is not None


_TEXT = r"(?:(?!</?(?:think|search|information|answer)>).)*"
_INFORMATION = r"(?:(?!</information>).)*"
_VALID_FORMAT = re.compile(
    rf"""\s*(?:<think>)?{_TEXT}</think>\s*
    (?:<search>{_TEXT}</search>\s*<information>{_INFORMATION}</information>\s*<think>{_TEXT}</think>\s*)*
    <answer>{_TEXT}</answer>\s*""",
    re.DOTALL | re.VERBOSE,
)
