"""Adopt a FAISS index someone already built (Search-R1's ``e5_Flat.index``) without re-embedding.

    build_index --method dense --faiss-index e5_Flat.index --corpus wiki-18.jsonl --encoder e5-base-v2 --out DIR

The corpus is streamed once into the passage store (vector ``i`` is corpus passage ``i``, as
in the original), and the index is checked against it and the encoder: as many vectors as
passages, the encoder's dimension, inner-product metric. Optionally ``verify`` random
passages are re-embedded and compared with their stored vectors (cosine ≥ ``min_cosine``;
the original embedded in fp16 with torch, so exact equality is not expected).

The index file is not copied (wiki-18's is ~62 GB): ``meta.json`` records its absolute path
and size, and :class:`~searchr1_jax.retrieval.dense.DenseRetriever` memory-maps flat indexes
(``IO_FLAG_MMAP_IFC``), so serving costs page cache, not process memory. With ``fp16`` a
float32 flat index is converted, streaming, into an fp16 scalar-quantizer index inside the
index directory (half the size: ~31 GB for wiki-18), written in FAISS's own format.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile

import faiss
import numpy as np
from tqdm import tqdm

from searchr1_jax.retrieval.corpus import count_lines, iter_passages
from searchr1_jax.retrieval.docstore import DocStore, is_nonempty, publish, write_docstore, write_meta
from searchr1_jax.retrieval.encoder import TextEmbedder, load_encoder

INDEX_FILE = "index.faiss"
MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
_CONVERT_ROWS = 65536  # vectors converted per step (~200 MB of float32 at d=768)


def read_index_mmap(path: str):
    """Open a FAISS index with flat codes memory-mapped where FAISS allows it (flat and
    scalar-quantizer indexes); other types are read into memory."""
    try:
        return faiss.read_index(path, MMAP_FLAGS)
    except RuntimeError:
        return faiss.read_index(path)


def index_type_of(index) -> str:
    """The dense retriever's name for `index`'s type: "flat", "ivf" or "hnsw"."""
    if _flat_kind(index):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    try:
        faiss.extract_index_ivf(index)
        return "ivf"
    except RuntimeError:
        raise ValueError(f"unsupported FAISS index type {type(index).__name__} (flat, IVF or HNSW)") from None


def _flat_kind(index) -> str | None:
    """"fp32" for IndexFlat, "fp16" for an fp16 scalar quantizer, None for other types."""
    if isinstance(index, faiss.IndexFlat):
        return "fp32"
    if isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        return "fp16"
    return None


def write_fp16_copy(index, path: str, show_progress: bool = False) -> None:
    """Write `index` (a float32 flat inner-product index) as an fp16 IndexScalarQuantizer at
    `path`, streaming: the header comes from FAISS itself (an empty index of the same shape,
    serialised), the codes from FAISS's own fp16 encoder, a chunk at a time."""
    d, n = index.d, index.ntotal
    empty = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, index.metric_type)
    header = bytearray(faiss.serialize_index(empty).tobytes())
    # Layout: "IxSQ", d (int32), ntotal (int64), ..., then the codes as a vector: its byte
    # count (uint64, the last 8 bytes of an empty index) followed by the bytes.
    assert header[:4] == b"IxSQ" and struct.unpack_from("<q", header, 8)[0] == 0 and header[-8:] == bytes(8)
    struct.pack_into("<q", header, 8, n)
    tmp = path + ".tmp"
    with open(tmp, "wb") as out:
        out.write(header[:-8])
        out.write(struct.pack("<Q", n * empty.code_size))
        for start in tqdm(range(0, n, _CONVERT_ROWS), desc="fp16 copy", unit="chunk", disable=not show_progress):
            vectors = index.reconstruct_n(start, min(_CONVERT_ROWS, n - start))
            out.write(empty.sa_encode(np.ascontiguousarray(vectors, np.float32)).tobytes())
    os.replace(tmp, path)


def verify_vectors(index, store: DocStore, embedder: TextEmbedder, rows: np.ndarray) -> np.ndarray:
    """Cosine of the stored vector and a fresh embedding of each passage in `rows` (float64 [k])."""
    stored = np.stack([index.reconstruct(int(r)) for r in rows]).astype(np.float64)
    fresh = embedder.embed_passages([store.passage(int(r)).contents for r in rows]).astype(np.float64)
    norms = np.linalg.norm(stored, axis=1) * np.linalg.norm(fresh, axis=1)
    return (stored * fresh).sum(axis=1) / np.maximum(norms, 1e-12)


def adopt_faiss_index(
    corpus_path: str | os.PathLike,
    faiss_index: str | os.PathLike,
    encoder_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    verify: int = 0,
    min_cosine: float = 0.99,
    fp16: bool = False,
    max_length: int = 256,
    batch_size: int = 64,
    pooling: str | None = None,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Make `out_dir` a dense index directory serving the existing `faiss_index` over
    `corpus_path` with the encoder in `encoder_dir`; returns the metadata written.

    Raises ValueError naming the files when the index does not match the corpus (vector
    count), the encoder (dimension) or the metric, or when a verified vector differs.
    """
    corpus = os.path.abspath(os.fspath(corpus_path))
    source = os.path.abspath(os.fspath(faiss_index))
    out = os.path.abspath(os.fspath(out_dir))
    for path, what in ((corpus, "corpus file"), (source, "FAISS index file")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} not found: {path}")
    if is_nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    encoder, tokenizer, config = load_encoder(encoder_dir, pooling=pooling, query_prefix=query_prefix, passage_prefix=passage_prefix)
    embedder = TextEmbedder(encoder, tokenizer, config, max_length=max_length, batch_size=batch_size)  # checks max_length
    try:
        index = read_index_mmap(source)
    except RuntimeError as err:
        raise ValueError(f"{source}: not a FAISS index ({str(err).strip().splitlines()[-1]})") from None
    if index.d != config.model.hidden_size:
        raise ValueError(f"{source}: vectors have dimension {index.d} but the encoder {config.path} makes {config.model.hidden_size}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{source}: metric {index.metric_type} is not inner product (METRIC_INNER_PRODUCT=0); "
                         "Search-R1's e5 indexes are inner-product indexes of unit vectors")
    kind = _flat_kind(index)
    try:
        index_type = index_type_of(index)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if fp16 and kind != "fp32":
        raise ValueError(f"{source}: fp16 conversion needs a float32 flat index, this is {type(index).__name__}")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.adopting-", dir=parent)
    try:
        lines = count_lines(corpus)
        passages = tqdm(iter_passages(corpus), total=lines, unit="passage", desc="passage store", disable=not show_progress)
        num_passages = write_docstore(passages, staging)
        if num_passages != index.ntotal:
            raise ValueError(f"{source} holds {index.ntotal} vectors but {corpus} holds {num_passages} passages; "
                             "vector i must be passage i of the corpus the index was built from")
        fields = {"adopted_from": source, "source_bytes": os.path.getsize(source)}
        if verify > 0:
            rows = np.sort(np.random.default_rng(0).choice(num_passages, size=min(verify, num_passages), replace=False))
            cosines = verify_vectors(index, DocStore.open(staging), embedder, rows)
            bad = [(int(r), round(float(c), 4)) for r, c in zip(rows, cosines) if c < min_cosine]
            if bad:
                raise ValueError(f"{source}: {len(bad)} of {len(rows)} re-embedded passages differ from their stored vectors "
                                 f"(passage, cosine < {min_cosine}): {bad[:10]}; wrong corpus order, encoder, prefix or max_length?")
            fields.update(verified_passages=len(rows), verified_min_cosine=round(float(cosines.min()), 6))
        if fp16:
            write_fp16_copy(index, os.path.join(staging, INDEX_FILE), show_progress)
            index_file, stored_fp16 = INDEX_FILE, True
        else:
            index_file, stored_fp16 = source, kind == "fp16"
        write_meta(staging, "dense", num_passages, corpus, encoder=config.path, encoder_family=config.family,
                   pooling=config.pooling, query_prefix=config.query_prefix, passage_prefix=config.passage_prefix,
                   max_length=max_length, index_type=index_type, dim=index.d,
                   fp16=stored_fp16, nlist=faiss.extract_index_ivf(index).nlist if index_type == "ivf" else None, index_file=index_file, **fields)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out, overwrite)
    from searchr1_jax.retrieval.docstore import read_meta

    return read_meta(out)
