"""A user's mistake ends every command with one line, `error: …`, naming the field, flag,
file or URL (no traceback), before any model is loaded or compiled; a new run refuses a
directory that holds an earlier one; the library keeps transformers' torch advisory quiet."""
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import copy_user_files
from searchr1_jax.config import ConfigError
from searchr1_jax.trainer import claim_output_dir

CONVERT = ["-m", "searchr1_jax.data.convert", "--out", "data/nq_hotpotqa", "--input", "nq/{split}.jsonl",
           "--data-source", "nq"]
TRAIN = ["-m", "searchr1_jax.train", "--config=configs/qwen3b_ppo.py", "--config.model.path=models/Qwen2.5-3B",
         "--config.data.train_files=data/nq_hotpotqa/train.parquet",
         "--config.data.val_files=data/nq_hotpotqa/test.parquet"]


@pytest.fixture(scope="module")
def work(user_files_template, tmp_path_factory):
    """The user's directory after step 1 (both splits converted) and step 2's index build."""
    work = copy_user_files(user_files_template, tmp_path_factory.mktemp("cli") / "work")
    for split in ("train", "test"):
        _ok(work, *[a.format(split=split) for a in CONVERT], "--split", split)
    _ok(work, "-m", "searchr1_jax.retrieval.build_index", "--corpus", "wiki-18.jsonl", "--method", "bm25",
        "--out", "indexes/bm25")
    return work


def _run(work, *args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ok(work, *args):
    proc = _run(work, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _one_line_error(proc) -> str:
    """The error line of a failed command, checking that it is the only sign of failure."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/retrieve"


def test_config_mistakes_are_one_line(work):
    line = _one_line_error(_run(work, *TRAIN, "--config.trainer.total_step=2"))
    assert line == 'error: --config.trainer.total_step: unknown config field; Did you mean "total_steps" ' \
                   'instead of "total_step"?'
    line = _one_line_error(_run(work, *TRAIN, "--config.trainer.total_steps=two"))
    assert "--config.trainer.total_steps=two" in line
    assert _one_line_error(_run(work, "-m", "searchr1_jax.train", "--config=configs/qwen3b_pop.py")) == \
        "error: --config: no such config file 'configs/qwen3b_pop.py'"
    line = _one_line_error(_run(work, *TRAIN, "--config.trainer.resume=True", "--config.trainer.overwrite=True"))
    assert "config.trainer.resume and config.trainer.overwrite" in line


def test_data_mistakes_name_the_field_and_file(work, tmp_path):
    line = _one_line_error(_run(work, *TRAIN, "--config.data.val_files=data/nq_hotpotqa/valid.parquet"))
    assert line.startswith("error: config.data.val_files: data/nq_hotpotqa/valid.parquet: no such parquet file")
    table = pq.read_table(work / "data" / "nq_hotpotqa" / "test.parquet").drop(["reward_model"])
    pq.write_table(table, tmp_path / "no_answers.parquet")
    line = _one_line_error(_run(work, *TRAIN, f"--config.data.train_files={tmp_path / 'no_answers.parquet'}"))
    assert line.startswith("error: config.data.train_files: ") and "missing column(s) ['reward_model']" in line
    line = _one_line_error(_run(work, "-m", "searchr1_jax.evaluate", "--model", "models/Qwen2.5-3B", "--data",
                                str(tmp_path / "no_answers.parquet"), "--index", "indexes/bm25", "--out", "eval"))
    assert line.startswith("error: --data: ") and "missing column(s) ['reward_model']" in line


def test_a_dead_retriever_is_found_at_start_up(work):
    url = _dead_url()
    for args in ([*TRAIN, f"--config.retriever.url={url}"],
                 ["-m", "searchr1_jax.evaluate", "--model", "models/Qwen2.5-3B", "--data",
                  "data/nq_hotpotqa/test.parquet", "--retriever-url", url, "--out", "eval"],
                 ["-m", "searchr1_jax.infer", "--model", "models/Qwen2.5-3B", "--retriever-url", url,
                  "--question", "Where is Paris?"]):
        started = time.monotonic()
        line = _one_line_error(_run(work, *args))
        assert f"retrieval server at {url} unreachable" in line
        assert line.startswith("error: config.retriever.url: " if "train" in args[1] else "error: --retriever-url: ")
        assert time.monotonic() - started < 60, "the probe must come before loading and compiling"
    assert not (work / "runs").exists(), "a run that failed its checks must leave no run directory"


def test_missing_inputs_of_every_command(work):
    cases = {
        ("-m", "searchr1_jax.evaluate", "--model", "models/nope", "--data", "data/nq_hotpotqa/test.parquet",
         "--index", "indexes/bm25", "--out", "eval"): "models/nope",
        ("-m", "searchr1_jax.infer", "--model", "models/Qwen2.5-3B", "--index", "indexes/nope",
         "--question", "Where?"): "indexes/nope",
        ("-m", "searchr1_jax.export", "--checkpoint", "runs/nope", "--out", "exports/x"): "runs/nope",
        ("-m", "searchr1_jax.sft", "--model", "models/Qwen2.5-3B", "--data", "nope.jsonl", "--out", "m"): "nope.jsonl",
        ("-m", "searchr1_jax.data.convert", "--split", "train", "--out", "d", "--input", "nope.jsonl",
         "--data-source", "nq"): "nope.jsonl",
        ("-m", "searchr1_jax.retrieval.build_index", "--corpus", "nope.jsonl", "--method", "bm25",
         "--out", "i"): "nope.jsonl",
        ("-m", "searchr1_jax.retrieval.server", "--index", "indexes/nope", "--port", "1"): "indexes/nope",
        (*TRAIN, "--config.model.path=models/nope"): "config.model.path",
    }
    for args, named in cases.items():
        assert named in _one_line_error(_run(work, *args)), args


def test_a_new_run_refuses_a_directory_holding_another(work, tmp_path):
    run = tmp_path / "runs" / "old"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4}) + "\n")
    line = _one_line_error(_run(work, *TRAIN, "--config.retriever.url=", "--config.retriever.index_dir=indexes/bm25",
                                f"--config.trainer.output_dir={run}"))
    assert line == (f"error: config.trainer.output_dir: {str(run)!r} already holds a run; continue it with "
                    "--config.trainer.resume=True, or move it aside with --config.trainer.overwrite=True")
    assert (run / "metrics.jsonl").read_text() == json.dumps({"step": 4}) + "\n"
    # resume: nothing to do; overwrite: the old run is moved aside whole, never deleted.
    assert claim_output_dir(run, resume=True, overwrite=False) is None and run.is_dir()
    aside = claim_output_dir(run, resume=False, overwrite=True)
    assert not run.exists() and aside.parent == run.parent and aside.name.startswith("old.replaced-")
    assert (aside / "checkpoints" / "4").is_dir() and (aside / "metrics.jsonl").is_file()
    run.mkdir()  # an empty directory is no earlier run
    assert claim_output_dir(run, resume=False, overwrite=False) is None
    with pytest.raises(ConfigError, match="already holds a run"):
        claim_output_dir(aside, resume=False, overwrite=False)


def test_no_torch_advisory_without_torch():
    """A plain install has no torch; transformers then prints "PyTorch was not found" on
    import unless told otherwise, which this package does."""
    code = ("import importlib.util as u; find = u.find_spec; "
            "u.find_spec = lambda n, *a, **k: None if n.split('.')[0] == 'torch' else find(n, *a, **k); "
            "import searchr1_jax.models, transformers; assert not transformers.is_torch_available()")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr
    shown = subprocess.run([sys.executable, "-c", code.replace("searchr1_jax.models, ", "")],
                           capture_output=True, text=True, timeout=120, env=env)
    assert "PyTorch was not found" in shown.stderr  # the check above can fail
