"""Reading FlashRAG-style raw QA files: jsonl, one `{"id", "question", "golden_answers"}` a line.

Only `question` (a non-blank string) and `golden_answers` (a non-empty list of non-blank
strings) are used; other keys are ignored. Blank lines are skipped and counted in a log
line. Any other bad line (not UTF-8, not JSON, not an object, a missing or mistyped field,
no gold answer) raises ValueError naming the file, the line (1-based) and the field, or with
`skip_invalid=True` is skipped and counted in a warning.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QARecord:
    """One raw question with its accepted answers."""

    question: str
    golden_answers: list[str]


def read_flashrag_jsonl(path: str | os.PathLike, skip_invalid: bool = False) -> list[QARecord]:
    """The records of a FlashRAG-style jsonl file, in file order (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such jsonl file")
    records, problems, blank_lines = [], [], 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig on the first line drops a byte-order mark some editors write.
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                problems.append(
                    f"{path}: line {line_number}: not valid UTF-8 ({err.reason} at byte {err.start})")
                if not skip_invalid:
                    raise ValueError(problems[-1]) from None
                continue
            if not line.strip():
                blank_lines += 1
                continue
            try:
                records.append(_record_from_line(line))
            except ValueError as err:
                problems.append(f"{path}: line {line_number}: {err}")
                if not skip_invalid:
                    raise ValueError(problems[-1]) from None
    if blank_lines:
        logger.info("%s: skipped %d blank line(s)", path, blank_lines)
    if problems:
        logger.warning("%s: skipped %d invalid line(s); first: %s", path, len(problems), problems[0])
    if not records:
        detail = f"; first problem: {problems[0]}" if problems else ""
        raise ValueError(f"{path}: no valid records{detail}")
    return records


def _record_from_line(line: str) -> QARecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"field question: expected a non-blank string, got {question!r}")
    answers = obj.get("golden_answers")
    if not isinstance(answers, list):
        raise ValueError(f"field golden_answers: expected a list of strings, got {answers!r}")
    if not answers:
        raise ValueError("field golden_answers: no gold answer")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"field golden_answers[{i}]: expected a non-blank string, got {answer!r}")
    return QARecord(question=question, golden_answers=answers)
