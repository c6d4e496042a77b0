"""python -m searchr1_jax.infer --model M (--index DIR | --retriever-url URL) --question "..."

Runs one multi-turn Search-R1 episode and prints it turn by turn: the model's reasoning,
each search with the titles it retrieved, invalid actions, and the final answer.
M is a Hugging Face model directory or a training run / Orbax checkpoint directory.
"""
from __future__ import annotations

import argparse
import re

import jax
import numpy as np

from searchr1_jax.evaluate import add_rollout_flags, greedy_driver, load_policy_any, make_retriever

TITLE = re.compile(r"Doc \d+\(Title: (.*?)\)")


def episode_segments(traj, row: int, tokenizer) -> list[tuple[str, str]]:
    """(kind, text) in order for one row: kind "policy", "information" or "note"."""
    tokens, loss_mask = np.asarray(traj.tokens)[row], np.asarray(traj.loss_mask)[row]
    lo, end = int(np.asarray(traj.prompt_len)[row]), int(np.asarray(traj.response_end)[row])
    segments = []
    while lo < end:
        hi = lo
        while hi < end and loss_mask[hi] == loss_mask[lo]:
            hi += 1
        text = tokenizer.decode(tokens[lo:hi].tolist(), skip_special_tokens=True)
        kind = "policy" if loss_mask[lo] else ("information" if "<information>" in text else "note")
        segments.append((kind, text))
        lo = hi
    return segments


def render_episode(question: str, segments: list[tuple[str, str]]) -> str:
    lines = [f"Question: {question}", ""]
    for kind, text in segments:
        if kind == "policy":
            lines.append(text.strip())
        elif kind == "information":
            titles = TITLE.findall(text)
            lines.append(f"    [retrieved {len(titles)}: " + " | ".join(titles) + "]")
        else:
            lines.append(f"    [invalid action → {text.strip()}]")
    return "\n".join(lines)


def main(argv=None):
    from searchr1_jax.data import base_prompt, chat_messages, render_prompt
    from searchr1_jax.models import load_tokenizer
    from searchr1_jax.rewards import extract_answer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory, or a run/checkpoint directory")
    parser.add_argument("--question", required=True)
    add_rollout_flags(parser)
    args = parser.parse_args(argv)
    try:
        retriever = make_retriever(args.index, args.retriever_url)
        model, tokenizer_dir = load_policy_any(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = load_tokenizer(tokenizer_dir)
    if args.template == "chat":
        text = render_prompt(chat_messages(args.question), "chat", tokenizer)
    else:
        text = base_prompt(args.question)
    ids = tokenizer(text, add_special_tokens=args.template == "base")["input_ids"]
    if len(ids) > args.max_prompt_tokens:
        raise SystemExit(f"error: the prompt has {len(ids)} tokens, more than --max-prompt-tokens "
                         f"(max_prompt_tokens = {args.max_prompt_tokens})")
    traj = greedy_driver(model, tokenizer, args).run([ids], retriever, jax.random.key(0))
    segments = episode_segments(traj, 0, tokenizer)
    print(render_episode(args.question, segments))
    answer = extract_answer("".join(t for k, t in segments if k != "note"))
    print(f"\nAnswer: {answer if answer is not None else '(none)'}   "
          f"[searches: {int(traj.searches[0])}, turns: {int(traj.turns[0])}, finish: {traj.finish_reason[0]}]")


if __name__ == "__main__":
    main()
