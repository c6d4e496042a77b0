"""Dense retrieval: resumable sharded index building and a FAISS-backed Retriever.

An existing FAISS index (Search-R1's ``e5_Flat.index``) can be adopted instead of built:
:mod:`searchr1_jax.retrieval.faiss_adopt`. Flat indexes are memory-mapped when served.

Index directory layout (see :mod:`searchr1_jax.retrieval.docstore` for the shared part)::

    meta.json         {"method": "dense", "num_passages", "corpus", "created", "encoder",
                       "encoder_family", "pooling", "query_prefix", "passage_prefix",
                       "max_length", "index_type", "dim", "fp16", "nlist", "index_file"}
    index.faiss       inner-product FAISS index; vector i is passage i of the docstore
    docstore.arrow    the passages in corpus order

:func:`build_dense_index` works in ``<out>.partial/``: the corpus is embedded in shards of
`shard_size` passages saved as ``shards/emb_NNNNN.npy`` (each written to a temporary name and
renamed, so a shard file that exists is complete). Re-running the same command after an
interruption skips the finished shards. Only when the FAISS index, passage store and
``meta.json`` are all written is the staging directory renamed to `out`, so `out` never holds
a half-built index.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import faiss
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from searchr1_jax.retrieval.corpus import count_lines, iter_passages
from searchr1_jax.retrieval.docstore import (DocStore, check_build_settings, is_nonempty, publish, read_meta,
                                             write_docstore, write_meta)
from searchr1_jax.retrieval.encoder import TextEmbedder, load_encoder
from searchr1_jax.retrieval.types import Passage

INDEX_TYPES = ("flat", "hnsw", "ivf")
INDEX_FILE = "index.faiss"
BUILD_FILE = "build.json"
SHARD_DIR = "shards"
HNSW_M = 32  # graph degree: faiss's recommended range is 16-64; 32 balances memory and recall
HNSW_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 128
DEFAULT_NPROBE = 64
# Training sample: k-means needs >= 39 points per centroid (faiss warns below); 64 keeps
# wiki-18's sample (~18k lists of 768 floats) near 3.5 GB. Never fewer than 65536 rows (or all).
_IVF_TRAIN_POINTS_PER_LIST = 64
_MIN_TRAIN_POINTS = 65536
_REQUIRED_META = ("encoder", "pooling", "query_prefix", "passage_prefix", "index_type", "dim", "max_length", "fp16")

log = logging.getLogger(__name__)


def default_nlist(num_passages: int) -> int:
    """IVF list count: ~4·sqrt(N), but at least 39 training points per list and at least 1."""
    return max(1, min(int(4 * math.sqrt(num_passages)), num_passages // 39))


def staging_dir(out_dir: str | os.PathLike) -> str:
    """Where :func:`build_dense_index` builds `out_dir` before renaming it into place."""
    return os.path.abspath(os.fspath(out_dir)) + ".partial"


def _shard_path(shards: str, number: int) -> str:
    return os.path.join(shards, f"emb_{number:05d}.npy")


def _save_shard(path: str, vectors: np.ndarray) -> None:
    """Write one shard so that the final name only ever holds a complete file."""
    tmp = path[: -len(".npy")] + ".tmp.npy"
    np.save(tmp, vectors)
    os.replace(tmp, path)


def _chunks(passages: Iterator[Passage], size: int) -> Iterator[list[Passage]]:
    chunk: list[Passage] = []
    for passage in passages:
        chunk.append(passage)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _embed_shards(
    corpus: str, shards: str, embedder: TextEmbedder, shard_size: int, fp16: bool, total: int, show_progress: bool
) -> list[str]:
    """Embed the corpus into shard files, skipping those already complete; returns their paths in order."""
    os.makedirs(shards, exist_ok=True)
    dtype = np.float16 if fp16 else np.float32
    paths = []
    with tqdm(total=total, unit="passage", desc="embedding", disable=not show_progress) as bar:
        for number, chunk in enumerate(_chunks(iter_passages(corpus), shard_size)):
            path = _shard_path(shards, number)
            paths.append(path)
            if os.path.isfile(path):
                shape = np.load(path, mmap_mode="r").shape
                if shape != (len(chunk), embedder.dim):
                    raise ValueError(f"{path}: shard has shape {shape}, expected {(len(chunk), embedder.dim)}; delete it to re-embed")
                bar.update(len(chunk))
            else:
                vectors = embedder.embed_passages([p.contents for p in chunk], on_batch=bar.update)
                _save_shard(path, vectors.astype(dtype))
    return paths


def _new_index(index_type: str, dim: int, fp16: bool, nlist: int):
    ip = faiss.METRIC_INNER_PRODUCT
    fp16_code = faiss.ScalarQuantizer.QT_fp16
    if index_type == "flat":
        return faiss.IndexScalarQuantizer(dim, fp16_code, ip) if fp16 else faiss.IndexFlatIP(dim)
    if index_type == "hnsw":
        index = faiss.IndexHNSWSQ(dim, fp16_code, HNSW_M, ip) if fp16 else faiss.IndexHNSWFlat(dim, HNSW_M, ip)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if fp16:
        return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, fp16_code, ip)
    return faiss.IndexIVFFlat(quantizer, dim, nlist, ip)


def _training_sample(shard_paths: Sequence[str], num_rows: int, size: int) -> np.ndarray:
    """`size` rows drawn uniformly (fixed seed) across the memory-mapped shards, float32."""
    picks = np.sort(np.random.default_rng(0).choice(num_rows, size=min(size, num_rows), replace=False))
    rows, start = [], 0
    for path in shard_paths:
        shard = np.load(path, mmap_mode="r")
        inside = picks[(picks >= start) & (picks < start + len(shard))] - start
        rows.append(np.asarray(shard[inside], np.float32))
        start += len(shard)
    return np.concatenate(rows)


def _build_faiss(shard_paths: Sequence[str], num_rows: int, dim: int, index_type: str, fp16: bool, nlist: int, show_progress: bool):
    index = _new_index(index_type, dim, fp16, nlist)
    if not index.is_trained:
        size = max(nlist * _IVF_TRAIN_POINTS_PER_LIST, _MIN_TRAIN_POINTS)
        index.train(_training_sample(shard_paths, num_rows, size))
    for path in tqdm(shard_paths, unit="shard", desc=f"indexing ({index_type})", disable=not show_progress):
        index.add(np.ascontiguousarray(np.load(path), dtype=np.float32))
    return index


def _write_meta_atomically(staging: str, num_passages: int, corpus: str, fields: dict) -> None:
    """meta.json marks the staging dir as finished, so it must never exist half-written."""
    scratch = tempfile.mkdtemp(prefix=".meta-", dir=staging)
    write_meta(scratch, "dense", num_passages, corpus, **fields)
    os.replace(os.path.join(scratch, "meta.json"), os.path.join(staging, "meta.json"))
    os.rmdir(scratch)


def _build_in_staging(
    corpus: str, staging: str, embedder: TextEmbedder, *, index_type: str, shard_size: int, fp16: bool,
    nlist: int | None, max_length: int, show_progress: bool,
) -> None:
    """Shards -> passage store -> FAISS index -> meta.json, all inside `staging`."""
    config = embedder.config
    shards = os.path.join(staging, SHARD_DIR)
    lines = count_lines(corpus)  # progress-bar total (blank lines included)
    shard_paths = _embed_shards(corpus, shards, embedder, shard_size, fp16, lines, show_progress)
    passages = tqdm(iter_passages(corpus), total=lines, unit="passage", desc="passage store", disable=not show_progress)
    num_passages = write_docstore(passages, staging)
    if num_passages == 0:
        raise ValueError(f"{corpus}: the corpus holds no passages")
    embedded = sum(np.load(p, mmap_mode="r").shape[0] for p in shard_paths)
    if embedded != num_passages:
        raise ValueError(f"{corpus} changed during the build ({embedded} passages embedded, {num_passages} stored); delete {staging} and rebuild")
    if nlist is None and index_type == "ivf":
        nlist = default_nlist(num_passages)
    if nlist is not None and not 1 <= nlist <= num_passages:
        raise ValueError(f"nlist must be in [1, {num_passages}] (the number of passages), got {nlist}")
    index = _build_faiss(shard_paths, num_passages, embedder.dim, index_type, fp16, nlist or 0, show_progress)
    faiss.write_index(index, os.path.join(staging, INDEX_FILE))
    _write_meta_atomically(staging, num_passages, corpus, {
        "encoder": config.path, "encoder_family": config.family, "pooling": config.pooling,
        "query_prefix": config.query_prefix, "passage_prefix": config.passage_prefix, "max_length": max_length,
        "index_type": index_type, "dim": embedder.dim, "fp16": fp16, "nlist": nlist, "index_file": INDEX_FILE,
    })


def build_dense_index(
    corpus_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    encoder_dir: str | os.PathLike,
    *,
    index_type: str = "flat",
    batch_size: int = 64,
    shard_size: int = 65536,
    max_length: int = 256,
    fp16: bool = False,
    nlist: int | None = None,
    pooling: str | None = None,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> None:
    """Embed a jsonl corpus with the encoder in `encoder_dir` and write a dense index to `out_dir`.

    index_type: "flat" (exact inner product), "hnsw" (graph, M=32) or "ivf" (`nlist` lists,
    default :func:`default_nlist`, trained on a sample). fp16 stores vectors (shards and index)
    in half precision, halving memory (wiki-18: ~32 GB instead of ~64 GB). An interrupted build
    resumes when called again with the same arguments. pooling and the prefixes override the
    encoder family's conventions (see :func:`encoder.resolve_conventions`) and are recorded in
    meta.json for the retriever. An existing non-empty `out_dir` is an error unless
    `overwrite`, in which case it is replaced only once the new index is complete.
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if nlist is not None and index_type != "ivf":
        raise ValueError(f"nlist only applies to index_type='ivf', not {index_type!r}")
    corpus = os.path.abspath(os.fspath(corpus_path))
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    encoder_path = os.path.abspath(os.fspath(encoder_dir))
    out = os.path.abspath(os.fspath(out_dir))
    if is_nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    # Load (and so check) the encoder before anything is written.
    encoder, tokenizer, config = load_encoder(encoder_path, pooling=pooling, query_prefix=query_prefix, passage_prefix=passage_prefix)
    embedder = TextEmbedder(encoder, tokenizer, config, max_length=max_length, batch_size=batch_size)
    staging = staging_dir(out)
    stat = os.stat(corpus)
    check_build_settings(staging, {
        "corpus": corpus, "corpus_bytes": stat.st_size, "corpus_mtime_ns": stat.st_mtime_ns,
        "encoder": encoder_path, "pooling": config.pooling, "query_prefix": config.query_prefix,
        "passage_prefix": config.passage_prefix, "max_length": max_length, "shard_size": shard_size,
        "index_type": index_type, "fp16": fp16, "nlist": nlist,
    })
    shards = os.path.join(staging, SHARD_DIR)
    if not os.path.isfile(os.path.join(staging, "meta.json")):  # else only the final rename was missed
        _build_in_staging(corpus, staging, embedder, index_type=index_type, shard_size=shard_size, fp16=fp16,
                          nlist=nlist, max_length=max_length, show_progress=show_progress)
    shutil.rmtree(shards, ignore_errors=True)
    os.remove(os.path.join(staging, BUILD_FILE))
    publish(staging, out, overwrite)


def _to_gpus(index, index_type: str, fp16: bool):
    """Clone the index onto all GPUs (sharded) when faiss was built with GPU support."""
    if index_type == "hnsw" or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index  # faiss has no GPU HNSW
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = fp16
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as err:
        log.warning("keeping the %s index on CPU: faiss could not move it to GPU (%s)", index_type, err)
        return index


class DenseRetriever:
    """Retriever over a dense index: embeds queries, searches FAISS, reads passages back.

    Passage.score is the inner product of the unit-length query and passage embeddings.
    """

    def __init__(self, embedder: TextEmbedder, index, docstore: DocStore):
        if index.ntotal != len(docstore):
            raise ValueError(f"index holds {index.ntotal} vectors but the passage store {docstore.path} holds {len(docstore)}")
        self.embedder = embedder
        self.index = index
        self.docstore = docstore

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike,
        *,
        encoder_dir: str | os.PathLike | None = None,
        batch_size: int = 256,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool = True,
        dtype=jnp.float32,
    ) -> "DenseRetriever":
        """Open an index built by :func:`build_dense_index`.

        encoder_dir overrides the encoder path recorded in meta.json (e.g. after moving it);
        the recorded pooling, prefixes and max length are always used so queries are embedded
        like the passages were. Queries are embedded `batch_size` at a time by one jitted
        program per (rows, length) bucket, on the accelerator when JAX has one (e5-base on
        this 2-core CPU: benchmarks/README.md, "Dense query encoding"). nprobe (IVF,
        default 64) and ef_search (HNSW, default 128) trade speed for recall.
        """
        index_dir = os.path.abspath(os.fspath(index_dir))
        meta_path = os.path.join(index_dir, "meta.json")
        meta = read_meta(index_dir)
        if meta["method"] != "dense":
            raise ValueError(f"{meta_path}: method is {meta['method']!r}, not 'dense'")
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"{meta_path}: missing field(s) {missing}")
        encoder_path = os.fspath(encoder_dir) if encoder_dir is not None else meta["encoder"]
        if not os.path.isdir(encoder_path):
            raise FileNotFoundError(f"encoder directory {encoder_path} (from {meta_path if encoder_dir is None else 'encoder_dir'}) not found; pass encoder_dir")
        encoder, tokenizer, config = load_encoder(
            encoder_path, dtype, pooling=meta["pooling"], query_prefix=meta["query_prefix"], passage_prefix=meta["passage_prefix"]
        )
        if config.model.hidden_size != meta["dim"]:
            raise ValueError(f"{encoder_path}: encoder dimension {config.model.hidden_size} != index dimension {meta['dim']} ({meta_path})")
        embedder = TextEmbedder(encoder, tokenizer, config, max_length=meta["max_length"], batch_size=batch_size)
        index_path = os.path.join(index_dir, meta.get("index_file", INDEX_FILE))
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"FAISS index file not found: {index_path}")
        if meta.get("adopted_from") == index_path and os.path.getsize(index_path) != meta.get("source_bytes"):
            raise ValueError(f"{index_path} has {os.path.getsize(index_path)} bytes, but {meta['source_bytes']} when it was "
                             f"adopted into {index_dir}: the file changed; adopt it again")
        from searchr1_jax.retrieval.faiss_adopt import read_index_mmap

        index = read_index_mmap(index_path)  # flat vectors memory-mapped: page cache, not process memory
        if meta["index_type"] == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(nprobe or DEFAULT_NPROBE, ivf.nlist)
        elif meta["index_type"] == "hnsw":
            index.hnsw.efSearch = ef_search or DEFAULT_EF_SEARCH
        if use_gpu:
            index = _to_gpus(index, meta["index_type"], meta["fp16"])
        return cls(embedder, index, DocStore.open(index_dir))

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """Top-`topk` passages per query by inner product, best first (fewer if the index holds fewer)."""
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive integer, got {topk!r}")
        if not queries:
            return []
        vectors = self.embedder.embed_queries(list(queries))
        scores, ids = self.index.search(vectors, min(topk, self.index.ntotal))
        return [
            self.docstore.passages([int(i) for i in row_ids if i >= 0], [float(s) for s, i in zip(row_scores, row_ids) if i >= 0])
            for row_scores, row_ids in zip(scores, ids)
        ]
