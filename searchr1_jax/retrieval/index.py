"""Open any index directory as a `Retriever`, whichever method built it.

``meta.json``'s ``method`` picks the backend: "bm25" → :class:`Bm25Retriever`, "dense" →
``dense.DenseRetriever`` (imported only then, so BM25 users need no faiss), "lucene" →
:class:`LuceneRetriever`. A plain Pyserini/Anserini Lucene index without ``meta.json``
(``segments_N`` file) is opened with the Lucene backend, so existing wiki-18 indexes work.
Keyword arguments go to the backend's ``load``.
"""
from __future__ import annotations

import os

from searchr1_jax.retrieval import lucene
from searchr1_jax.retrieval.docstore import META_FILE, read_meta
from searchr1_jax.retrieval.types import Retriever


def index_method(index_dir: str | os.PathLike) -> str:
    """"bm25", "dense" or "lucene" for an index directory; a clear error for anything else."""
    index_dir = os.fspath(index_dir)
    if not os.path.isdir(index_dir):
        raise FileNotFoundError(f"index directory not found: {index_dir}")
    if not os.path.exists(os.path.join(index_dir, META_FILE)) and lucene.is_lucene_index(index_dir):
        return "lucene"
    return read_meta(index_dir)["method"]


def load_retriever(index_dir: str | os.PathLike, **kwargs) -> Retriever:
    """The retriever for `index_dir` (see the module docstring)."""
    method = index_method(index_dir)
    if method == "bm25":
        from searchr1_jax.retrieval.bm25 import Bm25Retriever

        return Bm25Retriever.load(index_dir, **kwargs)
    if method == "dense":
        from searchr1_jax.retrieval.dense import DenseRetriever

        return DenseRetriever.load(index_dir, **kwargs)
    return lucene.LuceneRetriever.load(index_dir, **kwargs)
