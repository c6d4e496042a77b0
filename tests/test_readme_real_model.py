"""The README's "Training on real models" block, run verbatim as a new user would, at toy
sizes: the test reads the commands out of README.md (so the two cannot drift apart), changes
only sizes (appended flags and config overrides) and the server's port, and runs them in a
directory holding what the README says the user has (a random Qwen2 model saved by
transformers, FlashRAG jsonl, a corpus). The recipes keep `model.remat=True`, as shipped."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import transformers

from conftest import copy_user_files
from searchr1_jax.config import config_from_file

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- real-model-steps"
TOY_TRAIN = [f"--config.{k}={v}" for k, v in dict(
    **{"trainer.total_steps": 2, "trainer.batch_size": 4, "trainer.mini_batch_size": 2,
       "trainer.micro_batch_size": 2, "trainer.eval_every": 2, "trainer.eval_size": 24, "trainer.save_every": 1,
       "rollout.max_turns": 2, "rollout.max_new_tokens": 16, "rollout.max_obs_tokens": 48,
       "rollout.max_prompt_tokens": 256, "rollout.max_context_tokens": 512}).items()]
TOY_ROLLOUT = ["--max-turns", "2", "--max-new-tokens", "16", "--max-obs-tokens", "48", "--max-prompt-tokens", "256"]
SIZE_OVERRIDES = {"searchr1_jax.train": TOY_TRAIN,
                  "searchr1_jax.evaluate": ["--limit", "24", "--batch-size", "8", *TOY_ROLLOUT],
                  "searchr1_jax.infer": TOY_ROLLOUT}


def readme_commands(readme: str) -> list[str]:
    """The shell commands of the marked code block: continuation lines joined, comments and
    blank lines dropped."""
    block = readme[readme.index(MARKER):]
    block = block[block.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    joined = block.replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(command: str, port: int) -> tuple[list[str], bool]:
    """(argv, runs in the background) of a README command with toy sizes and `port`."""
    background = command.endswith("&")
    command = command.rstrip("&").strip().replace(":8000/", f":{port}/").replace("--port 8000", f"--port {port}")
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    return [sys.executable, *argv[1:], *SIZE_OVERRIDES.get(argv[2], [])], background


def _wait_for_server(port: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError("the retrieval server did not come up")


def test_the_readme_steps_run_verbatim(user_files_template, tmp_path):
    for recipe in ("configs/qwen3b_ppo.py", "configs/qwen3b_grpo.py"):
        assert config_from_file(REPO / recipe).model.remat  # the rollout runs with remat as shipped
    work = copy_user_files(user_files_template, tmp_path / "work")
    commands = readme_commands((REPO / "README.md").read_text())
    modules = [c.split()[2] for c in commands]
    assert modules == ["searchr1_jax.data.convert", "searchr1_jax.data.convert", "searchr1_jax.retrieval.build_index",
                       "searchr1_jax.retrieval.server", "searchr1_jax.train", "searchr1_jax.train",
                       "searchr1_jax.export", "searchr1_jax.evaluate", "searchr1_jax.infer"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = _free_port()
    server, outputs = None, {}
    try:
        for i, command in enumerate(commands):
            argv, background = _argv(command, port)
            if background:
                server = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True)
                _wait_for_server(port, server)
                continue
            started = time.monotonic()
            proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
            outputs[i] = proc
            print(f"{time.monotonic() - started:6.1f} s  {command[:110]}")  # shown with pytest -s
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    for split in ("train", "test"):
        assert (work / "data" / "nq_hotpotqa" / f"{split}.parquet").is_file()
    for run_name, train_index in (("qwen3b_ppo", 4), ("qwen3b_grpo", 5)):
        run = work / "runs" / run_name
        summary = json.loads((run / "run_summary.json").read_text())
        assert summary["step"] == summary["total_steps"] == 2 and not summary["stopped_early"]
        assert set(summary["validation_em"]) == {"nq", "hotpotqa", "all"}
        assert summary["checkpoints"] == [str(Path("runs") / run_name / "checkpoints" / s) for s in ("1", "2")]
        printed = outputs[train_index].stdout
        assert f"export the policy: python -m searchr1_jax.export --checkpoint runs/{run_name}" in printed
        assert re.search(r"^\s+nq\s+\d\.\d{3} \(2\)", printed, re.M), printed
        # Samples of training steps are trajectories only, no empty tables.
        assert not list((run / "samples").glob("train_step*_table.*"))
        assert (run / "samples" / "train_step2_trajectories.jsonl").read_text().strip()
    assert "algorithm grpo: advantages: grpo over groups of 5 samples" in outputs[5].stderr
    assert "KL to the reference: a loss term (k3, coef 0.001)" in outputs[5].stderr

    export = work / "exports" / "qwen3b_ppo"
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert np.isfinite(model(input_ids=__import__("torch").tensor([[1, 2, 3]])).logits.detach().numpy()).all()
    table = json.loads((work / "eval" / "qwen3b_ppo" / "eval_table.json").read_text())
    assert set(table) == {"nq", "hotpotqa", "all"} and table["all"]["n"] == 24
    evaluate_err = outputs[7].stderr
    assert "Unable to initialize backend" not in evaluate_err and "orbax" not in evaluate_err.lower()
    # Evaluating a run directory (Orbax restore) prints no library chatter either.
    proc = subprocess.run([*_argv(commands[7], port)[0][:3], "--model", "runs/qwen3b_grpo", "--data",
                           "data/nq_hotpotqa/test.parquet", "--index", "indexes/wiki18_bm25", "--out", "eval/grpo",
                           "--limit", "4", *TOY_ROLLOUT], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chatter = [line for line in proc.stderr.splitlines()
               if "orbax" in line.lower() or "absl" in line or "Unable to initialize backend" in line]
    assert not chatter, chatter
    episode = outputs[8].stdout
    assert episode.startswith("Question: Who wrote the novel") and "\nAnswer: " in episode
