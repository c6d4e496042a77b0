"""BM25 retrieval with bm25s: batched, multi-threaded, the project's default backend.

Why this shape:

- bm25s' index layout: the BM25 weight of every (passage, term) pair in a CSC matrix (one
  column of postings per term), so scoring a query sums a few columns.
- Searching uses our numba kernel (:func:`_topk_batch`) over that matrix: queries run on
  parallel threads (``numba.prange``), each by MaxScore (:func:`_maxscore_topk`), the
  exact dynamic pruning Lucene also uses: passages that can only match low-weight terms
  are skipped once k better ones are known, so a query costs about the postings of its
  rare terms instead of all of them. bm25s' own numba backend adds every posting and then
  scans the whole corpus for each query. Results are the same top k (ties go to the lower
  passage number, as in Lucene). Without numba, bm25s' numpy backend is used.
- Scoring is Lucene's BM25 (bm25s ``method="lucene"``) with Pyserini's defaults k1=0.9,
  b=0.4, so results agree with a Lucene index of the same corpus:
  ``score(q, d) = Σ_{t∈q} idf(t) · tf / (tf + k1·(1 − b + b·|d|/avgdl))`` with
  ``idf(t) = ln(1 + (N − df + 0.5)/(df + 0.5))``; a term repeated in the query counts once
  per occurrence.
- Text analysis (:class:`Analyzer`): lower-case, ``\\w\\w+`` words, English stopwords
  (bm25s' list), Snowball English stemmer (PyStemmer). Title and text are indexed together,
  as Pyserini indexes wiki-18's ``contents``.
- The matrix is built by :mod:`searchr1_jax.retrieval.bm25_build` (streaming, sharded,
  resumable, memory bounded; wiki-18 fits a 24 GB machine), not with ``bm25s.BM25.index``,
  which holds every passage as a Python list; the result is the same matrix, in bm25s'
  file format so ``bm25s.BM25.load`` reads it, plus the column maxima ``term_max.npy``.
- Serving memory-maps the matrix and the passage store; only the vocabulary (a dict) and
  the column maxima are loaded, so RSS grows with the postings queries touch (page cache,
  reclaimable), not with the corpus.
- A query with no indexed term returns no passages (Lucene does the same); passages with
  score 0 are never returned.

Index directory (see :mod:`searchr1_jax.retrieval.docstore`): ``meta.json`` (method "bm25"),
the passage store (``docstore/part-NNNNN.arrow``), bm25s' files under ``bm25s/`` and
``term_max.npy``.
"""
from __future__ import annotations

import json
import os
import re
import threading
from typing import Sequence

import numpy as np

from searchr1_jax.retrieval.docstore import DocStore, read_meta
from searchr1_jax.retrieval.types import Passage

BM25S_SUBDIR = "bm25s"
TERM_MAX_FILE = "term_max.npy"  # float32 [num_terms]: each column's largest weight (MaxScore bounds)
K1 = 0.9
B = 0.4
EMPTY_TERM = ""  # bm25s' term for queries with no known term; it occurs in no passage
_WORD = re.compile(r"(?u)\b\w\w+\b")

try:
    from numba import njit, prange
except ImportError:  # bm25s' numpy backend is used instead
    njit = prange = None


def default_threads() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Analyzer:
    """Text → index terms: lower-case, words of ≥ 2 word characters, no stopwords, stemmed."""

    def __init__(self):
        import Stemmer
        from bm25s.stopwords import STOPWORDS_EN

        self._stemmer = Stemmer.Stemmer("english")
        self._stopwords = frozenset(STOPWORDS_EN)

    def words(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def terms(self, text: str) -> list[str]:
        return self._stemmer.stemWords([w for w in self.words(text) if w not in self._stopwords])

    def term(self, word: str) -> str | None:
        """The term of one lower-cased word, or None for a stopword."""
        return None if word in self._stopwords else self._stemmer.stemWord(word)


class TermIds:
    """Assigns term ids while indexing; caches word → id so each distinct word is stemmed once."""

    def __init__(self, analyzer: Analyzer):
        self.analyzer = analyzer
        self.vocab: dict[str, int] = {}  # term → id
        self._word_ids: dict[str, int] = {}  # lower-cased word → term id, -1 for stopwords

    def _add(self, word: str) -> int:
        term = self.analyzer.term(word)
        term_id = -1 if term is None else self.vocab.setdefault(term, len(self.vocab))
        self._word_ids[word] = term_id
        return term_id

    def raw_ids(self, text: str) -> list[int]:
        """The term id of every word of `text`, -1 for stopwords (for callers that filter in bulk)."""
        words = self.analyzer.words(text)
        ids = list(map(self._word_ids.get, words))  # the common case, all words known, stays in C
        if None in ids:
            ids = [self._add(w) if i is None else i for w, i in zip(words, ids)]
        return ids

    def ids(self, text: str) -> list[int]:
        """The term ids of `text` in order, stopwords dropped."""
        return [i for i in self.raw_ids(text) if i >= 0]


def passage_text(passage: Passage) -> str:
    """The text BM25 indexes for a passage: its stored ``contents`` (title line and text), as
    Pyserini indexes wiki-18's ``contents`` field."""
    return passage.contents


def count_pairs(term_ids: np.ndarray, doc_lengths: np.ndarray, first_doc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (term, passage) pairs of a chunk of consecutive passages, with term counts.

    `term_ids` (int32 [T]) is the chunk's term ids passage after passage; `doc_lengths`
    (int [n]) how many belong to each passage; passages are numbered from `first_doc`.
    Returns ``(terms int32 [P], docs int32 [P], tf int32 [P])`` sorted by term, then passage.
    """
    keys = np.repeat(np.arange(first_doc, first_doc + len(doc_lengths), dtype=np.int64), doc_lengths)
    keys |= term_ids.astype(np.int64) << 32
    keys.sort()  # in place: about 17 bytes per token at the peak, where np.unique needs ~40
    if not len(keys):
        empty = np.zeros(0, np.int32)
        return empty, empty, empty
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    tf = np.diff(np.append(starts, len(keys))).astype(np.int32)
    keys = keys[starts]
    return (keys >> 32).astype(np.int32), (keys & 0xFFFFFFFF).astype(np.int32), tf


def build_bm25_index(corpus_path: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> dict:
    """Index a jsonl corpus with BM25 into `out_dir`: see :func:`bm25_build.build_bm25_index`
    (streaming, sharded, resumable, memory bounded by ``memory_gb``)."""
    from searchr1_jax.retrieval.bm25_build import build_bm25_index as build

    return build(corpus_path, out_dir, **kwargs)


def term_maxima(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Largest weight of each term (column) of a CSC matrix; 0 for terms in no passage. float64 [T]."""
    out = np.zeros(len(indptr) - 1, np.float64)
    nonempty = np.flatnonzero(np.diff(indptr))
    if len(nonempty):
        out[nonempty] = np.maximum.reduceat(np.asarray(data), np.asarray(indptr)[nonempty])
    return out


if njit is not None:

    @njit(cache=True, nogil=True)
    def _better(score, doc, other_score, other_doc) -> bool:
        """Higher score first; on a tie, the lower passage number (Lucene's order)."""
        return score > other_score or (score == other_score and doc < other_doc)

    @njit(cache=True, nogil=True)
    def _offer(top_scores, top_docs, score, doc) -> None:
        """Insert (score, doc) into the best-first arrays if it beats their last entry."""
        i = top_scores.shape[0] - 1
        if not _better(score, doc, top_scores[i], top_docs[i]):
            return
        while i > 0 and _better(score, doc, top_scores[i - 1], top_docs[i - 1]):
            top_scores[i] = top_scores[i - 1]
            top_docs[i] = top_docs[i - 1]
            i -= 1
        top_scores[i] = score
        top_docs[i] = doc

    @njit(cache=True, nogil=True)
    def _seek(indices, lo, hi, target):
        """First position in [lo, hi) of the sorted `indices` holding a value >= target (galloping)."""
        if lo >= hi or indices[lo] >= target:
            return lo
        step = 1
        while lo + step < hi and indices[lo + step] < target:
            lo += step
            step *= 2
        hi = min(lo + step, hi)
        lo += 1
        while lo < hi:
            mid = (lo + hi) // 2
            if indices[mid] < target:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @njit(cache=True, nogil=True)
    def _maxscore_topk(terms, data, indices, indptr, term_max, top_scores, top_docs) -> None:
        """Exact top-k of one query by MaxScore, written into top_scores/top_docs (best first).

        Postings are visited passage by passage in increasing order. Terms are sorted by
        their largest weight; once the k-th best score θ is at least the summed maxima of
        the weakest terms, those become "non-essential": only passages that contain an
        essential term are candidates, and a candidate's non-essential postings are looked
        up (galloping) only while it can still beat θ. A later passage must beat θ strictly
        (ties go to the lower passage), so pruning at "score + bound <= θ" loses nothing.
        Scores are summed in float64, which is exact for a few float32 weights, so the
        order of summation does not change them.
        """
        k = top_scores.shape[0]
        m = terms.shape[0]
        order = np.argsort(term_max[terms], kind="mergesort")
        pos = np.empty(m, np.int64)
        end = np.empty(m, np.int64)
        bound = np.empty(m, np.float64)  # bound[i]: summed maxima of terms 0..i (in `order`)
        total = 0.0
        for i in range(m):
            term = terms[order[i]]
            pos[i] = indptr[term]
            end[i] = indptr[term + 1]
            total += term_max[term]
            bound[i] = total * (1.0 + 1e-12)
        filled, theta, essential = 0, 0.0, 0  # terms essential..m-1 are essential
        no_doc = np.iinfo(np.int64).max
        while True:
            doc = no_doc
            for i in range(essential, m):
                if pos[i] < end[i] and indices[pos[i]] < doc:
                    doc = indices[pos[i]]
            if doc == no_doc:
                return
            score = 0.0
            for i in range(essential, m):
                if pos[i] < end[i] and indices[pos[i]] == doc:
                    score += data[pos[i]]
                    pos[i] += 1
            pruned = False
            for i in range(essential - 1, -1, -1):
                if score + bound[i] <= theta:
                    pruned = True
                    break
                pos[i] = _seek(indices, pos[i], end[i], doc)
                if pos[i] < end[i] and indices[pos[i]] == doc:
                    score += data[pos[i]]
            if pruned or (filled == k and score <= theta):
                continue
            _offer(top_scores, top_docs, score, doc)
            filled = min(filled + 1, k)
            if filled == k:
                theta = top_scores[k - 1]
                while essential < m and bound[essential] <= theta:
                    essential += 1

    @njit(parallel=True, cache=True, nogil=True)
    def _topk_batch(query_ptr, query_terms, data, indices, indptr, term_max, k):
        """Top-k passages of each query (MaxScore), queries spread over threads.

        query_ptr (int64 [Q+1]) delimits each query's term ids in query_terms (int64);
        data/indices/indptr: the CSC weight matrix; term_max (float64 [T]) its column
        maxima. Returns (docs int64 [Q, k], scores float32 [Q, k]) best first, -1 / 0.0
        where fewer than k passages match.
        """
        num_queries = query_ptr.shape[0] - 1
        top_scores = np.full((num_queries, k), -1.0, np.float64)
        top_docs = np.full((num_queries, k), -1, np.int64)
        for q in prange(num_queries):
            _maxscore_topk(
                query_terms[query_ptr[q] : query_ptr[q + 1]], data, indices, indptr, term_max, top_scores[q], top_docs[q]
            )
        return top_docs, np.maximum(top_scores, 0.0).astype(np.float32)


class Bm25Retriever:
    """In-process BM25 `Retriever` over an index built by :func:`build_bm25_index`.

    `search` is thread-safe: calls are serialised by a lock, since numba's thread count is
    per calling thread and the kernel already uses every thread; batching many queries into
    one call is what makes it fast.
    """

    def __init__(self, index_dir: str, matrix: dict, vocab: dict[str, int], term_max: np.ndarray, store: DocStore, *, n_threads: int):
        self._index_dir = index_dir
        self._matrix = matrix  # bm25s' layout: data, indices, indptr (memory-mapped), num_docs
        self._vocab = vocab
        self._store = store
        self._analyzer = Analyzer()
        self._n_threads = n_threads
        self._lock = threading.Lock()
        self._num_docs = int(matrix["num_docs"])
        self._term_max = term_max
        self._bm25s_model = None  # only for the NumPy fallback, loaded on first use

    @classmethod
    def load(cls, index_dir: str | os.PathLike, *, n_threads: int | None = None) -> "Bm25Retriever":
        """Open an index (matrix and passages memory-mapped); `n_threads` defaults to the CPUs available."""
        index_dir = os.fspath(index_dir)
        meta = read_meta(index_dir)
        if meta["method"] != "bm25":
            raise ValueError(f"{index_dir}: meta.json says method {meta['method']!r}, expected 'bm25'")
        files = os.path.join(index_dir, BM25S_SUBDIR)
        try:
            with open(os.path.join(files, "params.index.json"), encoding="utf-8") as handle:
                num_docs = int(json.load(handle)["num_docs"])
            with open(os.path.join(files, "vocab.index.json"), encoding="utf-8") as handle:
                vocab = json.load(handle)
            matrix = {name: np.load(os.path.join(files, f"{name}.csc.index.npy"), mmap_mode="r") for name in ("data", "indices", "indptr")}
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{files}: not a readable bm25s index ({type(err).__name__}: {err})") from None
        matrix["num_docs"] = num_docs
        term_max_path = os.path.join(index_dir, TERM_MAX_FILE)
        # Indexes built before term_max.npy existed: compute it (reads the whole matrix once).
        term_max = np.load(term_max_path).astype(np.float64) if os.path.isfile(term_max_path) else term_maxima(matrix["data"], matrix["indptr"])
        return cls(index_dir, matrix, vocab, term_max, DocStore.open(index_dir), n_threads=n_threads or default_threads())

    def __len__(self) -> int:
        return self._num_docs

    def search_ids(self, queries: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Corpus row numbers and BM25 scores of the best `topk` passages per query.

        Returns ``(docs, scores)``: int64 and float32 arrays ``[len(queries), k]`` with
        ``k = min(topk, num_passages)``, best first (ties: lower row first); where fewer
        than k passages match, the rest hold doc -1 and score 0.
        """
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        k = min(topk, self._num_docs)
        vocab = self._vocab
        query_terms = [[vocab[t] for t in self._analyzer.terms(q) if t in vocab] for q in queries]
        if njit is None:
            return self._search_ids_numpy(query_terms, k)
        import numba

        query_ptr = np.zeros(len(query_terms) + 1, np.int64)
        np.cumsum([len(t) for t in query_terms], out=query_ptr[1:])
        flat_terms = np.fromiter((t for terms in query_terms for t in terms), np.int64, count=int(query_ptr[-1]))
        matrix = self._matrix
        with self._lock:
            numba.set_num_threads(max(1, min(len(queries), self._n_threads, numba.config.NUMBA_NUM_THREADS)))
            return _topk_batch(query_ptr, flat_terms, matrix["data"], matrix["indices"], matrix["indptr"], self._term_max, k)

    def _search_ids_numpy(self, query_terms: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        if not query_terms:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        empty = [self._vocab[EMPTY_TERM]]  # bm25s needs a term; this one is in no passage
        with self._lock:
            if self._bm25s_model is None:
                import bm25s

                path = os.path.join(self._index_dir, BM25S_SUBDIR)
                self._bm25s_model = bm25s.BM25.load(path, mmap=True, backend="numpy", show_progress=False)
            docs, scores = self._bm25s_model.retrieve(
                [t or empty for t in query_terms], k=k, show_progress=False, n_threads=self._n_threads
            )
        docs = np.where(scores > 0, docs, -1).astype(np.int64)
        return docs, np.asarray(scores, np.float32)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        docs, scores = self.search_ids(queries, topk)
        return [
            [self._store.passage(int(d), float(s)) for d, s in zip(row_docs, row_scores) if d >= 0]
            for row_docs, row_scores in zip(docs, scores)
        ]
