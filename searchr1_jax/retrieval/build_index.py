"""Build a retrieval index from a jsonl corpus.

    python -m searchr1_jax.retrieval.build_index --corpus C.jsonl --method bm25 --out DIR
    python -m searchr1_jax.retrieval.build_index --corpus C.jsonl --method dense --out DIR --encoder PATH
    python -m searchr1_jax.retrieval.build_index --corpus wiki-18.jsonl --method dense --out DIR \
        --encoder e5-base-v2 --faiss-index e5_Flat.index [--verify 64] [--fp16]

The corpus holds one passage a line, ``{id, contents}`` or ``{id, title, text}``. The index
directory gets ``meta.json`` and the passage store beside the index. An existing index is
never overwritten half-way: BM25 and dense build in ``DIR.partial`` (resumable: rerun the
same command after an interruption; BM25's memory is bounded by --memory-gb) and Lucene in
a temporary sibling directory, each renamed into place when complete. --faiss-index adopts
an index built elsewhere (e.g. Search-R1's e5_Flat.index) instead of embedding the corpus.
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m searchr1_jax.retrieval.build_index",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--corpus", required=True, help="jsonl corpus, {id, contents} or {id, title, text} per line")
    parser.add_argument("--method", required=True, choices=("bm25", "dense", "lucene"),
                        help="bm25: bm25s (default backend); dense: encoder + FAISS; lucene: Pyserini (needs pyserini and Java 21+)")
    parser.add_argument("--out", required=True, help="index directory to create")
    parser.add_argument("--encoder", help="dense only: directory of the Hugging Face encoder (e.g. e5-base-v2)")
    parser.add_argument("--index-type", default="flat", choices=("flat", "hnsw", "ivf"), help="dense only: FAISS index type")
    parser.add_argument("--batch-size", type=int, default=64, help="dense only: passages per encoder batch")
    parser.add_argument("--max-length", type=int, default=256, help="dense only: tokens per passage and query (e5: 256)")
    parser.add_argument("--fp16", action="store_true", help="dense only: store vectors in float16 (half the memory)")
    parser.add_argument("--faiss-index", "--faiss_index", dest="faiss_index",
                        help="dense only: adopt this existing FAISS index (vector i = corpus passage i) instead of embedding")
    parser.add_argument("--verify", type=int, default=0,
                        help="dense with --faiss-index: re-embed this many random passages and compare with their stored vectors")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="bm25 only: memory budget of the build, all workers together")
    parser.add_argument("--workers", type=int, default=1, help="bm25 only: processes building shards in parallel")
    parser.add_argument("--threads", type=int, default=1, help="lucene only: indexing threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index once the new one is complete")
    args = parser.parse_args(argv)
    if args.method == "dense" and not args.encoder:
        parser.error("--method dense needs --encoder PATH")
    if args.method != "dense" and (args.encoder or args.faiss_index):
        parser.error(f"--encoder and --faiss-index only apply to --method dense, not {args.method}")
    if args.verify and not args.faiss_index:
        parser.error("--verify only applies with --faiss-index")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.method == "bm25":
            from searchr1_jax.retrieval.bm25 import build_bm25_index

            meta = build_bm25_index(args.corpus, args.out, overwrite=args.overwrite, memory_gb=args.memory_gb,
                                    workers=args.workers)
        elif args.method == "lucene":
            from searchr1_jax.retrieval.lucene import build_lucene_index

            meta = build_lucene_index(args.corpus, args.out, threads=args.threads, overwrite=args.overwrite)
        elif args.faiss_index:
            from searchr1_jax.retrieval.faiss_adopt import adopt_faiss_index

            meta = adopt_faiss_index(args.corpus, args.faiss_index, args.encoder, args.out, verify=args.verify,
                                     fp16=args.fp16, batch_size=args.batch_size, max_length=args.max_length,
                                     overwrite=args.overwrite)
        else:
            from searchr1_jax.retrieval.dense import build_dense_index

            build_dense_index(
                args.corpus, args.out, args.encoder, index_type=args.index_type, batch_size=args.batch_size,
                fp16=args.fp16, max_length=args.max_length, overwrite=args.overwrite,
            )  # fmt: skip
            from searchr1_jax.retrieval.docstore import read_meta

            meta = read_meta(args.out)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"build_index: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
