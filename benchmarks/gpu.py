"""Accelerator figures in one run: decode against the HBM roofline, training MFU with fused
and naive attention, prefill, and transformers `generate` on the same GPU.

    PYTHONPATH=. python benchmarks/gpu.py           # a GPU machine; at most ~8 minutes on an H200
    PYTHONPATH=. python benchmarks/gpu.py --smoke   # CPU, tiny shapes, well under a minute (a test)

Machine (measured first, by XLA on the device): copy bandwidth (a 2 GiB bf16 array read
and written once, bytes moved over time) and the bf16 matmul peak (8192³, f32
accumulation), best of 5.

(a) decode: a random-weight model of Qwen2.5-3B's shape in bf16 (weights, activations, KV
    cache), batches of 64 and 256 rows whose prompts hold 512-1536 random tokens (mean
    1,024; rows of a rollout differ in length), 128 greedy new tokens per row with no stop
    string and no EOS, through `RolloutEngine.decode` (one jitted loop; its compacted
    phases are skipped, as no row stops early here). Tokens/s, and the roofline: per step
    all weights once plus each row's keys and values for its own positions, over the copy
    bandwidth; ours as a fraction of it. Once with the backend's attention policy ("auto":
    flash on a GPU, whose decode reads only each row's used slots) and, time permitting,
    with the naive policy (every row reads the call's whole slot window).
(b) training: one micro-batch of a Qwen2.5-1.5B shape at T = 4,096 (bf16 weights, remat),
    forward and backward of the teacher-forced log-probs (`train_step.sequence_logprobs`),
    per attention policy (flash, cudnn, naive). MFU = model FLOPs (6 × matmul parameters
    per token incl. the LM head, plus causal attention 6 · L · H · D · (t + 1) per token t;
    rematerialisation not counted) / time / the measured bf16 peak.
(c) prefill: the engine's prefill of (a)'s prompts, real prompt tokens per second.
(d) transformers: `generate` (greedy, bf16, sdpa attention) on the same prompts
    (left-padded), decode tokens/s as generate(128) minus generate(1), and its prefill
    tokens/s from generate(1). It runs first and frees its memory; JAX allocates on demand.

Every part is timed after a compile/warm-up run (compile seconds printed). A part that fails
prints its error and the script goes on. Order: (d), machine, (a)+(c) with the backend's
policy, (b), then (a) with the naive policy; a part starts only if the --budget (420 s of
wall clock) still holds the longest part of its kind so far, else it prints "skipped".
Output: markdown tables, then "done in N s".
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from roofline import Shape, best_seconds  # noqa: E402
from searchr1_jax.models import Decoder  # noqa: E402
from searchr1_jax.models import attention as attention_module  # noqa: E402
from searchr1_jax.models.config import config_from_hf_dict  # noqa: E402
from searchr1_jax.models.decoder import set_attention  # noqa: E402
from searchr1_jax.rollout import engine as engine_module  # noqa: E402
from searchr1_jax.rollout.engine import RolloutEngine, chunk_width  # noqa: E402
from searchr1_jax.rollout.sampling import SamplingParams  # noqa: E402
from searchr1_jax.rollout.stops import build_stop_table  # noqa: E402
from searchr1_jax.train_step import SequenceBatch, sequence_logprobs  # noqa: E402

SHAPES = {
    # Qwen/Qwen2.5-3B's config.json (3.09B parameters, tied embeddings).
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       tie_word_embeddings=True, rope_theta=1e6),
    # Qwen/Qwen2.5-1.5B's config.json (1.54B parameters, tied embeddings).
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, rope_theta=1e6),
    # --smoke: one layer of the demo model's width (compiles in seconds on a CPU).
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
SEED = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run measures (the GPU defaults, or --smoke's tiny ones)."""

    decode_shape: str = "qwen2.5-3b"
    batches: tuple[int, ...] = (64, 256)
    context: tuple[int, int] = (512, 1536)  # prompt lengths, uniform in [low, high]
    new_tokens: int = 128
    decode_policies: tuple[str, ...] = ("auto", "naive")
    train_shape: str = "qwen2.5-1.5b"
    train_length: int = 4096
    train_batch: int = 1
    train_policies: tuple[str, ...] = ("gpu", "cudnn", "naive")
    copy_bytes: int = 2 << 30
    matmul_size: int = 8192
    budget: float = 420.0  # wall-clock seconds for the whole run (parts that would overrun are skipped)


SMOKE = Plan(decode_shape="tiny", batches=(4,), context=(24, 72), new_tokens=8,
             decode_policies=("auto", "gpu"), train_shape="tiny", train_length=64,
             train_policies=("gpu", "naive"), copy_bytes=64 << 20, matmul_size=512,
             budget=240.0)


def hf_config(shape: str):
    import transformers
    return transformers.Qwen2Config(**SHAPES[shape], bos_token_id=None, eos_token_id=None,
                                    pad_token_id=0)


def model_config(shape: str):
    return dataclasses.replace(config_from_hf_dict(hf_config(shape).to_dict()), hf_config={})


def measure_machine(plan: Plan) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    x = jnp.ones((plan.copy_bytes // 2,), jnp.bfloat16)
    copy = best_seconds(jax.jit(lambda a: a + 1), x)
    n = plan.matmul_size
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = best_seconds(jax.jit(lambda m: jnp.dot(m, m, preferred_element_type=jnp.float32)), a)
    del x, a
    return dict(bandwidth=2 * plan.copy_bytes / copy, flops=2 * n ** 3 / matmul)


def prompts_for(plan: Plan, batch: int, vocab: int):
    """Right-padded prompts [batch, width], their masks and lengths (the same for every run)."""
    rng = np.random.RandomState(SEED + batch)
    lengths = rng.randint(plan.context[0], plan.context[1] + 1, batch)
    width = chunk_width(int(lengths.max()))
    tokens = rng.randint(0, vocab, (batch, width)).astype(np.int32)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    return tokens * mask, mask, lengths


def decode_roofline(shape: Shape, bandwidth: float, lengths, new_tokens: int) -> float:
    """Tokens/s if each decode step read only the weights and each row's own slots."""
    positions = np.concatenate([np.arange(n, n + new_tokens) for n in lengths])
    step_bytes = new_tokens * shape.weight_bytes + shape.cache_bytes(positions)
    return len(lengths) * new_tokens * bandwidth / step_bytes


def run_decode(plan: Plan, policy: str, batch: int, params_cache: dict) -> dict:
    """Prefill and decode through the rollout engine; see the module doc, (a) and (c)."""
    cfg = model_config(plan.decode_shape)
    if "model" not in params_cache:
        params_cache["model"] = Decoder(cfg, rngs=nnx.Rngs(SEED), dtype=jnp.bfloat16,
                                        param_dtype=jnp.bfloat16)
    model = nnx.clone(params_cache["model"])
    set_attention(model, policy)
    tokens, mask, lengths = prompts_for(plan, batch, cfg.vocab_size)
    budget = int(lengths.max()) + plan.new_tokens + 1
    engine = RolloutEngine(
        model, capacity=max(budget + 1, tokens.shape[1]), budget=budget,
        max_new_tokens=plan.new_tokens, sampling=SamplingParams(greedy=True),
        # No token text holds a stop-string character: nothing stops before new_tokens.
        stop_table=build_stop_table(["x"] * cfg.vocab_size, "</search>", "</answer>"), eos_ids=[])
    params = nnx.state(model)
    everyone = np.ones(batch, bool)
    timings = {}
    for attempt in ("compile", "timed"):
        clock = time.perf_counter()
        state = jax.block_until_ready(engine.prefill(params, tokens, mask, 1))
        timings[f"{attempt}_prefill"] = time.perf_counter() - clock
        clock = time.perf_counter()
        state, result = engine.decode(params, state, everyone, jax.random.key(SEED),
                                      search_enabled=False, lengths=lengths)
        count = np.asarray(jax.block_until_ready(result.count))
        timings[f"{attempt}_decode"] = time.perf_counter() - clock
        if not (count == plan.new_tokens).all():
            raise AssertionError(f"rows decoded {sorted(set(count.tolist()))} tokens, not {plan.new_tokens}")
        del state, result
    return dict(prefill_tokens_per_second=float(lengths.sum()) / timings["timed_prefill"],
                tokens_per_second=batch * plan.new_tokens / timings["timed_decode"],
                compile=timings["compile_prefill"] + timings["compile_decode"]
                - timings["timed_prefill"] - timings["timed_decode"],
                lengths=lengths, shape=Shape.of(cfg, bytes_per_value=2))


def run_transformers(plan: Plan, batch: int) -> dict:
    """transformers' generate on the same prompts, left-padded; see the module doc, (d)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(SEED)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_config(plan.decode_shape)).to(torch.bfloat16).eval()
    right, mask, lengths = prompts_for(plan, batch, model.config.vocab_size)
    width = right.shape[1]
    left = np.zeros_like(right)
    left_mask = np.zeros_like(mask)
    for b, n in enumerate(lengths):
        left[b, width - n:], left_mask[b, width - n:] = right[b, :n], 1
    ids = torch.as_tensor(left, device=device)
    attn = torch.as_tensor(left_mask, device=device)

    def generate(n: int) -> float:
        clock = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == width + n, out.shape
        return time.perf_counter() - clock

    generate(2)  # warm-up
    first, whole = generate(1), generate(plan.new_tokens)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(tokens_per_second=batch * (plan.new_tokens - 1) / (whole - first),
                prefill_tokens_per_second=float(lengths.sum()) / first)


def train_flops(shape: Shape, batch: int, length: int) -> float:
    """Model FLOPs of one forward and backward pass (3 × forward) of `batch` causal rows."""
    forward = shape.token_flops(np.arange(length)) + 2 * shape.hidden * shape.vocab * length
    return 3.0 * batch * forward


def run_training(plan: Plan, policy: str, model_cache: dict) -> dict:
    """One micro-batch forward and backward; see the module doc, (b)."""
    cfg = model_config(plan.train_shape)
    if "model" not in model_cache:
        model_cache["model"] = Decoder(cfg, rngs=nnx.Rngs(SEED), dtype=jnp.bfloat16,
                                       param_dtype=jnp.bfloat16, remat=True)
    model = nnx.clone(model_cache["model"])
    set_attention(model, policy)
    b, t = plan.train_batch, plan.train_length
    rng = np.random.RandomState(SEED)
    tokens = rng.randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
    attn = np.ones((b, t), np.int32)
    attn[:, : t // 32] = 0  # a little left padding, as PPO rows have
    positions = np.maximum(np.cumsum(attn, -1) - 1, 0).astype(np.int32)
    seq = SequenceBatch(*(jnp.asarray(x) for x in (tokens, attn, positions, attn.astype(np.float32))))
    graphdef, params = nnx.split(model)

    def loss(p):
        logp, _ = sequence_logprobs(nnx.merge(graphdef, p), seq)
        return -jnp.sum(logp * seq.loss_mask[:, :]) / jnp.sum(seq.loss_mask)

    step = jax.jit(jax.value_and_grad(loss))
    clock = time.perf_counter()
    value, _ = jax.block_until_ready(step(params))
    compile_seconds = time.perf_counter() - clock
    seconds = best_seconds(step, params, repeats=3)
    if not np.isfinite(float(value)):
        raise AssertionError(f"loss is {float(value)}")
    return dict(seconds=seconds, compile=compile_seconds - seconds,
                flops=train_flops(Shape.of(cfg, bytes_per_value=2), b, t), loss=float(value))


class Budget:
    """Wall-clock seconds for the whole run: a part starts only if the seconds left exceed
    the longest part of its kind so far (or `first_guess` before any ran)."""

    def __init__(self, seconds: float, first_guess: float):
        self.start, self.seconds, self.first_guess = time.perf_counter(), seconds, first_guess
        self.longest: dict[str, float] = {}

    def allows(self, kind: str) -> bool:
        left = self.seconds - (time.perf_counter() - self.start)
        return left > self.longest.get(kind, self.first_guess)

    def run(self, kind: str, what: str, fn, *args):
        """fn(*args), or None after printing why it failed (a failing part must not lose the
        others' figures)."""
        clock = time.perf_counter()
        try:
            return fn(*args)
        except Exception as error:
            print(f"\n{what} failed: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc(limit=3)
            return None
        finally:
            self.longest[kind] = max(self.longest.get(kind, 0.0), time.perf_counter() - clock)


def print_decode_row(plan: Plan, policy: str, batch: int, ours: dict, theirs: dict | None,
                     bandwidth: float) -> None:
    bound = decode_roofline(ours["shape"], bandwidth, ours["lengths"], plan.new_tokens)
    rate = ours["tokens_per_second"]
    hf = (f"{theirs['tokens_per_second']:,.0f} | {rate / theirs['tokens_per_second']:.2f}x | "
          f"{theirs['prefill_tokens_per_second']:,.0f}" if theirs else "– | – | –")
    print(f"| {attention_module.policy(policy).name} | {batch} | {rate:,.0f} | {bound:,.0f} | "
          f"{rate / bound:.0%} | {ours['prefill_tokens_per_second']:,.0f} | {hf} | "
          f"{ours['compile']:.0f} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--parts", default="abcd", help="which of a, b, c, d to run (c comes with a)")
    parser.add_argument("--budget", type=float, default=None,
                        help="wall-clock seconds for the whole run (default 420; smoke 240)")
    parser.add_argument("--train-batch", type=int, default=None, help="rows per training micro-batch")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else Plan()
    if args.budget is not None:
        plan = dataclasses.replace(plan, budget=args.budget)
    if args.train_batch is not None:
        plan = dataclasses.replace(plan, train_batch=args.train_batch)
    budget = Budget(plan.budget, first_guess=plan.budget / 8)
    device = jax.devices()[0]
    import torch
    import transformers
    print(f"{datetime.date.today()} {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; attention policy "
          f"'auto' = {attention_module.policy('auto').name!r}", flush=True)

    theirs = {}
    if "d" in args.parts:
        for batch in plan.batches:
            theirs[batch] = budget.run("d", f"(d) transformers batch {batch}", run_transformers, plan, batch)

    machine = measure_machine(plan)
    print(f"machine: copy bandwidth {machine['bandwidth'] / 1e9:,.0f} GB/s, bf16 matmul "
          f"{machine['flops'] / 1e12:,.1f} TFLOP/s (measured)", flush=True)
    # No row stops before new_tokens here, so the engine's compacted phases would never run.
    engine_module.compact_sizes = lambda rows, shards: ()
    decode_cache: dict = {}

    def decode_table(policies):
        for policy in policies:
            for batch in plan.batches:
                if not budget.allows("a"):
                    print(f"| {policy} | {batch} | skipped: the {plan.budget:.0f} s budget would run out |")
                    continue
                ours = budget.run("a", f"(a) decode {policy} batch {batch}", run_decode, plan, policy,
                                  batch, decode_cache)
                if ours is not None:
                    print_decode_row(plan, policy, batch, ours, theirs.get(batch), machine["bandwidth"])

    if "a" in args.parts:
        print(f"\n(a) decode and (c) prefill: {plan.decode_shape}, bf16, prompts of "
              f"{plan.context[0]}-{plan.context[1]} tokens, {plan.new_tokens} new tokens per row")
        print("\n| policy | batch | decode tok/s | roofline tok/s | of roofline | prefill tok/s "
              "| transformers decode tok/s | ours / transformers | transformers prefill tok/s | compile s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        decode_table(plan.decode_policies[:1])

    if "b" in args.parts:
        print(f"\n(b) training micro-batch: {plan.train_shape}, {plan.train_batch} x "
              f"{plan.train_length} tokens, bf16, remat, forward + backward")
        print("\n| attention policy | step s | model TFLOP | TFLOP/s | MFU | compile s |")
        print("|---|---|---|---|---|---|")
        train_cache: dict = {}
        for policy in plan.train_policies:
            if not budget.allows("b"):
                print(f"| {policy} | skipped: the {plan.budget:.0f} s budget would run out |")
                continue
            result = budget.run("b", f"(b) training {policy}", run_training, plan, policy, train_cache)
            if result is None:
                continue
            rate = result["flops"] / result["seconds"]
            print(f"| {policy} | {result['seconds']:.3f} | {result['flops'] / 1e12:.3g} | "
                  f"{rate / 1e12:,.3g} | {rate / machine['flops']:.0%} | {result['compile']:.0f} |",
                  flush=True)
        del train_cache

    if "a" in args.parts and len(plan.decode_policies) > 1:
        print("\n(a) decode, other attention policies (same columns)\n")
        print("| policy | batch | decode tok/s | roofline tok/s | of roofline | prefill tok/s "
              "| transformers decode tok/s | ours / transformers | transformers prefill tok/s | compile s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        decode_table(plan.decode_policies[1:])
    print(f"\ndone in {time.perf_counter() - budget.start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
