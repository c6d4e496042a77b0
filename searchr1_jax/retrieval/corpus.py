"""Streaming reader for passage corpora in jsonl.

One passage a line, in either of the two schemas users have:

- ``{"id": ..., "contents": "\\"Title\\"\\ntext"}`` (wiki-18 / FlashRAG / Pyserini): ``contents``
  is kept byte for byte (``Passage.contents``); for display, the first line is the title,
  one pair of surrounding double quotes removed, and the rest is the text (a ``contents``
  without a newline is all text).
- ``{"id": ..., "title": ..., "text": ...}`` (DPR-style tools).

``id`` may be a string or an integer (integers become their decimal string); ``contents``,
``title`` and ``text`` must be strings. Other fields are ignored and blank lines are
skipped. Anything else (invalid JSON, a missing field, a wrong type) raises
:class:`CorpusError` naming the file and the 1-based line number.

The reader streams (wiki-18 has 21M lines) and yields :class:`Passage` with score 0.0.
Index directories store passages with :mod:`searchr1_jax.retrieval.docstore`
(``write_docstore(passages, out_dir)``, ``DocStore.open(index_dir)``), re-exported here.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from searchr1_jax.retrieval.docstore import DocStore, write_docstore  # noqa: F401  (re-export)
from searchr1_jax.retrieval.types import Passage, split_contents  # noqa: F401  (split_contents re-exported)

_READ_CHUNK_BYTES = 1 << 24


class CorpusError(ValueError):
    """A corpus line that is not a passage; the message names the file and line."""


def _parse_id(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise CorpusError(f"{where}: field 'id' must be a string or an integer, got {type(value).__name__}")


def _string_field(row: dict, name: str, where: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def parse_passage(line: str, where: str) -> Passage:
    """Parse one jsonl line into a Passage; `where` ("file:line") prefixes any error."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise CorpusError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise CorpusError(f"{where}: missing field 'id'")
    pid = _parse_id(row["id"], where)
    if "contents" in row:
        return Passage.from_contents(pid, _string_field(row, "contents", where))
    missing = [name for name in ("title", "text") if name not in row]
    if missing:
        raise CorpusError(
            f"{where}: missing field(s) {missing}; a passage needs 'contents' or both 'title' and 'text'"
        )
    return Passage(id=pid, title=_string_field(row, "title", where), text=_string_field(row, "text", where))


def iter_passages(path: str | os.PathLike) -> Iterator[Passage]:
    """Yield the passages of a jsonl corpus in file order, streaming."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield parse_passage(line, f"{path}:{line_number}")


def count_lines(path: str | os.PathLike) -> int:
    """Lines in a file, a last line without newline included (for progress-bar totals); reads 16 MiB at a time."""
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK_BYTES):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")
