"""Lower bounds on a rollout's time: what any implementation of an algorithm must compute and
read, at this machine's measured peak FLOP/s and memory bandwidth.

Cost model of one token at position p (0-based) of a row, for a decoder with L layers, H query
heads, KVH key/value heads of width D (float32 unless given):
  FLOPs:  2 × (weights of the layers' matrices) + 4 × L × H × D × (p + 1)   (q·K and probs·V
          over the p + 1 slots it sees), plus 2 × hidden × vocab when its logits are needed;
  bytes:  a decoded token reads its row's keys and values, (p + 1) × L × 2 × KVH × D × 4.
Every decode step also reads all weights once, shared by the rows decoding together; a turn
needs as many steps as its longest row generates.

Two algorithms, both with a KV cache inside a turn:
  kv-cache (ours): the prompt and each observation are computed once (chunks, compute-bound),
      each policy token is one decode step (bandwidth-bound);
  re-prefill (the original): before every turn, each row still going recomputes its whole
      context (prompt, earlier turns and observations), then decodes the turn the same way.
A phase's bound is max(FLOPs / peak FLOP/s, bytes / bandwidth); an algorithm's bound is the
sum over its two phases (chunked prefill, decode).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Machine:
    """flops: float32 matmul FLOP/s; bandwidth: bytes/s read."""

    flops: float
    bandwidth: float

    def describe(self) -> str:
        return f"{self.flops / 1e9:.0f} GFLOP/s, {self.bandwidth / 1e9:.1f} GB/s"


def best_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        clock = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - clock)
    return best


def measure_machine(matmul_size: int = 2048, read_bytes: int = 256 << 20) -> Machine:
    """Peak float32 matmul FLOP/s and read bandwidth (a sum over read_bytes) as XLA achieves
    them on the default device (best of 5)."""
    a = jnp.ones((matmul_size, matmul_size), jnp.float32)
    matmul = best_seconds(jax.jit(lambda x: x @ x), a)
    big = jnp.ones((read_bytes // 4,), jnp.float32)
    read = best_seconds(jax.jit(jnp.sum), big)
    return Machine(flops=2 * matmul_size ** 3 / matmul, bandwidth=read_bytes / read)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The dimensions the cost model needs (from a searchr1_jax ModelConfig)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    layer_weights: int  # elements of one layer's matrices
    bytes_per_value: int = 4

    @classmethod
    def of(cls, cfg, bytes_per_value: int = 4) -> "Shape":
        h, d = cfg.hidden_size, cfg.head_dim
        attention = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2
        return cls(layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                   head_dim=d, hidden=h, vocab=cfg.vocab_size,
                   layer_weights=attention + 3 * h * cfg.intermediate_size,
                   bytes_per_value=bytes_per_value)

    @property
    def weight_bytes(self) -> int:
        """Bytes a decode step reads: the layers' matrices and the LM head."""
        return (self.layers * self.layer_weights + self.hidden * self.vocab) * self.bytes_per_value

    def token_flops(self, positions: np.ndarray) -> float:
        """FLOPs of the tokens at `positions` (no logits)."""
        positions = np.asarray(positions, np.float64)
        per_slot = 4 * self.layers * self.heads * self.head_dim
        return float(len(positions) * 2 * self.layers * self.layer_weights
                     + per_slot * (positions + 1).sum())

    def cache_bytes(self, positions: np.ndarray) -> float:
        """Key/value bytes the tokens at `positions` read."""
        per_slot = self.layers * 2 * self.kv_heads * self.head_dim * self.bytes_per_value
        return float(per_slot * (np.asarray(positions, np.float64) + 1).sum())


@dataclasses.dataclass(frozen=True)
class Bound:
    """Lower bounds in seconds: prefill (prompts, observations, re-read contexts) and decode."""

    prefill: float
    decode: float

    @property
    def total(self) -> float:
        return self.prefill + self.decode


def turns_of(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of policy tokens (mask 1) in a row: its turns."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def rollout_bounds(shape: Shape, machine: Machine, rows) -> dict[str, Bound]:
    """Bounds of the two algorithms (module doc) on one rollout.

    rows: per row (tokens, loss_mask) up to its end; mask 1 on policy tokens, and the row's
    first turn starts after its prompt."""
    decode_flops = decode_bytes = kv_prefill = 0.0
    re_prefill = 0.0
    steps_per_turn: dict[int, int] = {}
    for _, mask in rows:
        turns = turns_of(mask)
        mask = np.asarray(mask)
        policy, other = np.flatnonzero(mask == 1), np.flatnonzero(mask == 0)
        decode_flops += shape.token_flops(policy) + 2 * shape.hidden * shape.vocab * len(policy)
        decode_bytes += shape.cache_bytes(policy)
        kv_prefill += shape.token_flops(other)
        for t, (start, end) in enumerate(turns):
            re_prefill += shape.token_flops(np.arange(start))
            steps_per_turn[t] = max(steps_per_turn.get(t, 0), end - start)
    decode_bytes += sum(steps_per_turn.values()) * shape.weight_bytes
    decode = max(decode_flops / machine.flops, decode_bytes / machine.bandwidth)
    return {"kv-cache": Bound(prefill=kv_prefill / machine.flops, decode=decode),
            "re-prefill": Bound(prefill=re_prefill / machine.flops, decode=decode)}
