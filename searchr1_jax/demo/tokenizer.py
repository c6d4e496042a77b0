"""The demo's tokenizer: whole words for the fixed wording, syllables (or whole words) for made-up names.

Built with the `tokenizers` library as a Unigram model over GPT-2-style byte-level
pre-tokens, and saved in Hugging Face format so `AutoTokenizer.from_pretrained(dir)` loads it
offline:

- Every pre-token of the demo texts (" capital", " of", "?", "\\n\\n", " 1", "(") becomes one
  piece, so the instruction, questions, passages and thinking are one token per word. Pieces
  score alike (so encoding picks the fewest pieces: " to" stays whole although " " and the
  syllable "to" are pieces too), with their log frequency as a tie-breaker too small to ever
  outweigh one piece more.
- With `split_names` (the full demo), a name word (capitalised consonant-vowel syllables, see
  `names.py`) is never a piece: it counts towards its syllables (" Ka", "to", "ra"), and all
  syllables are pieces in every position, so any name, including names of held-out entities,
  becomes a few syllable tokens that training has used. Without it (the reduced demo), a name
  word seen in the texts is one piece like any other word; syllables stay pieces for names
  never seen.
- The 256 byte-level symbols are pieces scored far below every other piece, so any text
  encodes (one token per byte at worst) and decodes back to itself exactly.
- The Search-R1 tags are single, non-special added tokens (they decode as text); `<|endoftext|>`
  (eos) and `<|pad|>` (padding) are special.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from searchr1_jax.demo.names import SYLLABLES, split_syllables

TAGS = ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_SPACE = "Ġ"  # the byte-level symbol of " "
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")
_PIECE_SCORE = -1.0
_TIE_BREAK = 1e-3  # weight of a piece's log frequency: |log p| < 50, so < 0.05 of one piece
_FALLBACK_SCORE = -10.0  # single byte symbols: used only where no piece fits


def _is_name_word(word: str) -> bool:
    if not word[:1].isupper():
        return False
    try:
        split_syllables(word)
    except ValueError:
        return False
    return True


def _pieces(pre_token: str, split_names: bool) -> list[str]:
    """Pieces one byte-level pre-token counts towards: itself, or a name's syllables."""
    space, word = (_SPACE, pre_token[1:]) if pre_token.startswith(_SPACE) else ("", pre_token)
    if not (split_names and _is_name_word(word)):
        return [pre_token]
    first, *rest = split_syllables(word)
    return [space + first] + [s.lower() for s in rest]


def count_pieces(texts: Iterable[str], split_names: bool = True) -> collections.Counter:
    """How often each piece occurs in `texts` (tags excluded: they are added tokens)."""
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts: collections.Counter = collections.Counter()
    for text in texts:
        for chunk in _TAG_SPLIT.split(text):
            if chunk and chunk not in TAGS:
                for pre_token, _ in pre_tokenizer.pre_tokenize_str(chunk):
                    counts.update(_pieces(pre_token, split_names))
    return counts


def train_tokenizer(texts: Iterable[str], split_names: bool = True) -> Tokenizer:
    """A tokenizer whose word pieces are those of `texts`; ids 0 and 1 are eos and pad.

    split_names: names become syllable tokens (True) or one token per name word (False).
    """
    counts = count_pieces(texts, split_names)
    total = sum(counts.values())
    scores = {piece: _PIECE_SCORE + _TIE_BREAK * math.log(n / total) for piece, n in counts.items()}
    rarest = min(scores.values(), default=_PIECE_SCORE)
    for syllable in SYLLABLES:
        for piece in (_SPACE + syllable.capitalize(), syllable.capitalize(), syllable):
            scores.setdefault(piece, rarest)
    for symbol in pre_tokenizers.ByteLevel.alphabet():
        scores.setdefault(symbol, _FALLBACK_SCORE)
    fixed = [EOS_TOKEN, PAD_TOKEN, *TAGS]
    vocab = [(token, 0.0) for token in fixed]
    # Ids in piece order, not score order: texts with other word frequencies (another noise
    # level of the behaviour trajectories) give the same ids, so trained models stay usable.
    vocab += sorted((p, s) for p, s in scores.items() if p not in fixed)

    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS_TOKEN, PAD_TOKEN)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Write `tokenizer` to `out_dir` in the Hugging Face format (tokenizer.json + configs)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    ).save_pretrained(os.fspath(out_dir))
    # transformers 5 writes its own class name, which transformers 4 cannot resolve; both load
    # the generic fast tokenizer under this name.
    config_path = os.path.join(os.fspath(out_dir), "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
