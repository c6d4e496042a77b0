"""Multi-host start-up with JAX's own runtime (`jax.distributed.initialize`).

`initialize()` must run before any other JAX call. It picks, in order:
  1. explicit coordinator flags (all three of address, process count, process id);
  2. SLURM with more than one task: the coordinator is the job's first node;
  3. a Cloud TPU VM: `jax.distributed.initialize()` with no arguments (the TPU runtime
     knows the pod's workers);
  4. otherwise one process: nothing to do.
After it, `jax.devices()` lists the devices of every host and a mesh spans them all.
Only process 0 should log and write shared files (`is_main_process`, `log_main`); every
process writes its own checkpoint shards (Orbax does this when all processes call save).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from typing import Mapping

import jax

logger = logging.getLogger("searchr1_jax")

# SLURM jobs sharing a first node get different coordinator ports (PORT_BASE + job id % PORT_SPAN).
PORT_BASE, PORT_SPAN = 12000, 20000


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Arguments for jax.distributed.initialize. local_device_ids None: all local devices."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[003-006,9],cpu1" → "gpu003"."""
    head = nodelist.strip()
    if not head:
        raise ValueError("SLURM node list is empty")
    depth, end = 0, len(head)
    for i, ch in enumerate(head):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    head = head[:end]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    inside, suffix = rest.split("]", 1)
    first = inside.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ValueError(f"SLURM environment: {name} is not set (run the job step with srun)") from None
    except ValueError:
        raise ValueError(f"SLURM environment: {name}={env[name]!r} is not an integer") from None


def slurm_cluster_spec(env: Mapping[str, str], port: int | None = None) -> ClusterSpec | None:
    """ClusterSpec from SLURM's variables, or None outside SLURM or with a single task.

    One task per node sees all of its node's GPUs; several tasks per node each take the GPU
    of their SLURM_LOCALID (or the single GPU SLURM bound to them via CUDA_VISIBLE_DEVICES).
    """
    if "SLURM_JOB_ID" not in env or "SLURM_NTASKS" not in env:
        return None
    num_processes = _env_int(env, "SLURM_NTASKS")
    if num_processes <= 1:
        return None
    process_id = _env_int(env, "SLURM_PROCID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM environment: none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST is set")
    nodes_var = next((v for v in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if v in env),
                     None)
    if nodes_var is None:
        raise ValueError("SLURM environment: none of SLURM_STEP_NUM_NODES, SLURM_JOB_NUM_NODES is set")
    num_nodes = _env_int(env, nodes_var)
    if port is None:
        port = PORT_BASE + _env_int(env, "SLURM_JOB_ID") % PORT_SPAN
    local_ids = None
    if num_processes > num_nodes:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        local_ids = None if len(visible) == 1 else (_env_int(env, "SLURM_LOCALID"),)
    return ClusterSpec(f"{first_slurm_host(nodelist)}:{port}", num_processes, process_id, local_ids)


def _on_tpu_vm() -> bool:
    has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, env: Mapping[str, str] | None = None) -> str:
    """Join the multi-host job (see the module docstring). Returns the mode used:
    "explicit", "slurm", "tpu", "single" or "already" (initialised before)."""
    env = os.environ if env is None else env
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if jax.distributed.is_initialized():
        return "already"
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"explicit multi-host start-up needs all of coordinator_address, num_processes "
                             f"and process_id; missing {missing}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is outside [0, num_processes={num_processes})")
        mode, spec = "explicit", ClusterSpec(coordinator_address, num_processes, process_id)
    elif (spec := slurm_cluster_spec(env)) is not None:
        mode = "slurm"
    elif _on_tpu_vm():
        mode, spec = "tpu", None
    else:
        return "single"
    try:
        if spec is None:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator_address=spec.coordinator_address,
                                       num_processes=spec.num_processes, process_id=spec.process_id,
                                       local_device_ids=(list(spec.local_device_ids)
                                                         if spec.local_device_ids is not None else None))
    except RuntimeError as e:
        raise RuntimeError(f"multi-host start-up ({mode}, {spec}) failed: {e}. It must run before any "
                           "other JAX call (call searchr1_jax.parallel.initialize() first in main), and "
                           "every process must reach the coordinator.") from e
    return mode


def is_main_process() -> bool:
    """True on process 0, the one that logs and writes shared files."""
    return jax.process_index() == 0


def log_main(msg: str, *args, level: int = logging.INFO) -> None:
    """Log `msg % args` from process 0 only."""
    if is_main_process():
        logger.log(level, msg, *args)


def sync_processes(name: str) -> None:
    """Wait until every process reached this point (a no-op with one process): e.g. until
    process 0 has prepared a directory that all of them write into."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
