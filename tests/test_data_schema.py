"""Reading and writing the Search-R1 parquet layout, and the error for each malformed row."""
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from searchr1_jax.data import Example, chat_messages, read_examples, write_examples


def example(index=0, question="who wrote hamlet", golds=("Shakespeare",), **overrides):
    fields = dict(data_source="nq", golden_answers=list(golds), split="train", index=index,
                  question=question, prompt_text=None)
    fields.update(overrides)
    if "prompt" not in fields:
        fields["prompt"] = chat_messages(question)
    return Example(**fields)


def search_r1_row(index=0, target=("Paris",)):
    """A row shaped like Search-R1's own files: no question or prompt_text, content before role."""
    return {
        "data_source": "nq",
        "prompt": [{"content": "Answer ... Question: capital of france?\n", "role": "user"}],
        "ability": "fact-reasoning",
        "reward_model": {"ground_truth": {"target": list(target)}, "style": "rule"},
        "extra_info": {"index": index, "split": "test"},
    }


def write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_round_trip(tmp_path):
    examples = [
        example(0),
        example(1, "¿Dónde está Zürich? 北京", ("Zürich", "Zurich, Schweiz"), data_source="popqa",
                ability="multi-hop", prompt_text="<|user|>…<|assistant|>"),
        example(2, question=None, prompt=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]),
    ]
    path = tmp_path / "sub" / "train.parquet"
    write_examples(examples, path)
    assert read_examples(path) == examples


def test_written_columns_are_the_search_r1_ones(tmp_path):
    path = tmp_path / "t.parquet"
    write_examples([example(7, golds=("A", "B"))], path)
    (row,) = pq.read_table(path).to_pylist()
    assert list(row) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": ["A", "B"]}}
    assert row["extra_info"] == {"split": "train", "index": 7, "question": "who wrote hamlet", "prompt_text": None}
    assert row["ability"] == "fact-reasoning"
    assert row["prompt"] == chat_messages("who wrote hamlet")


def test_reads_a_search_r1_file(tmp_path):
    path = write_rows(tmp_path / "s.parquet", [search_r1_row(0), search_r1_row(1, ("a", "b"))])
    examples = read_examples(path)
    assert examples[1] == Example(
        data_source="nq", prompt=[{"role": "user", "content": "Answer ... Question: capital of france?\n"}],
        golden_answers=["a", "b"], split="test", index=1)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet: no such parquet file"):
        read_examples(tmp_path / "nope.parquet")
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(ValueError, match="text.parquet: not a readable parquet file"):
        read_examples(not_parquet)
    row = search_r1_row()
    del row["ability"]
    with pytest.raises(ValueError, match=r"m.parquet: missing column\(s\) \['ability'\]"):
        read_examples(write_rows(tmp_path / "m.parquet", [row]))
    empty = pa.Table.from_pylist([search_r1_row()]).slice(0, 0)
    pq.write_table(empty, tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="e.parquet: no rows"):
        read_examples(tmp_path / "e.parquet")


def _with(path_keys, value):
    row = search_r1_row(1)
    *parents, last = path_keys
    node = row
    for key in parents:
        node = node[key]
    node[last] = value
    return row


@pytest.mark.parametrize("keys, value, message", [
    (["reward_model", "ground_truth", "target"], [], "field reward_model.ground_truth.target: no gold answer"),
    (["reward_model", "ground_truth", "target"], None,
     "field reward_model.ground_truth.target: expected a list of answer strings, got NoneType None"),
    (["reward_model", "ground_truth", "target"], [" "], r"field reward_model.ground_truth.target\[0\]: empty"),
    (["reward_model", "ground_truth"], None, "field reward_model.ground_truth: expected"),
    (["data_source"], "", "field data_source: empty"),
    (["data_source"], None, "field data_source: expected a string, got NoneType"),
    (["prompt"], [], "field prompt: no messages"),
    (["prompt"], None, "field prompt: expected a list"),
    (["prompt"], [{"role": "user", "content": None}], r"field prompt\[0\].content: expected a string"),
    (["ability"], "  ", "field ability: empty"),
    (["extra_info"], None, "field extra_info: expected"),
    (["extra_info", "index"], -1, "field extra_info.index: expected an integer >= 0, got -1"),
    (["extra_info", "index"], None, "field extra_info.index: expected an integer >= 0, got None"),
    (["extra_info", "split"], "", "field extra_info.split: empty"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, keys, value, message):
    rows = [search_r1_row(0), _with(keys, value)]
    path = write_rows(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=f"bad.parquet: row 1: {message}"):
        read_examples(path)


def test_mistyped_column_is_named(tmp_path):
    path = write_rows(tmp_path / "int.parquet", [_with(["reward_model", "ground_truth", "target"], [1984])])
    with pytest.raises(ValueError, match=r"row 0: field reward_model.ground_truth.target\[0\]: expected a string, got int 1984"):
        read_examples(path)


def test_non_utf8_text_names_the_row(tmp_path):
    sources = pa.array([b"nq", b"\xffq"], type=pa.binary()).view(pa.string())  # invalid UTF-8 in row 1
    table = pa.Table.from_pylist([search_r1_row(0), search_r1_row(1)]).set_column(0, "data_source", sources)
    pq.write_table(table, tmp_path / "latin.parquet")
    with pytest.raises(ValueError, match="latin.parquet: row 1: field data_source: not valid UTF-8"):
        read_examples(tmp_path / "latin.parquet")
    kept = read_examples(tmp_path / "latin.parquet", skip_invalid=True)
    assert [e.index for e in kept] == [0]


def test_skip_invalid_logs_the_count(tmp_path, caplog):
    rows = [search_r1_row(0), search_r1_row(1, target=()), search_r1_row(2)]
    path = write_rows(tmp_path / "some.parquet", rows)
    with caplog.at_level(logging.WARNING):
        examples = read_examples(path, skip_invalid=True)
    assert [e.index for e in examples] == [0, 2]
    assert "skipped 1 invalid row(s) of 3" in caplog.text
    assert "row 1: field reward_model.ground_truth.target: no gold answer" in caplog.text
    all_bad = write_rows(tmp_path / "none.parquet", [search_r1_row(0, target=())])
    with pytest.raises(ValueError, match=r"none.parquet: no valid rows \(1 invalid\)"):
        read_examples(all_bad, skip_invalid=True)


def test_write_refuses_invalid_examples(tmp_path):
    with pytest.raises(ValueError, match="w.parquet: example 1: field reward_model.ground_truth.target: no gold answer"):
        write_examples([example(0), example(1, golds=())], tmp_path / "w.parquet")
    with pytest.raises(ValueError, match="refusing to write a file with no examples"):
        write_examples([], tmp_path / "w.parquet")
    assert not (tmp_path / "w.parquet").exists()
