"""Raw QA jsonl (FlashRAG style) → Search-R1 parquet, one file per split.

    python -m searchr1_jax.data.convert --split train --out data/ \\
        --input nq/train.jsonl --data-source nq \\
        --input hotpotqa/train.jsonl --data-source hotpotqa \\
        [--tokenizer /models/Qwen2.5-3B] [--template auto|base|chat] [--skip-invalid]

writes data/train.parquet holding both sources (nq rows first). Run it once per split.

The stored `prompt` is always the Search-R1 user message, so the file stays usable by
Search-R1 itself. `extra_info.prompt_text` holds the prompt rendered for the chosen template
(`data.prompts.render_prompt`): the instruction as is (`base`), or the tokenizer's chat
template with the assistant turn opened (`chat`, read from the tokenizer folder); `auto` (the
default) is `chat` when --tokenizer has a chat template, else `base`. Training and evaluation
render the stored `prompt` again with their own tokenizer, so this field is informational.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from searchr1_jax.data.flashrag import QARecord, read_flashrag_jsonl
from searchr1_jax.data.prompts import TEMPLATES, chat_messages, render_prompt
from searchr1_jax.data.schema import Example, write_examples

__all__ = ["convert", "load_tokenizer", "main", "merge", "read_flashrag_jsonl"]

logger = logging.getLogger(__name__)
SPLITS = ("train", "test")


def convert(
    records: Sequence[QARecord],
    data_source: str,
    split: str,
    template: str = "auto",
    tokenizer=None,
) -> list[Example]:
    """Examples of one source; `index` is the record's position in `records`.

    `question` holds the record's question stripped of surrounding whitespace.

    `tokenizer` (a transformers tokenizer with a chat template) is needed for template "chat";
    "auto" renders with the chat template when `tokenizer` has one, else the raw text.
    """
    if not data_source.strip():
        raise ValueError("data_source is empty")
    examples = []
    for index, record in enumerate(tqdm(records, desc=f"{data_source} {split}", disable=None)):
        prompt = chat_messages(record.question)
        examples.append(Example(
            data_source=data_source,
            prompt=prompt,
            golden_answers=list(record.golden_answers),
            split=split,
            index=index,
            question=record.question.strip(),
            prompt_text=render_prompt(prompt, template, tokenizer),
        ))
    return examples


def merge(parts: Sequence[Sequence[Example]]) -> list[Example]:
    """One list of several sources' examples, in the given order.

    Raises ValueError if the parts mix splits or if a (data_source, index) key repeats
    (the same source given twice).
    """
    merged = [example for part in parts for example in part]
    splits = sorted({example.split for example in merged})
    if len(splits) > 1:
        raise ValueError(f"cannot merge examples of different splits {splits} into one file")
    seen = set()
    for example in merged:
        key = (example.data_source, example.index)
        if key in seen:
            raise ValueError(
                f"data_source {key[0]!r} index {key[1]} appears twice; give each data source once "
                "(concatenate its jsonl files first if it has several)"
            )
        seen.add(key)
    return merged


def load_tokenizer(path: str):
    """A transformers tokenizer from a local folder (no download is attempted)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer folder")
    from transformers import AutoTokenizer  # imported here: base conversions do not need it

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: could not load a tokenizer ({err})") from err


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m searchr1_jax.data.convert",
        description=(
            "Convert FlashRAG-style QA jsonl ({id, question, golden_answers} per line) into one "
            "Search-R1 parquet file OUT/SPLIT.parquet. Several sources are merged into that one "
            "file by repeating --input/--data-source: the i-th --data-source names the i-th "
            "--input. Run once with --split train and once with --split test."
        ),
    )
    parser.add_argument("--input", action="append", required=True, metavar="JSONL",
                        help="a raw QA jsonl file; repeat for several sources")
    parser.add_argument("--data-source", action="append", required=True, metavar="NAME",
                        help="data_source of the matching --input (e.g. nq, hotpotqa); "
                             "used to choose the reward function")
    parser.add_argument("--split", required=True, choices=SPLITS, help="which split the inputs are")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder; SPLIT.parquet is (over)written")
    parser.add_argument("--template", default="auto", choices=TEMPLATES,
                        help="auto (default): the --tokenizer's chat template when it has one, else the "
                             "instruction as is; base: the instruction as is; chat: the chat template")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="local tokenizer folder whose chat template --template chat/auto uses")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip invalid lines (logging how many) instead of stopping at the first")
    args = parser.parse_args(argv)
    if len(args.input) != len(args.data_source):
        parser.error(f"got {len(args.input)} --input but {len(args.data_source)} --data-source; "
                     "give one --data-source per --input, in the same order")
    if args.template == "chat" and args.tokenizer is None:
        parser.error("--tokenizer is needed with --template chat")
    if args.template == "base" and args.tokenizer is not None:
        parser.error("--tokenizer has no use with --template base")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 on success, 1 on bad input)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        parts = []
        for path, data_source in zip(args.input, args.data_source):
            records = read_flashrag_jsonl(path, skip_invalid=args.skip_invalid)
            parts.append(convert(records, data_source, args.split, args.template, tokenizer))
            logger.info("%s: %d examples from %s", data_source, len(parts[-1]), path)
        examples = merge(parts)
        out = Path(args.out) / f"{args.split}.parquet"
        write_examples(examples, out)
    except (OSError, ValueError) as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 1
    logger.info("wrote %d examples to %s", len(examples), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
