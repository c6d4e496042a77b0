"""Pyserini/Lucene backend: real tests skip without pyserini and Java 21+; the glue is tested always."""
import json
import types

import numpy as np
import pytest

from searchr1_jax.retrieval import lucene
from searchr1_jax.retrieval.bm25 import Bm25Retriever, build_bm25_index
from searchr1_jax.retrieval.corpus import CorpusError
from searchr1_jax.retrieval.index import index_method, load_retriever
from searchr1_jax.retrieval.types import Passage

UNAVAILABLE = lucene.unavailable_reason()
needs_lucene = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"Lucene backend unavailable: {UNAVAILABLE}")


class StandInSearcher:
    """Answers pyserini's documented calls from a dict; records them."""

    def __init__(self, raws, hits_by_query):
        self.raws, self.hits_by_query, self.calls = raws, hits_by_query, []

    def _hits(self, query, k):
        return [types.SimpleNamespace(docid=d, score=s) for d, s in self.hits_by_query.get(query, [])][:k]

    def search(self, query, k):
        self.calls.append(("search", query, k))
        return self._hits(query, k)

    def batch_search(self, queries, qids, k, threads):
        self.calls.append(("batch_search", tuple(queries), tuple(qids), k, threads))
        return {qid: self._hits(q, k) for q, qid in zip(queries, qids) if q in self.hits_by_query}

    def doc(self, docid):
        raw = self.raws.get(docid)
        return None if raw is None else types.SimpleNamespace(raw=lambda: raw)


def test_batch_and_serial_paths_parse_raw_documents():
    raws = {
        "7": json.dumps({"id": "7", "contents": '"Paris"\nCapital of France.'}, indent=2),
        "9": json.dumps({"id": "9", "contents": '"Lyon"\nA city.'}),
    }
    searcher = StandInSearcher(raws, {"paris": [("7", 3.5), ("9", 1.25)], "lyon": [("9", 2.0)]})
    retriever = lucene.LuceneRetriever(searcher, "/idx", n_threads=2)
    expected = [
        [Passage("9", "Lyon", "A city.", 2.0)],
        [],
        [Passage("7", "Paris", "Capital of France.", 3.5), Passage("9", "Lyon", "A city.", 1.25)],
    ]
    assert retriever.search(["lyon", "nothing", "paris"], 2) == expected
    assert searcher.calls == [("batch_search", ("lyon", "nothing", "paris"), ("0", "1", "2"), 2, 2)]
    assert retriever.search_serial_with_fetch(["lyon", "nothing", "paris"], 2) == expected
    assert [c[0] for c in searcher.calls[1:]] == ["search"] * 3


def test_missing_raw_document_is_a_clear_error():
    retriever = lucene.LuceneRetriever(StandInSearcher({}, {"q": [("5", 1.0)]}), "/idx", n_threads=1)
    with pytest.raises(CorpusError, match="/idx: document 5: no raw document stored"):
        retriever.search(["q"], 3)


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    lucene.unavailable_reason.cache_clear()
    monkeypatch.setattr(lucene.importlib.util, "find_spec", lambda name: None)
    try:
        assert "pyserini is not installed" in lucene.unavailable_reason()
        with pytest.raises(RuntimeError, match="the Lucene backend is unavailable: pyserini is not installed"):
            lucene.LuceneRetriever.load("/nowhere")
    finally:
        lucene.unavailable_reason.cache_clear()


@needs_lucene
def test_lucene_index_round_trip_and_agreement_with_bm25(tmp_path):
    rng = np.random.default_rng(0)
    words = "river mountain castle forest harbor desert island valley canyon glacier meadow volcano".split()
    rows = [{"id": f"p{i}", "title": f"Place {i}", "text": " ".join(rng.choice(words, size=rng.integers(4, 20)))} for i in range(400)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = lucene.build_lucene_index(corpus, tmp_path / "lucene", threads=1)
    assert meta["method"] == "lucene" and meta["num_passages"] == 400
    assert index_method(tmp_path / "lucene") == "lucene"
    build_bm25_index(corpus, tmp_path / "bm25", show_progress=False)

    searcher = load_retriever(tmp_path / "lucene", n_threads=2)
    queries = [" ".join(rng.choice(words, size=3)) for _ in range(30)]
    batched, serial = searcher.search(queries, 3), searcher.search_serial_with_fetch(queries, 3)
    assert [[p.id for p in r] for r in batched] == [[p.id for p in r] for r in serial]
    first = batched[0][0]
    assert first.title == f"Place {first.id[1:]}" and first.text == rows[int(first.id[1:])]["text"]
    ours = Bm25Retriever.load(tmp_path / "bm25").search(queries, 3)
    overlap = np.mean([len({p.id for p in a} & {p.id for p in b}) / 3 for a, b in zip(ours, batched)])
    assert overlap >= 0.9  # same BM25 (k1=0.9, b=0.4); analyzers differ slightly (Porter vs Snowball)
