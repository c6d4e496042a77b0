"""The multi-turn rollout engine end to end, on tiny random decoders and a scripted retriever.

Two policies:
  * `policy`: a random Qwen2 decoder whose weights are nudged so that tags are likely: a few
    tag tokens have strong embeddings and a strong successor in the LM head ("<search>" →
    " capital" → " </" "search" ">", "<answer>" → " Paris" " " "</answer>"), and the opening
    tags get large random LM-head columns, so the random context decides when a chain starts.
    Everything else is random, so the greedy trajectories mix searches, answers and invalid
    actions, and attention over the whole context matters.
  * `scripted`: a decoder whose layers are zero, so the next token depends only on the current
    one (a successor table in the LM head): its trajectories are known in advance, token by
    token, which makes a hand-checked trajectory possible.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from searchr1_jax import parallel
from searchr1_jax.models import Decoder
from searchr1_jax.models.config import config_from_hf_dict
from searchr1_jax.models.decoder import set_attention
from searchr1_jax.parallel.sharding import place_array
from searchr1_jax.retrieval.observation import format_passages, wrap_information
from searchr1_jax.retrieval.types import Passage
from searchr1_jax.infer import episode_segments, render_episode, stream_episode
from searchr1_jax.rollout import RolloutConfig, RolloutDriver
from searchr1_jax.rollout import engine as engine_module
from searchr1_jax.rollout.actions import ANSWER, INVALID, SEARCH
from test_rollout_units import CORRECTIVE, make_tokenizer

VOCAB = 528  # model vocabulary, larger than the tokenizer's 521 like Qwen's
PROMPTS = ["Question 0: where is Paris?", "Question 1: where is the capital?", "What is Rome?",
           "Question 3: a city", "France", "Italy, the river?", "Question 6: Berlin", "search me"]


class ScriptedRetriever:
    """Two passages per query, derived from its text; records every call."""

    def __init__(self):
        self.calls = []

    def search(self, queries, topk):
        self.calls.append(list(queries))
        return [[Passage(id=f"{q}-{i}", title=f"{q} {i}", text=f"The {q} is number {i}.")
                 for i in range(topk)] for q in queries]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _config(tokenizer, hidden, intermediate, layers, heads, kv_heads):
    hf = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  num_key_value_heads=kv_heads, eos_token_id=tokenizer.eos_token_id)
    return config_from_hf_dict(hf.to_dict())


def _decoder(cfg, kernel_std, seed=0):
    """A Decoder with N(0, kernel_std) matrices, zero biases and unit norm scales (built from
    numpy without running the initializers, which are slow to run op by op on CPU)."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(seed)

    def value(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(x.shape, x.dtype)
        if "bias" in name or kernel_std == 0:
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0, kernel_std, x.shape), x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(value, nnx.state(model, nnx.Param)))
    return model


def _set_chains(model, tokenizer, chains, scale):
    """One embedding dimension per chain token; the LM head maps it to its successor."""
    emb = np.array(model.model.embed_tokens[...])
    head = np.array(model.lm_head.kernel[...])
    dim = 0
    for chain in chains:
        ids = tokenizer.convert_tokens_to_ids(chain)
        assert None not in ids, chain
        for token, successor in zip(ids, ids[1:]):
            emb[token] = 0.0
            emb[token, dim] = 8.0
            head[dim] = 0.0
            head[dim, successor] = scale
            dim += 1
    model.model.embed_tokens[...] = jnp.asarray(emb)
    model.lm_head.kernel[...] = jnp.asarray(head)
    return dim


@pytest.fixture(scope="module")
def policy(tokenizer):
    cfg = _config(tokenizer, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
    model = _decoder(cfg, kernel_std=0.15, seed=0)
    rng = np.random.RandomState(0)
    used = _set_chains(model, tokenizer, [["<search>", "Ġcapital", "Ġ</", "search", ">"],
                                          ["<answer>", "ĠParis", "Ġ", "</answer>"]], scale=4.0)
    head = np.array(model.lm_head.kernel[...])
    for tag in ("<search>", "<answer>"):
        head[used:, tokenizer.convert_tokens_to_ids(tag)] = rng.normal(0, 1.0, 64 - used)
    model.lm_head.kernel[...] = jnp.asarray(head)
    return model


GREEDY = RolloutConfig(max_turns=3, max_new_tokens=16, max_obs_tokens=96, max_prompt_tokens=32,
                       greedy=True, topk=2)


def _prompt_ids(tokenizer, texts=PROMPTS):
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@pytest.fixture(scope="module")
def greedy_driver(policy, tokenizer):
    return RolloutDriver(policy, tokenizer, GREEDY)


@pytest.fixture(scope="module")
def greedy_run(greedy_driver, tokenizer):
    retriever = ScriptedRetriever()
    trajectory = greedy_driver.run(_prompt_ids(tokenizer), retriever, jax.random.key(0))
    return trajectory, retriever


def _reference_rollout(model, tokenizer, prompts, config, width=256):
    """Greedy multi-turn generation that recomputes every row's whole context for every token
    (rows step together only to batch the forward passes). Returns per row (tokens, policy
    mask, finish reason, searches)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, m))
    retriever = ScriptedRetriever()
    rows = [dict(context=list(p), mask=[0] * len(p), turn=0, generated=[], finish=None, searches=0)
            for p in prompts]
    while any(r["finish"] is None for r in rows):
        tokens = np.zeros((len(rows), width), np.int32)
        for b, r in enumerate(rows):
            tokens[b, :len(r["context"])] = r["context"]
        lengths = np.array([len(r["context"]) for r in rows])
        mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
        logits = np.asarray(forward(state, tokens, mask))[np.arange(len(rows)), lengths - 1]
        for b, r in enumerate(rows):
            if r["finish"] is not None:
                continue
            token = int(np.argmax(logits[b]))
            r["generated"].append(token)
            r["context"].append(token)
            r["mask"].append(1)
            final = r["turn"] == config.max_turns
            text = tokenizer.decode(r["generated"], skip_special_tokens=False)
            if not ((not final and "</search>" in text) or "</answer>" in text
                    or token == tokenizer.eos_token_id or len(r["generated"]) == config.max_new_tokens):
                continue
            r["turn"] += 1
            r["generated"] = []
            if "</answer>" in text and "<answer>" in text[:text.index("</answer>")]:
                r["finish"] = "answer"
                continue
            if final:
                r["finish"] = "max_turns"
                continue
            if "</search>" in text and "<search>" in text[:text.index("</search>")]:
                head = text[:text.index("</search>")]
                query = head[head.rindex("<search>") + len("<search>"):].strip()
                passages = retriever.search([query], config.topk)[0]
                observation = wrap_information(format_passages(passages))
                r["searches"] += 1
            else:
                observation = CORRECTIVE
            obs_ids = tokenizer.encode(observation, add_special_tokens=False)
            assert len(obs_ids) <= config.max_obs_tokens
            r["context"] += obs_ids
            r["mask"] += [0] * len(obs_ids)
    assert max(len(r["context"]) for r in rows) <= width
    return [(r["context"], r["mask"], r["finish"], r["searches"]) for r in rows]


def test_greedy_kv_cache_rollout_equals_full_recompute_reference(policy, tokenizer, greedy_run):
    trajectory, retriever = greedy_run
    tokens = np.asarray(trajectory.tokens)
    loss_mask = np.asarray(trajectory.loss_mask)
    end = np.asarray(trajectory.response_end)
    reference = _reference_rollout(policy, tokenizer, _prompt_ids(tokenizer), GREEDY)
    for b, (want, want_mask, want_finish, want_searches) in enumerate(reference):
        assert tokens[b, :end[b]].tolist() == want, f"row {b}"
        assert loss_mask[b, :end[b]].tolist() == want_mask, f"row {b}"
        assert (trajectory.finish_reason[b], trajectory.searches[b]) == (want_finish, want_searches)
    # The rollout exercised every path: searches, answers, invalid actions, several turns.
    assert trajectory.searches.sum() >= 3 and (trajectory.finish_reason == "answer").sum() >= 3
    assert (trajectory.valid_actions < trajectory.turns).sum() >= 2
    assert trajectory.turns.max() == GREEDY.max_turns + 1
    # One retriever call per turn that had searches, each with all of that turn's queries.
    assert sum(map(len, retriever.calls)) == trajectory.searches.sum()
    assert len(retriever.calls) <= GREEDY.max_turns


def _policy_segments(trajectory):
    """Per row, the lengths of its runs of policy tokens: the tokens it decoded in each turn."""
    runs = []
    for row in np.asarray(trajectory.loss_mask):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))
        runs.append((edges[1::2] - edges[::2]).tolist())
    return runs


@pytest.fixture
def loop_batches(monkeypatch):
    """The batch sizes that decode loops were traced for (the compacted phases included)."""
    sizes = set()
    real_loop = engine_module.RolloutEngine._turn_loop
    monkeypatch.setattr(engine_module.RolloutEngine, "_turn_loop",
                        lambda self, *a: sizes.add(a[6].shape[0]) or real_loop(self, *a))
    return sizes


def test_compacted_decode_phases_give_the_same_greedy_rollout(policy, tokenizer, greedy_run, loop_batches,
                                                              monkeypatch):
    """The compacted decode phases (the last half of a turn's rows, then the last quarter,
    gathered into smaller batches) run in the greedy rollout above and change nothing: the
    same rollout with every turn decoded over all rows gives the same trajectory (logprobs to
    float rounding: the batches differ in shape, so the sums run in another order)."""
    compacted = RolloutDriver(policy, tokenizer, GREEDY).run(_prompt_ids(tokenizer), ScriptedRetriever(),
                                                             jax.random.key(0))
    assert loop_batches == {8, 4, 2}
    # Some turn went on after all but two of its rows stopped: the last phase decoded tokens.
    turns = max(map(len, _policy_segments(compacted)))
    assert any(sorted(n)[-1] > sorted(n)[-3] for n in (
        [runs[t] for runs in _policy_segments(compacted) if len(runs) > t] for t in range(turns)) if len(n) > 2)
    monkeypatch.setattr(engine_module, "compact_sizes", lambda rows, shards: ())
    whole = RolloutDriver(policy, tokenizer, GREEDY).run(_prompt_ids(tokenizer), ScriptedRetriever(),
                                                         jax.random.key(0))
    expected, _ = greedy_run
    for got in (compacted, whole):
        for field in ("tokens", "loss_mask", "response_end", "searches", "turns"):
            np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(expected, field)),
                                          err_msg=field)
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(expected.logprobs), atol=1e-5)


@pytest.mark.parametrize("attention_policy", ["gpu", "tpu"])
def test_rollout_through_accelerator_kernels_equals_cpu_rollout(policy, tokenizer, greedy_run,
                                                                 attention_policy):
    """The engine never looks inside the cache: with the GPU or TPU attention policy (their
    Pallas kernels interpreted on this CPU, keys [B, KVH, S, D] instead of the CPU's
    transposed keys) the greedy rollout is the same, token for token."""
    other = nnx.clone(policy)
    set_attention(other, attention_policy)
    got = RolloutDriver(other, tokenizer, GREEDY).run(_prompt_ids(tokenizer), ScriptedRetriever(),
                                                      jax.random.key(0))
    expected, _ = greedy_run
    for field in ("tokens", "loss_mask", "response_end", "searches", "turns"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(expected, field)),
                                      err_msg=field)
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(expected.logprobs), atol=1e-5)


def test_trajectory_layout(greedy_run, tokenizer):
    trajectory, _ = greedy_run
    tokens, attention, positions, loss_mask, logprobs = (np.asarray(x) for x in (
        trajectory.tokens, trajectory.attention_mask, trajectory.positions, trajectory.loss_mask,
        trajectory.logprobs))
    prompt_len, end = np.asarray(trajectory.prompt_len), np.asarray(trajectory.response_end)
    assert tokens.shape == (len(PROMPTS), GREEDY.context_tokens)
    for b in range(len(PROMPTS)):
        assert prompt_len[b] == len(tokenizer.encode(PROMPTS[b], add_special_tokens=False))
        assert attention[b].tolist() == [1] * end[b] + [0] * (tokens.shape[1] - end[b])
        assert positions[b, :end[b]].tolist() == list(range(end[b]))
        assert not loss_mask[b, :prompt_len[b]].any() and loss_mask[b, end[b] - 1] == 1
        assert (tokens[b, end[b]:] == tokenizer.pad_token_id).all()
        assert trajectory.responses[b] == tokenizer.decode(
            tokens[b, prompt_len[b]:end[b]], skip_special_tokens=True)
    assert (loss_mask <= attention).all()
    assert (logprobs[loss_mask == 0] == 0).all() and (logprobs[loss_mask == 1] <= 0).all()


SAMPLED = dataclasses.replace(GREEDY, greedy=False, temperature=0.7, top_k=40, top_p=0.9,
                              n_samples=2)


def test_on_turn_reports_every_turn_as_the_trajectory_records_it(greedy_driver, greedy_run, tokenizer):
    trajectory, _ = greedy_run
    events, retriever = [], ScriptedRetriever()
    again = greedy_driver.run(_prompt_ids(tokenizer), retriever, jax.random.key(0),
                              on_turn=events.append)
    # The callback changes nothing in the trajectory.
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(trajectory.tokens))
    assert again.responses == trajectory.responses
    # Turn by turn; within a turn every action, then every observation, each by row.
    order = [(e.turn, e.stage == "observation", e.row) for e in events]
    assert order == sorted(order) and len(set(order)) == len(order)
    queries = []
    for b in range(len(PROMPTS)):
        mine = [e for e in events if e.row == b]
        acted = [e for e in mine if e.stage == "action"]
        assert [e.turn for e in acted] == list(range(trajectory.turns[b]))  # once per turn
        for e in mine:
            assert e.action in (SEARCH, ANSWER, INVALID)
            assert (e.query is not None) == (e.action == SEARCH)
            if e.stage == "action":
                assert e.observation is None
            else:  # owed an observation: a search or an invalid action, not on the last turn
                assert e.action != ANSWER and e.turn < GREEDY.max_turns
                assert e.observation is None or e.observation.startswith("\n\n<information>")
                assert e.observation is None or e.finish_reason == ""
        assert all(e.finish_reason == "" for e in mine[:-1])
        assert mine[-1].finish_reason == trajectory.finish_reason[b]
        pieces = [e.text if e.stage == "action" else e.observation or "" for e in mine]
        assert "".join(pieces) == trajectory.responses[b], f"row {b}"
        assert sum(e.action == SEARCH for e in acted) == trajectory.searches[b]
        assert sum(e.action != INVALID for e in acted) == trajectory.valid_actions[b]
        queries += [(e.turn, b, e.query) for e in acted if e.action == SEARCH]
    # The retriever was asked exactly the reported queries.
    assert [q for call in retriever.calls for q in call] == [q for _, _, q in sorted(queries)]
    assert {e.stage for e in events} == {"action", "observation"}
    assert {e.action for e in events} == {SEARCH, ANSWER, INVALID}


def test_sampling_logprobs_equal_teacher_forced(policy, tokenizer):
    prompts = _prompt_ids(tokenizer)[:4]
    trajectory = RolloutDriver(policy, tokenizer, SAMPLED).run(prompts, ScriptedRetriever(),
                                                               jax.random.key(3))
    tokens, mask = np.asarray(trajectory.tokens), np.asarray(trajectory.attention_mask)
    assert tokens.shape[0] == 8
    for b in range(4):  # a GRPO group: same prompt, different samples
        n = len(prompts[b])
        assert tokens[2 * b, :n].tolist() == tokens[2 * b + 1, :n].tolist() == prompts[b]
    assert any(tokens[2 * b].tolist() != tokens[2 * b + 1].tolist() for b in range(4))
    logits = jax.jit(lambda t, m: policy(t, m))(tokens, mask)
    teacher = jax.nn.log_softmax(logits / SAMPLED.temperature, axis=-1)
    # The logprob at slot s comes from the logits at slot s - 1.
    forced = np.take_along_axis(np.asarray(teacher[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
    loss_mask = np.asarray(trajectory.loss_mask)[:, 1:].astype(bool)
    sampled = np.asarray(trajectory.logprobs)[:, 1:]
    assert loss_mask.sum() > 50
    observed = (~loss_mask & (mask[:, 1:] == 1)) & (np.arange(1, tokens.shape[1]) >= np.asarray(
        trajectory.prompt_len)[:, None])
    assert observed.sum() > 100  # policy tokens after observations are included
    print(trajectory.finish_reason, trajectory.searches, trajectory.turns)
    np.testing.assert_allclose(sampled[loss_mask], forced[loss_mask], atol=1e-4, rtol=0)


def _with_remat(model):
    """The same weights in a Decoder built with remat=True (the shipped recipes' setting)."""
    remat = nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0), remat=True))
    nnx.update(remat, nnx.state(model))
    return remat


def test_rollout_with_remat_equals_without(policy, tokenizer, greedy_run):
    """Remat belongs to the backward pass: a remat=True policy rolls out (no trace-level error
    inside the engine's scan) exactly like the same weights without remat."""
    with_remat = RolloutDriver(_with_remat(policy), tokenizer, GREEDY).run(
        _prompt_ids(tokenizer), ScriptedRetriever(), jax.random.key(0))
    unsharded, _ = greedy_run
    np.testing.assert_array_equal(np.asarray(with_remat.tokens), np.asarray(unsharded.tokens))
    np.testing.assert_array_equal(np.asarray(with_remat.loss_mask), np.asarray(unsharded.loss_mask))
    np.testing.assert_allclose(np.asarray(with_remat.logprobs), np.asarray(unsharded.logprobs), atol=1e-5)


def test_remat_still_recomputes_layers_in_the_backward_pass(policy, tokenizer):
    """The uncached (training) call keeps remat: its gradient equals the plain one and its
    jaxpr holds a rematerialisation."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 12)), jnp.int32)

    def grads(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: nnx.merge(graphdef, p)(tokens).sum()  # noqa: E731
        return jax.grad(loss)(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    plain, plain_jaxpr = grads(policy)
    remat, remat_jaxpr = grads(_with_remat(policy))
    assert "remat" in remat_jaxpr or "checkpoint" in remat_jaxpr
    assert "remat" not in plain_jaxpr and "checkpoint" not in plain_jaxpr
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sharded_rollout_equals_unsharded(policy, tokenizer, greedy_run):
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("data", "fsdp"))
    params = jax.device_put(nnx.state(policy), NamedSharding(mesh, PartitionSpec()))
    driver = RolloutDriver(policy, tokenizer, GREEDY, mesh=mesh)
    sharded = driver.run(_prompt_ids(tokenizer), ScriptedRetriever(), jax.random.key(0), params=params)
    assert sharded.tokens.sharding.spec == PartitionSpec(("data", "fsdp"))
    assert len(sharded.tokens.addressable_shards) == 8
    unsharded, _ = greedy_run
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(unsharded.tokens))
    np.testing.assert_array_equal(np.asarray(sharded.loss_mask), np.asarray(unsharded.loss_mask))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(unsharded.logprobs), atol=1e-5)
    assert sharded.finish_reason.tolist() == unsharded.finish_reason.tolist()
    with pytest.raises(ValueError, match="do not divide over the mesh's 8 batch shards"):
        driver.run(_prompt_ids(tokenizer)[:3], ScriptedRetriever(), jax.random.key(0), params=params)


def test_rollout_with_weights_split_over_fsdp_and_tensor_equals_unsharded(policy, tokenizer, greedy_run):
    """The trainer's fsdp_tensor layout: rows over data × fsdp (each of those 4 shards decoding
    its own rows in a shard_map), weights split over fsdp and tensor by the rules (replicated
    over the batch axes for a call, still split over tensor inside it)."""
    mesh_cfg = parallel.MeshConfig(data=2, fsdp=2, tensor=2, preset="fsdp_tensor")
    mesh = parallel.make_mesh(mesh_cfg)
    shardings = parallel.param_shardings(policy, mesh, mesh_cfg.resolved_rules)
    params = jax.tree.map(place_array, nnx.state(policy, nnx.Param), shardings)
    assert any("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(params))
    sharded = RolloutDriver(policy, tokenizer, GREEDY, mesh=mesh).run(
        _prompt_ids(tokenizer), ScriptedRetriever(), jax.random.key(0), params=params)
    assert sharded.tokens.sharding.spec == PartitionSpec(("data", "fsdp"))
    unsharded, _ = greedy_run
    for field in ("tokens", "loss_mask", "response_end"):
        np.testing.assert_array_equal(np.asarray(getattr(sharded, field)),
                                      np.asarray(getattr(unsharded, field)), err_msg=field)
    # tensor-parallel matmuls sum their halves in another order
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(unsharded.logprobs), atol=1e-4)


def test_sampled_rollout_is_the_same_however_rows_are_batched(policy, tokenizer, loop_batches, monkeypatch):
    """Draws are keyed by row and token index, so a sampled rollout does not depend on the
    layout: unsharded with the compacted phases (16 rows, then 8, then 4), sharded over 8
    devices (2 rows each, then 1), and without any compacted phase, it samples the same
    tokens."""
    def run(mesh=None):
        params = None if mesh is None else jax.device_put(nnx.state(policy), NamedSharding(mesh, PartitionSpec()))
        return RolloutDriver(policy, tokenizer, SAMPLED, mesh=mesh).run(
            _prompt_ids(tokenizer), ScriptedRetriever(), jax.random.key(5), params=params)

    unsharded = run()
    sharded = run(Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp")))
    assert loop_batches == {16, 8, 4, 2, 1}
    monkeypatch.setattr(engine_module, "compact_sizes", lambda rows, shards: ())
    whole = run()
    assert unsharded.tokens.shape[0] == 16 and unsharded.searches.sum() >= 3
    for got in (sharded, whole):
        for field in ("tokens", "loss_mask", "response_end", "searches", "turns"):
            np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                          np.asarray(getattr(unsharded, field)), err_msg=field)
        # float rounding of differently shaped batches, scaled by 1 / temperature
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(unsharded.logprobs), atol=1e-4)


def test_decode_on_two_shards_exchanges_nothing(policy, tokenizer, greedy_run):
    """8 rows over 2 batch shards: each device decodes its own 4 rows (then 2, then 1) and
    gathers them on its own, so a decode call holds no collective at all, and the rollout is
    the unsharded one."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    params = jax.device_put(nnx.state(policy), NamedSharding(mesh, PartitionSpec()))
    driver = RolloutDriver(policy, tokenizer, GREEDY, mesh=mesh)
    engine, calls = driver.engine, []
    compiled_decode = engine._decode

    def recording(*args):
        def spec(x):  # mesh-placed arrays keep their sharding; the others (the key) are free
            if not isinstance(x, jax.Array):
                return x
            sharding = x.sharding if isinstance(x.sharding, NamedSharding) else None
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        calls.append(jax.tree.map(spec, args))
        return compiled_decode(*args)

    engine._decode = recording
    sharded = driver.run(_prompt_ids(tokenizer), ScriptedRetriever(), jax.random.key(0), params=params)
    assert calls and {call[-1] for call in calls} == {(2, 1)}  # the phases' rows per shard
    hlo = compiled_decode.lower(*calls[-1]).compile().as_text()
    for collective in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
        assert collective not in hlo, collective
    unsharded, _ = greedy_run
    for field in ("tokens", "loss_mask", "response_end"):
        np.testing.assert_array_equal(np.asarray(getattr(sharded, field)),
                                      np.asarray(getattr(unsharded, field)), err_msg=field)
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(unsharded.logprobs), atol=1e-5)

# -- the scripted policy ----------------------------------------------------------------------
SEARCH_CHAIN = ["ĊĊ", "<search>", "Ġcapital", "Ġ</", "search", ">."]
ANSWER_CHAIN = [">.", "<answer>", "ĠParis", "Ġ", "</answer>"]


@pytest.fixture(scope="module")
def scripted(tokenizer):
    """Next token = successor(current token): after an observation ("…ĊĊ") it searches for
    "capital" with `</search>` cut into " </" "search" ">." (a trailing "." included); if the
    search tag does not stop it, it answers "Paris". After "France" it emits EOS. Every other
    token is followed by "!" (id 0, the argmax of all-zero logits), forever."""
    cfg = _config(tokenizer, hidden=32, intermediate=16, layers=1, heads=2, kv_heads=1)
    model = _decoder(cfg, kernel_std=0.0)
    # A chain token's final hidden state is sqrt(32) on its own dimension: successor logit 5.
    _set_chains(model, tokenizer, [SEARCH_CHAIN, ANSWER_CHAIN, ["ĠFrance", "<|endoftext|>"]],
                scale=5.0 / np.sqrt(32))
    assert tokenizer.convert_ids_to_tokens(0) == "!"
    return model


HAND = RolloutConfig(max_turns=2, max_new_tokens=10, max_obs_tokens=96, max_prompt_tokens=16,
                     greedy=True, topk=1)


@pytest.fixture(scope="module")
def hand_driver(scripted, tokenizer):
    return RolloutDriver(scripted, tokenizer, HAND)


def test_hand_checked_trajectory(hand_driver, tokenizer):
    """Turn 1 invalid (token limit, then EOS on row 1), corrective observation; turn 2 a
    search split over three tokens, retrieved observation; turn 3 (final, search does not
    stop) the same search text, then the answer."""
    config = HAND
    retriever = ScriptedRetriever()
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ("Where?", "Paris is in France")]
    trajectory = hand_driver.run(prompts, retriever, jax.random.key(0))

    ids = lambda tokens: tokenizer.convert_tokens_to_ids(tokens)
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)
    search = ids(SEARCH_CHAIN[1:])
    answer = ids(ANSWER_CHAIN[1:])
    observation_text = ('\n\n<information>Doc 1(Title: "capital 0") The capital is number 0.'
                        '</information>\n\n')
    observation = enc(observation_text)
    corrective = enc(CORRECTIVE)
    assert retriever.calls == [["capital", "capital"]]  # one call, turn 2, both rows
    for b, first_turn in enumerate([[0] * 10, [tokenizer.eos_token_id]]):
        segments = [(prompts[b], 0), (first_turn, 1), (corrective, 0), (search, 1),
                    (observation, 0), (search + answer, 1)]
        want_tokens = [t for seg, _ in segments for t in seg]
        want_mask = [m for seg, m in segments for _ in seg]
        end = int(trajectory.response_end[b])
        assert np.asarray(trajectory.tokens)[b, :end].tolist() == want_tokens
        assert np.asarray(trajectory.loss_mask)[b].tolist() == want_mask + [0] * (
            config.context_tokens - end)
        logprobs = np.asarray(trajectory.logprobs)[b]
        assert (logprobs[:end][np.array(want_mask) == 1] < 0).all()
        assert (logprobs[:end][np.array(want_mask) == 0] == 0).all()
        assert trajectory.turns[b] == 3 and trajectory.searches[b] == 1
        assert trajectory.valid_actions[b] == 2 and trajectory.finish_reason[b] == "answer"
    assert trajectory.responses[0] == (
        "!" * 10 + CORRECTIVE + "<search> capital </search>." + observation_text
        + "<search> capital </search>.<answer> Paris </answer>")
    # Greedy logprobs: a chain token's successor has logit 5 against 527 zeros; after a
    # token outside the chains every logit is 0.
    logprobs = np.asarray(trajectory.logprobs)
    np.testing.assert_allclose(logprobs[1, int(trajectory.response_end[1]) - 1],
                               5 - np.log(np.exp(5) + VOCAB - 1), rtol=1e-5)
    np.testing.assert_allclose(logprobs[0, len(prompts[0])], -np.log(VOCAB), rtol=1e-5)


def test_infer_prints_each_turn_before_its_search(hand_driver, tokenizer, capsys):
    """infer's episode is streamed: when the retriever is called, the turn that asked for the
    search (and the invalid turn before it, with its note) is already on stdout."""
    seen = []

    class WatchingRetriever(ScriptedRetriever):
        def search(self, queries, topk):
            seen.append(capsys.readouterr().out)
            return super().search(queries, topk)

    ids = tokenizer.encode("Where?", add_special_tokens=False)
    trajectory = stream_episode(hand_driver, "Where?", ids, WatchingRetriever())
    assert seen == ["Question: Where?\n\n" + "!" * 10 + "\n    [invalid action → My previous action "
                    "is invalid. If I want to search, I should put the query between <search> and "
                    "</search>. If I want to give the final answer, I should put the answer between "
                    "<answer> and </answer>. Let me try again.]\n<search> capital </search>.\n"]
    assert capsys.readouterr().out == (
        '    [retrieved 1: "capital 0"]\n<search> capital </search>.<answer> Paris </answer>\n'
        "\nAnswer: Paris   [searches: 1, turns: 3, finish: answer]\n")
    # The finished trajectory renders the same episode (the demo prints it that way).
    assert render_episode("Where?", episode_segments(trajectory, 0, tokenizer)) + "\n" == (
        seen[0] + '    [retrieved 1: "capital 0"]\n<search> capital </search>.<answer> Paris </answer>\n')


def test_context_budget(scripted, tokenizer):
    """Row 0 fills its budget while generating; row 1's corrective observation does not fit."""
    config = RolloutConfig(max_turns=2, max_new_tokens=10, max_obs_tokens=96, max_prompt_tokens=32,
                           max_context_tokens=36, greedy=True)
    long_prompt = tokenizer.encode("x" * 28, add_special_tokens=False)
    short_prompt = tokenizer.encode("Where?", add_special_tokens=False)
    assert len(long_prompt) == 28 and len(short_prompt) + 10 < 36
    trajectory = RolloutDriver(scripted, tokenizer, config).run(
        [long_prompt, short_prompt], ScriptedRetriever(), jax.random.key(0))
    assert trajectory.finish_reason.tolist() == ["context_budget", "context_budget"]
    assert np.asarray(trajectory.response_end).tolist() == [36, len(short_prompt) + 10]
    assert trajectory.turns.tolist() == [1, 1]
    loss_mask = np.asarray(trajectory.loss_mask)
    assert loss_mask[0].tolist() == [0] * len(long_prompt) + [1] * (36 - len(long_prompt))
    assert loss_mask[1].sum() == 10
