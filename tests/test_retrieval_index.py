"""load_retriever dispatch on meta.json, and the build_index CLI."""
import json

import pytest

from searchr1_jax.retrieval import build_index
from searchr1_jax.retrieval.bm25 import Bm25Retriever
from searchr1_jax.retrieval.docstore import write_meta
from searchr1_jax.retrieval.index import index_method, load_retriever


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": "a", "contents": '"Alpha"\nfirst letter'}, {"id": "b", "title": "Beta", "text": "second letter"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_builds_bm25_and_load_retriever_opens_it(tmp_path, corpus, capsys):
    assert build_index.main(["--corpus", str(corpus), "--method", "bm25", "--out", str(tmp_path / "idx")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "bm25" and printed["num_passages"] == 2 and printed["corpus"] == str(corpus)
    assert index_method(tmp_path / "idx") == "bm25"
    retriever = load_retriever(tmp_path / "idx", n_threads=1)
    assert isinstance(retriever, Bm25Retriever)
    assert [[p.id for p in row] for row in retriever.search(["second", "alpha"], 3)] == [["b"], ["a"]]
    # A second build into the same directory is refused unless --overwrite.
    assert build_index.main(["--corpus", str(corpus), "--method", "bm25", "--out", str(tmp_path / "idx")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert build_index.main(["--corpus", str(corpus), "--method", "bm25", "--out", str(tmp_path / "idx"), "--overwrite"]) == 0


def test_cli_reports_bad_corpus_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "x"}\n{"id": "2", "text": "no title"}\n')
    assert build_index.main(["--corpus", str(bad), "--method", "bm25", "--out", str(tmp_path / "idx")]) == 1
    assert f"{bad}:2: missing field(s) ['title']" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_cli_argument_errors(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_index.main(["--corpus", str(corpus), "--method", "dense", "--out", str(tmp_path / "d")])
    assert exit_.value.code == 2 and "--encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_index.main(["--corpus", str(corpus), "--method", "bm25", "--out", str(tmp_path / "d"), "--encoder", "x"])
    with pytest.raises(SystemExit):
        build_index.main(["--corpus", str(corpus), "--method", "tfidf", "--out", str(tmp_path / "d")])


def test_index_method_detection(tmp_path):
    with pytest.raises(FileNotFoundError, match="index directory not found"):
        index_method(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        index_method(tmp_path)
    lucene_dir = tmp_path / "lucene"
    lucene_dir.mkdir()
    (lucene_dir / "segments_3").write_bytes(b"")  # what a plain Pyserini/Anserini index holds
    assert index_method(lucene_dir) == "lucene"
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    write_meta(dense_dir, "dense", 5, "c.jsonl", encoder="e5")
    assert index_method(dense_dir) == "dense"


def test_server_cli_refuses_a_missing_index(tmp_path, capsys):
    from searchr1_jax.retrieval import server

    assert server.main(["--index", str(tmp_path / "missing")]) == 1
    assert f"index directory not found: {tmp_path / 'missing'}" in capsys.readouterr().err
