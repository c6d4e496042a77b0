"""The contract between retrieval and everything that asks it (rollout, evaluate, server).

`Retriever.search(queries, topk)` returns, for each query, up to `topk` passages best first.
In-process BM25/dense retrievers and the HTTP client all implement it, so callers never know
which one they hold.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrieved passage. `score` is backend-specific (BM25 score, inner product)."""

    id: str
    title: str
    text: str
    score: float = 0.0

    @property
    def contents(self) -> str:
        """The wiki-18 `contents` field: `"Title"\\ntext`."""
        return f'"{self.title}"\n{self.text}'


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """Top-`topk` passages per query, best first; one inner list per query."""
        ...
