"""Decode throughput against the memory roofline: our jitted KV-cache decode loop vs
transformers' `generate`, on one accelerator.

    python benchmarks/decode.py                    # Qwen2.5-3B shape, bf16, batches 64 and 256
    python benchmarks/decode.py --shape tiny --batches 4 --context 96 --new-tokens 16  # smoke run

Both engines get a random-weight Qwen2 model of the same shape (bf16 weights, activations and
KV cache), B prompts of `context` random tokens, and decode `new_tokens` tokens per row
greedily with no stop string and no EOS, so every row decodes every step.

Reported per batch size:
  ours          prefill seconds, then decode tokens/s (B × new_tokens tokens over the
                decode loop: `RolloutEngine.decode`, one jitted while loop);
  roofline      the bytes any decoder must read per step, all weights once plus each row's
                keys and values for its own positions, at the device's read bandwidth
                (measured, or --bandwidth), as tokens/s; ours as a fraction of it;
  transformers  decode tokens/s of `generate`: B × (new_tokens - 1) tokens over the time of
                generate(new_tokens) minus that of generate(1) (the prefill and first token).
transformers runs first and frees its memory, and JAX allocates on demand, so the two never
hold the device's memory at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from roofline import Shape, measure_machine  # noqa: E402
from searchr1_jax.models import Decoder  # noqa: E402
from searchr1_jax.models.config import config_from_hf_dict  # noqa: E402
from searchr1_jax.rollout.engine import RolloutEngine, chunk_width  # noqa: E402
from searchr1_jax.rollout.sampling import SamplingParams  # noqa: E402
from searchr1_jax.rollout.stops import build_stop_table  # noqa: E402

SHAPES = {
    # Qwen/Qwen2.5-3B's config.json (3.09B parameters, tied embeddings).
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
SEED = 0


def hf_config(shape: str) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(**SHAPES[shape], bos_token_id=None, eos_token_id=None,
                                    pad_token_id=0)


def roofline_tokens_per_second(shape: Shape, bandwidth: float, batch: int, context: int,
                               new_tokens: int) -> float:
    """Tokens/s if every decode step only read the weights and each row's own cache slots."""
    positions = np.arange(context, context + new_tokens)
    step_bytes = new_tokens * shape.weight_bytes + batch * shape.cache_bytes(positions)
    return batch * new_tokens * bandwidth / step_bytes


def run_ours(shape: str, batch: int, context: int, new_tokens: int) -> dict:
    cfg = dataclasses.replace(config_from_hf_dict(hf_config(shape).to_dict()), hf_config={})
    model = Decoder(cfg, rngs=nnx.Rngs(SEED), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = nnx.state(model)
    budget = context + new_tokens + 1
    width = chunk_width(context)  # prompts are appended in whole pieces: right-padded to this
    engine = RolloutEngine(
        model, capacity=max(budget + 1, width), budget=budget, max_new_tokens=new_tokens,
        sampling=SamplingParams(greedy=True),
        # No token text holds a stop-string character: nothing stops before new_tokens.
        stop_table=build_stop_table(["x"] * cfg.vocab_size, "</search>", "</answer>"),
        eos_ids=[])
    prompts = np.zeros((batch, width), np.int32)
    prompts[:, :context] = np.random.RandomState(SEED).randint(0, cfg.vocab_size, (batch, context))
    mask = (np.arange(width) < context)[None].repeat(batch, axis=0).astype(np.int32)
    lengths = np.full(batch, context)
    everyone = np.ones(batch, bool)
    timings = {}
    for attempt in ("compile", "timed"):
        clock = time.perf_counter()
        state = jax.block_until_ready(engine.prefill(params, prompts, mask, 1))
        timings[f"{attempt}_prefill"] = time.perf_counter() - clock
        clock = time.perf_counter()
        state, result = engine.decode(params, state, everyone, jax.random.key(SEED),
                                      search_enabled=False, lengths=lengths)
        count = np.asarray(jax.block_until_ready(result.count))
        timings[f"{attempt}_decode"] = time.perf_counter() - clock
        if not (count == new_tokens).all():
            raise AssertionError(f"rows decoded {sorted(set(count.tolist()))} tokens, not {new_tokens}")
        del state, result
    return dict(prefill=timings["timed_prefill"], decode=timings["timed_decode"],
                compile=timings["compile_prefill"] + timings["compile_decode"],
                tokens_per_second=batch * new_tokens / timings["timed_decode"],
                shape=Shape.of(cfg, bytes_per_value=2))


def run_transformers(shape: str, batch: int, context: int, new_tokens: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(SEED)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_config(shape)).to(torch.bfloat16).eval()
    ids = torch.as_tensor(np.random.RandomState(SEED).randint(0, model.config.vocab_size,
                                                              (batch, context)), device=device)

    def generate(n: int) -> float:
        clock = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == context + n, out.shape
        return time.perf_counter() - clock

    generate(2)  # warm-up
    first, whole = generate(1), generate(new_tokens)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(tokens_per_second=batch * (new_tokens - 1) / (whole - first), prefill=first)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-3b", choices=list(SHAPES))
    parser.add_argument("--batches", default="64,256", help="comma-separated batch sizes")
    parser.add_argument("--context", type=int, default=1024,
                        help="prompt tokens per row (a multiple of 128, or at most 128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per row")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="device read bandwidth in GB/s (default: measured)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    machine = measure_machine(read_bytes=(2 << 30) if device.platform == "gpu" else (256 << 20))
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else machine.bandwidth
    print(f"{datetime.date.today()} {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; read bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s ({'given' if args.bandwidth else 'measured'}); "
          f"{args.shape}, context {args.context}, {args.new_tokens} new tokens, bf16", flush=True)
    print("\n| batch | ours prefill s | ours decode tok/s | roofline tok/s | ours / roofline "
          "| transformers decode tok/s | ours / transformers | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        theirs = None if args.skip_transformers else run_transformers(
            args.shape, batch, args.context, args.new_tokens)
        ours = run_ours(args.shape, batch, args.context, args.new_tokens)
        bound = roofline_tokens_per_second(ours["shape"], bandwidth, batch, args.context,
                                           args.new_tokens)
        their_rate = f"{theirs['tokens_per_second']:,.0f}" if theirs else "–"
        ratio = f"{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x" if theirs else "–"
        print(f"| {batch} | {ours['prefill']:.2f} | {ours['tokens_per_second']:,.0f} | {bound:,.0f} | "
              f"{ours['tokens_per_second'] / bound:.0%} | {their_rate} | {ratio} | "
              f"{ours['compile']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
