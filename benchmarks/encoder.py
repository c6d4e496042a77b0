"""Dense query encoding: our jitted, batched Flax encoder vs transformers (torch), e5-base shape.

    python benchmarks/encoder.py [--batch 256 --length 32 --repeats 3 --threads 2]

Both run a random-weight BERT shaped like e5-base-v2 (hidden 768, 12 layers, 12 heads,
intermediate 3072, vocab 30522), float32, on the same [batch, length] token ids (queries
are ~10-20 tokens with "query: "; our encoder pads them to the 32 bucket), mean pooling and
L2 normalisation included. Ours: `encoder._embed_batch`, the jitted program that
`TextEmbedder` runs per batch (compiled once, outside the timing). Torch: `BertModel` under
`torch.inference_mode()`, as the original's encoder (fp32 here; it runs fp16 on GPU).
Each figure is the best of `--repeats` batches. On an accelerator JAX picks it up unchanged.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

E5_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")


def best_of(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from searchr1_jax.retrieval.encoder import BertConfig, BertEncoder, _embed_batch

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, args.length + 1, size=args.batch)
    ids = rng.integers(1000, E5_BASE["vocab_size"], size=(args.batch, args.length)).astype(np.int32)
    mask = (np.arange(args.length)[None, :] < lengths[:, None]).astype(np.int32)
    config = BertConfig(vocab_size=E5_BASE["vocab_size"], hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
    graphdef, state = nnx.split(BertEncoder(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    run = lambda: jax.block_until_ready(_embed_batch(graphdef, "mean", state, ids, mask))  # noqa: E731
    start = time.perf_counter()
    ours_out = np.asarray(run())
    compile_s = time.perf_counter() - start
    ours = best_of(args.repeats, run)
    rows = [
        ("device", f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"),
        ("ours: jitted Flax encoder, float32", f"{ours:.2f} s per batch of {args.batch} = {args.batch / ours:,.0f} queries/s "
                                               f"(first call incl. compile {compile_s:.1f} s)"),
    ]
    if not args.no_torch:
        import torch
        from transformers import BertConfig as HFBertConfig, BertModel

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        model = BertModel(HFBertConfig(**E5_BASE), add_pooling_layer=False).eval()
        tids, tmask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

        def torch_run():
            with torch.inference_mode():
                hidden = model(input_ids=tids, attention_mask=tmask).last_hidden_state
                pooled = (hidden * tmask[..., None]).sum(1) / tmask.sum(1, keepdim=True)
                return torch.nn.functional.normalize(pooled, dim=-1)

        torch_run()
        reference = best_of(args.repeats, torch_run)
        rows += [
            (f"transformers BertModel (torch, {args.threads} threads), float32",
             f"{reference:.2f} s per batch = {args.batch / reference:,.0f} queries/s"),
            ("ours / torch", f"{reference / ours:.2f}x"),
        ]
    print(f"\n{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}  "
          f"e5-base shape, random weights, batch {args.batch}, padded length {args.length}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    assert np.isfinite(ours_out).all()


if __name__ == "__main__":
    main()
