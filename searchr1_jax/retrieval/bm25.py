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
- The matrix is built here with NumPy from a streaming pass (:func:`bm25_csc`), not with
  ``bm25s.BM25.index``, which holds every passage as a Python list: ours needs ~40 bytes
  per distinct (passage, term) pair at peak and is several times faster; the result is the
  same matrix, saved with bm25s' own ``save`` so ``bm25s.BM25.load`` reads it.
- A query with no indexed term returns no passages (Lucene does the same); passages with
  score 0 are never returned.

Index directory (see :mod:`searchr1_jax.retrieval.docstore`): ``meta.json`` (method "bm25"),
``docstore.arrow``, and bm25s' files under ``bm25s/``.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Iterable, Sequence

import numpy as np

from searchr1_jax.retrieval.corpus import count_lines, iter_passages
from searchr1_jax.retrieval.docstore import DocStore, read_meta, staged_directory, write_docstore, write_meta
from searchr1_jax.retrieval.types import Passage

BM25S_SUBDIR = "bm25s"
K1 = 0.9
B = 0.4
EMPTY_TERM = ""  # bm25s' term for queries with no known term; it occurs in no passage
_WORD = re.compile(r"(?u)\b\w\w+\b")
_PASSAGES_PER_CHUNK = 65536

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

    def ids(self, text: str) -> list[int]:
        cache = self._word_ids
        ids = [cache[w] if w in cache else self._add(w) for w in self.analyzer.words(text)]
        return [i for i in ids if i >= 0]


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
    docs = np.repeat(np.arange(first_doc, first_doc + len(doc_lengths), dtype=np.int64), doc_lengths)
    keys = term_ids.astype(np.int64) << 32 | docs
    keys, tf = np.unique(keys, return_counts=True)
    return (keys >> 32).astype(np.int32), (keys & 0xFFFFFFFF).astype(np.int32), tf.astype(np.int32)


def bm25_csc(
    terms: np.ndarray, docs: np.ndarray, tf: np.ndarray, doc_lengths: np.ndarray, num_terms: int, k1: float, b: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lucene BM25 weights of (term, passage) pairs as a CSC matrix [num_passages, num_terms].

    `terms`, `docs`, `tf`: distinct pairs and their counts, sorted by passage within each
    term (the concatenated outputs of :func:`count_pairs`); `doc_lengths` (int [N]): terms
    per passage. Returns ``(data float32 [P], indices int32 [P], indptr int64 [num_terms+1])``:
    the weights of term ``t`` for passages ``indices[indptr[t]:indptr[t+1]]``.
    """
    num_docs = len(doc_lengths)
    df = np.bincount(terms, minlength=num_terms)
    idf = np.log1p((num_docs - df + 0.5) / (df + 0.5)).astype(np.float32)
    avg_length = doc_lengths.mean() if num_docs else 0.0
    norm = (k1 * (1.0 - b + b * doc_lengths / avg_length) if avg_length > 0 else np.full(num_docs, k1)).astype(np.float32)
    # In place, in float32 (as bm25s stores them), to keep the peak memory low.
    weights = tf.astype(np.float32)
    denominator = norm[docs]
    denominator += weights
    weights /= denominator
    del denominator
    weights *= idf[terms]
    order = np.argsort(terms, kind="stable")
    indptr = np.zeros(num_terms + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    return weights[order], docs[order], indptr


def _progress(iterable: Iterable, total: int | None, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="bm25 index", unit="passage", unit_scale=True, smoothing=0.05)


def build_bm25_index(
    corpus_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Index a jsonl corpus with BM25 into `out_dir`; returns the metadata written.

    One streaming pass writes the passage store and counts (term, passage) pairs per chunk;
    then the weights are computed and saved in bm25s' format. The directory is built beside
    `out_dir` and renamed into place at the end (see `staged_directory`).
    """
    import bm25s

    started = time.perf_counter()
    corpus_path = os.fspath(corpus_path)
    term_ids = TermIds(Analyzer())
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    lengths: list[np.ndarray] = []
    chunk_ids: list[int] = []
    chunk_lengths: list[int] = []

    def flush() -> None:
        first_doc = sum(len(x) for x in lengths)
        chunk = np.asarray(chunk_lengths, dtype=np.int64)
        pairs.append(count_pairs(np.asarray(chunk_ids, dtype=np.int32), chunk, first_doc))
        lengths.append(chunk)
        chunk_ids.clear()
        chunk_lengths.clear()

    def analysed(passages: Iterable[Passage]) -> Iterable[Passage]:
        for passage in passages:
            ids = term_ids.ids(passage_text(passage))
            chunk_ids.extend(ids)
            chunk_lengths.append(len(ids))
            if len(chunk_lengths) == _PASSAGES_PER_CHUNK:
                flush()
            yield passage

    total = count_lines(corpus_path) if show_progress else None
    with staged_directory(out_dir, overwrite=overwrite) as staging:
        num_passages = write_docstore(analysed(_progress(iter_passages(corpus_path), total, show_progress)), staging)
        if num_passages == 0:
            raise ValueError(f"{corpus_path}: the corpus has no passages")
        if chunk_lengths:
            flush()
        vocab = term_ids.vocab
        vocab.setdefault(EMPTY_TERM, len(vocab))
        terms, docs, tf = (np.concatenate(column) for column in zip(*pairs))
        pairs.clear()
        data, indices, indptr = bm25_csc(terms, docs, tf, np.concatenate(lengths), len(vocab), K1, B)
        del terms, docs, tf
        model = bm25s.BM25(k1=K1, b=B, method="lucene", backend="numpy")
        model.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": num_passages}
        model.vocab_dict = vocab
        model.nonoccurrence_array = None
        model.save(os.path.join(staging, BM25S_SUBDIR), show_progress=False)
        meta = write_meta(
            staging,
            "bm25",
            num_passages,
            corpus_path,
            k1=K1,
            b=B,
            scoring="lucene",
            analyzer="lowercase, \\w\\w+ words, bm25s English stopwords, Snowball English stemmer",
            num_terms=len(vocab),
            num_postings=int(len(data)),
            build_seconds=round(time.perf_counter() - started, 1),
        )
    return meta


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

    def __init__(self, model, store: DocStore, *, n_threads: int):
        self._model = model
        self._store = store
        self._analyzer = Analyzer()
        self._n_threads = n_threads
        self._lock = threading.Lock()
        self._num_docs = int(model.scores["num_docs"])
        self._term_max = term_maxima(model.scores["data"], model.scores["indptr"])

    @classmethod
    def load(cls, index_dir: str | os.PathLike, *, n_threads: int | None = None) -> "Bm25Retriever":
        """Open an index (arrays memory-mapped); `n_threads` defaults to the CPUs available."""
        import bm25s

        meta = read_meta(index_dir)
        if meta["method"] != "bm25":
            raise ValueError(f"{os.fspath(index_dir)}: meta.json says method {meta['method']!r}, expected 'bm25'")
        model = bm25s.BM25.load(
            os.path.join(os.fspath(index_dir), BM25S_SUBDIR), mmap=True, backend="numpy", show_progress=False
        )
        return cls(model, DocStore.open(index_dir), n_threads=n_threads or default_threads())

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
        vocab = self._model.vocab_dict
        query_terms = [[vocab[t] for t in self._analyzer.terms(q) if t in vocab] for q in queries]
        if njit is None:
            return self._search_ids_numpy(query_terms, k)
        import numba

        query_ptr = np.zeros(len(query_terms) + 1, np.int64)
        np.cumsum([len(t) for t in query_terms], out=query_ptr[1:])
        flat_terms = np.fromiter((t for terms in query_terms for t in terms), np.int64, count=int(query_ptr[-1]))
        matrix = self._model.scores
        with self._lock:
            numba.set_num_threads(max(1, min(len(queries), self._n_threads, numba.config.NUMBA_NUM_THREADS)))
            return _topk_batch(query_ptr, flat_terms, matrix["data"], matrix["indices"], matrix["indptr"], self._term_max, k)

    def _search_ids_numpy(self, query_terms: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        if not query_terms:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        empty = [self._model.vocab_dict[EMPTY_TERM]]  # bm25s needs a term; this one is in no passage
        with self._lock:
            docs, scores = self._model.retrieve(
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
