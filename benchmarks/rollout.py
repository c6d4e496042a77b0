"""Multi-turn rollout speed: our KV-cache engine vs the original's re-prefill-every-turn loop.

    python benchmarks/rollout.py [--sizes tiny,100m --batch 16 --max-turns 4 --max-new-tokens 128]

Both engines get the same random-weight Qwen2 model (ours exported with `save_hf`, loaded by
`transformers.AutoModelForCausalLM`), the same Search-R1 prompts, the same scripted
retriever (3 passages per query, observations of ~300 tokens) and the same turn limits, and
both decode greedily:

  (a) ours: `searchr1_jax.rollout.RolloutDriver` — one prefill, the KV cache kept across turns,
      each observation appended at its row's own position, stop strings matched in the
      jitted decode loop;
  (b) the original's algorithm on transformers: every turn, `model.generate` (greedy, with
      `stop_strings`) on the whole left-padded context of the still-active rows, so the
      context is prefilled again every turn; then the same action parsing and observations.

The random weights are edited so that the policy searches: the tokens of
"<search> answer </search>" get strong embeddings and each its successor in the LM head, and
the LM-head column of "<search>" is scaled so that a search starts after some random tokens.
The two engines should produce the same tokens; the script reports the fraction that match
(our policy tokens inside the common prefix of each row's two sequences, and whole rows).

Our engine runs in two layouts: on one XLA device, and (when --threads > 1) with its rows
sharded over one XLA CPU device per thread (the host split with
--xla_force_host_platform_device_count, as a mesh of several devices would shard them); the
faster layout stands for ours. transformers runs as it comes, with torch using --threads
threads.

Reported per size: generated (policy) tokens per second of each engine over the timed
rollout (compilation / warm-up excluded and reported apart; each engine runs repeatedly for
~10 s, at most 5 times, and its fastest run counts), and the speedup. The last line is
`speedup: X.XX` for the ~100M model (the last size run).

Also per size, the roofline (benchmarks/roofline.py): the least time our algorithm (KV cache)
and the original's (re-prefill every turn) need for this rollout at this machine's measured
float32 matmul FLOP/s and read bandwidth, each engine's time as a fraction of it, and the
transformers time over our algorithm's bound: the most any KV-cache engine could gain here.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _threads_from_argv(argv) -> int:
    """--threads, read before JAX is imported (XLA reads its flags once)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
    return os.cpu_count() or 1


THREADS = _threads_from_argv(sys.argv)
if THREADS == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
else:
    # One XLA CPU device per thread, so that our engine can also run with its rows sharded
    # over them (the "host devices" layout); the one-device layout uses the first.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={THREADS}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from roofline import Machine, Shape, measure_machine, rollout_bounds  # noqa: E402
from searchr1_jax.data.prompts import base_prompt  # noqa: E402
from searchr1_jax.models import Decoder, save_hf  # noqa: E402
from searchr1_jax.models.config import config_from_hf_dict  # noqa: E402
from searchr1_jax.retrieval.types import Passage  # noqa: E402
from searchr1_jax.rollout import RolloutConfig, RolloutDriver, observation_ids, read_action  # noqa: E402
from searchr1_jax.rollout.observations import corrective_text, passages_text  # noqa: E402
from searchr1_jax.rollout.stops import (STOP_ANSWER, STOP_EOS, STOP_LENGTH, STOP_SEARCH,  # noqa: E402
                                        token_texts)

# Per size: the Qwen2 config and how strongly "<search>" is boosted (chosen so that a turn
# has ~50-70 policy tokens and ~60% of turns search, at both sizes).
SIZES = {
    # The shape of the demo's model (searchr1_jax/demo/build.py: hidden 128, 4 layers, 4 / 2
    # heads), with the benchmark tokenizer's vocabulary and an untied head (edited apart).
    "tiny": dict(search_boost=2.0, vocab_size=2048, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=False),
    # ~98M parameters, Qwen2-shaped (GQA 12/2); ids past the tokenizer's 2k are never
    # produced (their LM-head columns are zero).
    "100m": dict(search_boost=1.5, vocab_size=16384, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                 tie_word_embeddings=False),
}
TOKENIZER_VOCAB = 2048
WORDS = ("the of and in to was is for on as by with he at from that his it an were are which "
         "this be or has had first also its new after who their one but two been not city river "
         "capital country born died film album song team war king river island mountain").split()
SEARCH_CHAIN = ["<search>", "Ġanswer", "Ġ</", "search", ">"]
SEED = 0


# -- the shared inputs --------------------------------------------------------------------------
def synthetic_text(rng: np.random.RandomState, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words)).capitalize() + "."


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (like Qwen's) trained on Search-R1-style text; `</search>` is several
    tokens, the other tags are single added tokens."""
    rng = np.random.RandomState(SEED)
    corpus = [base_prompt(synthetic_text(rng, 8)) for _ in range(50)]
    corpus += [corrective_text("<search>", "</search>", "<answer>", "</answer>")] * 20
    corpus += [f"<think> {synthetic_text(rng, 12)} </think>\n<search> {synthetic_text(rng, 4)} "
               f"</search>" for _ in range(200)]
    corpus += [f'Doc 1(Title: "{synthetic_text(rng, 2)}") {synthetic_text(rng, 80)}' for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - 16, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in
                    ["<search>", "<answer>", "</answer>", "<think>", "</think>", "<information>",
                     "</information>"]])
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|pad|>")


class SyntheticRetriever:
    """`topk` passages of 85 words per query, a deterministic function of the query."""

    def search(self, queries, topk):
        results = []
        for query in queries:
            rng = np.random.RandomState(zlib.crc32(query.encode()))
            results.append([Passage(id=f"{i}", title=synthetic_text(rng, 2)[:-1],
                                    text=synthetic_text(rng, 85), score=1.0 / (i + 1))
                            for i in range(topk)])
        return results


def make_policy(size: str, tokenizer, search_boost: float, init_std: float = 0.05) -> Decoder:
    """Random Qwen2 weights, N(0, init_std) (a little above transformers' 0.02, whose deep
    random stacks map every context to nearly the same hidden direction), edited to search: each
    chain token owns one hidden dimension (its embedding), which the LM head maps to its
    successor; the "<search>" column gets larger random weights elsewhere."""
    shape = {k: v for k, v in SIZES[size].items() if k != "search_boost"}
    hf = transformers.Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    cfg = dataclasses.replace(config_from_hf_dict(hf.to_dict()), hf_config={})
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(SEED)

    def value(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(x.shape, x.dtype)
        if "bias" in name:
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0, init_std, x.shape).astype(np.float32))

    nnx.update(model, jax.tree_util.tree_map_with_path(value, nnx.state(model, nnx.Param)))
    emb = np.array(model.model.embed_tokens[...])
    head = np.array(model.lm_head.kernel[...])
    head[:, len(tokenizer):] = 0.0  # ids the tokenizer lacks: logit 0, never the argmax
    chain = tokenizer.convert_tokens_to_ids(SEARCH_CHAIN)
    assert None not in chain, SEARCH_CHAIN
    hidden, used = emb.shape[1], len(chain) - 1
    # Reserve the first `used` hidden dimensions for the chain: no other token and no layer
    # writes to them, so they are nonzero exactly when the current token is a chain token.
    emb[:, :used] = 0.0
    for layer in model.model.layers:
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            kernel = np.array(proj.kernel[...])
            kernel[:, :used] = 0.0
            proj.kernel[...] = jnp.asarray(kernel)
    head[:used] = 0.0
    for dim, (token, successor) in enumerate(zip(chain, chain[1:])):
        # Large enough to dominate the final RMSNorm: the final hidden state of a chain
        # token is then ~sqrt(hidden) on its dimension and ~0 elsewhere.
        emb[token] = 0.0
        emb[token, dim] = 1000.0
        head[dim, successor] = 10.0 / np.sqrt(hidden)
    # Random logits of every token scale alike with the width; "<search>" gets `search_boost`
    # times the spread of the others, so it wins the argmax in some contexts.
    head[used:, chain[0]] = rng.normal(0, init_std * search_boost, hidden - used)
    model.model.embed_tokens[...] = jnp.asarray(emb)
    model.lm_head.kernel[...] = jnp.asarray(head)
    return model


# -- (a) our engine -----------------------------------------------------------------------------
def our_layouts(model: Decoder, batch: int) -> dict:
    """name -> (mesh or None, the weights placed for it): one device, and (with several CPU
    devices whose count divides the batch) the rows sharded over all of them, the weights
    copied to each."""
    devices = jax.devices()
    layouts = {"1 device": (None, jax.device_put(nnx.state(model), devices[0]))}
    if len(devices) > 1 and devices[0].platform == "cpu" and batch % len(devices) == 0:
        mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,))
        layouts[f"{len(devices)} host devices"] = (
            mesh, jax.device_put(nnx.state(model), NamedSharding(mesh, PartitionSpec())))
    return layouts


def fastest(run, budget_seconds: float = 10.0, most: int = 5):
    """Time `run` (→ (output..., seconds)) repeatedly until `budget_seconds` have passed (at
    least once, at most `most` times) → (the fastest run's outputs as a tuple, its time, the
    number of runs).
    A short rollout varies by ±10% from run to run on a shared machine; a long one runs once."""
    best, spent, runs = None, 0.0, 0
    while runs < most and (runs == 0 or spent < budget_seconds):
        *output, seconds = run()
        spent, runs = spent + seconds, runs + 1
        if best is None or seconds < best[1]:
            best = (tuple(output), seconds)
    return best[0], best[1], runs


def run_ours(driver: RolloutDriver, prompts, retriever, params):
    clock = time.perf_counter()
    trajectory = driver.run(prompts, retriever, jax.random.key(SEED), params=params)
    jax.block_until_ready(trajectory.tokens)
    seconds = time.perf_counter() - clock
    tokens = np.asarray(trajectory.tokens)
    loss_mask = np.asarray(trajectory.loss_mask)
    end = np.asarray(trajectory.response_end)
    rows = [(tokens[b, :end[b]].tolist(), loss_mask[b, :end[b]].tolist()) for b in range(len(prompts))]
    return rows, trajectory, seconds


# -- (b) the original's loop on transformers ----------------------------------------------------
def first_stop(texts, ids, stops, eos_ids):
    """Tokens kept of one generation: up to the token completing a stop string, or an EOS."""
    text = ""
    for k, token in enumerate(ids):
        text += texts[token]
        if token in eos_ids or any(stop in text for stop in stops):
            return ids[:k + 1], k
    return ids, None


def run_transformers(model, tokenizer, prompts, retriever, config: RolloutConfig, token_texts):
    """Search-R1's generation loop: generate on the whole context of the active rows each turn."""
    tags = dict(search_open=config.search_open, search_stop=config.search_stop,
                answer_open=config.answer_open, answer_stop=config.answer_stop)
    corrective = corrective_text(**tags)
    pad, eos = tokenizer.pad_token_id, {tokenizer.eos_token_id}
    rows = [(list(p), [0] * len(p)) for p in prompts]
    done = [False] * len(prompts)
    clock = time.perf_counter()
    for turn in range(config.max_turns + 1):
        final = turn == config.max_turns
        active = [b for b in range(len(prompts)) if not done[b]]
        if not active:
            break
        stops = [config.answer_stop] if final else [config.search_stop, config.answer_stop]
        width = max(len(rows[b][0]) for b in active)
        input_ids = torch.full((len(active), width), pad, dtype=torch.long)
        attention = torch.zeros((len(active), width), dtype=torch.long)
        for i, b in enumerate(active):  # left padding, like the original
            n = len(rows[b][0])
            input_ids[i, width - n:] = torch.tensor(rows[b][0])
            attention[i, width - n:] = 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                 max_new_tokens=config.max_new_tokens, stop_strings=stops,
                                 tokenizer=tokenizer, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        observations = {}
        queries = []
        for i, b in enumerate(active):
            kept, stop_at = first_stop(token_texts, out[i, width:].tolist(), stops, eos)
            rows[b][0].extend(kept)
            rows[b][1].extend([1] * len(kept))
            text = tokenizer.decode(kept, skip_special_tokens=False)
            outcome = (STOP_LENGTH if stop_at is None else STOP_EOS if kept[-1] in eos
                       else STOP_ANSWER if config.answer_stop in text else STOP_SEARCH)
            action = read_action(outcome, text, **tags)
            if action.kind == "answer" or final:
                done[b] = True
            elif action.kind == "search":
                queries.append((b, action.query))
            else:
                observations[b] = corrective
        if final:
            break
        if queries:
            for (b, _), passages in zip(queries, retriever.search([q for _, q in queries], config.topk)):
                observations[b] = passages_text(passages)
        order = sorted(observations)
        obs_ids, _ = observation_ids(tokenizer, [observations[b] for b in order], config.max_obs_tokens)
        for b, ids in zip(order, obs_ids):
            rows[b][0].extend(ids)
            rows[b][1].extend([0] * len(ids))
    return rows, time.perf_counter() - clock


# -- comparison ---------------------------------------------------------------------------------
def agreement(ours, theirs):
    """(fraction of our policy tokens inside the common prefix of the two sequences of their
    row, fraction of rows whose sequences are identical)."""
    matched = total = same_rows = 0
    for (a, mask), (b, _) in zip(ours, theirs):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        matched += sum(mask[:prefix])
        total += sum(mask)
        same_rows += a == b
    return matched / max(total, 1), same_rows / len(ours)


def bench_size(size: str, args, tokenizer, retriever, machine: Machine) -> dict:
    config = RolloutConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                           max_obs_tokens=500, max_prompt_tokens=256, greedy=True, topk=3)
    model = make_policy(size, tokenizer, args.search_boost or SIZES[size]["search_boost"])
    n_params = model.config.num_params
    prompts = [tokenizer.encode(base_prompt(synthetic_text(np.random.RandomState(i), 8)),
                                add_special_tokens=False) for i in range(args.batch)]
    result = dict(size=size, params=n_params, runs={})
    for layout, (mesh, params) in our_layouts(model, len(prompts)).items():
        driver = RolloutDriver(model, tokenizer, config, mesh=mesh)
        clock = time.perf_counter()
        run_ours(driver, prompts, retriever, params)  # compiles
        warm = time.perf_counter() - clock
        (rows, trajectory), seconds, repeats = fastest(
            lambda: run_ours(driver, prompts, retriever, params))
        tokens = int(np.asarray(trajectory.loss_mask).sum())
        bounds = rollout_bounds(Shape.of(model.config), machine, rows)
        bound = bounds["kv-cache"]
        result["runs"][layout] = dict(rows=rows, seconds=seconds, warmup=warm, policy_tokens=tokens,
                                      bounds=bounds,
                                      finish={r: int((trajectory.finish_reason == r).sum())
                                              for r in ("answer", "max_turns", "context_budget")})
        print(f"[{size}] ours, {layout}: {tokens} policy tokens in {seconds:.2f}s (fastest of "
              f"{repeats}; first run incl. "
              f"compilation {warm:.1f}s), {bound.total / seconds:.0%} of our algorithm's roofline; "
              f"searches {int(trajectory.searches.sum())}, mean turns {trajectory.turns.mean():.2f}, "
              f"longest context {int(np.asarray(trajectory.response_end).max())}", flush=True)
    # The faster layout stands for our engine below.
    layout = min(result["runs"], key=lambda name: result["runs"][name]["seconds"])
    best = result["runs"][layout]
    ours, ours_seconds = best["rows"], best["seconds"]
    result.update(layout=layout, ours_seconds=ours_seconds, warmup_ours=best["warmup"],
                  policy_tokens=best["policy_tokens"],
                  obs_tokens=float(np.mean([len(o) for o in observation_ids(
                      tokenizer, [passages_text(p) for p in retriever.search(["q"], 3)], 500)[0]])),
                  finish=best["finish"])
    bounds = best["bounds"]
    result.update(bound_ours=bounds["kv-cache"].total, bound_theirs=bounds["re-prefill"].total)
    print(f"[{size}] roofline: our algorithm needs >= {bounds['kv-cache'].total:.2f}s "
          f"(prompts and observations {bounds['kv-cache'].prefill:.2f}s, decode "
          f"{bounds['kv-cache'].decode:.2f}s), ours ({layout}) ran at "
          f"{bounds['kv-cache'].total / ours_seconds:.0%} of that; re-prefill needs >= "
          f"{bounds['re-prefill'].total:.2f}s", flush=True)
    if args.skip_transformers:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, None, tmp)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    texts = token_texts(tokenizer, model.config.vocab_size)
    clock = time.perf_counter()
    run_transformers(hf_model, tokenizer, prompts[:2], retriever,
                     dataclasses.replace(config, max_turns=0, max_new_tokens=4), texts)
    warm_theirs = time.perf_counter() - clock
    (theirs,), theirs_seconds, their_repeats = fastest(
        lambda: run_transformers(hf_model, tokenizer, prompts, retriever, config, texts))
    their_tokens = sum(sum(mask) for _, mask in theirs)
    token_match, row_match = agreement(ours, theirs)
    result.update(theirs_seconds=theirs_seconds, warmup_theirs=warm_theirs,
                  their_policy_tokens=their_tokens, token_match=token_match, row_match=row_match)
    matches = ", ".join(f"{name} {agreement(run['rows'], theirs)[0]:.1%}"
                        for name, run in result["runs"].items())
    print(f"[{size}] transformers: {their_tokens} policy tokens in {theirs_seconds:.2f}s "
          f"(fastest of {their_repeats}) "
          f"({result['bound_theirs'] / theirs_seconds:.0%} of re-prefill's roofline); "
          f"match: {token_match:.1%} of tokens, {row_match:.0%} of rows identical "
          f"(tokens matched per layout: {matches}); "
          f"the most any kv-cache engine could gain here: "
          f"{theirs_seconds / result['bound_ours']:.2f}x", flush=True)
    return result


def speedup_of(result: dict) -> float:
    """Generated tokens per second of ours over those of transformers."""
    ours = result["policy_tokens"] / result["ours_seconds"]
    return ours / (result["their_policy_tokens"] / result["theirs_seconds"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,100m", help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--batch", type=int, default=16, help="prompts per rollout")
    parser.add_argument("--max-turns", type=int, default=4, help="search turns (then one final turn)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per turn at most")
    parser.add_argument("--search-boost", type=float, default=None,
                        help="std of the '<search>' LM-head column over that of the others "
                             "(larger: earlier searches); default: per size")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="CPU threads of both engines (torch and XLA); default: all cores")
    parser.add_argument("--skip-transformers", action="store_true", help="time our engine only")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    print(f"{datetime.date.today()} {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {args.threads} "
          f"thread(s) per engine; load average {os.getloadavg()[0]:.1f}", flush=True)
    tokenizer = make_tokenizer()
    retriever = SyntheticRetriever()
    machine = measure_machine()
    print(f"machine peaks (XLA, float32): {machine.describe()}", flush=True)
    results = [bench_size(size, args, tokenizer, retriever, machine) for size in sizes]
    print("\n| model | params | engine | policy tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for layout, run in r["runs"].items():
            print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | ours, {layout} | {run['policy_tokens']} | "
                  f"{run['seconds']:.2f} | {run['policy_tokens'] / run['seconds']:.1f} |")
        if "theirs_seconds" in r:
            print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | transformers | {r['their_policy_tokens']} | "
                  f"{r['theirs_seconds']:.2f} | {r['their_policy_tokens'] / r['theirs_seconds']:.1f} |")
    for r in results:
        if "theirs_seconds" in r:
            speedup = speedup_of(r)
            print(f"{r['size']}: speedup {speedup:.2f}x (ours: {r['layout']}), token match {r['token_match']:.1%}, rows "
                  f"identical {r['row_match']:.0%}, observations ~{r['obs_tokens']:.0f} tokens, "
                  f"finish {r['finish']}")
    if "theirs_seconds" in results[-1]:
        print(f"speedup: {speedup_of(results[-1]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
