"""The text a policy sees after a search, formatted exactly as Search-R1 does.

Search-R1 takes each hit's stored ``contents`` (wiki-18: ``"Title"\\ntext``), calls its first
line the title and the remaining lines the text, and writes ``Doc {i}(Title: {title}) {text}\\n``
per hit. The title therefore keeps wiki-18's double quotes (``Doc 1(Title: "Paris") Paris
is ...``), and any other ``contents`` (no newline, CRLF, a plain title) comes out as the
same split of it. ``Passage.contents`` is the stored text byte for byte, so models trained
with the original see exactly what they saw there.
The block is then stripped and wrapped as ``\\n\\n<information>…</information>\\n\\n``.
"""
from __future__ import annotations

from typing import Sequence

from searchr1_jax.retrieval.types import Passage


def format_passages(passages: Sequence[Passage]) -> str:
    """``Doc 1(Title: "T1") text1\\nDoc 2(Title: "T2") text2\\n…`` (one line per passage)."""
    lines = []
    for number, passage in enumerate(passages, start=1):
        title, _, text = passage.contents.partition("\n")
        lines.append(f"Doc {number}(Title: {title}) {text}\n")
    return "".join(lines)


def wrap_information(text: str) -> str:
    """``\\n\\n<information>{text stripped}</information>\\n\\n``, the observation appended to the context."""
    return f"\n\n<information>{text.strip()}</information>\n\n"
