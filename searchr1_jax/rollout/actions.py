"""Reading a finished turn: did the policy search (and for what), answer, or do neither?

Semantics of Search-R1: a turn that stopped at the search closing tag is a search if an
opening tag precedes it in the same turn (the query is the stripped text between the last
opening tag and the closing one, possibly empty); a turn that stopped at the answer closing
tag is an answer if an opening tag precedes it; anything else (EOS, the token limit, a
closing tag without its opening) is an invalid action.
"""
from __future__ import annotations

import dataclasses

from searchr1_jax.rollout.stops import STOP_ANSWER, STOP_SEARCH

SEARCH, ANSWER, INVALID = "search", "answer", "invalid"


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # SEARCH, ANSWER or INVALID
    query: str | None = None


def read_action(outcome: int, text: str, *, search_open: str, search_stop: str,
                answer_open: str, answer_stop: str) -> Action:
    """The action of one turn from its stop outcome (stops.STOP_*) and decoded text.

    Only the text up to the first closing tag counts (the stop rule guarantees it ends the
    turn, give or take the rest of its last token).
    """
    if outcome == STOP_SEARCH:
        end = text.find(search_stop)
        start = text.rfind(search_open, 0, max(end, 0))
        if end >= 0 and start >= 0:
            return Action(SEARCH, text[start + len(search_open):end].strip())
    elif outcome == STOP_ANSWER:
        end = text.find(answer_stop)
        if end >= 0 and text.rfind(answer_open, 0, end) >= 0:
            return Action(ANSWER)
    return Action(INVALID)
