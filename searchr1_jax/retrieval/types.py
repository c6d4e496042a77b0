"""The contract between retrieval and everything that asks it (rollout, evaluate, server).

`Retriever.search(queries, topk)` returns, for each query, up to `topk` passages best first.
In-process BM25/dense retrievers and the HTTP client all implement it, so callers never know
which one they hold.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable


def split_contents(contents: str) -> tuple[str, str]:
    """Split wiki-18 ``contents`` (``"Title"\\ntext``) into ``(title, text)``.

    The title is the first line with one pair of surrounding double quotes removed; a
    ``contents`` without a newline is all text (empty title). Only for display and for
    corpora's convenience: what a policy sees is formatted from ``contents`` itself
    (:mod:`searchr1_jax.retrieval.observation`).
    """
    first, newline, rest = contents.partition("\n")
    if not newline:
        return "", contents
    if len(first) >= 2 and first[0] == '"' and first[-1] == '"':
        first = first[1:-1]
    return first, rest


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrieved passage. `score` is backend-specific (BM25 score, inner product).

    `contents` is the corpus line's stored ``contents``, byte for byte: it is what the
    ``/retrieve`` API returns and what observations are formatted from, as in the original.
    When not given (a ``{id, title, text}`` corpus, or a passage built in code) it is
    ``"title"\\ntext``, the wiki-18 layout. Build a passage from stored contents with
    :meth:`from_contents`.
    """

    id: str
    title: str
    text: str
    score: float = 0.0
    contents: str = None  # type: ignore[assignment]  # filled in __post_init__ when None

    def __post_init__(self):
        if self.contents is None:
            object.__setattr__(self, "contents", f'"{self.title}"\n{self.text}')

    @classmethod
    def from_contents(cls, id: str, contents: str, score: float = 0.0) -> "Passage":
        """A passage whose `contents` is kept as given; title and text split from it for display."""
        title, text = split_contents(contents)
        return cls(id=id, title=title, text=text, score=score, contents=contents)


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """Top-`topk` passages per query, best first; one inner list per query."""
        ...
