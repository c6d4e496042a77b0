"""Memory estimate: against bytes really allocated on 8 simulated devices, and against
parameter and KV-cache sizes counted by hand for Qwen2.5-3B / 7B."""
import collections
import gc
import logging

import jax
import jax.numpy as jnp
import optax
import pytest
import transformers
from flax import nnx

from searchr1_jax import parallel
from searchr1_jax.models import Decoder, ValueModel
from searchr1_jax.models.config import config_from_hf_dict

GIB = 2**30
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
QWEN_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
SMALL_WORKLOAD = parallel.Workload(rollout_batch=8, cache_length=32, prefill_rows=8, prefill_chunk=8,
                                   train_micro_batch=8, train_length=32)


def _cfg(fields):
    return config_from_hf_dict(transformers.Qwen2Config(**fields).to_dict())


def _bytes_per_device():
    gc.collect()  # arrays that earlier tests left in reference cycles would vanish mid-count
    totals = collections.Counter()
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            totals[shard.device] += shard.data.nbytes
    return totals


@pytest.mark.parametrize("preset, sizes", [
    ("fsdp_tensor", dict(data=1, fsdp=2, tensor=4)),
    ("fsdp", dict(data=1, fsdp=8, tensor=1)),
    ("data", dict(data=8, fsdp=1, tensor=1)),
])
def test_estimate_within_10_percent_of_allocated_bytes(preset, sizes):
    """Policy + critic + reference + two Adam states + a bfloat16 KV cache, placed on the
    mesh; the estimate of those items against the per-device bytes that appeared."""
    cfg = _cfg(TINY)
    mesh_cfg = parallel.MeshConfig(preset=preset, **sizes)
    mesh, rules = parallel.make_mesh(mesh_cfg), mesh_cfg.resolved_rules
    tx = optax.adam(1e-3)
    before = _bytes_per_device()

    policy = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    nnx.update(policy, jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), nnx.state(policy, nnx.Param)))
    critic = ValueModel.from_decoder(policy, rngs=nnx.Rngs(1))
    reference = parallel.frozen_copy(policy)
    parallel.place_models(policy, critic, reference, mesh, rules)
    opt_states = []
    for model in (policy, critic):
        params = nnx.state(model, nnx.Param)
        shardings = parallel.optimizer_shardings(jax.eval_shape(tx.init, params),
                                                 parallel.param_shardings(model, mesh, rules))
        opt_states.append(jax.jit(tx.init, out_shardings=shardings)(params))
    cache_shape = jax.eval_shape(lambda: policy.init_cache(8, 32, dtype=jnp.bfloat16))
    cache = jax.jit(lambda: policy.init_cache(8, 32, dtype=jnp.bfloat16),
                    out_shardings=parallel.cache_shardings(cache_shape, mesh, rules))()

    after = _bytes_per_device()
    allocated = {d: after[d] - before[d] for d in mesh.devices.flat}
    estimate = parallel.estimate_memory(cfg, mesh, rules, SMALL_WORKLOAD,
                                        parallel.Precision(cache_dtype=jnp.bfloat16),
                                        critic=True, reference=True, preset=preset)
    predicted = estimate.bytes_of("policy params", "policy Adam moments", "critic params",
                                  "critic Adam moments", "reference params", "KV cache")
    for device, nbytes in allocated.items():
        assert abs(predicted - nbytes) <= 0.10 * nbytes, (device, predicted, nbytes)
    # Keep every buffer alive until it has been counted.
    assert len(opt_states) == 2 and cache.keys[0].shape == (8, 4, 8, 32)


def _split_counts(fields):
    """(elements of matrices, of vectors) of a Qwen2 decoder, counted by hand."""
    h, v, m, layers = fields["hidden_size"], fields["vocab_size"], fields["intermediate_size"], \
        fields["num_hidden_layers"]
    q = h  # heads × head_dim == hidden for Qwen2.5
    kv = fields["num_key_value_heads"] * h // fields["num_attention_heads"]
    matrices = layers * (h * q + 2 * h * kv + q * h + 3 * h * m) + v * h * (1 if fields["tie_word_embeddings"] else 2)
    vectors = layers * (q + 2 * kv + 2 * h) + h
    return matrices, vectors


def test_parameter_bytes_match_hand_counts_for_qwen_7b():
    cfg = _cfg(QWEN_7B)
    matrices, vectors = _split_counts(QWEN_7B)
    assert matrices + vectors == cfg.num_params == 7_615_616_512
    bf16 = parallel.Precision(param_dtype=jnp.bfloat16, master_dtype=jnp.float32,
                              compute_dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16)

    def params_bytes(preset, sizes):
        est = parallel.estimate_memory(cfg, sizes, parallel.rules_for(preset), SMALL_WORKLOAD, bf16,
                                       critic=False, reference=False, preset=preset)
        return est.bytes_of("policy params"), est.bytes_of("policy master copy"), \
            est.bytes_of("policy Adam moments")

    assert params_bytes("data", dict(data=8)) == (2 * cfg.num_params, 4 * cfg.num_params, 8 * cfg.num_params)
    # FSDP splits every matrix 8 ways on its hidden dimension; biases and norms stay whole.
    assert params_bytes("fsdp", dict(fsdp=8))[0] == 2 * (matrices // 8 + vectors)
    # FSDP×tensor splits both dimensions of every matrix, and q/k/v biases over tensor.
    layers, h = QWEN_7B["num_hidden_layers"], QWEN_7B["hidden_size"]
    biases = layers * (h + 2 * 512)
    assert params_bytes("fsdp_tensor", dict(fsdp=2, tensor=4))[0] == \
        2 * (matrices // 8 + biases // 4 + (vectors - biases))


def test_kv_cache_bytes_match_hand_count_for_qwen_3b():
    """36 KiB per token in bfloat16 (2 × 36 layers × 2 kv heads × 128 × 2 bytes)."""
    cfg = _cfg(QWEN_3B)
    work = parallel.Workload(rollout_batch=512, cache_length=4608, prefill_rows=8, prefill_chunk=512,
                             train_micro_batch=16, train_length=4608)
    precision = parallel.Precision(param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16,
                                   cache_dtype=jnp.bfloat16)

    def kv(preset, sizes):
        return parallel.estimate_memory(cfg, sizes, parallel.rules_for(preset), work, precision,
                                        critic=False, reference=False).bytes_of("KV cache")

    per_token = 36 * 1024
    assert kv("fsdp", dict(fsdp=8)) == 64 * 4608 * (per_token + 1) + 64 * 4
    # 2 kv heads cannot be split over tensor=4: the cache is split over batch only (data×fsdp = 2).
    assert kv("fsdp_tensor", dict(fsdp=2, tensor=4)) == 256 * 4608 * (per_token + 1) + 256 * 4
    assert kv("fsdp_tensor", dict(fsdp=4, tensor=2)) == 128 * 4608 * (per_token // 2 + 1) + 128 * 4


def test_logits_and_activation_terms():
    cfg = _cfg(TINY)
    rules = parallel.rules_for("fsdp_tensor")
    mesh = dict(data=1, fsdp=2, tensor=4)
    remat = parallel.estimate_memory(cfg, mesh, rules, SMALL_WORKLOAD, critic=False, reference=False)
    # 3 float32 [b, T, V] buffers, batch split 2 ways and vocab 4 ways.
    assert remat.bytes_of("logits, log-probs, grad") == 3 * (8 // 2) * 32 * (128 // 4) * 4
    no_remat = parallel.estimate_memory(cfg, mesh, rules, parallel.Workload(
        **{**SMALL_WORKLOAD.__dict__, "remat": False}), critic=False, reference=False)
    assert no_remat.bytes_of("activations") > remat.bytes_of("activations (remat)")
    assert remat.peak_bytes == remat.phase_bytes("resident") + max(remat.phase_bytes("rollout"),
                                                                  remat.phase_bytes("train"))


def _qwen7b_ppo(preset, sizes):
    work = parallel.Workload(rollout_batch=512, cache_length=4608, prefill_rows=64, prefill_chunk=512,
                             train_micro_batch=16, train_length=4608)
    precision = parallel.Precision(param_dtype=jnp.bfloat16, master_dtype=jnp.float32,
                                   compute_dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16)
    return parallel.estimate_memory(_cfg(QWEN_7B), sizes, parallel.rules_for(preset), work, precision,
                                    critic=True, reference=True, preset=preset)


def test_check_fits_names_the_biggest_items_and_a_remedy():
    replicated = _qwen7b_ppo("data", dict(data=8))
    with pytest.raises(parallel.MemoryBudgetError) as err:
        parallel.check_fits(replicated, 80 * GIB)
    message = str(err.value)
    assert "does not fit the 80.00 GiB" in message and "preset 'data'" in message
    assert "policy Adam moments 56.74 GiB (resident)" in message  # 8 bytes × 7.6e9 params
    assert "preset 'fsdp'" in message
    sharded = _qwen7b_ppo("fsdp", dict(fsdp=8))
    parallel.check_fits(sharded, 80 * GIB)
    parallel.check_fits(replicated, None)  # memory unknown: nothing to check
    assert "peak = resident + max(rollout, train)" in sharded.table(80 * GIB)


class _DeviceWithoutStats:
    """An accelerator whose allocator reports nothing."""

    platform = "gpu"

    def memory_stats(self):
        return None


def test_device_memory_from_override_device_or_host():
    import os

    assert parallel.device_memory_bytes(override_gb=95) == 95 * GIB
    # CPU devices report no allocator stats: the host's memory, shared by its 8 simulated devices.
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert parallel.device_memory_bytes(jax.devices()[0]) == host // 8
    assert parallel.device_memory_bytes(_DeviceWithoutStats()) is None


def test_report_memory_logs_the_table_then_checks(caplog):
    estimate = _qwen7b_ppo("fsdp", dict(fsdp=8))
    with caplog.at_level(logging.INFO, logger="searchr1_jax"):
        assert parallel.report_memory(estimate, override_gb=80) == 80 * GIB
    assert "memory per device (preset fsdp, mesh data=1×fsdp=8×tensor=1)" in caplog.text
    assert "KV cache" in caplog.text and "device memory" in caplog.text
    with pytest.raises(parallel.MemoryBudgetError, match="does not fit the 40.00 GiB"):
        parallel.report_memory(estimate, override_gb=40)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="searchr1_jax"):
        assert parallel.report_memory(estimate, device=_DeviceWithoutStats()) is None
    assert "fit not checked" in caplog.text
    # On CPU the 7B plan is checked against the host's memory, and refused.
    with pytest.raises(parallel.MemoryBudgetError, match="does not fit"):
        parallel.report_memory(estimate, device=jax.devices()[0])
