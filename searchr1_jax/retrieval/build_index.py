"""Build a retrieval index from a jsonl corpus.

    python -m searchr1_jax.retrieval.build_index --corpus C.jsonl --method bm25 --out DIR
    python -m searchr1_jax.retrieval.build_index --corpus C.jsonl --method dense --out DIR --encoder PATH

The corpus holds one passage a line, ``{id, contents}`` or ``{id, title, text}``. The index
directory gets ``meta.json`` and the passage store beside the index. An existing index is
never overwritten half-way: BM25 and Lucene build in a temporary sibling directory renamed
into place at the end; dense builds in ``DIR.partial`` (resumable: rerun the same command
after an interruption) and is moved into place when complete.
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
    parser.add_argument("--fp16", action="store_true", help="dense only: store vectors in float16 (half the memory)")
    parser.add_argument("--threads", type=int, default=1, help="lucene only: indexing threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index once the new one is complete")
    args = parser.parse_args(argv)
    if args.method == "dense" and not args.encoder:
        parser.error("--method dense needs --encoder PATH")
    if args.method != "dense" and args.encoder:
        parser.error(f"--encoder only applies to --method dense, not {args.method}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.method == "bm25":
            from searchr1_jax.retrieval.bm25 import build_bm25_index

            meta = build_bm25_index(args.corpus, args.out, overwrite=args.overwrite)
        elif args.method == "lucene":
            from searchr1_jax.retrieval.lucene import build_lucene_index

            meta = build_lucene_index(args.corpus, args.out, threads=args.threads, overwrite=args.overwrite)
        else:
            from searchr1_jax.retrieval.dense import build_dense_index

            build_dense_index(
                args.corpus, args.out, args.encoder, index_type=args.index_type, batch_size=args.batch_size,
                fp16=args.fp16, overwrite=args.overwrite,
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
