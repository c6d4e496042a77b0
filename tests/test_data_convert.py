"""FlashRAG jsonl reading, jsonl → parquet conversion (base and chat templates), merging, CLI."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from searchr1_jax.data import QARecord, base_prompt, read_examples, read_flashrag_jsonl
from searchr1_jax.data.convert import convert, main, merge

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NQ = [
    {"id": "test_0", "question": "who wrote hamlet", "golden_answers": ["Shakespeare", "William Shakespeare"]},
    {"id": "test_1", "question": "capital of France?", "golden_answers": ["Paris"], "metadata": {"x": 1}},
    {"id": "test_2", "question": "¿Quién pintó el Guernica?", "golden_answers": ["Pablo Picasso", "毕加索"]},
]
HOTPOT = [{"id": "h0", "question": "Which is older, A or B", "golden_answers": ["A"]}]


def write_jsonl(path, objects, extra_lines=()):
    lines = [json.dumps(o, ensure_ascii=False) for o in objects] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny word-level tokenizer with a chat template, saved as a local folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def test_read_flashrag_jsonl(tmp_path, caplog):
    path = tmp_path / "nq.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "x", NQ, ["", "  "]).read_bytes())  # BOM, blank lines
    with caplog.at_level(logging.INFO):
        records = read_flashrag_jsonl(path)
    assert records == [QARecord(o["question"], o["golden_answers"]) for o in NQ]
    assert "skipped 2 blank line(s)" in caplog.text


@pytest.mark.parametrize("bad_line, message", [
    (b"\xff\xfe not utf-8", "line 2: not valid UTF-8 \\(invalid start byte at byte 0\\)"),
    (b'{"question": "q", "golden_answers": ["a"]', "line 2: not valid JSON"),
    (b'["q", ["a"]]', "line 2: expected a JSON object, got list"),
    (b"{}", "line 2: field question: expected a non-blank string, got None"),
    (b'{"question": "  ", "golden_answers": ["a"]}', "line 2: field question"),
    (b'{"question": "q", "golden_answers": []}', "line 2: field golden_answers: no gold answer"),
    (b'{"question": "q"}', "line 2: field golden_answers: expected a list of strings, got None"),
    (b'{"question": "q", "golden_answers": "Paris"}', "line 2: field golden_answers: expected a list of strings"),
    (b'{"question": "q", "golden_answers": ["a", 1984]}', r"line 2: field golden_answers\[1\]: expected a non-blank string, got 1984"),
])
def test_malformed_jsonl_line_names_file_line_and_field(tmp_path, bad_line, message):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(json.dumps(NQ[0]).encode() + b"\n" + bad_line + b"\n" + json.dumps(NQ[1]).encode() + b"\n")
    with pytest.raises(ValueError, match=f"raw.jsonl: {message}"):
        read_flashrag_jsonl(path)
    assert len(read_flashrag_jsonl(path, skip_invalid=True)) == 2


def test_jsonl_file_errors(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such jsonl file"):
        read_flashrag_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no valid records$"):
        read_flashrag_jsonl(tmp_path / "empty.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "golden_answers": []}] * 2)
    with pytest.raises(ValueError, match="no valid records; first problem: .*line 1: field golden_answers"):
        read_flashrag_jsonl(bad, skip_invalid=True)
    assert "skipped 2 invalid line(s)" in caplog.text


def test_convert_base_template():
    records = [QARecord(o["question"], o["golden_answers"]) for o in NQ]
    examples = convert(records, "nq", "test")
    assert [e.index for e in examples] == [0, 1, 2]
    assert examples[0].prompt == [{"role": "user", "content": base_prompt("who wrote hamlet")}]
    assert examples[0].prompt_text == base_prompt("who wrote hamlet")
    assert examples[2].golden_answers == ["Pablo Picasso", "毕加索"]
    assert {(e.data_source, e.split, e.ability) for e in examples} == {("nq", "test", "fact-reasoning")}


def test_cli_round_trip_merges_sources(tmp_path):
    nq = write_jsonl(tmp_path / "nq.jsonl", NQ)
    hotpot = write_jsonl(tmp_path / "hotpot.jsonl", HOTPOT)
    out = tmp_path / "out"
    assert main(["--input", str(nq), "--data-source", "nq", "--input", str(hotpot),
                 "--data-source", "hotpotqa", "--split", "train", "--out", str(out)]) == 0
    examples = read_examples(out / "train.parquet")
    raw = NQ + HOTPOT
    assert [(e.question, e.golden_answers) for e in examples] == [(o["question"], o["golden_answers"]) for o in raw]
    assert [(e.data_source, e.index) for e in examples] == [("nq", 0), ("nq", 1), ("nq", 2), ("hotpotqa", 0)]
    assert all(e.split == "train" for e in examples)
    assert [e.prompt[0]["content"] for e in examples] == [base_prompt(o["question"]) for o in raw]


def test_cli_chat_template_from_a_local_tokenizer(tmp_path, tokenizer_dir):
    nq = write_jsonl(tmp_path / "nq.jsonl", NQ[:2])
    out = tmp_path / "out"
    assert main(["--input", str(nq), "--data-source", "nq", "--split", "test", "--out", str(out),
                 "--template", "chat", "--tokenizer", str(tokenizer_dir)]) == 0
    examples = read_examples(out / "test.parquet")
    expected = f"<|im_start|>user\n{base_prompt('capital of France')}<|im_end|>\n<|im_start|>assistant\n"
    assert examples[1].prompt_text == expected
    # The stored prompt stays the plain Search-R1 message list.
    assert examples[1].prompt == [{"role": "user", "content": base_prompt("capital of France")}]


def test_cli_usage_errors(tmp_path, capsys):
    nq = str(write_jsonl(tmp_path / "nq.jsonl", NQ))
    common = ["--split", "train", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", nq, "--input", nq, "--data-source", "nq", *common])
    assert exit_info.value.code == 2
    assert "got 2 --input but 1 --data-source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input", nq, "--data-source", "nq", "--template", "chat", *common])
    assert "--tokenizer is needed with --template chat" in capsys.readouterr().err


def test_cli_input_errors_exit_1_with_a_message(tmp_path, capsys):
    nq = str(write_jsonl(tmp_path / "nq.jsonl", NQ))
    common = ["--split", "train", "--out", str(tmp_path / "out")]
    assert main(["--input", str(tmp_path / "gone.jsonl"), "--data-source", "nq", *common]) == 1
    assert "convert: error: " + str(tmp_path / "gone.jsonl") + ": no such jsonl file" in capsys.readouterr().err
    assert main(["--input", nq, "--data-source", "nq", "--input", nq, "--data-source", "nq", *common]) == 1
    assert "data_source 'nq' index 0 appears twice" in capsys.readouterr().err
    assert main(["--input", nq, "--data-source", "nq", "--template", "chat",
                 "--tokenizer", str(tmp_path / "no_tok"), *common]) == 1
    assert "no_tok: no such tokenizer folder" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", NQ, ['{"question": "q", "golden_answers": []}'])
    assert main(["--input", str(bad), "--data-source", "nq", *common]) == 1
    assert "bad.jsonl: line 4: field golden_answers: no gold answer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["--input", str(bad), "--data-source", "nq", "--skip-invalid", *common]) == 0
    assert len(read_examples(tmp_path / "out" / "train.parquet")) == 3


def test_merge_refuses_mixed_splits():
    train = convert([QARecord("q", ["a"])], "nq", "train")
    test = convert([QARecord("q", ["a"])], "hotpotqa", "test")
    with pytest.raises(ValueError, match=r"different splits \['test', 'train'\]"):
        merge([train, test])
    assert merge([train, convert([QARecord("r", ["b"])], "hotpotqa", "train")])[1].data_source == "hotpotqa"


def test_module_runs_as_a_script(tmp_path):
    nq = write_jsonl(tmp_path / "nq.jsonl", NQ)
    result = subprocess.run(
        [sys.executable, "-m", "searchr1_jax.data.convert", "--input", str(nq), "--data-source", "nq",
         "--split", "test", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert f"wrote 3 examples to {tmp_path / 'test.parquet'}" in result.stderr
    assert len(read_examples(tmp_path / "test.parquet")) == 3
