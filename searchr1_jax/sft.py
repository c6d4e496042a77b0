"""Supervised warm start on multi-turn trajectories, masked like RL.

A trajectory row (jsonl) is `{"prompt": str, "segments": [{"kind": "policy"|"obs", "text"}...]}`:
the prompt (the user message), then alternating policy text (trained on) and retrieved
observations (context only, never a target). The prompt and every segment are tokenized
separately and concatenated, exactly as a rollout builds its sequence, so the warm-started
model sees at training time the token boundaries it will see when sampling.

    python -m searchr1_jax.sft --model HF_DIR --data sft.jsonl --out OUT_DIR \
        [--steps 300 --lr 3e-3 --batch-size 32 --max-len 512 --template auto|base|chat]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from searchr1_jax.train_step import SequenceBatch, sequence_logprobs

log = logging.getLogger("searchr1_jax.sft")
POLICY, OBS = "policy", "obs"


def read_trajectories(path: str | Path) -> list[dict]:
    """Rows of a trajectory jsonl file; errors name the file, line and field."""
    rows = []
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: field 'prompt' must be a string")
            segments = row.get("segments")
            if not isinstance(segments, list) or not segments:
                raise ValueError(f"{path}:{n}: field 'segments' must be a non-empty list")
            for k, seg in enumerate(segments):
                if not isinstance(seg, dict) or seg.get("kind") not in (POLICY, OBS) or not isinstance(
                        seg.get("text"), str):
                    raise ValueError(f"{path}:{n}: segments[{k}] must be {{'kind': 'policy'|'obs', 'text': str}}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no trajectories")
    return rows


def tokenize_trajectory(row: dict, tokenizer, template: str = "auto") -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one trajectory: mask 1 exactly on policy tokens. The prompt is
    rendered by `data.encode_prompt` (template "auto": chat template when the tokenizer has one)."""
    from searchr1_jax.data import encode_prompt

    ids = encode_prompt([{"role": "user", "content": row["prompt"]}], template, tokenizer)
    mask = [0] * len(ids)
    for seg in row["segments"]:
        seg_ids = tokenizer(seg["text"], add_special_tokens=False)["input_ids"]
        ids.extend(seg_ids)
        mask.extend([1 if seg["kind"] == POLICY else 0] * len(seg_ids))
    return ids, mask


def pack_batch(examples: Sequence[tuple[list[int], list[int]]], length: int, pad_id: int,
               row_multiple: int = 1) -> SequenceBatch:
    """Pack sequences (longest first, each into the first row with room) into right-padded rows of `length` slots: arrays [rows, length].

    Each sequence keeps its own positions (0, 1, …) and attends only to itself: attention_mask
    holds its 1-based index within the row (0 = padding). Sequences longer than `length` are
    cut at the end. The number of rows is what the packing needs, rounded up to a multiple of
    `row_multiple` (fewer distinct shapes to compile).
    """
    placed: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for ids, mask in sorted(examples, key=lambda e: -len(e[0])):  # first-fit decreasing
        ids, mask = ids[:length], mask[:length]
        r = next((i for i, free in enumerate(room) if free >= len(ids)), None)
        if r is None:
            placed.append([])
            room.append(length)
            r = len(placed) - 1
        placed[r].append((ids, mask))
        room[r] -= len(ids)
    rows = -(-len(placed) // row_multiple) * row_multiple
    tokens = np.full((rows, length), pad_id, np.int32)
    segments = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    loss = np.zeros((rows, length), np.float32)
    for r, row in enumerate(placed):
        at = 0
        for k, (ids, mask) in enumerate(row, 1):
            n = len(ids)
            tokens[r, at:at + n], segments[r, at:at + n], loss[r, at:at + n] = ids, k, mask
            positions[r, at:at + n] = np.arange(n)
            at += n
    return SequenceBatch(jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions), jnp.asarray(loss))


def make_sft_step(graphdef, tx):
    """jit(params, opt_state, batch) → (params, opt_state, mean NLL over policy tokens)."""
    def loss_fn(params, batch: SequenceBatch):
        logp, _ = sequence_logprobs(nnx.merge(graphdef, params), batch)
        return -jnp.sum(logp * batch.loss_mask) / jnp.maximum(jnp.sum(batch.loss_mask), 1.0)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def run_sft(model, tokenizer, rows: Sequence[dict], *, steps: int, lr: float, batch_size: int,
            max_len: int, seed: int = 0, template: str = "auto", show_progress: bool = True):
    """Train `model` (a Decoder) in place on `rows`; returns the per-step losses.

    Batches of `batch_size` trajectories are drawn without replacement, epoch after epoch, in
    an order fixed by `seed`, and packed several to a row (see `pack_batch`): rows are as wide
    as the longest trajectory (rounded up to 64, capped at `max_len`) and their number is
    rounded up to a multiple of 2, so only a few shapes compile and little compute is padding.
    """
    from tqdm import tqdm

    encoded = [tokenize_trajectory(r, tokenizer, template) for r in rows]
    too_long = sum(len(ids) > max_len for ids, _ in encoded)
    if too_long:
        log.warning("%d of %d trajectories are longer than max_len=%d and are cut", too_long, len(encoded), max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = min(max_len, -(-max(len(ids) for ids, _ in encoded) // 64) * 64)
    warmup = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    step_fn = make_sft_step(graphdef, tx)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    for _ in tqdm(range(steps), desc="sft", disable=not show_progress, dynamic_ncols=True):
        if len(order) < batch_size:
            order.extend(rng.permutation(len(encoded)).tolist())
        idx, order = order[:batch_size], order[batch_size:]
        batch = pack_batch([encoded[i] for i in idx], width, pad_id, row_multiple=2)
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(float(loss))
    nnx.update(model, params)
    return losses


def main(argv=None):
    from searchr1_jax.cli import quiet_logs, user_errors
    from searchr1_jax.models import load_hf, load_tokenizer, save_hf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory to start from")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    parser.add_argument("--data", required=True, help="trajectory jsonl")
    parser.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--template", choices=("auto", "base", "chat"), default="auto",
                        help="prompt rendering: auto (default) = chat template when the tokenizer has one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet_logs()
    try:
        trajectories = read_trajectories(args.data)
    except (FileNotFoundError, ValueError) as e:  # only input errors can come from reading it
        raise SystemExit(f"error: --data: {e}") from None
    with user_errors():
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        model, cfg = load_hf(args.model)
    losses = run_sft(model, tokenizer, trajectories, steps=args.steps, lr=args.lr,
                     batch_size=args.batch_size, max_len=args.max_len, seed=args.seed, template=args.template)
    save_hf(model, cfg, args.out, tokenizer_dir=args.tokenizer or args.model)
    print(f"sft: loss {losses[0]:.3f} → {losses[-1]:.3f}; saved to {args.out}")


if __name__ == "__main__":
    main()
