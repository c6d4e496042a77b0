"""Stop-string detection inside the jitted decode loop, however the tokenizer splits the string.

A character-level Aho-Corasick automaton over the stop strings (its states are their
prefixes) is lifted to tokens once, on the host: for every state q and token id t,
`packed[q, t]` holds the state after reading t's text from q and whether the stop strings
were completed while reading it. The decode loop then carries one int32 state per row and
does one table lookup per generated token.

Exactness assumption: the text of a token sequence is the concatenation of the texts of its
tokens decoded one at a time. It holds for byte-level BPE tokenizers (Qwen, Llama 3, GPT-2)
up to bytes of an unfinished UTF-8 character, which decode to U+FFFD on their own; since the
stop strings are ASCII and ASCII bytes never occur inside a multi-byte character, matching
is unaffected. `check_token_texts` verifies the assumption on a probe text.

Granularity: the token that completes a stop string is the last token kept. If that token
carries characters beyond the stop string, they stay in the policy's text; the query parser
reads the text up to the stop string.
"""
from __future__ import annotations

import dataclasses
import re
from collections import deque
from typing import Sequence

import jax.numpy as jnp
import numpy as np

# Turn outcomes the decode loop reports per row.
NOT_STOPPED, STOP_SEARCH, STOP_ANSWER, STOP_EOS, STOP_LENGTH = 0, 1, 2, 3, 4

# Bits of the packed table entry below the next state.
_SEARCH_HIT, _ANSWER_HIT, _ANSWER_FIRST = 1, 2, 4
_STATE_SHIFT = 3


@dataclasses.dataclass(frozen=True)
class CharAutomaton:
    """delta [Q, A] int32 over character classes (the stop strings' characters, then one
    class for every other character); accepts [Q] int8: 0, or 1 + index of the stop string
    completed on entering the state. State 0 is the empty prefix."""

    delta: np.ndarray
    accepts: np.ndarray
    alphabet: dict[str, int]

    @property
    def other_class(self) -> int:
        return len(self.alphabet)


def build_char_automaton(patterns: Sequence[str]) -> CharAutomaton:
    """The Aho-Corasick DFA of `patterns`, complete (every state has every transition)."""
    if not patterns or any(not p for p in patterns):
        raise ValueError(f"stop strings must be non-empty, got {list(patterns)!r}")
    alphabet = {c: i for i, c in enumerate(sorted({c for p in patterns for c in p}))}
    goto: list[dict[int, int]] = [{}]
    accepts = [0]
    for index, pattern in enumerate(patterns):
        state = 0
        for char in pattern:
            cls = alphabet[char]
            if cls not in goto[state]:
                goto.append({})
                accepts.append(0)
                goto[state][cls] = len(goto) - 1
            state = goto[state][cls]
        accepts[state] = index + 1
    num_classes = len(alphabet) + 1
    delta = np.zeros((len(goto), num_classes), np.int32)
    fail = [0] * len(goto)
    queue = deque()
    for cls in range(num_classes):
        child = goto[0].get(cls)
        if child is not None:
            delta[0, cls] = child
            queue.append(child)
    while queue:  # breadth first, so a state's failure target is complete before it is used
        state = queue.popleft()
        if not accepts[state]:
            accepts[state] = accepts[fail[state]]
        for cls in range(num_classes):
            child = goto[state].get(cls)
            if child is None:
                delta[state, cls] = delta[fail[state], cls]
            else:
                fail[child] = delta[fail[state], cls]
                delta[state, cls] = child
                queue.append(child)
    return CharAutomaton(delta=delta, accepts=np.asarray(accepts, np.int8), alphabet=alphabet)


@dataclasses.dataclass(frozen=True)
class StopTable:
    """packed [Q, V] int32 = next_state << 3 | hit bits; see `stop_step` for the decoding."""

    packed: np.ndarray

    @property
    def num_states(self) -> int:
        return self.packed.shape[0]


def build_stop_table(token_texts: Sequence[str], search_stop: str, answer_stop: str) -> StopTable:
    """Token-level transitions for the two stop strings over a vocabulary of decoded texts."""
    auto = build_char_automaton([search_stop, answer_stop])
    num_states, vocab = auto.delta.shape[0], len(token_texts)
    next_state = np.tile(np.arange(num_states, dtype=np.int32)[:, None], (1, vocab))
    bits = np.zeros((num_states, vocab), np.int32)
    # Tokens without a stop-string character send every state back to the empty prefix
    # (or keep it, when their text is empty) and complete nothing; only the rest need a walk.
    relevant = [i for i, text in enumerate(token_texts) if any(c in auto.alphabet for c in text)]
    plain = np.array([bool(text) for text in token_texts], bool)
    plain[relevant] = False
    next_state[:, plain] = 0
    if relevant:
        width = max(len(token_texts[i]) for i in relevant)
        pad_class = auto.other_class + 1  # padding: leaves the state unchanged
        delta = np.concatenate([auto.delta, np.arange(num_states, dtype=np.int32)[:, None]], axis=1)
        classes = np.full((len(relevant), width), pad_class, np.int32)
        for row, token in enumerate(relevant):
            text = token_texts[token]
            classes[row, :len(text)] = [auto.alphabet.get(c, auto.other_class) for c in text]
        state = np.tile(np.arange(num_states, dtype=np.int32)[:, None], (1, len(relevant)))
        hit_bits = np.zeros_like(state)
        for col in range(width):
            state = delta[state, classes[None, :, col]]
            accepted = auto.accepts[state]
            first_hit = hit_bits == 0
            hit_bits |= np.where(accepted == 1, _SEARCH_HIT, 0)
            hit_bits |= np.where(accepted == 2, _ANSWER_HIT | np.where(first_hit, _ANSWER_FIRST, 0), 0)
        next_state[:, relevant] = state
        bits[:, relevant] = hit_bits
    return StopTable(packed=(next_state << _STATE_SHIFT) | bits)


def stop_step(packed, state, tokens, search_enabled):
    """One automaton step inside the decode loop.

    packed [Q, V]; state, tokens [R] int32; search_enabled: bool scalar.
    Returns (next state [R], outcome [R]: NOT_STOPPED, STOP_SEARCH or STOP_ANSWER). When a
    token completes both strings the first one completed wins; with search disabled only the
    answer string stops.
    """
    entry = packed[state, tokens]
    search_hit = (entry & _SEARCH_HIT) > 0
    answer_hit = (entry & _ANSWER_HIT) > 0
    answer_first = (entry & _ANSWER_FIRST) > 0
    stops_search = search_hit & search_enabled & ~(answer_hit & answer_first)
    outcome = jnp.where(stops_search, STOP_SEARCH, jnp.where(answer_hit, STOP_ANSWER, NOT_STOPPED))
    return entry >> _STATE_SHIFT, outcome.astype(jnp.int32)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each id's text decoded on its own; ids the tokenizer does not know (a model vocabulary
    padded beyond the tokenizer's) get "" and never affect matching."""
    known = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return list(texts) + [""] * (vocab_size - known)


_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
PROBE_TEXT = ("<think> reason </think>\n<search> Zürich 2024? </search>\n\n<information>Doc 1"
              "(Title: \"Ünïcode — test\") text 東京</information>\n\n<answer> Beijing </answer>")


def _ascii_skeleton(text: str) -> str:
    """Text with every run of non-ASCII characters collapsed to one U+FFFD."""
    return _NON_ASCII_RUN.sub("\ufffd", text)


def check_token_texts(tokenizer, texts: Sequence[str], probe: str = PROBE_TEXT) -> None:
    """Raise ValueError unless per-token texts concatenate to the decoded probe text, up to
    non-ASCII characters (which ASCII stop strings can neither contain nor straddle)."""
    ids = tokenizer.encode(probe, add_special_tokens=False)
    whole = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pieces = "".join(texts[i] for i in ids)
    if _ascii_skeleton(whole) != _ascii_skeleton(pieces):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}): "
            f"tokens decoded one at a time do not concatenate to the decoded text "
            f"({pieces!r} vs {whole!r}), so stop strings cannot be matched token by token; "
            f"byte-level BPE tokenizers (Qwen, Llama 3) are supported")
