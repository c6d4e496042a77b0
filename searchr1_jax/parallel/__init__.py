"""Device mesh, logical-axis sharding rules, model placement, memory estimate, multi-host start-up."""
from searchr1_jax.parallel.distributed import (ClusterSpec, initialize, is_main_process, log_main,
                                               slurm_cluster_spec, sync_processes)
from searchr1_jax.parallel.memory import (MemoryBudgetError, MemoryEstimate, MemoryItem, Precision, Workload,
                                          check_fits, device_memory_bytes, estimate_memory, report_memory)
from searchr1_jax.parallel.mesh import MeshConfig, make_mesh, mesh_config_from, resolve_mesh_shape
from searchr1_jax.parallel.placement import frozen_copy, place_models
from searchr1_jax.parallel.rules import (MESH_AXES, PRESETS, Fallback, Rules, logical_to_spec, rules_for,
                                         shard_shape)
from searchr1_jax.parallel.sharding import (batch_sharding, batch_spec, cache_shardings, logits_sharding,
                                            optimizer_shardings, param_shardings, shard_batch, shard_module)

__all__ = [
    "ClusterSpec", "initialize", "is_main_process", "log_main", "slurm_cluster_spec", "sync_processes",
    "MemoryBudgetError", "MemoryEstimate", "MemoryItem", "Precision", "Workload", "check_fits",
    "device_memory_bytes", "estimate_memory", "report_memory",
    "MeshConfig", "make_mesh", "mesh_config_from", "resolve_mesh_shape",
    "frozen_copy", "place_models",
    "MESH_AXES", "PRESETS", "Fallback", "Rules", "logical_to_spec", "rules_for", "shard_shape",
    "batch_sharding", "batch_spec", "cache_shardings", "logits_sharding", "optimizer_shardings",
    "param_shardings", "shard_batch", "shard_module",
]
