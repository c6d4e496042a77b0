"""Answer normalisation shared by every answer metric.

Follows the SQuAD-style rule the Search-R1 papers report with (lower-case, drop punctuation,
drop the articles a/an/the, collapse whitespace), extended to Unicode so that text a model
writes with typographic characters scores like its ASCII spelling: NFKC folds compatibility
forms (full-width letters, ligatures, composed vs decomposed accents) and every character in
a Unicode punctuation category is dropped, not only `string.punctuation`. On ASCII text the
result is identical to the original rule, so published EM numbers stay comparable.
Accents are kept ("Beyoncé" and "Beyonce" differ), as in the original.
"""
from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_punctuation(ch: str) -> bool:
    # `string.punctuation` also holds ASCII symbols ($ + < = > ^ ` | ~) that Unicode files
    # under S*, and the original drops them, so both tests are needed.
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Normalised form of an answer string, used for EM, subEM, F1 and retrieval checks.

    Steps, in order: NFKC, lower-case, delete punctuation (no space is left in its place, so
    "New-York" becomes "newyork" as in the original), replace the articles a/an/the by a
    space, collapse runs of whitespace to one space and strip the ends.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects str, got {type(text).__name__}: {text!r}")
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())
