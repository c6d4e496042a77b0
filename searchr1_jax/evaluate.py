"""python -m searchr1_jax.evaluate --model M --data test.parquet (--index DIR | --retriever-url URL) --out DIR

Greedy multi-turn rollouts over every row of the parquet file(s); a per-data_source table
(EM, subEM, F1, mean searches, mean turns, invalid-action rate) printed and written as
`eval_table.json` / `eval_table.md`, and every trajectory in `eval_trajectories.jsonl`.
M is a Hugging Face model directory or a training run / Orbax checkpoint directory.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from searchr1_jax import scoring
from searchr1_jax.cli import quiet_logs, user_errors

log = logging.getLogger("searchr1_jax.evaluate")


def encode_prompts(examples: Sequence, tokenizer, template: str, max_prompt_tokens: int) -> list[tuple]:
    """(example, prompt token ids) pairs, rendered by `data.encode_prompt` (template "auto":
    the tokenizer's chat template when it has one, else the raw text); prompts longer than
    `max_prompt_tokens` are dropped with a logged count."""
    from searchr1_jax.data import encode_prompt

    kept, dropped = [], 0
    for ex in examples:
        ids = encode_prompt(ex.prompt, template, tokenizer)
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        kept.append((ex, list(ids)))
    if dropped:
        log.warning("dropped %d of %d prompts longer than max_prompt_tokens=%d", dropped, len(examples),
                    max_prompt_tokens)
    if not kept:
        raise ValueError(f"every prompt is longer than max_prompt_tokens={max_prompt_tokens}")
    return kept


def score_trajectory(items: Sequence[tuple], traj, tokenizer, reward_fn: Callable, n_samples: int) -> list[dict]:
    """Per-row records (reward, em, subem, f1, searches, turns, …) of a rollout of `items`."""
    tokens, loss_mask, attn = (np.asarray(getattr(traj, k)) for k in ("tokens", "loss_mask", "attention_mask"))
    prompt_len, response_end = np.asarray(traj.prompt_len), np.asarray(traj.response_end)
    texts = scoring.response_texts(tokens, loss_mask, attn, prompt_len, response_end, tokenizer)
    examples = [ex for ex, _ in items for _ in range(n_samples)]
    rows = scoring.score_rows(texts, [ex.golden_answers for ex in examples],
                              [ex.data_source for ex in examples], reward_fn)
    for i, row in enumerate(rows):
        row.update(turns=int(traj.turns[i]), searches=int(traj.searches[i]),
                   valid_actions=int(traj.valid_actions[i]), finish_reason=str(traj.finish_reason[i]),
                   question=examples[i].question, golden_answers=list(examples[i].golden_answers),
                   response=traj.responses[i])
    return rows


def greedy_rows(driver, retriever, params, items: Sequence[tuple], tokenizer, reward_fn: Callable,
                batch_size: int, show_progress: bool = True) -> list[dict]:
    """Greedy rollouts of `items` in fixed-size batches (the last padded by repetition, the
    extra rows discarded, so one compiled shape serves the whole set)."""
    from tqdm import tqdm

    rows: list[dict] = []
    key = jax.random.key(0)  # greedy decoding never draws from it
    for lo in tqdm(range(0, len(items), batch_size), desc="evaluate", disable=not show_progress, leave=False,
                   dynamic_ncols=True):
        chunk = list(items[lo:lo + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        traj = driver.run([ids for _, ids in padded], retriever, key, params=params)
        rows.extend(score_trajectory(padded, traj, tokenizer, reward_fn, 1)[:len(chunk)])
    return rows


def load_policy_any(path: str | Path):
    """(Decoder, tokenizer directory) from an HF directory or a run/checkpoint directory."""
    from searchr1_jax.models import load_hf

    path = Path(path)
    if (path / "config.json").is_file():
        model, _ = load_hf(path)
        return model, path
    from searchr1_jax.export import load_policy

    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} does not exist (expected an HF directory or a checkpoint)")
    model, record = load_policy(path)
    return model, Path(record["tokenizer_path"])


def make_retriever(index_dir: str | None, url: str | None, timeout: float = 30.0):
    """The retriever of `--index` or `--retriever-url`, checked with one query."""
    from searchr1_jax.retrieval.connect import open_retriever

    return open_retriever(index_dir, url, timeout_s=timeout)


def add_rollout_flags(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", default=None, help="index directory built by searchr1_jax.retrieval.build_index")
    where.add_argument("--retriever-url", default=None, help="URL of a /retrieve server")
    parser.add_argument("--topk", type=int, default=3, help="passages per search")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=500, help="per turn")
    parser.add_argument("--max-obs-tokens", type=int, default=500)
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    parser.add_argument("--template", choices=("auto", "base", "chat"), default="auto",
                        help="prompt rendering: auto (default, as the original) = the tokenizer's chat "
                             "template when it has one, else the raw text; base / chat force one")


def greedy_driver(model, tokenizer, args):
    from searchr1_jax.rollout import RolloutConfig, RolloutDriver

    cfg = RolloutConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                        max_obs_tokens=args.max_obs_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        greedy=True, n_samples=1, topk=args.topk)
    return RolloutDriver(model, tokenizer, cfg)


def main(argv=None):
    from searchr1_jax.data import read_examples
    from searchr1_jax.models import load_tokenizer
    from searchr1_jax.rewards import default_reward_config, make_reward_fn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory, or a run/checkpoint directory")
    parser.add_argument("--data", required=True, help="Search-R1 parquet file(s), comma-separated")
    parser.add_argument("--out", required=True, help="output directory for the tables and trajectories")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows (0: all)")
    add_rollout_flags(parser)
    args = parser.parse_args(argv)
    quiet_logs()
    try:
        examples = [ex for path in args.data.split(",") for ex in read_examples(path.strip())]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --data: {e}") from None
    with user_errors():
        retriever = make_retriever(args.index, args.retriever_url)
        model, tokenizer_dir = load_policy_any(args.model)
    if args.limit:
        examples = examples[:args.limit]
    tokenizer = load_tokenizer(tokenizer_dir)
    items = encode_prompts(examples, tokenizer, args.template, args.max_prompt_tokens)
    driver = greedy_driver(model, tokenizer, args)
    rows = greedy_rows(driver, retriever, None, items, tokenizer, make_reward_fn(default_reward_config()),
                       batch_size=min(args.batch_size, len(items)))
    table = scoring.summarize(rows)
    scoring.write_results(args.out, table, rows, prefix="eval")
    print(scoring.markdown_table(table))
    print(f"\nwrote {Path(args.out) / 'eval_table.md'}, eval_table.json and eval_trajectories.jsonl")


if __name__ == "__main__":
    main()
