"""Corpus reading (both schemas, errors with file:line), the passage store, meta.json, staging."""
import json
import os
import pathlib

import pytest

from searchr1_jax.retrieval.corpus import CorpusError, count_lines, iter_passages, split_contents
from searchr1_jax.retrieval.docstore import DocStore, read_meta, staged_directory, write_docstore, write_meta
from searchr1_jax.retrieval.types import Passage


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_both_schemas_stream_in_order(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps({"id": "a", "contents": '"Paris"\nParis is the capital.\nSecond line.'}),
            "",
            json.dumps({"id": 7, "title": "Berlin", "text": "Berlin is big.", "extra": 1}),
            json.dumps({"id": "c", "contents": "no title line"}),
            json.dumps({"id": "d", "contents": "Unquoted\ntext"}),
        ],
    )
    passages = list(iter_passages(path))
    assert passages == [
        Passage("a", "Paris", "Paris is the capital.\nSecond line.", 0.0),
        Passage("7", "Berlin", "Berlin is big.", 0.0),
        Passage("c", "", "no title line", 0.0, contents="no title line"),  # stored contents kept as is
        Passage("d", "Unquoted", "text", 0.0, contents="Unquoted\ntext"),
    ]
    assert passages[0].contents == '"Paris"\nParis is the capital.\nSecond line.'


def test_iter_passages_is_lazy(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "1", "contents": '"T"\nx'}), "{broken"])
    stream = iter_passages(path)
    assert next(stream).id == "1"  # the bad second line is only read when asked for
    with pytest.raises(CorpusError):
        next(stream)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"contents": '"T"\nx'}), "missing field 'id'"),
        (json.dumps({"id": "1", "title": "T"}), "missing field(s) ['text']"),
        (json.dumps({"id": "1", "contents": 5}), "field 'contents' must be a string"),
        (json.dumps({"id": 1.5, "contents": "x"}), "field 'id' must be a string or an integer"),
        (json.dumps({"id": True, "contents": "x"}), "field 'id' must be a string or an integer"),
        (json.dumps({"id": "1", "title": None, "text": "x"}), "field 'title' must be a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"id": "0", "contents": '"T"\nx'})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(CorpusError) as err:
        list(iter_passages(path))
    assert f"{path}:3" in str(err.value)
    assert message in str(err.value)


def test_missing_corpus_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_passages(tmp_path / "nope.jsonl"))


def test_split_contents_strips_one_pair_of_quotes():
    assert split_contents('"A "quoted" title"\nbody') == ('A "quoted" title', "body")
    assert split_contents('"\nbody') == ('"', "body")


def test_count_lines(tmp_path):
    (tmp_path / "a").write_bytes(b"x\ny\nz")
    (tmp_path / "b").write_bytes(b"x\ny\n")
    (tmp_path / "c").write_bytes(b"")
    assert [count_lines(tmp_path / n) for n in "abc"] == [3, 2, 0]


def test_docstore_round_trip_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("searchr1_jax.retrieval.docstore._ROWS_PER_BATCH", 4)
    passages = [Passage(f"id{i}", f"title {i}", f"text {i} ünïcode", 0.0) for i in range(10)]
    assert write_docstore(iter(passages), tmp_path) == 10
    store = DocStore.open(tmp_path)
    assert len(store) == 10
    assert list(store) == passages
    assert store.passages([9, 0, 4], scores=[1.5, 2.5, 3.5]) == [
        Passage("id9", "title 9", "text 9 ünïcode", 1.5),
        Passage("id0", "title 0", "text 0 ünïcode", 2.5),
        Passage("id4", "title 4", "text 4 ünïcode", 3.5),
    ]
    with pytest.raises(IndexError, match="passage 10 out of range"):
        store.passage(10)


def test_docstore_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="docstore.arrow"):
        DocStore.open(tmp_path)
    (tmp_path / "docstore.arrow").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid passage store"):
        DocStore.open(tmp_path)


def test_meta_round_trip_and_errors(tmp_path):
    meta = write_meta(tmp_path, "bm25", 12, "corpus.jsonl", k1=0.9)
    assert read_meta(tmp_path) == meta
    assert meta["corpus"] == os.path.abspath("corpus.jsonl") and meta["k1"] == 0.9 and meta["created"].endswith("+00:00")
    with pytest.raises(ValueError, match="method must be one of"):
        write_meta(tmp_path, "tfidf", 1, "c")
    (tmp_path / "meta.json").write_text('{"method": "bm25", "num_passages": "12"}')
    with pytest.raises(ValueError, match="'num_passages' must be an integer"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="meta.json: invalid JSON"):
        read_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        read_meta(tmp_path / "elsewhere")


def test_staged_directory_replaces_only_on_success(tmp_path):
    out = tmp_path / "index"
    with staged_directory(out) as staging:
        pathlib.Path(staging, "v").write_text("1")
        assert not out.exists()
    assert (out / "v").read_text() == "1"

    with pytest.raises(FileExistsError, match="already exists"):
        with staged_directory(out):
            pass
    with pytest.raises(RuntimeError, match="interrupted"):
        with staged_directory(out, overwrite=True) as staging:
            pathlib.Path(staging, "v").write_text("2")
            raise RuntimeError("interrupted")
    assert (out / "v").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no staging leftovers

    with staged_directory(out, overwrite=True) as staging:
        pathlib.Path(staging, "v").write_text("3")
    assert (out / "v").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == ["index"]


def test_docstore_reads_stores_written_before_contents_was_kept(tmp_path):
    """Index directories built earlier hold columns id, title, text: still readable."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
    with ipc.new_file(str(tmp_path / "docstore.arrow"), schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(["1", "2"]), pa.array(["Paris", "Rome"]), pa.array(["a", "b\nc"])], schema=schema))
    store = DocStore.open(tmp_path)
    assert store.passages([1, 0], [2.0, 1.0]) == [Passage("2", "Rome", "b\nc", 2.0), Passage("1", "Paris", "a", 1.0)]
    assert store.passage(1).contents == '"Rome"\nb\nc'
