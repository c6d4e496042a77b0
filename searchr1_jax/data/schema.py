"""The Search-R1 parquet layout: one row per question.

Columns (what Search-R1's own files hold; readers of either project can read the other's):
  data_source   string                  e.g. "nq", "hotpotqa"; picks the reward function
  prompt        list<{role, content}>   the chat messages; one user turn with the instruction
  ability       string                  "fact-reasoning"
  reward_model  {style: "rule", ground_truth: {target: list<string>}}   the gold answers
  extra_info    {split, index, question, prompt_text}
`extra_info.question` (the raw question, for evaluation reports) and `extra_info.prompt_text`
(the prompt rendered at conversion time, see `convert.py`) are this project's additions;
both may be null, and Search-R1 readers ignore them.

Every row read is validated; an invalid row raises ValueError naming the file, the row
(0-based, as pandas counts) and the field, or with `skip_invalid=True` is skipped and the
number of skipped rows logged.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

DEFAULT_ABILITY = "fact-reasoning"
COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")

PARQUET_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([
        ("style", pa.string()),
        ("ground_truth", pa.struct([("target", pa.list_(pa.string()))])),
    ])),
    ("extra_info", pa.struct([
        ("split", pa.string()),
        ("index", pa.int64()),
        ("question", pa.string()),
        ("prompt_text", pa.string()),
    ])),
])


@dataclasses.dataclass(frozen=True)
class Example:
    """One question. `index` is its position within its data_source and split."""

    data_source: str
    prompt: list[dict[str, str]]
    golden_answers: list[str]
    split: str
    index: int
    ability: str = DEFAULT_ABILITY
    question: str | None = None
    prompt_text: str | None = None


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field {field}: {message}")


@dataclasses.dataclass(frozen=True)
class _Undecodable:
    """Stands for a column value whose bytes are not valid UTF-8."""

    reason: str


def read_examples(path: str | os.PathLike, skip_invalid: bool = False) -> list[Example]:
    """All examples of a Search-R1 parquet file, in file order.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not
    parquet, lacks a column, has no rows, or (unless `skip_invalid`) has an invalid row.
    With `skip_invalid`, invalid rows are dropped and their count logged as a warning;
    a file with no valid row still raises.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such parquet file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; a Search-R1 file has {list(COLUMNS)}")
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows")
    columns = [_column_values(table.column(name)) for name in COLUMNS]
    examples, problems = [], []
    for row_number, values in enumerate(zip(*columns)):
        try:
            examples.append(_example_from_row(dict(zip(COLUMNS, values))))
        except _FieldError as err:
            message = f"{path}: row {row_number}: {err}"
            if not skip_invalid:
                raise ValueError(message) from None
            problems.append(message)
    if problems:
        logger.warning("%s: skipped %d invalid row(s) of %d; first: %s",
                       path, len(problems), table.num_rows, problems[0])
    if not examples:
        raise ValueError(f"{path}: no valid rows ({len(problems)} invalid); first problem: {problems[0]}")
    return examples


def write_examples(examples: Sequence[Example], path: str | os.PathLike) -> None:
    """Writes `examples` as a Search-R1 parquet file (parent folders are created).

    Each example is validated with the reader's rules first; ValueError names the example's
    position in `examples` and the field.
    """
    path = Path(path)
    if not examples:
        raise ValueError(f"{path}: refusing to write a file with no examples")
    rows = []
    for position, example in enumerate(examples):
        row = _row_from_example(example)
        try:
            _example_from_row(row)
        except _FieldError as err:
            raise ValueError(f"{path}: example {position}: {err}") from None
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), path)


def _column_values(column: pa.ChunkedArray) -> list[Any]:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        # Only on this rare path is the column converted value by value, to find the rows.
        values = []
        for i in range(len(column)):
            try:
                values.append(column[i].as_py())
            except UnicodeDecodeError as err:
                values.append(_Undecodable(f"{err.reason} at byte {err.start}"))
        return values


def _row_from_example(example: Example) -> dict[str, Any]:
    return {
        "data_source": example.data_source,
        "prompt": example.prompt,
        "ability": example.ability,
        "reward_model": {"style": "rule", "ground_truth": {"target": example.golden_answers}},
        "extra_info": {
            "split": example.split,
            "index": example.index,
            "question": example.question,
            "prompt_text": example.prompt_text,
        },
    }


def _example_from_row(row: dict[str, Any]) -> Example:
    """The validated Example of one row; raises _FieldError naming the first bad field."""
    data_source = _text(row["data_source"], "data_source")
    ability = _text(row["ability"], "ability")

    prompt = _typed(row["prompt"], list, "prompt", "a list of {role, content} messages")
    if not prompt:
        raise _FieldError("prompt", "no messages")
    messages = []
    for i, message in enumerate(prompt):
        _typed(message, dict, f"prompt[{i}]", "a {role, content} message")
        messages.append({
            "role": _text(message.get("role"), f"prompt[{i}].role"),
            "content": _text(message.get("content"), f"prompt[{i}].content"),
        })

    reward_model = _typed(row["reward_model"], dict, "reward_model", "{style, ground_truth}")
    ground_truth = _typed(reward_model.get("ground_truth"), dict, "reward_model.ground_truth",
                          "{target: [answers]}")
    targets = _typed(ground_truth.get("target"), list, "reward_model.ground_truth.target",
                     "a list of answer strings")
    if not targets:
        raise _FieldError("reward_model.ground_truth.target", "no gold answer")
    golden_answers = [_text(t, f"reward_model.ground_truth.target[{i}]") for i, t in enumerate(targets)]

    extra_info = _typed(row["extra_info"], dict, "extra_info", "{split, index}")
    split = _text(extra_info.get("split"), "extra_info.split")
    index = extra_info.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise _FieldError("extra_info.index", f"expected an integer >= 0, got {index!r}")
    question, prompt_text = (
        None if extra_info.get(key) is None else _text(extra_info[key], f"extra_info.{key}")
        for key in ("question", "prompt_text")
    )
    return Example(data_source=data_source, prompt=messages, golden_answers=golden_answers,
                   split=split, index=index, ability=ability, question=question,
                   prompt_text=prompt_text)


def _typed(value: Any, kind: type, field: str, expected: str) -> Any:
    if isinstance(value, _Undecodable):
        raise _FieldError(field, f"not valid UTF-8 ({value.reason})")
    if not isinstance(value, kind):
        raise _FieldError(field, f"expected {expected}, got {_describe(value)}")
    return value


def _text(value: Any, field: str) -> str:
    """A non-blank str, or _FieldError."""
    _typed(value, str, field, "a string")
    if not value.strip():
        raise _FieldError(field, "empty")
    return value


def _describe(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:60] + '…' if len(shown) > 60 else shown}"
