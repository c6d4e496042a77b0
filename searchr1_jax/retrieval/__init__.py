"""Retrieval: corpus reading, BM25 / Lucene / dense retrievers, index building, HTTP server and client.

Every retriever implements :class:`Retriever` (``search(queries, topk)``), so the rollout
never knows which one it holds. ``load_retriever(index_dir)`` opens any index directory.
The dense retriever (``DenseRetriever``, ``build_dense_index``, ``adopt_faiss_index``) is imported on first use,
so BM25 users need neither faiss nor an encoder.
"""
from __future__ import annotations

import importlib

from searchr1_jax.retrieval.bm25 import Bm25Retriever, build_bm25_index
from searchr1_jax.retrieval.client import HttpRetriever, RetrieverError, RetrieverUnavailableError
from searchr1_jax.retrieval.corpus import CorpusError, count_lines, iter_passages
from searchr1_jax.retrieval.docstore import DocStore, read_meta, write_docstore, write_meta
from searchr1_jax.retrieval.index import load_retriever
from searchr1_jax.retrieval.lucene import LuceneRetriever, build_lucene_index
from searchr1_jax.retrieval.observation import format_passages, wrap_information
from searchr1_jax.retrieval.types import Passage, Retriever

_LAZY = {
    "DenseRetriever": "searchr1_jax.retrieval.dense",
    "build_dense_index": "searchr1_jax.retrieval.dense",
    "adopt_faiss_index": "searchr1_jax.retrieval.faiss_adopt",
}

__all__ = [
    "Bm25Retriever",
    "CorpusError",
    "DenseRetriever",
    "DocStore",
    "HttpRetriever",
    "LuceneRetriever",
    "Passage",
    "Retriever",
    "RetrieverError",
    "RetrieverUnavailableError",
    "adopt_faiss_index",
    "build_bm25_index",
    "build_dense_index",
    "build_lucene_index",
    "count_lines",
    "format_passages",
    "iter_passages",
    "load_retriever",
    "read_meta",
    "wrap_information",
    "write_docstore",
    "write_meta",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
