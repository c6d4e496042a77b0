"""python -m searchr1_jax.infer --model M (--index DIR | --retriever-url URL) --question "..."

Runs one multi-turn Search-R1 episode and prints it turn by turn as it is generated: each
turn's text as soon as the turn ends (before its search runs), the titles each search
retrieved or the invalid-action note, and finally the answer with the episode's counts.
M is a Hugging Face model directory or a training run / Orbax checkpoint directory.
"""
from __future__ import annotations

import argparse
import re
import sys

import jax
import numpy as np

from searchr1_jax.cli import quiet_logs, user_errors
from searchr1_jax.evaluate import add_rollout_flags, greedy_driver, load_policy_any, make_retriever
from searchr1_jax.rewards import extract_answer
from searchr1_jax.rollout.actions import SEARCH
from searchr1_jax.rollout.driver import TurnEvent

TITLE = re.compile(r"Doc \d+\(Title: (.*?)\)")
INFORMATION_TAG = re.compile(r"</?information>")
# The corrective message (rollout.observations.corrective_text) starts with this, whatever the tags.
CORRECTIVE_START = "<information>My previous action is invalid."


def observation_line(kind: str, text: str) -> str:
    """One indented line for an observation: kind "information" (a search's passages: their
    titles) or "note" (the corrective message after an invalid action)."""
    if kind == "information":
        titles = TITLE.findall(text)
        return f"    [retrieved {len(titles)}: " + " | ".join(titles) + "]"
    return f"    [invalid action → {INFORMATION_TAG.sub('', text).strip()}]"


def episode_segments(traj, row: int, tokenizer) -> list[tuple[str, str]]:
    """(kind, text) in order for one row of a finished trajectory: kind "policy",
    "information" or "note"."""
    tokens, loss_mask = np.asarray(traj.tokens)[row], np.asarray(traj.loss_mask)[row]
    lo, end = int(np.asarray(traj.prompt_len)[row]), int(np.asarray(traj.response_end)[row])
    segments = []
    while lo < end:
        hi = lo
        while hi < end and loss_mask[hi] == loss_mask[lo]:
            hi += 1
        text = tokenizer.decode(tokens[lo:hi].tolist(), skip_special_tokens=True)
        kind = "policy" if loss_mask[lo] else ("note" if text.lstrip().startswith(CORRECTIVE_START)
                                               else "information")
        segments.append((kind, text))
        lo = hi
    return segments


def render_episode(question: str, segments: list[tuple[str, str]]) -> str:
    """The episode of a finished trajectory (see episode_segments), as infer prints it."""
    lines = [f"Question: {question}", ""]
    for kind, text in segments:
        lines.append(text.strip() if kind == "policy" else observation_line(kind, text))
    return "\n".join(lines)


def stream_episode(driver, question: str, ids: list[int], retriever, key=None, out=None):
    """Roll out one prompt with `driver` (a RolloutDriver), printing the episode to `out`
    (default: sys.stdout) as it is generated, then the answer line. Returns the Trajectory."""
    out = sys.stdout if out is None else out
    say = lambda line: print(line, file=out, flush=True)  # noqa: E731

    def show(event: TurnEvent) -> None:
        if event.stage == "action":
            say(event.text.strip())
        elif event.observation is not None:  # None: it did not fit, the row finished
            say(observation_line("information" if event.action == SEARCH else "note",
                                 event.observation))

    say(f"Question: {question}\n")
    traj = driver.run([ids], retriever, jax.random.key(0) if key is None else key, on_turn=show)
    answer = extract_answer(traj.responses[0])
    say(f"\nAnswer: {answer if answer is not None else '(none)'}   "
        f"[searches: {int(traj.searches[0])}, turns: {int(traj.turns[0])}, finish: {traj.finish_reason[0]}]")
    return traj


def main(argv=None):
    from searchr1_jax.data import chat_messages, encode_prompt
    from searchr1_jax.models import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model directory, or a run/checkpoint directory")
    parser.add_argument("--question", required=True)
    add_rollout_flags(parser)
    args = parser.parse_args(argv)
    quiet_logs()
    with user_errors():
        retriever = make_retriever(args.index, args.retriever_url)
        model, tokenizer_dir = load_policy_any(args.model)
    tokenizer = load_tokenizer(tokenizer_dir)
    try:
        ids = encode_prompt(chat_messages(args.question), args.template, tokenizer)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if len(ids) > args.max_prompt_tokens:
        raise SystemExit(f"error: the prompt has {len(ids)} tokens, more than --max-prompt-tokens "
                         f"(max_prompt_tokens = {args.max_prompt_tokens})")
    stream_episode(greedy_driver(model, tokenizer, args), args.question, ids, retriever)


if __name__ == "__main__":
    main()
