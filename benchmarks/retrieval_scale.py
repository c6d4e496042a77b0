"""BM25 at wiki-18 scale: the streaming sharded build's time and memory, serving memory and
throughput, agreement with Lucene, and a projection to 21M passages.

    python benchmarks/retrieval_scale.py --num-passages 1000000 [--memory-gb 8 --workers 2]

Uses the synthetic corpus and queries of `benchmarks/retrieval.py` (generated once, cached
under .cache/bench/). Steps, each in a fresh child process so that its memory is its own:

  1. build: `build_bm25_index(memory_gb, workers)`; wall time and peak RSS, both the
     kernel's high-water mark of the largest process (ru_maxrss) and the sum over the
     process tree sampled every 0.2 s (workers run in parallel);
  2. serve: open the index as the server does (`Bm25Retriever.load`), answer the queries in
     one batch (best of 3, after one warm-up batch); RSS after opening and after searching,
     split into anonymous memory and memory-mapped file pages (reclaimable page cache);
  3. Lucene (when pyserini and Java 21+ are importable by this interpreter and an index
     exists at <cache>/lucene, e.g. built by `benchmarks/retrieval.py`): the original
     server's serial path (one search per query + one document fetch per hit) on the same
     queries, and top-k agreement;
  4. the projection to 21M passages (linear in passages for the build; see the README).
Skip the build with --no-build to reuse the index of an earlier run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from retrieval import agreement, write_synthetic_corpus  # noqa: E402

WIKI18 = 21_015_324  # passages in wiki-18.jsonl


def tree_rss(pid: int) -> int:
    """Bytes resident in process `pid` and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_child(code: str) -> tuple[dict, float]:
    """Run `code` in a child Python; returns (the JSON dict it prints last, peak tree RSS in GiB)."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak[0] / 2**30


BUILD = """
import json, resource, time
from searchr1_jax.retrieval.bm25_build import build_bm25_index
t = time.perf_counter()
meta = build_bm25_index({corpus!r}, {out!r}, memory_gb={memory_gb}, workers={workers}, show_progress=False)
seconds = time.perf_counter() - t
peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2**20
print(json.dumps({{"seconds": seconds, "max_rss_gib": peak, "shards": meta["shards"], "shard_lines": meta["shard_lines"],
                  "num_postings": meta["num_postings"], "num_terms": meta["num_terms"]}}))
"""

SERVE = """
import json, time
def status():
    fields = {{}}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 2**20
    return fields
from searchr1_jax.retrieval.bm25 import Bm25Retriever
queries = [json.loads(line) for line in open({queries!r})]
t = time.perf_counter()
retriever = Bm25Retriever.load({index!r})
load_seconds = time.perf_counter() - t
after_load = status()
retriever.search(queries[:8], {k})
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    hits = retriever.search(queries, {k})
    best = min(best, time.perf_counter() - t)
serial = time.perf_counter()
for q in queries[:200]:
    retriever.search([q], {k})
serial = 200 / (time.perf_counter() - serial)
print(json.dumps({{"qps": len(queries) / best, "serial_qps": serial, "load_seconds": load_seconds, "after_load": after_load,
                  "after_search": status(), "hits": [[p.id for p in row] for row in hits]}}))
"""


def lucene_serial(lucene_dir: str, queries: list[str], k: int) -> tuple[float, list[list[str]]] | None:
    """q/s of the original's serial path (best of 3) and its hits, or None without pyserini."""
    from searchr1_jax.retrieval import lucene

    if lucene.unavailable_reason() is not None or not lucene.is_lucene_index(lucene_dir):
        return None
    searcher = lucene.LuceneRetriever.load(lucene_dir, n_threads=1)
    searcher.search_serial_with_fetch(queries[:50], k)  # warm the JIT
    best, hits = float("inf"), None
    for _ in range(3):
        t = time.perf_counter()
        hits = searcher.search_serial_with_fetch(queries, k)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best, [[p.id for p in row] for row in hits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-passages", type=int, default=1_000_000)
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--memory-gb", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-build", action="store_true", help="reuse the index of an earlier run")
    parser.add_argument("--cache-dir", default=os.path.join(REPO, ".cache", "bench"))
    args = parser.parse_args()

    base = os.path.join(args.cache_dir, f"retrieval-{args.num_passages}")
    corpus = os.path.join(base, "corpus.jsonl")
    queries_path = os.path.join(base, f"queries-{args.num_queries}.jsonl")
    if not (os.path.exists(corpus) and os.path.exists(queries_path)):
        write_synthetic_corpus(corpus, queries_path, args.num_passages, args.num_queries)
    with open(queries_path, encoding="utf-8") as handle:
        queries = [json.loads(line) for line in handle]
    index = os.path.join(base, "bm25-sharded")
    rows: list[tuple[str, str]] = []
    corpus_gib = os.path.getsize(corpus) / 2**30

    if not args.no_build:
        shutil.rmtree(index, ignore_errors=True)
        shutil.rmtree(index + ".partial", ignore_errors=True)
        build, tree_peak = run_child(BUILD.format(corpus=corpus, out=index, memory_gb=args.memory_gb, workers=args.workers))
        per_million = build["seconds"] / args.num_passages * 1e6
        rows += [
            (f"build ({args.workers} workers, memory_gb {args.memory_gb:g})",
             f"{build['seconds']:.0f} s ({per_million:.0f} s per 1M passages), {build['shards']} shards of "
             f"{build['shard_lines']:,} lines, {build['num_postings']:,} postings, {build['num_terms']:,} terms"),
            ("build peak RSS", f"largest process {build['max_rss_gib']:.2f} GiB, process tree {tree_peak:.2f} GiB"),
            ("projected 21M build (linear in passages)", f"{per_million * WIKI18 / 1e6 / 3600:.2f} h"),
        ]
    sizes = {name: os.path.getsize(os.path.join(index, "bm25s", f"{name}.csc.index.npy")) / 2**30 for name in ("data", "indices")}
    store = sum(os.path.getsize(os.path.join(index, "docstore", n)) for n in os.listdir(os.path.join(index, "docstore"))) / 2**30
    serve, serve_peak = run_child(SERVE.format(queries=queries_path, index=index, k=args.topk))
    load, after = serve["after_load"], serve["after_search"]
    rows += [
        ("index on disk", f"matrix {sizes['data'] + sizes['indices']:.2f} GiB, passage store {store:.2f} GiB (corpus {corpus_gib:.2f} GiB)"),
        ("serve: open", f"{serve['load_seconds']:.1f} s; RSS {load['VmRSS']:.2f} GiB (anon {load['RssAnon']:.2f}, file {load['RssFile']:.2f})"),
        ("serve: after the queries", f"RSS {after['VmRSS']:.2f} GiB (anon {after['RssAnon']:.2f}, mapped file pages {after['RssFile']:.2f}); peak {serve_peak:.2f} GiB"),
        (f"ours, one batch of {len(queries)}, all threads", f"{serve['qps']:,.0f} q/s"),
        ("ours, one query per call (serial)", f"{serve['serial_qps']:,.0f} q/s"),
    ]
    lucene_result = lucene_serial(os.path.join(base, "lucene"), queries, args.topk)
    if lucene_result is not None:
        lucene_qps, lucene_hits = lucene_result
        rows += [
            ("(a) original path: Lucene search + doc fetch per hit, serial", f"{lucene_qps:,.0f} q/s"),
            ("ours (batch) / (a)", f"{serve['qps'] / lucene_qps:.2f}"),
            (f"top-{args.topk} agreement ours vs Lucene", f"{agreement(serve['hits'], lucene_hits):.3f}"),
        ]
    else:
        rows.append(("Lucene", "unavailable (needs pyserini, Java 21+ and an index at <cache>/lucene)"))
    print(f"\n{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}  "
          f"{args.num_passages:,} passages, {len(queries):,} queries, top-{args.topk}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
