"""From finished trajectories to rewards, per-row records and per-data_source tables.

What a reward sees: the policy's own text plus the `<information>` blocks the retriever
inserted, in order. Other inserted text (the corrective note after an invalid action, which
itself mentions `<answer> and </answer>`) is left out, so it can never be scored as the
model's answer.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from searchr1_jax.rewards import exact_match, extract_answer, f1, sub_exact_match

INFORMATION_OPEN = "<information>"


def _runs(mask_row: np.ndarray, start: int, end: int):
    """(is_policy, lo, hi) runs of equal loss_mask over slots [start, end)."""
    lo = start
    for s in range(start + 1, end + 1):
        if s == end or mask_row[s] != mask_row[lo]:
            yield bool(mask_row[lo]), lo, s
            lo = s


def response_texts(tokens: np.ndarray, loss_mask: np.ndarray, attention_mask: np.ndarray,
                   prompt_len: np.ndarray, response_end: np.ndarray, tokenizer) -> list[str]:
    """Per row, the text rewards score: policy runs plus retrieved `<information>` runs."""
    texts = []
    for b in range(tokens.shape[0]):
        parts = []
        for is_policy, lo, hi in _runs(loss_mask[b], int(prompt_len[b]), int(response_end[b])):
            ids = tokens[b, lo:hi][attention_mask[b, lo:hi].astype(bool)]
            text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            if is_policy or text.lstrip().startswith(INFORMATION_OPEN):
                parts.append(text)
        texts.append("".join(parts))
    return texts


def full_texts(tokens, attention_mask, prompt_len, response_end, tokenizer) -> list[str]:
    """Per row, the whole decoded response (policy and every observation) for logs."""
    return [tokenizer.decode(tokens[b, int(prompt_len[b]):int(response_end[b])][
        attention_mask[b, int(prompt_len[b]):int(response_end[b])].astype(bool)].tolist(),
        skip_special_tokens=True) for b in range(tokens.shape[0])]


def score_rows(texts: Sequence[str], golds: Sequence[Sequence[str]], sources: Sequence[str],
               reward_fn: Callable[[str, list, str], float]) -> list[dict]:
    """Reward and answer metrics for each response."""
    rows = []
    for text, gold, source in zip(texts, golds, sources):
        answer = extract_answer(text)
        rows.append({
            "data_source": source, "answer": answer, "reward": float(reward_fn(text, list(gold), source)),
            "em": exact_match(answer, gold), "subem": sub_exact_match(answer, gold), "f1": f1(answer, gold),
        })
    return rows


TABLE_COLUMNS = ("n", "em", "subem", "f1", "reward", "searches", "turns", "invalid_rate")


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean metrics per data_source and over all rows ("all").

    Each row needs em, subem, f1, reward, searches, turns, valid_actions and data_source;
    invalid_rate is invalid actions per turn.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["data_source"]].append(row)
        groups["all"].append(row)
    table = {}
    for source, members in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        turns = sum(r["turns"] for r in members)
        invalid = sum(r["turns"] - r["valid_actions"] for r in members)
        table[source] = {
            "n": len(members),
            **{k: float(np.mean([r[k] for r in members])) for k in ("em", "subem", "f1", "reward",
                                                                     "searches", "turns")},
            "invalid_rate": invalid / max(turns, 1),
        }
    return table


def markdown_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| data_source | " + " | ".join(TABLE_COLUMNS) + " |",
             "|---|" + "---|" * len(TABLE_COLUMNS)]
    for source, m in table.items():
        cells = [str(m["n"])] + [f"{m[c]:.3f}" for c in TABLE_COLUMNS[1:]]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: str | Path, table: dict, rows: Sequence[dict], prefix: str = "eval") -> None:
    """`<prefix>_table.json` and `<prefix>_table.md` (when `table` has rows), and
    `<prefix>_trajectories.jsonl`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if table:
        (out / f"{prefix}_table.json").write_text(json.dumps(table, indent=2))
        (out / f"{prefix}_table.md").write_text(markdown_table(table) + "\n")
    with (out / f"{prefix}_trajectories.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
