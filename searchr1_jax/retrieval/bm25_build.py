"""BM25 index build for corpora of any size: streaming, sharded, resumable, bounded memory.

wiki-18 has 21M passages (~1.3 billion distinct (passage, term) pairs); the whole weight
matrix and its sort do not fit a 24 GB machine, so the build runs in two phases inside a
staging directory ``<out>.partial/`` (the layout of the dense build):

1. **Shards.** The corpus is cut into shards of ``shard_lines`` lines (byte ranges found by
   one fast scan for newlines, so a shard, and a resumed build, starts reading at its own
   offset). Each shard is analysed on its own, with its own vocabulary: its passages go to
   the passage-store part ``docstore/part-NNNNN.arrow`` and its postings, sorted by term
   *string* then passage, to ``shards/NNNNN/`` (``terms.txt``, ``df.npy``, ``docs.npy``,
   ``tf.npy``, ``lengths.npy``, ``shard.json``). A shard is written under a temporary name
   and renamed when complete, so a crash never leaves a half shard; a rerun of the same
   command skips the shards that exist. ``workers`` processes build shards in parallel.
   The shard size follows from ``memory_gb``: a shard costs about :data:`BYTES_PER_PAIR`
   bytes per pair at its peak, estimated from the first :data:`SAMPLE_LINES` passages
   (with a 25% margin), and there are at least ``workers`` shards, unless ``shard_lines``
   is given.
2. **Merge.** Global term ids are the lexicographic order of the terms, so every shard's
   local order is already the global order: the vocabularies merge by a streaming k-way
   merge, and the postings of a range of terms are gathered from every shard (file reads,
   not memory maps, so they never count against the process), weighted with the global
   idf and average length, and appended to the output. A block of terms holds at most the
   pairs the memory budget allows (a single term larger than that is its own block).

The result is the same matrix as an in-memory build (Lucene BM25, k1=0.9, b=0.4; see
:mod:`searchr1_jax.retrieval.bm25`), in bm25s' file format under ``bm25s/`` plus the
column maxima ``term_max.npy`` that the search kernel needs (computing them at load time
would read the whole matrix). ``meta.json`` is written last; then the staging directory is
renamed to ``out``. A corpus error (bad line) deletes the staging directory, since the
corpus must change to fix it; any other interruption keeps it for the rerun.
"""
from __future__ import annotations

import concurrent.futures
import heapq
import json
import multiprocessing
import os
import shutil
import time
from typing import Callable, Iterator

import numpy as np

from searchr1_jax.retrieval.bm25 import B, BM25S_SUBDIR, EMPTY_TERM, K1, TERM_MAX_FILE, Analyzer, TermIds, count_pairs, passage_text
from searchr1_jax.retrieval.corpus import CorpusError, count_lines, parse_passage
from searchr1_jax.retrieval.docstore import check_build_settings, is_nonempty, part_path, publish, write_meta, write_passages

SHARD_DIR = "shards"
BUILD_FILE = "build.json"
DEFAULT_MEMORY_GB = 8.0
# Peak bytes per distinct (passage, term) pair while one shard is built: the chunks' pairs
# (12 B), one concatenated column (4), the sort permutation (8) and a gathered column (4),
# plus the per-token keys of the chunk being counted. Measured ~28; 40 leaves room.
BYTES_PER_PAIR = 40
# One build process without its pairs: interpreter, NumPy/Arrow/numba, the analyser's
# word cache and the passage-store batch being written.
BASE_BYTES = 512 << 20
# Merge: per pair of the block being written (output doc numbers and weights) and of the
# shard slice being placed (doc numbers, tf, positions, weights and their temporaries).
MERGE_BYTES_PER_PAIR = 64
SAMPLE_LINES = 2000
PAIRS_MARGIN = 1.25
MIN_SHARD_LINES = 1000
ANALYZER = "lowercase, \\w\\w+ words, bm25s English stopwords, Snowball English stemmer"
_PASSAGES_PER_CHUNK = 16384  # ~1.6M words: their keys and sort stay under ~40 MB
_READ_CHUNK_BYTES = 1 << 24


def staging_dir(out_dir: str | os.PathLike) -> str:
    """Where :func:`build_bm25_index` builds `out_dir` before renaming it into place."""
    return os.path.abspath(os.fspath(out_dir)) + ".partial"


def line_offsets(path: str, every: int) -> list[int]:
    """Byte offsets where lines 0, every, 2·every, … start, then the file size.

    Consecutive offsets delimit the shards (the last may be shorter; a last line without
    a newline belongs to it). An empty file gives ``[0]``: no shard.
    """
    offsets, seen, position, target = [0], 0, 0, every
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK_BYTES):
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
            while seen + len(newlines) >= target:  # the target-th newline is in this chunk
                offsets.append(position + int(newlines[target - seen - 1]) + 1)
                target += every
            seen += len(newlines)
            position += len(chunk)
    if offsets[-1] != position:
        offsets.append(position)
    return offsets


def _read_lines(path: str, start: int, end: int, first_line: int) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines in bytes [start, end) of `path`."""
    with open(path, "rb") as handle:
        handle.seek(start)
        position, number = start, first_line
        while position < end:
            raw = handle.readline()
            if not raw:
                return
            position += len(raw)
            if raw.strip():
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            number += 1


def estimate_pairs_per_passage(corpus: str, sample_lines: int = SAMPLE_LINES) -> float:
    """Mean distinct terms per passage over the first `sample_lines` lines (1.0 if none)."""
    analyzer, passages, pairs = Analyzer(), 0, 0
    end = os.path.getsize(corpus)
    for number, line in _read_lines(corpus, 0, end, 1):
        if number > sample_lines:
            break
        pairs += len(set(analyzer.terms(passage_text(parse_passage(line, f"{corpus}:{number}")))))
        passages += 1
    return max(pairs / passages, 1.0) if passages else 1.0


def shard_lines_for(memory_bytes: float, workers: int, pairs_per_passage: float) -> int:
    """Lines per shard so that `workers` shard builds at once stay within `memory_bytes`."""
    parent = BASE_BYTES if workers > 1 else 0  # the coordinating process, idle meanwhile
    per_worker = (memory_bytes - parent) / workers - BASE_BYTES
    if per_worker <= 0:
        need = (BASE_BYTES * (workers + (workers > 1)) + (1 << 28)) / 2**30
        raise ValueError(f"memory_gb={memory_bytes / 2**30:g} is too small for {workers} worker(s); give at least {need:.1f}")
    return max(MIN_SHARD_LINES, int(per_worker / BYTES_PER_PAIR / (pairs_per_passage * PAIRS_MARGIN)))


def _shard_dir(staging: str, number: int) -> str:
    return os.path.join(staging, SHARD_DIR, f"{number:05d}")


def _save_npy(directory: str, name: str, array: np.ndarray) -> None:
    np.save(os.path.join(directory, name), array)


def build_shard(corpus: str, staging: str, number: int, start: int, end: int, first_line: int,
                on_passages: Callable[[int], None] | None = None) -> dict:
    """Analyse corpus bytes [start, end) (lines from `first_line`) into shard `number`.

    Writes the passage-store part and ``shards/NNNNN/`` (see the module docstring); returns
    the shard's ``shard.json`` record. A shard that already exists is not rebuilt.
    """
    final = _shard_dir(staging, number)
    record_path = os.path.join(final, "shard.json")
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as handle:
            return json.load(handle)
    term_ids = TermIds(Analyzer())
    columns: tuple[list, list, list] = ([], [], [])  # per chunk: terms, docs, tf
    lengths: list[np.ndarray] = []
    chunk_ids: list[int] = []  # term ids of the current chunk's words, -1 for stopwords
    chunk_lengths: list[int] = []  # words per passage of the current chunk
    done = [0]

    def flush() -> None:
        # Stopwords (-1) are dropped here in bulk; a passage's length counts its other words.
        ids = np.asarray(chunk_ids, dtype=np.int32)
        kept = np.concatenate([[0], np.cumsum(ids >= 0)])
        ends = np.cumsum(chunk_lengths)
        chunk = (kept[ends] - kept[ends - np.asarray(chunk_lengths)]).astype(np.int32)
        for column, values in zip(columns, count_pairs(ids[ids >= 0], chunk, done[0])):
            column.append(values)
        lengths.append(chunk)
        done[0] += len(chunk)
        chunk_ids.clear()
        chunk_lengths.clear()
        if on_passages is not None:
            on_passages(len(chunk))

    def passages():
        for line_number, line in _read_lines(corpus, start, end, first_line):
            passage = parse_passage(line, f"{corpus}:{line_number}")
            ids = term_ids.raw_ids(passage_text(passage))
            chunk_ids.extend(ids)
            chunk_lengths.append(len(ids))  # words, stopwords included, until flush()
            if len(chunk_lengths) == _PASSAGES_PER_CHUNK:
                flush()
            yield passage

    part = part_path(staging, number)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    num_passages = write_passages(passages(), part + ".tmp")
    if chunk_lengths:
        flush()
    # Local term ids in lexicographic order of the terms: then every shard's order is the
    # global order, and the merge needs no sort.
    by_id = list(term_ids.vocab)
    order = sorted(range(len(by_id)), key=by_id.__getitem__)
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    # One column at a time, freeing the chunks as we go, to keep the peak low.
    terms = rank[np.concatenate(columns[0])] if columns[0] else np.zeros(0, np.int32)
    columns[0].clear()
    permutation = np.argsort(terms, kind="stable")  # within a term, passages stay in order
    terms = terms[permutation]
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, column in (("docs.npy", columns[1]), ("tf.npy", columns[2])):
        values = np.concatenate(column) if column else np.zeros(0, np.int32)
        column.clear()
        _save_npy(tmp, name, values[permutation])
        del values
    del permutation
    df = np.bincount(terms, minlength=len(order)).astype(np.int32)
    _save_npy(tmp, "df.npy", df)
    _save_npy(tmp, "lengths.npy", np.concatenate(lengths) if lengths else np.zeros(0, np.int32))
    with open(os.path.join(tmp, "terms.txt"), "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(by_id[i] + "\n" for i in order)
    record = {"passages": num_passages, "pairs": int(len(terms)), "terms": len(order), "first_line": first_line,
              "byte_start": start, "byte_end": end}
    with open(os.path.join(tmp, "shard.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    os.replace(part + ".tmp", part)
    os.replace(tmp, final)  # the commit point of this shard
    return record


def _build_shards(corpus: str, staging: str, offsets: list[int], shard_lines: int, workers: int, show_progress: bool) -> list[dict]:
    """Build every missing shard (in parallel when workers > 1); records in shard order."""
    from tqdm.auto import tqdm

    jobs = [(corpus, staging, k, offsets[k], offsets[k + 1], k * shard_lines + 1) for k in range(len(offsets) - 1)]
    records: list[dict | None] = [None] * len(jobs)
    if workers <= 1:
        with tqdm(total=(len(jobs)) * shard_lines, desc="bm25 shards", unit="line", unit_scale=True,
                  disable=not show_progress, smoothing=0.05) as bar:
            for job in jobs:
                records[job[2]] = build_shard(*job, on_passages=bar.update)
        return records  # type: ignore[return-value]
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(build_shard, *job): job[2] for job in jobs}
        with tqdm(total=len(jobs), desc=f"bm25 shards ({workers} workers)", unit="shard", disable=not show_progress) as bar:
            for future in concurrent.futures.as_completed(futures):
                records[futures[future]] = future.result()
                bar.update()
    return records  # type: ignore[return-value]


class _NpyReader:
    """Reads slices of a 1-D .npy file with plain file reads (no memory map)."""

    def __init__(self, path: str):
        self._handle = open(path, "rb")
        version = np.lib.format.read_magic(self._handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(self._handle)
        self.dtype, self.length, self._offset = dtype, shape[0], self._handle.tell()

    def read(self, start: int, stop: int) -> np.ndarray:
        self._handle.seek(self._offset + start * self.dtype.itemsize)
        return np.fromfile(self._handle, self.dtype, stop - start)

    def close(self) -> None:
        self._handle.close()


def _npy_writer(path: str, dtype, length: int):
    """An open file with a 1-D .npy header for `length` items of `dtype`; append the data."""
    handle = open(path, "wb")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (int(length),)}
    np.lib.format.write_array_header_1_0(handle, header)
    return handle


def _merge_vocabularies(shard_dirs: list[str], vocab_path: str) -> list[np.ndarray]:
    """Write the sorted union of the shards' terms as bm25s' ``vocab.index.json`` (term → id,
    id 0 the empty term); returns, per shard, its local → global id map (int64, increasing)."""

    def terms(s: int) -> Iterator[tuple[str, int]]:
        with open(os.path.join(shard_dirs[s], "terms.txt"), encoding="utf-8", newline="\n") as handle:
            for line in handle:
                yield line[:-1], s

    maps = [np.empty(int(np.load(os.path.join(d, "df.npy"), mmap_mode="r").shape[0]), np.int64) for d in shard_dirs]
    filled = [0] * len(shard_dirs)
    with open(vocab_path, "w", encoding="utf-8") as out:
        out.write("{" + json.dumps(EMPTY_TERM) + ": 0")
        count, last = 1, None
        for term, s in heapq.merge(*(terms(s) for s in range(len(shard_dirs)))):
            if term != last:
                out.write(", " + json.dumps(term, ensure_ascii=False) + f": {count}")
                count, last = count + 1, term
            maps[s][filled[s]] = count - 1
            filled[s] += 1
        out.write("}")
    return maps


def merge_shards(staging: str, records: list[dict], memory_bytes: float, show_progress: bool) -> dict:
    """Merge the shards into bm25s' files under ``staging/bm25s`` and ``term_max.npy``;
    returns counts for meta.json."""
    from tqdm.auto import tqdm

    shard_dirs = [_shard_dir(staging, k) for k in range(len(records))]
    counts = np.array([r["passages"] for r in records], np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(counts)])
    num_docs = int(doc_offsets[-1])
    if num_docs == 0:
        raise ValueError("the corpus has no passages")
    out = os.path.join(staging, BM25S_SUBDIR)
    os.makedirs(out, exist_ok=True)
    maps = _merge_vocabularies(shard_dirs, os.path.join(out, "vocab.index.json"))
    num_terms = 1 + max((int(m[-1]) for m in maps if len(m)), default=0)
    local_df = [np.load(os.path.join(d, "df.npy")).astype(np.int64) for d in shard_dirs]
    df = np.zeros(num_terms, np.int64)
    for term_map, shard_df in zip(maps, local_df):
        df[term_map] += shard_df  # a map holds no repeated id, so fancy += is exact
    lengths = np.concatenate([np.load(os.path.join(d, "lengths.npy")) for d in shard_dirs])
    average = lengths.mean()
    # The same float32 arithmetic as an in-memory build, so the weights are bit-identical.
    idf = np.log1p((num_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
    norm = (K1 * (1.0 - B + B * lengths / average) if average > 0 else np.full(num_docs, K1)).astype(np.float32)
    del lengths
    indptr = np.zeros(num_terms + 1, np.int64)
    np.cumsum(df, out=indptr[1:])
    num_pairs = int(indptr[-1])
    local_ptr = [np.concatenate([[0], np.cumsum(d)]) for d in local_df]
    fixed = norm.nbytes + idf.nbytes + 4 * indptr.nbytes + sum(m.nbytes * 3 for m in maps)
    block_pairs = max(1 << 16, int((memory_bytes - BASE_BYTES - fixed) // MERGE_BYTES_PER_PAIR))
    term_max = np.zeros(num_terms, np.float32)
    docs_in = [_NpyReader(os.path.join(d, "docs.npy")) for d in shard_dirs]
    tf_in = [_NpyReader(os.path.join(d, "tf.npy")) for d in shard_dirs]
    data_out = _npy_writer(os.path.join(out, "data.csc.index.npy"), np.float32, num_pairs)
    indices_out = _npy_writer(os.path.join(out, "indices.csc.index.npy"), np.int32, num_pairs)
    try:
        with tqdm(total=num_pairs, desc="bm25 merge", unit="pair", unit_scale=True, disable=not show_progress) as bar:
            g0 = 0
            while g0 < num_terms:
                # The largest block of terms [g0, g1) within the budget, at least one term.
                g1 = int(np.searchsorted(indptr, indptr[g0] + block_pairs, side="right")) - 1
                g1 = min(max(g1, g0 + 1), num_terms)
                base, size = int(indptr[g0]), int(indptr[g1] - indptr[g0])
                block_docs = np.empty(size, np.int32)
                block_weights = np.empty(size, np.float32)
                cursor = indptr[g0:g1] - base  # next free slot of each term in the block
                for s, term_map in enumerate(maps):
                    l0, l1 = np.searchsorted(term_map, [g0, g1])
                    if l0 == l1:
                        continue
                    a, b = int(local_ptr[s][l0]), int(local_ptr[s][l1])
                    counts_here = local_df[s][l0:l1]
                    block_terms = term_map[l0:l1] - g0
                    group_start = local_ptr[s][l0:l1] - a
                    positions = np.repeat(cursor[block_terms] - group_start, counts_here) + np.arange(b - a)
                    docs = docs_in[s].read(a, b).astype(np.int64) + doc_offsets[s]
                    weights = tf_in[s].read(a, b).astype(np.float32)
                    denominator = norm[docs]
                    denominator += weights
                    weights /= denominator
                    del denominator
                    weights *= np.repeat(idf[block_terms + g0], counts_here)
                    block_docs[positions] = docs
                    block_weights[positions] = weights
                    cursor[block_terms] += counts_here
                    del positions, docs, weights
                block_weights.tofile(data_out)
                block_docs.tofile(indices_out)
                nonempty = np.flatnonzero(df[g0:g1])
                if len(nonempty):
                    term_max[g0 + nonempty] = np.maximum.reduceat(block_weights, (indptr[g0:g1] - base)[nonempty])
                bar.update(size)
                g0 = g1
    finally:
        for handle in (data_out, indices_out):
            handle.close()
        for reader in docs_in + tf_in:
            reader.close()
    np.save(os.path.join(out, "indptr.csc.index.npy"), indptr)
    np.save(os.path.join(staging, TERM_MAX_FILE), term_max)
    params = {"k1": K1, "b": B, "delta": 0.5, "method": "lucene", "idf_method": "lucene", "dtype": "float32",
              "int_dtype": "int32", "num_docs": num_docs, "version": _bm25s_version(), "backend": "numpy"}
    with open(os.path.join(out, "params.index.json"), "w", encoding="utf-8") as handle:
        json.dump(params, handle, indent=4)
    return {"num_passages": num_docs, "num_terms": num_terms, "num_postings": num_pairs}


def _bm25s_version() -> str:
    try:
        import bm25s

        return bm25s.__version__
    except ImportError:  # the files are readable without it
        return "unknown"


def build_bm25_index(
    corpus_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    memory_gb: float = DEFAULT_MEMORY_GB,
    workers: int = 1,
    shard_lines: int | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Index a jsonl corpus with BM25 into `out_dir`; returns the metadata written.

    memory_gb bounds the build's memory (all `workers` processes together) by sizing the
    shards and merge blocks (see the module docstring); shard_lines overrides the shard
    size. An interrupted build resumes when called again (finished shards are kept); the
    index appears at `out_dir` only when complete. An existing non-empty `out_dir` is an
    error unless `overwrite`, in which case it is replaced only once the new index is done.
    """
    started = time.perf_counter()
    corpus = os.path.abspath(os.fspath(corpus_path))
    out = os.path.abspath(os.fspath(out_dir))
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    if workers < 1 or memory_gb <= 0 or (shard_lines is not None and shard_lines < 1):
        raise ValueError(f"need workers >= 1, memory_gb > 0 and shard_lines >= 1, got {workers}, {memory_gb}, {shard_lines}")
    if is_nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    memory_bytes = memory_gb * 2**30
    staging = staging_dir(out)
    stat = os.stat(corpus)
    identity = {"corpus": corpus, "corpus_bytes": stat.st_size, "corpus_mtime_ns": stat.st_mtime_ns, "k1": K1, "b": B,
                "analyzer": ANALYZER}
    if not os.path.isfile(os.path.join(staging, BUILD_FILE)):
        if shard_lines is None:
            shard_lines = shard_lines_for(memory_bytes, workers, estimate_pairs_per_passage(corpus))
            if workers > 1:  # at least one shard per worker, else a worker idles
                shard_lines = max(1, min(shard_lines, -(-count_lines(corpus) // workers)))
        identity["shard_lines"] = shard_lines
    elif shard_lines is not None:
        identity["shard_lines"] = shard_lines
    # A resumed build keeps the shard size it started with (unless given explicitly); other
    # settings or a changed corpus are an error that names the staging directory.
    settings = check_build_settings(staging, identity, BUILD_FILE)
    try:
        if not os.path.isfile(os.path.join(staging, "meta.json")):  # else only the final rename was missed
            lines_per_shard = int(settings["shard_lines"])
            offsets = line_offsets(corpus, lines_per_shard)
            records = _build_shards(corpus, staging, offsets, lines_per_shard, workers, show_progress)
            counts = merge_shards(staging, records, memory_bytes, show_progress)
            scratch = os.path.join(staging, ".meta")
            os.makedirs(scratch, exist_ok=True)
            write_meta(scratch, "bm25", counts["num_passages"], corpus, k1=K1, b=B, scoring="lucene", analyzer=ANALYZER,
                       num_terms=counts["num_terms"], num_postings=counts["num_postings"], shards=len(records),
                       shard_lines=lines_per_shard, memory_gb=memory_gb, workers=workers,
                       build_seconds=round(time.perf_counter() - started, 1))
            os.replace(os.path.join(scratch, "meta.json"), os.path.join(staging, "meta.json"))
            os.rmdir(scratch)
    except (CorpusError, ValueError):
        # The corpus has to change to fix these, which invalidates the shards anyway.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(os.path.join(staging, SHARD_DIR), ignore_errors=True)
    os.remove(os.path.join(staging, BUILD_FILE))
    with open(os.path.join(staging, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    publish(staging, out, overwrite)
    return meta
