"""How well demo models copy names out of retrieved passages, separated from their search habits.

For every held-out question of the demo world, the ideal episode (`behaviour_trajectory` with
`IDEAL` noise, searched through the world's own BM25 index) is fed to each model under teacher
forcing; an episode counts as copied when the model's argmax equals the episode at every policy
token except the one that decides between searching and guessing ("I need" / "I know"). A model
that stops after the first hop of a two-hop question misses that episode too.

    python benchmarks/demo_copying.py MODEL [MODEL ...] [--seed 1 --size full]

MODEL: a Hugging Face directory (e.g. `.cache/demo/<world>/warm_start-clean-*`) or a run
directory with `:STEP` for one of its checkpoints (e.g. `runs/tiny_demo:8`). Prints, per model,
the share of copied episodes and the per-token accuracy, single-hop and two-hop.
"""
from __future__ import annotations

import argparse
import random

import jax.numpy as jnp
import numpy as np

from searchr1_jax.demo import trajectories
from searchr1_jax.demo.build import SIZES, build_demo, make_demo_world, prompt_messages
from searchr1_jax.export import load_policy
from searchr1_jax.models import load_hf, load_tokenizer
from searchr1_jax.retrieval.index import load_retriever
from searchr1_jax.sft import tokenize_trajectory

BATCH = 32


def ideal_episodes(paths, size: str, seed: int, tokenizer) -> list[tuple[list[int], list[int], str]]:
    """(token ids, policy mask, data_source) of the ideal episode of every held-out question."""
    world = make_demo_world(SIZES[size], seed)
    retriever = load_retriever(str(paths.index))
    rng = random.Random(0)  # IDEAL noise never draws from it
    episodes = []
    for question in world.questions_of("test"):
        played = trajectories.behaviour_trajectory(question, world, retriever, rng, trajectories.IDEAL)
        row = {"prompt": prompt_messages(question.text, "short")[0]["content"],
               "segments": [{"kind": kind, "text": text} for kind, text in played.segments]}
        ids, mask = tokenize_trajectory(row, tokenizer)
        episodes.append((ids, mask, question.data_source))
    return episodes


def copy_scores(model, episodes, tokenizer) -> dict[str, tuple[float, float]]:
    """{data_source: (share of episodes copied exactly, per-token accuracy)}."""
    decision = [tokenizer.convert_tokens_to_ids(t) for t in ("Ġneed", "Ġknow")]
    exact: dict[str, list[bool]] = {}
    accuracy: dict[str, list[float]] = {}
    for lo in range(0, len(episodes), BATCH):
        chunk = episodes[lo:lo + BATCH]
        width = max(len(ids) for ids, _, _ in chunk)
        tokens = np.full((len(chunk), width), tokenizer.pad_token_id, np.int32)  # right-padded, one per row
        real = np.zeros((len(chunk), width), np.int32)
        for r, (ids, _, _) in enumerate(chunk):
            tokens[r, :len(ids)], real[r, :len(ids)] = ids, 1
        predicted = np.asarray(jnp.argmax(model(jnp.asarray(tokens), jnp.asarray(real)), axis=-1))
        for r, (ids, mask, source) in enumerate(chunk):
            target = np.asarray(ids[1:])
            scored = (np.asarray(mask[1:]) > 0) & ~np.isin(target, decision)
            right = (predicted[r, :len(ids) - 1] == target)[scored]
            exact.setdefault(source, []).append(bool(right.all()))
            accuracy.setdefault(source, []).append(float(right.mean()))
    return {s: (float(np.mean(exact[s])), float(np.mean(accuracy[s]))) for s in sorted(exact)}


def load_model(spec: str):
    run, _, step = spec.rpartition(":")
    if run and step.isdigit():
        return load_policy(run, int(step))[0]
    return load_hf(spec)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--cache-dir", default=".cache/demo")
    args = parser.parse_args(argv)
    paths = build_demo(args.cache_dir, size=args.size, seed=args.seed, instruction="short")
    tokenizer = load_tokenizer(paths.tokenizer)
    episodes = ideal_episodes(paths, args.size, args.seed, tokenizer)
    for spec in args.models:
        scores = copy_scores(load_model(spec), episodes, tokenizer)
        print(spec, "  ".join(f"{s}: copied {e:.3f}, token accuracy {a:.4f}" for s, (e, a) in scores.items()))


if __name__ == "__main__":
    main()
