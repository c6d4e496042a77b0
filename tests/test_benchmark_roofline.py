"""The rollout benchmarks' roofline cost model (benchmarks/roofline.py), on hand-computed values."""
import os
import sys

import pytest

from searchr1_jax.models.config import ModelConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from roofline import Machine, Shape, rollout_bounds, turns_of  # noqa: E402

# 2 layers, 4 query heads and 2 kv heads of width 8: one slot of attention costs
# 4 * 2 * 4 * 8 = 256 FLOPs and one cached slot is 2 * 2 * 2 * 8 * 4 = 256 bytes.
SHAPE = Shape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, vocab=100, layer_weights=1000)


def test_token_costs_by_hand():
    # Two tokens at positions 0 and 2 see 1 and 3 slots: 2 * (2 * 2 * 1000) + 256 * 4.
    assert SHAPE.token_flops([0, 2]) == 9024
    assert SHAPE.cache_bytes([0, 2]) == 1024
    assert SHAPE.weight_bytes == (2 * 1000 + 32 * 100) * 4


def test_layer_weights_match_the_configs_parameter_count():
    cfg = ModelConfig(family="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
    shape = Shape.of(cfg)
    embeddings_and_norms = 2 * 100 * 32 + 3 * 2 * 32 + 32
    assert shape.layers * shape.layer_weights == cfg.num_params - embeddings_and_norms


def test_turns_are_the_runs_of_policy_tokens():
    assert turns_of([0, 0, 1, 1, 0, 1]) == [(2, 4), (5, 6)]
    assert turns_of([1, 0, 0]) == [(0, 1)]
    assert turns_of([0, 0]) == []


def test_rollout_bounds_by_hand():
    # One row: prompt at 0-1, a turn at 2-3, an observation at 4, a turn at 5.
    bounds = rollout_bounds(SHAPE, Machine(flops=1000.0, bandwidth=100.0),
                            [([7] * 6, [0, 0, 1, 1, 0, 1])])
    # Prompt and observation once: 3 * 4000 + 256 * (1 + 2 + 5) FLOPs.
    assert bounds["kv-cache"].prefill == pytest.approx(14.048)
    # Decode reads 256 * (3 + 4 + 6) cache bytes and the weights at 2 + 1 steps; its FLOPs
    # (34,528 with the logits) take less time than that.
    assert bounds["kv-cache"].decode == pytest.approx((256 * 13 + 3 * 20800) / 100)
    # Re-prefill recomputes positions 0-1 before turn 1 and 0-4 before turn 2.
    assert bounds["re-prefill"].prefill == pytest.approx((8000 + 256 * 3 + 20000 + 256 * 15) / 1000)
    assert bounds["re-prefill"].decode == bounds["kv-cache"].decode
    assert bounds["kv-cache"].total == pytest.approx(14.048 + 657.28)
