"""Loading a tokenizer from a local directory exactly as its files describe it.

transformers 5's AutoTokenizer picks a model-specific class from `config.json` when one sits
beside the tokenizer (an exported model directory), and such classes may rebuild the
pipeline from the vocabulary instead of using `tokenizer.json` as written. When
`tokenizer.json` exists we load it verbatim (the fast tokenizer it defines, with the chat
template and special tokens of `tokenizer_config.json`), so a model exported here tokenizes
exactly as it did in training.
"""
from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
