"""Made-up pronounceable names built from consonant-vowel syllables, drawn from a seeded RNG.

Every name word is two open syllables ("Ka" "to" → "Kato"), so the demo tokenizer splits any
name, seen or not, into syllable tokens that training has already used: held-out entities
differ from training ones only in how their syllables combine, which is what makes copying a
name out of a retrieved passage learnable for a tiny model. Two syllables (70 × 70 possible
words) keep that copy as short as it can be while leaving room for a few thousand names.

A word is accepted only if its lower-case form is new and not a word of the demo's templates,
and if BM25's analyzer keeps it as one unchanged term: no stopword, nothing the stemmer shortens
(which could make two names one term). Today's analyzer leaves every two-syllable word alone;
the check keeps that true if the analyzer changes.
"""
from __future__ import annotations

import random
from typing import Iterable

from searchr1_jax.retrieval.bm25 import Analyzer

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in CONSONANTS for v in VOWELS)
_MAX_TRIES = 10_000


def split_syllables(word: str) -> list[str]:
    """The syllables of a generated word, in order: "Katora" → ["Ka", "to", "ra"]."""
    if len(word) % 2 or not word:
        raise ValueError(f"{word!r} is not a word of consonant-vowel syllables")
    pieces = [word[i : i + 2] for i in range(0, len(word), 2)]
    if any(p.lower() not in SYLLABLES for p in pieces):
        raise ValueError(f"{word!r} is not a word of consonant-vowel syllables")
    return pieces


class NameGenerator:
    """Unique name words; `reserved` holds lower-case words that must never be names."""

    def __init__(self, rng: random.Random, reserved: set[str]):
        self._rng = rng
        self._used = {w.lower() for w in reserved}
        self._analyzer = Analyzer()
        self._first = self._later = SYLLABLES

    def restrict_to(self, words: Iterable[str]) -> None:
        """From now on combine only syllables that `words` use in the same place (first or second).

        Held-out names built this way contain no token that the training names lack.
        """
        split = [[s.lower() for s in split_syllables(w)] for w in words]
        self._first = tuple(sorted({s[0] for s in split}))
        self._later = tuple(sorted({x for s in split for x in s[1:]}))
        if not self._first or not self._later:
            raise ValueError("restrict_to needs at least one word of two syllables")

    def word(self) -> str:
        """A capitalised two-syllable word never returned before, e.g. "Velo"."""
        for _ in range(_MAX_TRIES):
            candidate = (self._rng.choice(self._first) + self._rng.choice(self._later)).capitalize()
            lower = candidate.lower()
            if lower in self._used or self._analyzer.terms(candidate) != [lower]:
                continue
            self._used.add(lower)
            return candidate
        raise RuntimeError(f"no new name after {_MAX_TRIES} tries; the world is too large for two-syllable names")
