"""Multi-host start-up decisions (SLURM parsing, explicit flags, TPU, single process),
main-process logging, and the launch scripts' shape. Nothing here starts a real cluster."""
import logging
import pathlib
import subprocess

import jax
import pytest

from searchr1_jax import parallel
from searchr1_jax.parallel import distributed

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SLURM_TWO_NODES = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                   "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_STEP_NUM_NODES": "2"}


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"),
    ("node001,node002", "node001"),
    ("gpu[003-006,9],cpu1", "gpu003"),
    ("gpu[12,14]", "gpu12"),
    ("a-[01-02]-ib", "a-01-ib"),
])
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_slurm_one_process_per_node_sees_all_local_gpus():
    spec = parallel.slurm_cluster_spec(SLURM_TWO_NODES)
    assert spec == parallel.ClusterSpec("gpu007:" + str(12000 + 4242 % 20000), 2, 1, None)
    assert parallel.slurm_cluster_spec(SLURM_TWO_NODES, port=1234).coordinator_address == "gpu007:1234"


def test_slurm_one_process_per_gpu_takes_its_local_gpu():
    env = {**SLURM_TWO_NODES, "SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}
    assert parallel.slurm_cluster_spec(env).local_device_ids == (3,)
    # SLURM already bound one GPU to the task: it is the task's only visible device.
    assert parallel.slurm_cluster_spec({**env, "CUDA_VISIBLE_DEVICES": "3"}).local_device_ids is None


def test_slurm_single_task_or_no_slurm_is_not_a_cluster():
    assert parallel.slurm_cluster_spec({}) is None
    assert parallel.slurm_cluster_spec({**SLURM_TWO_NODES, "SLURM_NTASKS": "1"}) is None


def test_slurm_missing_variable_is_named():
    env = dict(SLURM_TWO_NODES)
    del env["SLURM_PROCID"]
    with pytest.raises(ValueError, match="SLURM_PROCID is not set"):
        parallel.slurm_cluster_spec(env)
    with pytest.raises(ValueError, match="SLURM_NTASKS='two' is not an integer"):
        parallel.slurm_cluster_spec({**SLURM_TWO_NODES, "SLURM_NTASKS": "two"})


@pytest.fixture
def recorded_initialize(monkeypatch):
    """Calls that would have gone to jax.distributed.initialize."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    return calls


def test_single_process_is_a_no_op(recorded_initialize):
    assert parallel.initialize(env={}) == "single"
    assert recorded_initialize == []


def test_slurm_environment_starts_the_cluster(recorded_initialize):
    assert parallel.initialize(env=SLURM_TWO_NODES) == "slurm"
    assert recorded_initialize == [dict(coordinator_address="gpu007:16242", num_processes=2, process_id=1,
                                        local_device_ids=None)]


def test_explicit_flags_win_over_slurm(recorded_initialize):
    assert parallel.initialize("10.0.0.1:9999", 4, 3, env=SLURM_TWO_NODES) == "explicit"
    assert recorded_initialize == [dict(coordinator_address="10.0.0.1:9999", num_processes=4, process_id=3,
                                        local_device_ids=None)]


def test_tpu_vm_uses_automatic_detection(recorded_initialize, monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: True)
    assert parallel.initialize(env={}) == "tpu"
    assert recorded_initialize == [{}]


@pytest.mark.parametrize("args, message", [
    (("10.0.0.1:9999", None, 0), r"missing \['num_processes'\]"),
    ((None, 2, None), r"missing \['coordinator_address', 'process_id'\]"),
    (("10.0.0.1:9999", 2, 2), r"process_id 2 is outside \[0, num_processes=2\)"),
])
def test_incomplete_explicit_flags_are_rejected(recorded_initialize, args, message):
    with pytest.raises(ValueError, match=message):
        parallel.initialize(*args, env={})
    assert recorded_initialize == []


def test_late_initialize_explains_the_ordering(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)

    def too_late(**kwargs):
        raise RuntimeError("jax.distributed.initialize() must be called before any JAX calls")
    monkeypatch.setattr(jax.distributed, "initialize", too_late)
    with pytest.raises(RuntimeError, match=r"multi-host start-up \(slurm, .*must run before any other JAX call"):
        parallel.initialize(env=SLURM_TWO_NODES)


def test_already_initialized_is_left_alone(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert parallel.initialize(env=SLURM_TWO_NODES) == "already"


def test_only_process_zero_logs(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="searchr1_jax"):
        parallel.log_main("step %d", 1)
        monkeypatch.setattr(jax, "process_index", lambda: 1)
        assert not parallel.is_main_process()
        parallel.log_main("step %d", 2)
    assert [r.getMessage() for r in caplog.records] == ["step 1"]


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch", "retriever_per_node.sh"])
def test_launch_scripts_parse_and_open_with_usage(script):
    path = LAUNCH / script
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and lines[1].startswith("# Usage: ")
    subprocess.run(["bash", "-n", str(path)], check=True)
    # Without arguments each prints its usage comment and exits 2 (nothing is launched).
    done = subprocess.run(["bash", str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("# Usage: ")


def _fake_command(directory, name):
    """An executable `name` on PATH that prints each argument on its own line."""
    path = directory / name
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)


def _run_with_fakes(tmp_path, script, *args, **env):
    _fake_command(tmp_path, "gcloud")
    _fake_command(tmp_path, "srun")
    full_env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **env}
    done = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_tpu_pod_runs_the_same_command_on_all_workers(tmp_path):
    argv = _run_with_fakes(tmp_path, "tpu_pod.sh", "pod-1", "us-east5-a", "configs/qwen7b_ppo.py",
                           "--config.mesh.preset=fsdp", "--config.run_name=a b")
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert "--zone=us-east5-a" in argv and "--worker=all" in argv
    command = next(a for a in argv if a.startswith("--command="))
    # The override with a space reaches the remote shell quoted, as one argument.
    assert command == ("--command=cd ~/searchr1_jax && python3 -m searchr1_jax.train "
                       "--config=configs/qwen7b_ppo.py --config.mesh.preset=fsdp --config.run_name=a\\ b ")


def test_slurm_script_runs_one_training_process_per_node(tmp_path):
    argv = _run_with_fakes(tmp_path, "slurm_gpu.sbatch", "configs/qwen3b_ppo.py", "--config.mesh.fsdp=-1",
                           SLURM_SUBMIT_DIR=str(tmp_path))
    assert argv == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "python3", "-m", "searchr1_jax.train",
                    "--config=configs/qwen3b_ppo.py", "--config.mesh.fsdp=-1"]


def test_retriever_script_waits_for_the_server_and_marks_the_node_ready(tmp_path):
    """A stand-in server that records its arguments, listens, and exits after one connection."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$@" > {tmp_path}/server_args\n'
        f"exec {sys.executable} -c \"import socket; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); s.accept()\"\n")
    fake.chmod(0o755)
    ready = tmp_path / "ready"
    ready.mkdir()
    done = subprocess.run(["bash", str(LAUNCH / "retriever_per_node.sh"), "/data/index", str(port), "--topk", "3"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "RETRIEVER_READY_DIR": str(ready)})
    assert done.returncode == 0, done.stderr
    assert f"listening on 127.0.0.1:{port}" in done.stdout
    assert (tmp_path / "server_args").read_text().split() == [
        "-m", "searchr1_jax.retrieval.server", "--index", "/data/index", "--host", "127.0.0.1", "--port", str(port),
        "--topk", "3"]
    assert len(list(ready.iterdir())) == 1
