"""Mesh, logical-axis rules and sharded execution on 8 simulated CPU devices.

Sharded results are compared with the same computation on one device; parameter
placements are read back from `.sharding` and checked against hand-written expectations.
"""
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from searchr1_jax import parallel
from searchr1_jax.models import Decoder, ValueModel
from searchr1_jax.models.config import config_from_hf_dict
from searchr1_jax.parallel import sharding as sharding_module

# Every split dimension is divisible by 8: hidden 64, q 8×8, kv 4×8, mlp 128, vocab 128.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)

# (preset, mesh sizes): the three presets, plus one mesh using all three axes at once.
LAYOUTS = [
    ("fsdp_tensor", dict(data=1, fsdp=2, tensor=4)),
    ("fsdp", dict(data=1, fsdp=8, tensor=1)),
    ("data", dict(data=8, fsdp=1, tensor=1)),
    ("fsdp_tensor", dict(data=2, fsdp=2, tensor=2)),
]
LAYOUT_IDS = [f"{p}-d{m['data']}f{m['fsdp']}t{m['tensor']}" for p, m in LAYOUTS]

# What each preset should do to each parameter kind, written out by hand.
EXPECTED_SPECS = {
    "fsdp": {("vocab", "embed"): P(None, "fsdp"), ("embed", "vocab"): P("fsdp", None),
             ("embed", "q_heads"): P("fsdp", None), ("embed", "kv_heads"): P("fsdp", None),
             ("q_heads", "embed"): P(None, "fsdp"), ("embed", "mlp"): P("fsdp", None),
             ("mlp", "embed"): P(None, "fsdp"), ("q_heads",): P(None), ("kv_heads",): P(None),
             ("norm",): P(None), ("embed", "scalar"): P("fsdp", None), ("scalar",): P(None)},
    "fsdp_tensor": {("vocab", "embed"): P("tensor", "fsdp"), ("embed", "vocab"): P("fsdp", "tensor"),
                    ("embed", "q_heads"): P("fsdp", "tensor"), ("embed", "kv_heads"): P("fsdp", "tensor"),
                    ("q_heads", "embed"): P("tensor", "fsdp"), ("embed", "mlp"): P("fsdp", "tensor"),
                    ("mlp", "embed"): P("tensor", "fsdp"), ("q_heads",): P("tensor"),
                    ("kv_heads",): P("tensor"), ("norm",): P(None), ("embed", "scalar"): P("fsdp", None),
                    ("scalar",): P(None)},
    "data": {},  # everything replicated
}


def _cfg(**overrides):
    return config_from_hf_dict(transformers.Qwen2Config(**{**TINY, **overrides}).to_dict())


def _mesh(preset, sizes):
    mesh_cfg = parallel.MeshConfig(preset=preset, **sizes)
    return parallel.make_mesh(mesh_cfg), mesh_cfg.resolved_rules


def _fresh_decoder(cfg, host_params):
    """A Decoder holding copies of `host_params` (numpy), on the default device."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(1)))
    nnx.update(model, jax.tree.map(jnp.asarray, host_params))
    return model


def _params_by_path(model):
    return {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _expected_spec(preset, logical_axes):
    return EXPECTED_SPECS[preset].get(tuple(logical_axes), P(*([None] * len(logical_axes))))


def _same_spec(a: P, b: P) -> bool:
    """Specs equal up to trailing None entries."""
    strip = lambda s: tuple(s) + (None,) * (4 - len(tuple(s)))  # noqa: E731
    return strip(a) == strip(b)


@pytest.fixture(scope="module")
def tiny():
    """(config, host copy of the parameters, left-padded batch)."""
    cfg = _cfg()
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(0)
    # Larger weights than the default init so that sharding mistakes cannot hide in noise.
    host = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32),
                        nnx.state(model, nnx.Param))
    tokens = rng.randint(0, TINY["vocab_size"], (8, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    for row, pad in enumerate([0, 3, 5, 0, 7, 1, 0, 11]):
        mask[row, :pad] = 0
    return cfg, host, tokens, mask


def _forward(graphdef, params, tokens, mask):
    return nnx.merge(graphdef, params)(tokens, mask)


@pytest.fixture(scope="module")
def single_device_logits(tiny):
    cfg, host, tokens, mask = tiny
    model = _fresh_decoder(cfg, host)
    graphdef, params = nnx.split(model, nnx.Param)
    return np.asarray(jax.jit(lambda p, t, m: _forward(graphdef, p, t, m))(params, tokens, mask))


# ---------------------------------------------------------------- mesh and config


def test_mesh_axis_sizes_resolve_minus_one():
    assert parallel.resolve_mesh_shape(parallel.MeshConfig(), 8) == dict(data=1, fsdp=8, tensor=1)
    assert parallel.resolve_mesh_shape(parallel.MeshConfig(data=-1, fsdp=2, tensor=2), 8) == \
        dict(data=2, fsdp=2, tensor=2)
    assert parallel.resolve_mesh_shape(parallel.MeshConfig(data=2, fsdp=2, tensor=4), 16) == \
        dict(data=2, fsdp=2, tensor=4)


@pytest.mark.parametrize("kwargs, devices, message", [
    (dict(data=-1, fsdp=3), 8, "not a multiple of 3"),
    (dict(data=2, fsdp=2, tensor=1), 8, "= 4, but there are 8 devices"),
    (dict(data=-1, fsdp=-1), 8, "at most one of data, fsdp, tensor may be -1"),
    (dict(tensor=0), 8, "config.mesh.tensor"),
    (dict(preset="zero3"), 8, "config.mesh.preset"),
    (dict(rules=(("vocabulary", "tensor"),)), 8, "config.mesh.rules[0]: unknown logical axis 'vocabulary'"),
    (dict(rules=(("vocab", "model"),)), 8, "config.mesh.rules[0]: unknown mesh axis 'model'"),
])
def test_bad_mesh_config_is_a_clear_error(kwargs, devices, message):
    with pytest.raises(ValueError) as err:
        parallel.resolve_mesh_shape(parallel.MeshConfig(**kwargs), devices)
    assert message in str(err.value)


def test_make_mesh_uses_every_device_with_named_axes():
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_mesh_config_from_configdict_with_rule_override():
    section = ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=2, preset="fsdp_tensor",
                                             rules=(("vocab", None), ("batch", ("data",))),
                                             device_memory_gb=80.0))
    mesh_cfg = parallel.mesh_config_from(section)
    assert (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, mesh_cfg.device_memory_gb) == (2, -1, 2, 80.0)
    rules = dict(mesh_cfg.resolved_rules)
    assert rules["vocab"] == () and rules["batch"] == ("data",)
    assert rules["mlp"] == ("tensor",) and rules["embed"] == ("fsdp",)  # untouched preset entries
    assert parallel.mesh_config_from(None) == parallel.MeshConfig()
    with pytest.raises(ValueError, match=r"config.mesh: unknown field\(s\) \['fsdpp'\]"):
        parallel.mesh_config_from({"fsdpp": 8})


# ---------------------------------------------------------------- logical_to_spec


def test_logical_to_spec_splits_divisible_dims_and_reports_the_rest():
    rules = parallel.rules_for("fsdp_tensor")
    mesh = dict(data=1, fsdp=2, tensor=4)
    assert parallel.logical_to_spec(("embed", "mlp"), rules, (64, 128), mesh) == P("fsdp", "tensor")
    fallbacks = []
    spec = parallel.logical_to_spec(("vocab", "embed"), rules, (97, 64), mesh, path="emb", nbytes=123,
                                    fallbacks=fallbacks)
    assert spec == P(None, "fsdp")
    assert fallbacks == [parallel.Fallback("emb", "vocab", 0, 97, ("tensor",),
                                           "97 is not divisible by mesh size 4", 123)]
    # A mesh axis splits at most one dimension of an array: the second use falls back.
    clash = parallel.rules_for("fsdp_tensor", (("mlp", "fsdp"),))
    fallbacks = []
    assert parallel.logical_to_spec(("embed", "mlp"), clash, (64, 128), mesh, fallbacks=fallbacks) == \
        P("fsdp", None)
    assert fallbacks[0].dim == 1 and "already splits another dimension" in fallbacks[0].reason
    # Batch over two axes at once.
    assert parallel.logical_to_spec(("batch", "length"), rules, (8, 5), dict(data=2, fsdp=2, tensor=2)) == \
        P(("data", "fsdp"), None)


def test_logical_to_spec_rejects_unknown_names_and_rank_mismatch():
    rules = parallel.rules_for("fsdp")
    with pytest.raises(ValueError, match="w: logical axis 'heads' has no rule"):
        parallel.logical_to_spec(("embed", "heads"), rules, (8, 8), dict(fsdp=8), path="w")
    with pytest.raises(ValueError, match="2 logical axes"):
        parallel.logical_to_spec(("embed", "mlp"), rules, (8,), dict(fsdp=8))


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("preset, sizes", LAYOUTS, ids=LAYOUT_IDS)
def test_parameters_are_split_as_the_rules_say(tiny, preset, sizes):
    cfg, host, _, _ = tiny
    mesh, rules = _mesh(preset, sizes)
    model = _fresh_decoder(cfg, host)
    assert parallel.shard_module(model, mesh, rules) == []
    for path, var in _params_by_path(model).items():
        array = var.get_value()
        expected = _expected_spec(preset, var.get_metadata()["logical_axes"])
        assert _same_spec(array.sharding.spec, expected), (path, array.sharding.spec, expected)
        # The per-device buffers really are the split size.
        divisors = [1 if e is None else np.prod([sizes[a] for a in ((e,) if isinstance(e, str) else e)])
                    for e in tuple(expected) + (None,) * (array.ndim - len(expected))]
        want = tuple(n // d for n, d in zip(array.shape, divisors))
        assert {s.data.shape for s in array.addressable_shards} == {want}, path
        assert len(array.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(array), host_value(host, path))
    if preset != "data":
        for path, var in _params_by_path(model).items():
            if var.get_value().size >= 4096:  # every matrix; only norms and biases are small
                assert any(e is not None for e in var.get_value().sharding.spec), path


def host_value(host, path):
    return _params_by_path_state(host)[path]


def _params_by_path_state(state):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_nothing_large_is_replicated_silently(tiny, caplog, monkeypatch):
    """vocab 100 cannot be split over tensor=8: the embedding and head stay replicated on
    that dimension, and shard_module says so."""
    cfg = _cfg(vocab_size=100)
    mesh, rules = _mesh("fsdp_tensor", dict(data=1, fsdp=1, tensor=8))
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.state(model, nnx.Param)))
    monkeypatch.setattr(sharding_module, "LARGE_ARRAY_BYTES", 16 * 1024)
    with caplog.at_level(logging.WARNING, logger="searchr1_jax.parallel.sharding"):
        fallbacks = parallel.shard_module(model, mesh, rules)
    reported = {(fb.path, fb.dim) for fb in fallbacks}
    assert reported == {("model/embed_tokens", 0), ("lm_head/kernel", 1)}
    assert all(fb.nbytes == 100 * 64 * 4 and fb.size == 100 for fb in fallbacks)
    assert "model/embed_tokens dim 0 (vocab, size 100) not split" in caplog.text
    # Every parameter the rules split is either split on device or reported.
    params = _params_by_path(model)
    assert params["model/embed_tokens"].get_value().sharding.spec == P(None, "fsdp")
    for path, var in params.items():
        wanted = _expected_spec("fsdp_tensor", var.get_metadata()["logical_axes"])
        actual = tuple(var.get_value().sharding.spec) + (None,) * 2
        for dim, entry in enumerate(wanted):
            if entry is not None and entry != "fsdp":  # fsdp has size 1 here
                assert actual[dim] == entry or (path, dim) in reported, (path, dim)


# ---------------------------------------------------------------- sharded execution


@pytest.mark.parametrize("preset, sizes", LAYOUTS, ids=LAYOUT_IDS)
def test_sharded_forward_matches_single_device(tiny, single_device_logits, preset, sizes):
    cfg, host, tokens, mask = tiny
    mesh, rules = _mesh(preset, sizes)
    model = _fresh_decoder(cfg, host)
    parallel.shard_module(model, mesh, rules)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = parallel.batch_sharding(mesh, rules)
    out_sharding = parallel.logits_sharding(mesh, rules, (8, 12, TINY["vocab_size"]))
    forward = jax.jit(lambda p, t, m: _forward(graphdef, p, t, m),
                      in_shardings=(parallel.param_shardings(model, mesh, rules), batch, batch),
                      out_shardings=out_sharding)
    tokens_g, mask_g = parallel.shard_batch((tokens, mask), mesh, rules)
    logits = forward(params, tokens_g, mask_g)
    assert logits.sharding == out_sharding
    np.testing.assert_allclose(np.asarray(logits), single_device_logits, atol=1e-5, rtol=0)


def _loss(graphdef, params, tokens, mask):
    logits = _forward(graphdef, params, tokens, mask)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.sum(weight)


def _make_step(graphdef, tx):
    def step(params, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(lambda p: _loss(graphdef, p, tokens, mask))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


# Adam turns a gradient g into about lr·g/(|g| + eps): where |g| is near eps, float rounding
# differences between layouts are amplified by lr/eps, so lr stays modest. Updates (~lr) are
# still 100× the tolerance, so a wrong gradient cannot pass.
TX = optax.adamw(1e-3, weight_decay=0.1)


@pytest.fixture(scope="module")
def single_device_steps(tiny):
    """Parameters (host) after one and after two AdamW steps on one device."""
    cfg, host, tokens, mask = tiny
    model = _fresh_decoder(cfg, host)
    graphdef, params = nnx.split(model, nnx.Param)
    step = jax.jit(_make_step(graphdef, TX))
    opt_state = TX.init(params)
    params1, opt_state, _ = step(params, opt_state, tokens, mask)
    params2, _, _ = step(params1, opt_state, tokens, mask)
    return _params_by_path_state(params1), _params_by_path_state(params2)


@pytest.mark.parametrize("preset, sizes", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_sharded_optimizer_step_matches_unsharded(tiny, single_device_steps, preset, sizes):
    cfg, host, tokens, mask = tiny
    mesh, rules = _mesh(preset, sizes)
    model = _fresh_decoder(cfg, host)
    parallel.shard_module(model, mesh, rules)
    graphdef, params = nnx.split(model, nnx.Param)
    p_sh = parallel.param_shardings(model, mesh, rules)
    opt_shapes = jax.eval_shape(TX.init, params)
    opt_state = jax.jit(TX.init, out_shardings=parallel.optimizer_shardings(opt_shapes, p_sh))(params)
    o_sh = parallel.optimizer_shardings(opt_state, p_sh)
    batch = parallel.batch_sharding(mesh, rules)
    step = jax.jit(_make_step(graphdef, TX), in_shardings=(p_sh, o_sh, batch, batch),
                   out_shardings=(p_sh, o_sh, NamedSharding(mesh, P())))
    tokens_g, mask_g = parallel.shard_batch((tokens, mask), mesh, rules)
    params1, opt_state, _ = step(params, opt_state, tokens_g, mask_g)
    params2, opt_state, _ = step(params1, opt_state, tokens_g, mask_g)
    want1, want2 = single_device_steps
    moved = max(np.max(np.abs(want1[p] - host_value(host, p))) for p in want1)
    assert moved > 5e-4  # the step changes the parameters well beyond the tolerance
    for got, want in ((params1, want1), (params2, want2)):
        got = _params_by_path_state(got)
        assert got.keys() == want.keys()
        for path in want:
            # Adam divides by the root of the second moment, so a parameter whose gradient is
            # near zero moves by ~lr whatever its size: float-order noise in such a gradient
            # (sharded sums add in another order) shows as up to ~2e-5 here, well below `moved`.
            np.testing.assert_allclose(got[path], want[path], atol=5e-5, rtol=0, err_msg=path)
    # The Adam moments live where their parameters live; the step count is replicated.
    adam = opt_state[0]
    for (path, mu), (_, nu) in zip(nnx.to_flat_state(adam.mu), nnx.to_flat_state(adam.nu)):
        param = nnx.state(model, nnx.Param)
        want_spec = dict(nnx.to_flat_state(param))[path].get_value().sharding.spec
        assert mu.get_value().sharding.spec == want_spec == nu.get_value().sharding.spec
    assert adam.count.sharding.spec == P()


def test_optimizer_shardings_of_nnx_optimizer_mirror_params(tiny):
    cfg, host, _, _ = tiny
    mesh, rules = _mesh("fsdp_tensor", dict(data=1, fsdp=2, tensor=4))
    model = _fresh_decoder(cfg, host)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    p_sh = parallel.param_shardings(model, mesh, rules)
    o_sh = dict(nnx.to_flat_state(parallel.optimizer_shardings(nnx.state(optimizer, nnx.OptState), p_sh)))
    assert o_sh[("opt_state", 0, "count")].get_value().spec == P()
    assert o_sh[("opt_state", 0, "mu", "model", "embed_tokens")].get_value().spec == P("tensor", "fsdp")
    assert o_sh[("opt_state", 0, "nu", "model", "layers", 0, "mlp", "down_proj", "kernel")].get_value().spec == \
        P("tensor", "fsdp")


def test_kv_cache_sharded_extend_matches_single_device(tiny):
    cfg, host, tokens, mask = tiny
    mesh, rules = _mesh("fsdp_tensor", dict(data=1, fsdp=2, tensor=4))

    def prefill(graphdef, params, cache, tokens, mask):
        return nnx.merge(graphdef, params).extend(tokens, mask, cache)

    reference_model = _fresh_decoder(cfg, host)
    graphdef, params = nnx.split(reference_model, nnx.Param)
    want_logits, want_cache = jax.jit(lambda p, c, t, m: prefill(graphdef, p, c, t, m))(
        params, reference_model.init_cache(8, 16), tokens, mask)

    model = _fresh_decoder(cfg, host)
    parallel.shard_module(model, mesh, rules)
    graphdef, params = nnx.split(model, nnx.Param)
    cache = model.init_cache(8, 16)
    c_sh = parallel.cache_shardings(cache, mesh, rules)
    assert c_sh.keys[0].spec == P(("data", "fsdp"), "tensor", None, None)
    assert c_sh.valid.spec == P(("data", "fsdp"), None) and c_sh.length.spec == P(("data", "fsdp"))
    batch = parallel.batch_sharding(mesh, rules)
    run = jax.jit(lambda p, c, t, m: prefill(graphdef, p, c, t, m),
                  in_shardings=(parallel.param_shardings(model, mesh, rules), c_sh, batch, batch),
                  out_shardings=(parallel.logits_sharding(mesh, rules, (8, 12, TINY["vocab_size"])), c_sh),
                  donate_argnums=1)
    logits, new_cache = run(params, jax.device_put(cache, c_sh), *parallel.shard_batch((tokens, mask), mesh, rules))
    assert new_cache.keys[0].sharding.spec == P(("data", "fsdp"), "tensor", None, None)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(new_cache.values[0]), np.asarray(want_cache.values[0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new_cache.length), np.asarray(want_cache.length))


# ---------------------------------------------------------------- batches and placement


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh, rules = _mesh("fsdp", dict(data=2, fsdp=4, tensor=1))
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    (sharded,) = parallel.shard_batch((rows,), mesh, rules)
    assert sharded.sharding.spec == P(("data", "fsdp"))
    for shard in sharded.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])
        assert shard.data.shape == (1, 3)
    with pytest.raises(ValueError, match=r"batch field \['mask'\] has shape \(6, 3\).*multiple of 8"):
        parallel.shard_batch({"mask": np.zeros((6, 3))}, mesh, rules)


def test_place_models_colocates_policy_critic_and_an_independent_reference(tiny):
    cfg, host, tokens, mask = tiny
    mesh, rules = _mesh("fsdp", dict(data=1, fsdp=8, tensor=1))
    policy = _fresh_decoder(cfg, host)
    critic = ValueModel.from_decoder(policy, rngs=nnx.Rngs(2))
    reference = parallel.frozen_copy(policy)
    with pytest.raises(ValueError, match="separate copy"):
        parallel.place_models(policy, critic, policy, mesh, rules)
    placed = parallel.place_models(policy, critic, reference, mesh, rules)
    assert placed == {"policy": [], "critic": [], "reference": []}
    devices = set(mesh.devices.flat)
    for model in (policy, critic, reference):
        for path, var in _params_by_path(model).items():
            assert var.get_value().sharding.device_set == devices, path
    head = _params_by_path(critic)["value_head/kernel"].get_value()
    assert head.sharding.spec == P("fsdp", None)
    # The reference survives the policy's buffers being donated (deleted).
    for var in _params_by_path(policy).values():
        var.get_value().delete()
    np.testing.assert_array_equal(np.asarray(_params_by_path(reference)["model/embed_tokens"].get_value()),
                                  host_value(host, "model/embed_tokens"))


def test_frozen_copy_keeps_shardings_and_owns_its_buffers(tiny):
    cfg, host, _, _ = tiny
    mesh, rules = _mesh("fsdp_tensor", dict(data=1, fsdp=2, tensor=4))
    policy = _fresh_decoder(cfg, host)
    parallel.shard_module(policy, mesh, rules)
    reference = parallel.frozen_copy(policy)
    for path, var in _params_by_path(policy).items():
        ref = _params_by_path(reference)[path].get_value()
        assert ref.sharding == var.get_value().sharding
        pointers = {s.data.unsafe_buffer_pointer() for s in var.get_value().addressable_shards}
        assert not pointers & {s.data.unsafe_buffer_pointer() for s in ref.addressable_shards}, path
