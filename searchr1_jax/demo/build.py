"""Build (once) everything the CPU demo reads: corpus, index, Search-R1 parquet, SFT data, tokenizer.

    paths = build_demo("~/.cache/searchr1_jax", size="full")      # or size="small" for tests

creates ``<cache_dir>/demo-<size>-seed<seed>-<key>/`` holding

- ``corpus.jsonl``: ``{"id", "contents"}`` per passage, contents ``"Title"\\ntext``;
- ``bm25/``: the project's BM25 index of that corpus;
- ``train.parquet``, ``test.parquet``: Search-R1 rows, data_source ``demo_single_hop`` or
  ``demo_two_hop``, one user message holding the instruction and the question;
- ``sft.jsonl``: behaviour trajectories on the train questions, one per line:
  ``{"id", "world", "question_id", "data_source", "prompt", "segments": [{"kind":
  "policy"|"obs", "text"}...], "answer", "golden_answers", "correct", "mistakes"}``. World 0
  is the demo's world, played with `noise`; worlds 1… are copies of its train split
  (`DemoSize.sft_worlds`), alternately relabeled and renamed, played with `COPY_NOISE` (rare
  wrong decisions), each searched through a BM25 index of its own. To match a rollout, tokenize the prompt and each
  segment separately and concatenate the ids;
- ``tokenizer/``: the demo tokenizer in Hugging Face format;
- ``model_config.json``: a Qwen2 ``config.json`` for the proposed tiny model (the
  `model_config_kwargs` plus ``model_type`` and ``architectures``);
- ``manifest.json``: the build parameters and the world's statistics, written last.

`<key>` hashes the parameters and the source of every module that shapes the output, so a
change to the generator yields a new directory instead of a stale one. The directory is
built under a temporary name and renamed into place, so a build interrupted at any point
leaves nothing that looks complete; a complete directory is reused as is.

``python -m searchr1_jax.demo.build --cache-dir DIR [--size small]`` builds from the shell.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from searchr1_jax.data import prompts, schema
from searchr1_jax.demo import names, tokenizer, trajectories, world
from searchr1_jax.retrieval import bm25, observation
from searchr1_jax.retrieval.types import Passage
from searchr1_jax.rollout import observations as rollout_observations

logger = logging.getLogger(__name__)

TOPK = 3  # passages per search, as in Search-R1
# The copied worlds are played well, with rare wrong decisions, so that the clean stage of the
# warm start already knows every word of the noisy episodes ("I know the …").
COPY_NOISE = trajectories.Noise(no_search=0.1, wrong_query=0.0, wrong_answer=0.0, stop_early=0.1)
INSTRUCTIONS = ("search_r1", "short")
SHORT_INSTRUCTION = (
    "Answer the question. Think inside <think> and </think>, search with <search> query </search>, "
    "answer inside <answer> and </answer>. Question: {question}\n"
)
# Sources whose code decides the bytes written: any edit gives a new cache key.
_SOURCES = (names, world, trajectories, tokenizer, observation, rollout_observations, bm25, prompts, schema,
            sys.modules[__name__])


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """World dimensions (see `world.make_world`) and the number of worlds the SFT data plays.

    `sft_worlds`: one behaviour trajectory per train question in each of the demo's world,
    played with the build's noise, and `sft_worlds - 1` copies of its train split, played well
    (`COPY_NOISE`): alternately relabeled (`world.relabel`: its own names, shuffled facts) and
    renamed (`world.rename`: the same facts under fresh names). The clean episodes teach the task
    (copy the answer out of the retrieved passage rather than recall it); fresh names stop the
    model from completing a held-out name from the names it memorised, and the demo's own names
    keep it fluent in the words that the noisy stage and RL use; the noisy
    episodes on the demo's own train questions then give the warm start its bad habits.

    `whole_name_tokens`: one token per name word, and renamed copies that reuse the world's own
    name words (`world.rename(reuse_names=True)`), instead of syllable tokens and fresh names.
    `num_layers`: of the proposed model. The reduced world (the suite's learning test) uses
    both, and one-word person names (no given names): its two-layer model copies held-out names
    out of passages after ~600 SFT steps (0.86 of the single-hop episodes exactly), where
    syllable names in a world this small were memorised instead (0.14-0.21), and where two-word
    person names were most of what it still miscopied (benchmarks/README.md, "Demo").
    """

    num_countries: int
    num_test_countries: int
    cities_per_country: int
    persons_per_city: int
    distractor_persons_per_city: int
    num_given_names: int
    sft_worlds: int
    whole_name_tokens: bool = False
    num_layers: int = 4


SIZES = {
    "full": DemoSize(60, 8, 4, 2, 2, 60, sft_worlds=8),
    "small": DemoSize(10, 3, 3, 1, 1, 12, sft_worlds=2),
    "reduced": DemoSize(16, 4, 3, 1, 1, 0, sft_worlds=9, whole_name_tokens=True, num_layers=2),
}


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where one build's files are (see the module docstring)."""

    root: Path
    corpus: Path
    index: Path
    train: Path
    test: Path
    sft: Path
    tokenizer: Path
    model_config: Path
    manifest: Path

    @classmethod
    def under(cls, root: Path) -> "DemoPaths":
        return cls(root, root / "corpus.jsonl", root / "bm25", root / "train.parquet", root / "test.parquet",
                   root / "sft.jsonl", root / "tokenizer", root / "model_config.json", root / "manifest.json")


# The DemoSize fields that are `world.make_world` arguments.
_WORLD_FIELDS = tuple(name for name in inspect.signature(world.make_world).parameters if name != "seed")


def make_demo_world(size: DemoSize, seed: int) -> world.World:
    return world.make_world(seed, **{k: getattr(size, k) for k in _WORLD_FIELDS})


def model_config_kwargs(vocab_size: int, eos_token_id: int, pad_token_id: int, num_layers: int = 4) -> dict:
    """The proposed tiny Qwen2 (`transformers.Qwen2Config` kwargs): ~0.9M parameters at vocab 600.

    Four layers (the full demo) because copying a multi-token name out of a passage needs
    attention heads that compose (find the slot, then follow the name token by token); width
    128 keeps a CPU step cheap.
    """
    return dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def prompt_messages(question: str, instruction: str) -> list[dict[str, str]]:
    """The stored prompt: one user message, Search-R1's instruction or the short one."""
    if instruction == "search_r1":
        return prompts.chat_messages(question)
    if instruction == "short":
        question = question.strip()
        return [{"role": "user", "content": SHORT_INSTRUCTION.format(question=question if question.endswith("?") else question + "?")}]
    raise ValueError(f"instruction must be one of {INSTRUCTIONS}, got {instruction!r}")


def cache_key(size: str, seed: int, instruction: str, noise: trajectories.Noise) -> str:
    parameters = [size, dataclasses.asdict(SIZES[size]), seed, instruction, dataclasses.asdict(noise)]
    digest = hashlib.sha256(json.dumps(parameters).encode())
    for module in _SOURCES:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def build_demo(
    cache_dir: str | os.PathLike,
    *,
    size: str = "full",
    seed: int = 0,
    instruction: str = "search_r1",
    noise: trajectories.Noise = trajectories.Noise(),
) -> DemoPaths:
    """The demo files for these parameters, built on first use and cached under `cache_dir`.

    `noise`: the mistake rates of the SFT behaviour trajectories (see `trajectories.Noise`).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"instruction must be one of {INSTRUCTIONS}, got {instruction!r}")
    cache_dir = Path(cache_dir).expanduser()
    final = DemoPaths.under(cache_dir / f"demo-{size}-seed{seed}-{cache_key(size, seed, instruction, noise)}")
    if final.manifest.is_file():
        logger.info("demo data: reusing %s", final.root)
        return final
    if final.root.exists():
        raise RuntimeError(f"{final.root} exists but has no manifest.json, so it is not a complete build; "
                           "delete it to rebuild")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.root.name}.building-", dir=cache_dir))
    try:
        _build_into(DemoPaths.under(staging), final.root, size, seed, instruction, noise)
        try:
            os.rename(staging, final.root)
        except OSError:
            if not final.manifest.is_file():  # not a concurrent build of the same key that won
                raise
            logger.info("demo data: another process finished %s first; keeping its copy", final.root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


class _MemoRetriever:
    """Caches a retriever's answers: behaviour trajectories repeat the same queries many times."""

    def __init__(self, retriever):
        self._retriever = retriever
        self._answers: dict[tuple[str, int], list[Passage]] = {}

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        missing = [q for q in dict.fromkeys(queries) if (q, topk) not in self._answers]
        if missing:
            for query, found in zip(missing, self._retriever.search(missing, topk)):
                self._answers[(query, topk)] = found
        return [self._answers[(q, topk)] for q in queries]


def _timed(label: str):
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            if exc[0] is None:
                logger.info("demo data: %s in %.1f s", label, time.perf_counter() - self.start)

    return _Timer()


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _build_into(paths: DemoPaths, final_root: Path, size_name: str, seed: int, instruction: str,
                noise: trajectories.Noise) -> None:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    size = SIZES[size_name]
    with _timed("world"):
        the_world = make_demo_world(size, seed)
    _write_jsonl(paths.corpus, ({"id": p.id, "contents": p.contents} for p in the_world.passages))
    with _timed(f"BM25 index of {len(the_world.passages)} passages"):
        bm25.build_bm25_index(paths.corpus, paths.index, show_progress=False)
        _point_index_at(paths.index, final_root / paths.corpus.name)
    retriever = _MemoRetriever(bm25.Bm25Retriever.load(paths.index))

    prompt_of = {q.id: prompt_messages(q.text, instruction) for q in the_world.questions}
    with _timed("parquet files"):
        for split, path in (("train", paths.train), ("test", paths.test)):
            schema.write_examples(_examples(the_world.questions_of(split), prompt_of), path)

    rng = random.Random(seed)
    rows = []
    with _timed("behaviour trajectories"):
        for k, played in enumerate(sft_worlds(the_world, size, seed)):
            scratch = paths.root / f".world-{k}"
            world_retriever = retriever if k == 0 else _MemoRetriever(_scratch_index(played, scratch))
            questions = played.questions_of("train")
            for question in tqdm(questions, desc=f"demo: trajectories, world {k}", unit="question", disable=None):
                trajectory = trajectories.behaviour_trajectory(question, played, world_retriever, rng,
                                                               noise if k == 0 else COPY_NOISE, topk=TOPK)
                rows.append(_sft_row(question, k, prompt_messages(question.text, instruction)[0]["content"],
                                     trajectory))
            shutil.rmtree(scratch, ignore_errors=True)
    _write_jsonl(paths.sft, rows)

    with _timed("tokenizer"):
        texts = [m[0]["content"] for m in prompt_of.values()]
        texts += [segment["text"] for row in rows for segment in row["segments"]]
        texts += [observation.format_passages([p]) for p in the_world.passages]
        # The rollout's message after an invalid action, so that it too is one token per word.
        texts.append(rollout_observations.corrective_text("<search>", "</search>", "<answer>", "</answer>"))
        trained = tokenizer.train_tokenizer(texts, split_names=not size.whole_name_tokens)
        tokenizer.save_hf_tokenizer(trained, paths.tokenizer)

    kwargs = model_config_kwargs(trained.get_vocab_size(), trained.token_to_id(tokenizer.EOS_TOKEN),
                                 trained.token_to_id(tokenizer.PAD_TOKEN), size.num_layers)
    # A config.json: the kwargs plus the fields that name the architecture.
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **kwargs}
    paths.model_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    with _timed("statistics"):
        stats = _statistics(the_world, retriever, rows, trained, rng_seed=seed)
    manifest = {"size": size_name, "seed": seed, "instruction": instruction, "dimensions": dataclasses.asdict(size),
                "noise": dataclasses.asdict(noise), "topk": TOPK, "statistics": stats}
    paths.manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("demo data: %s", json.dumps(stats, sort_keys=True))
    logger.info("demo data: built %s in %.1f s", final_root, time.perf_counter() - started)


def sft_worlds(the_world: world.World, size: DemoSize, seed: int) -> list[world.World]:
    """The worlds the SFT data plays: `the_world`, then `size.sft_worlds - 1` copies of its train
    split: alternately relabeled (its own names, shuffled facts) and renamed (fresh names), or,
    with `size.whole_name_tokens`, all renamed with the world's own name words (every name
    token, held-out ones included, then appears in most copies, each time with other facts)."""
    rng = random.Random(f"{seed}/copies")

    def copy(k: int) -> world.World:
        if size.whole_name_tokens:
            return world.rename(the_world, rng, reuse_names=True)
        return (world.relabel if k % 2 else world.rename)(the_world, rng)

    return [the_world] + [copy(k) for k in range(1, size.sft_worlds)]


def _scratch_index(played: world.World, directory: Path) -> bm25.Bm25Retriever:
    """A BM25 retriever over `played`'s passages, its files in `directory`."""
    directory.mkdir(parents=True)
    corpus = directory / "corpus.jsonl"
    _write_jsonl(corpus, ({"id": p.id, "contents": p.contents} for p in played.passages))
    bm25.build_bm25_index(corpus, directory / "bm25", show_progress=False)
    return bm25.Bm25Retriever.load(directory / "bm25")


def _point_index_at(index_dir: Path, corpus: Path) -> None:
    """meta.json records the corpus path it was built from; name the final one, not the staging one."""
    meta_path = index_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["corpus"] = str(corpus)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def _examples(questions: Sequence[world.Question], prompt_of: dict) -> list[schema.Example]:
    position = collections.Counter()
    examples = []
    for q in questions:
        messages = prompt_of[q.id]
        examples.append(schema.Example(
            data_source=q.data_source, prompt=messages, golden_answers=[q.answer], split=q.split,
            index=position[q.data_source], question=q.text, prompt_text=messages[0]["content"],
        ))
        position[q.data_source] += 1
    return examples


def _sft_row(question: world.Question, world_index: int, prompt_text: str,
             trajectory: trajectories.Trajectory) -> dict:
    return {
        "id": f"{world_index}/{question.id}",
        "world": world_index,
        "question_id": question.id,
        "data_source": question.data_source,
        "prompt": prompt_text,
        "segments": [{"kind": kind, "text": text} for kind, text in trajectory.segments],
        "answer": trajectory.answer,
        "golden_answers": [question.answer],
        "correct": trajectory.correct,
        "mistakes": list(trajectory.mistakes),
    }


def _statistics(the_world: world.World, retriever, rows: list[dict], trained, rng_seed: int) -> dict:
    """Counts, BM25 hit rates of ideal and garbled queries, and token lengths (means)."""
    hops = [hop for q in the_world.questions for hop in q.hops]
    found = retriever.search([hop.query for hop in hops], TOPK)
    taken = the_world.name_words
    rng = random.Random(rng_seed)
    garbled = [hop.query.replace(hop.subject, trajectories.garble(hop.subject, taken, rng)) for hop in hops]
    found_garbled = retriever.search(garbled, TOPK)

    def rate(results, rank: int) -> float:
        hits = sum(any(p.id == hop.passage_id for p in passages[:rank]) for hop, passages in zip(hops, results))
        return round(hits / len(hops), 4)

    def mean_tokens(texts) -> float:
        texts = list(texts)
        return round(sum(len(trained.encode(t).ids) for t in texts) / max(len(texts), 1), 1)

    segments = [s for row in rows for s in row["segments"]]
    totals = [len(trained.encode(row["prompt"]).ids) + sum(len(trained.encode(s["text"]).ids) for s in row["segments"])
              for row in rows]
    questions = collections.Counter(f"{q.split}/{q.data_source}" for q in the_world.questions)
    return {
        "entities": {"countries": len(the_world.countries), "cities": len(the_world.cities), "persons": len(the_world.persons)},
        "passages": len(the_world.passages),
        "questions": dict(sorted(questions.items())),
        "bm25_ideal_query_top1": rate(found, 1),
        "bm25_ideal_query_top3": rate(found, TOPK),
        "bm25_garbled_query_top3": rate(found_garbled, TOPK),
        "vocab_size": trained.get_vocab_size(),
        "mean_tokens": {
            "prompt": mean_tokens(row["prompt"] for row in rows),
            "policy_turn": mean_tokens(s["text"] for s in segments if s["kind"] == trajectories.POLICY),
            "observation": mean_tokens(s["text"] for s in segments if s["kind"] == trajectories.OBS),
            "trajectory": round(sum(totals) / max(len(totals), 1), 1),
        },
        "max_trajectory_tokens": max(totals, default=0),
        "sft_trajectories": len(rows),
        "sft_correct_rate": round(sum(row["correct"] for row in rows) / max(len(rows), 1), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m searchr1_jax.demo.build", description="Build the demo's data (cached).")
    parser.add_argument("--cache-dir", required=True, help="directory that holds the cached demo builds")
    parser.add_argument("--size", default="full", choices=sorted(SIZES), help="full: the 10-minute demo; small: tests")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--instruction", default="search_r1", choices=INSTRUCTIONS,
                        help="search_r1: Search-R1's instruction word for word; short: a one-sentence version")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    paths = build_demo(args.cache_dir, size=args.size, seed=args.seed, instruction=args.instruction)
    print(paths.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
