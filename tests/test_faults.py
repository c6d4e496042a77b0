"""Faults a long run meets, each injected and its outcome asserted (the trainer through its
CLI on the tiny model and world): a corrupted or truncated newest checkpoint, a torn metrics
line, a kill -9 before the first save, a changed model on resume, and a diverging update."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_world, wait_for_step
from searchr1_jax.checkpoint import INTEGRITY_FILE, verify_integrity
from searchr1_jax.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield make_tiny_world(tmp_path_factory.mktemp("faults"))
    for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        os.environ.pop(key, None)


def _command(world, out_dir, *extra):
    p = world["paths"]
    return [sys.executable, "-m", "searchr1_jax.train", "--config=tests/configs/tiny_cli.py",
            f"--config.model.path={world['model']}", f"--config.data.train_files={p.train}",
            f"--config.retriever.index_dir={p.index}", f"--config.trainer.output_dir={out_dir}", *extra]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _run(world, out_dir, *extra, check=True):
    proc = subprocess.run(_command(world, out_dir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in read_metrics(run / "metrics.jsonl")]


def _tensorboard_steps(run: Path) -> dict[str, list[int]]:
    """Steps per tag in the run's TensorBoard event files (TFRecord framing read by hand)."""
    from tensorboardX.proto.event_pb2 import Event

    steps: dict[str, list[int]] = {}
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != INTEGRITY_FILE),
               key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """An uninterrupted 3-step run, a checkpoint after every step."""
    run = tmp_path_factory.mktemp("straight") / "run"
    _run(world, run)
    return run


def test_every_checkpoint_carries_its_integrity_file(straight):
    for step in (1, 2, 3):
        mark = json.loads((straight / "checkpoints" / str(step) / INTEGRITY_FILE).read_text())
        assert mark["step"] == step and mark["healthy"] and mark["files"]
        assert verify_integrity(straight / "checkpoints" / str(step)) is None


@pytest.mark.parametrize("fault", ["flipped_bytes", "truncated_file"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(world, straight, tmp_path, fault):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    victim = _largest_file(run / "checkpoints" / "3")
    data = bytearray(victim.read_bytes())
    if fault == "flipped_bytes":
        data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
    else:
        data = data[:len(data) // 2]
        # and a torn last metrics line, as a kill mid-write leaves it
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"step": 4, "actor/lo')
    victim.write_bytes(bytes(data))
    proc = _run(world, run, "--config.trainer.resume=True")
    reason = "does not match its saved checksum (corrupted)" if fault == "flipped_bytes" else "were saved (truncated"
    skipped = [line for line in proc.stderr.splitlines() if "checkpoint step 3 skipped" in line]
    assert len(skipped) == 1 and reason in skipped[0] and victim.name in skipped[0], proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stderr
    assert _rows(run) == _rows(straight)  # step 3 redone exactly
    assert (run / "checkpoints.rejected" / "3").is_dir()  # set aside, not deleted
    assert verify_integrity(run / "checkpoints" / "3") is None  # the redone step 3
    assert all(steps == [1, 2, 3] for steps in _tensorboard_steps(run).values())


@pytest.mark.slow
def test_kill_before_the_first_save_then_resume_logs_each_step_once(world, straight, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_command(world, run, "--config.trainer.save_every=100"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    _run(world, run, "--config.trainer.save_every=100", "--config.trainer.resume=True")
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]
    assert _rows(run) == _rows(straight)
    tb = _tensorboard_steps(run)
    assert tb and all(steps == [1, 2, 3] for steps in tb.values()), tb


def test_resume_refuses_a_changed_model(world, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    other = tmp_path / "other_model"
    shutil.copytree(world["model"], other)
    proc = _run(world, run, "--config.trainer.resume=True", f"--config.model.path={other}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: config.trainer.resume: the checkpoint was trained with another run's settings "
                           f"(model.path: '{world['model']}' → '{other}')")
    assert "--config.trainer.resume_override=True" in line
    assert _rows(run) == _rows(straight)  # nothing written


def test_a_diverging_update_is_not_applied_not_saved_and_stops_the_run(world, tmp_path):
    """lr 1e30: the first update is finite but makes the logits overflow, so every later
    loss is NaN. Those updates are skipped, never saved, and after max_bad_steps in a row the
    run exits 2 with the last healthy checkpoint in place."""
    run = tmp_path / "run"
    proc = _run(world, run, "--config.optim.actor_lr=1e30", "--config.trainer.total_steps=6",
                "--config.trainer.max_bad_steps=2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "2 steps in a row ended with a non-finite loss" in line and "last healthy checkpoint is step 1" in line
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [1]
    assert verify_integrity(run / "checkpoints" / "1") is None
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["actor/skipped_update"] == 0 and rows[1]["actor/skipped_update"] == 1
    from searchr1_jax.export import load_policy
    import jax

    policy, record = load_policy(run)
    assert record["step"] == 1
    from flax import nnx

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))


def test_export_copies_only_tokenizer_files(world, tmp_path):
    """A crafted checkpoint record points export at a directory holding secrets: only the
    known tokenizer files are copied, and a tokenizer file linking outside is refused."""
    from flax import nnx

    from searchr1_jax.models import Decoder, load_config, save_hf

    crafted = tmp_path / "crafted"
    shutil.copytree(world["paths"].tokenizer, crafted)
    (crafted / "credentials.env").write_text("SECRET=1\n")
    (crafted / "id_rsa").write_text("key\n")
    cfg = load_config(world["model"])
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    out = save_hf(model, cfg, tmp_path / "export", tokenizer_dir=crafted)
    names = sorted(p.name for p in out.iterdir())
    assert "credentials.env" not in names and "id_rsa" not in names
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(names)
    (crafted / "tokenizer.json").unlink()
    (tmp_path / "secret.json").write_text("{}")
    (crafted / "tokenizer.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(ValueError, match="resolves outside"):
        save_hf(model, cfg, tmp_path / "export2", tokenizer_dir=crafted)


def _start_server(index, port):
    proc = subprocess.Popen([sys.executable, "-m", "searchr1_jax.retrieval.server", "--index", str(index),
                             "--port", str(port)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError("server did not start")


def _searching_model(world, out: Path) -> Path:
    """A Qwen2 model (saved by transformers) whose every rollout turn is
    `<search> born</search>`: its layers are zero, so the next token depends on the current
    one only, through an untied LM head that maps any token to `<search>`, `<search>` to
    ` born`, and ` born` to `</search>`."""
    import torch
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(world["paths"].tokenizer)
    [query] = tokenizer.encode(" born", add_special_tokens=False)  # a word of the world's questions
    search, close = tokenizer.convert_tokens_to_ids(["<search>", "</search>"])
    config = transformers.Qwen2Config.from_pretrained(world["model"])
    config.tie_word_embeddings = False
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, 0] = 1.0  # any token: dimension 0
        embed[search], embed[query] = 0.0, 0.0
        embed[search, 1] = embed[query, 2] = 1.0
        head[search, 0] = head[query, 1] = head[close, 2] = 30.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_retriever_outage_mid_run_is_waited_out(world, tmp_path):
    """The server dies once the run has passed its start-up probe (its TensorBoard directory
    exists), before the first search, and comes back 20 s later: the run retries (counted in
    its metrics), continues, and ends with the uninterrupted run's numbers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _start_server(world["paths"].index, port)
    model = _searching_model(world, tmp_path / "searching_model")
    reference = tmp_path / "reference"
    _run(world, reference, f"--config.model.path={model}")
    run = tmp_path / "run"
    trainer = subprocess.Popen(_command(world, run, "--config.retriever.index_dir=", f"--config.model.path={model}",
                                        f"--config.retriever.url=http://127.0.0.1:{port}/retrieve"),
                               cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "tensorboard").is_dir():
            assert trainer.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.05)
        server.kill()
        server.wait()
        time.sleep(20)
        server = _start_server(world["paths"].index, port)
        _, err = trainer.communicate(timeout=600)
        assert trainer.returncode == 0, err[-3000:]
    finally:
        trainer.kill()
        server.terminate()
        server.wait(timeout=30)
    rows, expected = _rows(run), _rows(reference)
    assert all(r["rollout/searches"] == 1 for r in expected)  # every episode searched
    assert sum(r["retrieval/retries"] for r in rows) > 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "retrieval/retries"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(expected)
