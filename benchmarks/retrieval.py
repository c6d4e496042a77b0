"""Retrieval throughput: the original server's serial path vs our batched BM25 (and Lucene).

    python benchmarks/retrieval.py [--num-passages 1000000 --num-queries 1000 --topk 3]

Generates (once, cached under .cache/bench/) a synthetic wiki-18-shaped corpus: 100-word
passages whose words follow a Zipf law over a 200k-word vocabulary headed by English
function words, and six-word queries drawn from random passages. Then it measures, on the
same queries, queries per second of

  (a) the original server's path: one query at a time, then one document fetch per hit —
      Lucene (`searcher.search` + `searcher.doc(docid).raw()`) when pyserini and Java 21+
      are available, else the same serial loop over our default backend;
  (b) our default backend (bm25s-format index, our numba kernel), the whole batch in one call;
  (c) pyserini's own multi-threaded `batch_search` when available (docids and scores only;
      also with the document fetch that a Retriever needs);
  plus bm25s' own numba and numpy backends on the same index, top-k agreement between
  backends, index build time and peak memory (RSS high-water mark of the build, measured
  in a child process; --rebuild to measure again). Each throughput is the best of 3 runs.
The last line is `speedup: X.XX`, (b) over (a).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from searchr1_jax.retrieval import lucene  # noqa: E402
from searchr1_jax.retrieval.bm25 import BM25S_SUBDIR, EMPTY_TERM, Analyzer, Bm25Retriever, default_threads  # noqa: E402

FUNCTION_WORDS = (
    "the of and in to was is for on as by with he at from that his it an were are which "
    "this be or has had first also its new after who their one but two been not"
).split()
VOCAB_SIZE = 200_000
PASSAGE_WORDS = 100
QUERY_WORDS = 6
ZIPF_EXPONENT = 1.07
SEED = 0


def make_vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """`size` distinct words: the function words first, then pronounceable pseudo-words."""
    onsets = list("bcdfghjklmnprstvwz") + ["br", "ch", "dr", "gr", "kl", "pr", "sh", "st", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    words = list(FUNCTION_WORDS)
    seen = set(words)
    while len(words) < size:
        syllables = rng.integers(2, 5, size=4096)
        for n in syllables:
            word = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(n))
            if word not in seen:
                seen.add(word)
                words.append(word)
                if len(words) == size:
                    break
    return words


def write_synthetic_corpus(corpus_path: str, queries_path: str, num_passages: int, num_queries: int) -> None:
    """Write the corpus ({id, contents}) and queries (one JSON string a line)."""
    from tqdm import tqdm

    rng = np.random.default_rng(SEED)
    vocab = np.array(make_vocabulary(rng, VOCAB_SIZE), dtype=object)
    ranks = np.arange(1, VOCAB_SIZE + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-ZIPF_EXPONENT)
    cdf /= cdf[-1]
    query_sources = set(rng.choice(num_passages, size=num_queries, replace=False).tolist())
    queries = []
    chunk = 10_000
    os.makedirs(os.path.dirname(corpus_path), exist_ok=True)
    with open(corpus_path + ".part", "w", encoding="utf-8") as out:
        for start in tqdm(range(0, num_passages, chunk), desc="synthetic corpus", unit="10k passages"):
            n = min(chunk, num_passages - start)
            word_ids = np.searchsorted(cdf, rng.random((n, PASSAGE_WORDS)))
            title_ids = rng.integers(1000, VOCAB_SIZE, size=(n, 2))
            for row in range(n):
                pid = start + row
                text = " ".join(vocab[word_ids[row]])
                title = " ".join(vocab[title_ids[row]]).title()
                out.write(json.dumps({"id": str(pid), "contents": f'"{title}"\n{text}'}) + "\n")
                if pid in query_sources:
                    content_words = [w for w in dict.fromkeys(vocab[word_ids[row]]) if w not in FUNCTION_WORDS]
                    picked = rng.choice(len(content_words), size=QUERY_WORDS, replace=False)
                    queries.append(" ".join(content_words[i] for i in sorted(picked)))
    rng.shuffle(queries)
    with open(queries_path, "w", encoding="utf-8") as out:
        for query in queries:
            out.write(json.dumps(query) + "\n")
    os.replace(corpus_path + ".part", corpus_path)


def build_in_child(method: str, corpus_path: str, index_dir: str) -> tuple[float, float]:
    """Build an index in a child process; returns (seconds, peak RSS in GiB of that child or its own children)."""
    code = (
        "import sys, time, resource\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "t = time.perf_counter()\n"
        + (
            "from searchr1_jax.retrieval.bm25 import build_bm25_index\n"
            f"build_bm25_index({corpus_path!r}, {index_dir!r}, show_progress=False)\n"
            if method == "bm25"
            else "from searchr1_jax.retrieval.lucene import build_lucene_index\n"
            f"build_lucene_index({corpus_path!r}, {index_dir!r}, threads=2)\n"
        )
        + "peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
        + "print(time.perf_counter() - t, peak)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds, max_rss_kib = result.stdout.split()[-2:]
    return float(seconds), int(max_rss_kib) / 2**20


def bm25s_batched(index_dir: str, backend: str, queries: list[str], k: int, threads: int) -> tuple[float, list[list[int]]]:
    """bm25s' own batched `retrieve` on our index (same matrix, same query terms).

    Returns (seconds, corpus rows per query); query analysis is inside the timing, as for ours.
    """
    import bm25s

    model = bm25s.BM25.load(os.path.join(index_dir, BM25S_SUBDIR), mmap=True, backend=backend, show_progress=False)
    analyzer, vocab = Analyzer(), model.vocab_dict

    def run(batch: list[str]):
        query_ids = [[vocab[t] for t in analyzer.terms(q) if t in vocab] or [vocab[EMPTY_TERM]] for q in batch]
        return model.retrieve(query_ids, k=k, show_progress=False, n_threads=threads)

    run(queries[:8])  # compile numba kernels before the timed runs
    seconds, (docs, scores) = timed(lambda: run(queries))
    return seconds, [[d for d, s in zip(row, row_scores) if s > 0] for row, row_scores in zip(docs.tolist(), scores.tolist())]


REPEATS = 3


def timed(fn) -> tuple[float, object]:
    """Best wall time of REPEATS runs of fn (the machine is shared: the minimum is the least
    disturbed run) and fn's last result. The first run also warms caches and JITs."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def agreement(a: list[list], b: list[list]) -> float:
    """Mean over queries of |top-k(a) ∩ top-k(b)| / max(|a|, |b|) (1 when both are empty)."""
    return float(np.mean([len(set(x) & set(y)) / max(len(x), len(y)) if x or y else 1.0 for x, y in zip(a, b, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-passages", type=int, default=1_000_000)
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--cache-dir", default=os.path.join(REPO, ".cache", "bench"), help="where the corpus and indexes are kept")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the indexes even if cached (to measure build time and memory)")
    args = parser.parse_args()

    base = os.path.join(args.cache_dir, f"retrieval-{args.num_passages}")
    corpus_path = os.path.join(base, "corpus.jsonl")
    queries_path = os.path.join(base, f"queries-{args.num_queries}.jsonl")
    if not (os.path.exists(corpus_path) and os.path.exists(queries_path)):
        write_synthetic_corpus(corpus_path, queries_path, args.num_passages, args.num_queries)
    with open(queries_path, encoding="utf-8") as handle:
        queries = [json.loads(line) for line in handle]
    k = args.topk
    threads = default_threads()
    rows: list[tuple[str, str]] = []
    qps: dict[str, float] = {}
    hits: dict[str, list[list]] = {}

    bm25_dir = os.path.join(base, "bm25")
    if args.rebuild or not os.path.exists(os.path.join(bm25_dir, "meta.json")):
        shutil.rmtree(bm25_dir, ignore_errors=True)
        seconds, peak = build_in_child("bm25", corpus_path, bm25_dir)
        rows.append(("index build: ours (bm25s format)", f"{seconds:.0f} s, peak RSS {peak:.1f} GiB"))
    else:
        with open(os.path.join(bm25_dir, "meta.json")) as handle:
            rows.append(("index build: ours (bm25s format)", f"{json.load(handle)['build_seconds']:.0f} s (cached; --rebuild to measure memory)"))

    ours = Bm25Retriever.load(bm25_dir, n_threads=threads)
    ours.search(queries[:8], k)  # compile the numba kernel outside the timings
    seconds, batched = timed(lambda: ours.search(queries, k))
    qps["b"] = len(queries) / seconds
    hits["ours"] = [[p.id for p in row] for row in batched]
    rows_ours = ours.search_ids(queries, k)[0]
    one_thread = Bm25Retriever.load(bm25_dir, n_threads=1)
    seconds, _ = timed(lambda: one_thread.search(queries, k))
    qps["ours-1"] = len(queries) / seconds
    hits["ours-rows"] = [[d for d in row if d >= 0] for row in rows_ours.tolist()]

    for backend in ("numba", "numpy"):
        seconds, hits[f"bm25s-{backend}"] = bm25s_batched(bm25_dir, backend, queries, k, threads)
        qps[f"bm25s-{backend}"] = len(queries) / seconds

    reason = lucene.unavailable_reason()
    if reason is None:
        lucene_dir = os.path.join(base, "lucene")
        if args.rebuild or not os.path.exists(os.path.join(lucene_dir, "meta.json")):
            shutil.rmtree(lucene_dir, ignore_errors=True)
            seconds, peak = build_in_child("lucene", corpus_path, lucene_dir)
            rows.append(("index build: Lucene (Anserini, 2 threads)", f"{seconds:.0f} s, peak RSS {peak:.1f} GiB (JVM)"))
        searcher = lucene.LuceneRetriever.load(lucene_dir, n_threads=threads)
        searcher.search(queries[:8], k)  # start the JVM's JIT before the timed runs
        seconds, serial = timed(lambda: searcher.search_serial_with_fetch(queries, k))
        qps["a"] = len(queries) / seconds
        hits["lucene"] = [[p.id for p in row] for row in serial]
        qids = [str(i) for i in range(len(queries))]
        seconds, _ = timed(lambda: searcher.searcher.batch_search(queries, qids, k=k, threads=threads))
        qps["c"] = len(queries) / seconds
        seconds, _ = timed(lambda: searcher.search(queries, k))
        qps["c+fetch"] = len(queries) / seconds
        a_label = "(a) original path: Lucene search + doc fetch per hit, serial"
    else:
        seconds, _ = timed(lambda: [ours.search([q], k)[0] for q in queries])
        qps["a"] = len(queries) / seconds
        a_label = "(a) serial per-query loop over ours (pyserini unavailable)"

    rows += [
        (a_label, f"{qps['a']:.0f} q/s"),
        (f"(b) ours: numba kernel, batched, {threads} threads", f"{qps['b']:.0f} q/s"),
        ("    ours, batched, 1 thread", f"{qps['ours-1']:.0f} q/s"),
        (f"(c) pyserini batch_search, {threads} threads (docids only)", f"{qps['c']:.0f} q/s" if "c" in qps else f"unavailable: {reason}"),
    ]
    if "c+fetch" in qps:
        rows.append(("    the same + doc fetch per hit (LuceneRetriever.search)", f"{qps['c+fetch']:.0f} q/s"))
    rows += [
        (f"bm25s numba backend, batched, {threads} threads", f"{qps['bm25s-numba']:.0f} q/s"),
        (f"bm25s numpy backend, batched, {threads} threads", f"{qps['bm25s-numpy']:.0f} q/s"),
        (f"top-{k} agreement: ours vs bm25s numba", f"{agreement(hits['ours-rows'], hits['bm25s-numba']):.3f}"),
        (f"top-{k} agreement: ours vs bm25s numpy", f"{agreement(hits['ours-rows'], hits['bm25s-numpy']):.3f}"),
    ]
    if "lucene" in hits:
        rows.append((f"top-{k} agreement: ours vs Lucene", f"{agreement(hits['ours'], hits['lucene']):.3f}"))
        rows.append(("ours / (c)", f"{qps['b'] / qps['c']:.2f}"))
    rows.append(("ours, 1 thread / (a): per-core speedup", f"{qps['ours-1'] / qps['a']:.2f}"))

    print(
        f"\n{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}  "
        f"{args.num_passages:,} passages, {len(queries):,} queries, top-{k}, "
        f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"speedup: {qps['b'] / qps['a']:.2f}")


if __name__ == "__main__":
    main()
