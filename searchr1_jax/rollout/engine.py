"""The jitted device side of a rollout: prefill, appending observations, the decode loop.

All three functions take and return a `RolloutState` (donated, so the KV cache is updated in
place). Each row keeps its own slot layout: [prompt | policy tokens and observation tokens
interleaved], with no padding between them, so the state's arrays are already the
trajectory the trainer will score. Nothing is ever recomputed: a turn's tokens are decoded
one at a time into the cache and an observation is appended as one chunk at each row's own
position.

Slots: the cache holds `capacity` slots per row; a row never holds more than `budget` real
tokens, and the slots above the budget are scratch room so that a chunk appended to every
row at once (finished rows get an all-padding chunk there) never runs past the end.

Decode runs one jitted call per turn, its steps one-token appends in `lax.while_loop`s;
prefill and observations append in pieces of APPEND_PIECE tokens. Both go through the
decoder's own chunked append (`Decoder.extend_hidden`). A turn's loop runs over all rows
until half are still generating, then over those rows gathered into half the batch, then a
quarter (`compact_sizes`): a decode step reads every row's cache, and most rows of a turn
stop long before its last one does.

With a mesh, appends and decode turns run on each batch shard's rows alone (shard_map): a
device never waits for another within a call, and gathers its own rows for the phases.

Windows: every call works on the first `window` slots only (a static multiple of
WINDOW_STEP that the caller picks to cover every row's next writes), so attention reads the
slots in use rather than the whole capacity; the rest of the state is left as it is.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from searchr1_jax.models.decoder import Decoder
from searchr1_jax.models.kv_cache import KVCache, chunk_extent, write_rows
from searchr1_jax.rollout.sampling import SamplingParams, row_keys, sample_tokens
from searchr1_jax.rollout.stops import (NOT_STOPPED, STOP_EOS, STOP_LENGTH, StopTable,
                                        stop_step)

# Longest piece appended in one attention call: the attention scores of a piece are
# [rows, heads, piece, window], so this bounds prefill memory. Chunk widths are padded to
# a multiple of it (or to a power of two below it).
APPEND_PIECE = 64
BATCH_AXES = ("data", "fsdp")
# Granularity of the slot windows; each distinct window compiles once.
WINDOW_STEP = 256


@flax.struct.dataclass
class RolloutState:
    """Device state of R rows. cache: the KV cache (capacity S); next_logits [R, V] float32:
    logits of the token after each row's last slot; tokens [R, S] int32: the id in each slot;
    logprobs [R, S] float32: sampling logprob at policy slots; policy [R, S] bool: the slot
    holds a token the policy sampled."""

    cache: KVCache
    next_logits: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    policy: jax.Array


@flax.struct.dataclass
class TurnResult:
    """What one decode call reports per row: outcome (stops.NOT_STOPPED … STOP_LENGTH), count
    (tokens generated) [R] int32, and turn_tokens [R, max_new_tokens] (the first `count`)."""

    outcome: jax.Array
    count: jax.Array
    turn_tokens: jax.Array


def chunk_width(n: int) -> int:
    """Padded width for chunks of up to n tokens: a power of two (at least 16) up to
    APPEND_PIECE, a multiple of APPEND_PIECE beyond."""
    if n <= APPEND_PIECE:
        return max(16, 1 << max(0, (n - 1).bit_length()))
    return -(-n // APPEND_PIECE) * APPEND_PIECE


def slot_window(state: RolloutState, width: int) -> RolloutState:
    """The state restricted to slots [0, width) (next_logits and lengths unchanged)."""
    return RolloutState(
        cache=state.cache.window(width), next_logits=state.next_logits,
        tokens=state.tokens[:, :width], logprobs=state.logprobs[:, :width],
        policy=state.policy[:, :width])


def merge_window(full: RolloutState, part: RolloutState) -> RolloutState:
    """`full` with its first slots, next_logits and lengths replaced by those of `part`."""
    def put(whole, piece):
        return jax.lax.dynamic_update_slice_in_dim(whole, piece, 0, axis=1)

    return RolloutState(
        cache=full.cache.merge_window(part.cache), next_logits=part.next_logits,
        tokens=put(full.tokens, part.tokens), logprobs=put(full.logprobs, part.logprobs),
        policy=put(full.policy, part.policy))


@flax.struct.dataclass
class LoopState:
    """Where a turn's decode loop stopped: active [R] bool (rows still generating), automaton
    [R] int32 (stop-string matcher states), limit [R] int32 (each row's token allowance this
    turn). A row still active has decoded as many tokens as the loop ran steps (its count)."""

    active: jax.Array
    automaton: jax.Array
    limit: jax.Array


def compact_sizes(rows: int, shards: int) -> tuple[int, ...]:
    """Rows per batch shard of a turn's decode phases after the first: half of a shard's
    rows, then a quarter (each at least one row; fewer phases for small shards). Phase i + 1
    starts when at most its size of rows are still generating in the shard."""
    per_shard = rows // shards
    return tuple(size for size in (per_shard // 2, per_shard // 4) if size >= 1)


class RolloutEngine:
    """Jitted prefill / append / decode over one decoder, optionally sharded over a mesh.

    model: the policy (its graph is fixed here; its weights are passed to every call, so a
    trainer can update them between rollouts). capacity, budget: slots per row (see module
    doc). stop_table: from `stops.build_stop_table`; eos_ids: token ids that end a turn.
    mesh: the batch dimension of every state array is sharded over its "data" and "fsdp"
    axes (those it has), and appends and decode turns run on each batch shard's rows alone
    (`_map_shards`): rows never interact, so each device loops over its own rows without
    waiting for the others, with the weights replicated over those axes for the call.
    """

    def __init__(self, model: Decoder, *, capacity: int, budget: int, max_new_tokens: int,
                 sampling: SamplingParams, stop_table: StopTable, eos_ids: Sequence[int],
                 mesh: Mesh | None = None):
        if budget >= capacity:
            raise ValueError(f"budget ({budget}) must be below the cache capacity ({capacity})")
        self.graphdef = nnx.graphdef(model)
        self.capacity, self.budget, self.max_new_tokens = capacity, budget, max_new_tokens
        self.sampling = sampling
        self.mesh = mesh
        self.batch_axes = tuple(a for a in BATCH_AXES if mesh is not None and a in mesh.axis_names)
        replicated = (NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)
        self.stop_packed = jax.device_put(jnp.asarray(stop_table.packed, jnp.int32), replicated)
        eos = jnp.asarray(sorted(set(eos_ids)) or [-1], jnp.int32)
        self.eos_ids = jax.device_put(eos, replicated)
        self._prefill = jax.jit(self._prefill_impl, static_argnums=(3,))
        self._append = jax.jit(self._append_impl, donate_argnums=(1,), static_argnums=(4,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(3,), static_argnums=(8, 9))

    def window_for(self, slots: int) -> int:
        """The window (a multiple of WINDOW_STEP, at most the capacity) covering `slots`."""
        return min(self.capacity, -(-slots // WINDOW_STEP) * WINDOW_STEP)

    # -- sharding ---------------------------------------------------------------------------
    @property
    def batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    def _map_shards(self, fn, row_args: Sequence[bool]):
        """fn run on each batch shard's own rows: a shard_map over the mesh's batch axes, the
        arguments flagged in `row_args` (arrays, or trees of them, whose leading dimension is
        the rows) split by rows, the others replicated; every output is a row array (tree).
        Without batch axes, fn itself. Other mesh axes (tensor) stay automatic inside."""
        if not self.batch_axes:
            return fn
        rows = PartitionSpec(self.batch_axes)
        # check_vma off: the loops' carries start from fresh constants (the same on every
        # shard) and become per-shard values, which the checker would make us annotate.
        return jax.shard_map(fn, mesh=self.mesh, out_specs=rows, axis_names=frozenset(self.batch_axes),
                             in_specs=tuple(rows if split else PartitionSpec() for split in row_args),
                             check_vma=False)

    def _constrain(self, tree):
        """Shard the leading (row) dimension of every array in `tree` over the batch axes."""
        if self.mesh is None:
            return tree
        sharding = NamedSharding(self.mesh, PartitionSpec(self.batch_axes or None))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

    def put_rows(self, array):
        """A host array [R, ...] placed with its rows sharded like the state's."""
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, NamedSharding(self.mesh, PartitionSpec(self.batch_axes or None)))

    # -- public calls -----------------------------------------------------------------------
    def prefill(self, params, prompt_tokens, prompt_mask, n_samples: int) -> RolloutState:
        """Right-padded prompts [B, P] (mask 1 on real tokens) → the state of B * n_samples
        rows, row b * n_samples + i holding sample i of prompt b (one prefill per prompt)."""
        return self._prefill(params, jnp.asarray(prompt_tokens, jnp.int32),
                             jnp.asarray(prompt_mask, jnp.int32), n_samples)

    def append(self, params, state: RolloutState, tokens, mask, lengths) -> RolloutState:
        """Append right-padded chunks [R, C] (mask 1 on real tokens; an all-zero row appends
        nothing) at each row's own position; C <= capacity - budget. lengths [R]: the rows'
        current lengths (a host copy, to pick the window)."""
        if tokens.shape[1] > self.capacity - self.budget:
            raise ValueError(f"chunk of {tokens.shape[1]} tokens exceeds the scratch room "
                             f"({self.capacity - self.budget} slots)")
        window = self.window_for(int(max(lengths)) + tokens.shape[1])
        return self._append(params, state, self.put_rows(tokens.astype("int32")),
                            self.put_rows(mask.astype("int32")), window)

    def decode(self, params, state: RolloutState, active, key, search_enabled: bool, lengths):
        """Generate one turn for the rows where `active` [R] is true → (state, TurnResult).

        A row stops after the token that completes a stop string (the search one only while
        search_enabled), after an EOS id, after max_new_tokens tokens, or when it holds
        `budget` tokens. lengths [R]: the rows' current lengths (a host copy).

        Phases: a turn's tail is often one or two long rows, and a decode step reads the cache
        of every row in its batch. So the loop runs over all rows until at most half of a
        batch shard's rows are still generating, then over those gathered into half the
        batch, then a quarter (`compact_sizes`), all in the one call; each shard gathers its
        own rows on its own device. Draws are keyed by row id and token index
        (`sampling.row_keys`), so neither the phases nor the sharding change what a row
        generates.
        """
        lengths = np.asarray(lengths)
        needed = int(lengths.max()) + 1  # idle rows still write one (invalid) slot per step
        if active.any():
            needed = max(needed, int(lengths[active].max()) + self.max_new_tokens)
        rows = active.shape[0]
        return self._decode(params, self.stop_packed, self.eos_ids, state,
                            self.put_rows(active.astype(bool)),
                            self.put_rows(np.arange(rows, dtype=np.int32)), key,
                            jnp.asarray(search_enabled), self.window_for(needed),
                            compact_sizes(rows, self.batch_shards))

    # -- jitted bodies ----------------------------------------------------------------------
    def _prefill_impl(self, params, tokens, mask, n_samples):
        model = nnx.merge(self.graphdef, params)
        rows = tokens.shape[0]
        cache = model.init_cache(rows, self.capacity)
        state = RolloutState(
            cache=cache,
            next_logits=jnp.zeros((rows, model.config.vocab_size), jnp.float32),
            tokens=jnp.zeros((rows, self.capacity), jnp.int32),
            logprobs=jnp.zeros((rows, self.capacity), jnp.float32),
            policy=jnp.zeros((rows, self.capacity), bool))
        window = self.window_for(tokens.shape[1])
        state = merge_window(state, self._append_to(model, slot_window(state, window), tokens, mask))
        if n_samples > 1:
            state = jax.tree.map(lambda x: jnp.repeat(x, n_samples, axis=0), state)
        return self._constrain(state)

    def _append_impl(self, params, state, tokens, mask, window):
        def per_shard(params, state, tokens, mask):
            model = nnx.merge(self.graphdef, params)
            return merge_window(state, self._append_to(model, slot_window(state, window), tokens, mask))

        return self._map_shards(per_shard, (False, True, True, True))(params, state, tokens, mask)

    def _append_to(self, model, state: RolloutState, tokens, mask) -> RolloutState:
        rows, width = tokens.shape
        piece = min(width, APPEND_PIECE)
        if width % piece:
            raise ValueError(f"chunk width {width} is not a multiple of {piece}")
        start = state.cache.length
        last = chunk_extent(mask) - 1  # index of each row's last real token, -1 for none
        pieces = (tokens.reshape(rows, -1, piece).swapaxes(0, 1),
                  mask.reshape(rows, -1, piece).swapaxes(0, 1),
                  jnp.arange(0, width, piece, dtype=jnp.int32))

        def one_piece(carry, xs):
            piece_tokens, piece_mask, offset = xs
            cache, last_hidden = carry
            hidden, cache = model.extend_hidden(piece_tokens, piece_mask, cache)
            index = jnp.clip(last - offset, 0, piece - 1)
            at_last = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
            here = (last >= offset) & (last < offset + piece)
            return (cache, jnp.where(here[:, None], at_last, last_hidden)), None

        hidden_dim = model.config.hidden_size
        init = (state.cache, jnp.zeros((rows, hidden_dim), model.model.dtype))
        (cache, last_hidden), _ = jax.lax.scan(one_piece, init, pieces)
        logits = model.logits(last_hidden)
        # Slots past a row's new length are scratch; writing the chunk's padding there is harmless.
        return RolloutState(
            cache=cache,
            next_logits=jnp.where((last >= 0)[:, None], logits, state.next_logits),
            tokens=write_rows(state.tokens, tokens, start),
            logprobs=write_rows(state.logprobs, jnp.zeros(tokens.shape, jnp.float32), start),
            policy=write_rows(state.policy, jnp.zeros(tokens.shape, bool), start))

    def _decode_impl(self, params, stop_packed, eos_ids, full_state, active, row_ids, key,
                     search_enabled, window, sizes):
        def per_shard(params, stop_packed, eos_ids, full_state, active, row_ids, key, search_enabled):
            model = nnx.merge(self.graphdef, params)
            state = slot_window(full_state, window)
            rows, max_new = active.shape[0], self.max_new_tokens
            limit = jnp.minimum(max_new, self.budget - state.cache.length)
            zeros = jnp.zeros((rows,), jnp.int32)
            result = TurnResult(outcome=zeros, count=zeros, turn_tokens=jnp.zeros((rows, max_new), jnp.int32))
            loop = LoopState(active=active & (limit > 0), automaton=zeros, limit=limit)
            exits = tuple(sizes) + (0,)
            state, result, loop = self._turn_loop(model, stop_packed, eos_ids, state, result, loop,
                                                  row_ids, key, search_enabled, exits[0])
            for size, exit_rows in zip(sizes, exits[1:]):
                # The still-active rows first (the loop left at most `size`), then idle ones.
                picked = jnp.argsort(~loop.active, stable=True)[:size]

                def take(x):
                    return x[picked]

                def put(x, new):
                    return x.at[picked].set(new)

                part_state, part, part_loop = self._turn_loop(
                    model, stop_packed, eos_ids, jax.tree.map(take, state), jax.tree.map(take, result),
                    jax.tree.map(take, loop), take(row_ids), key, search_enabled, exit_rows)
                state, result, loop = (jax.tree.map(put, tree, new) for tree, new in (
                    (state, part_state), (result, part), (loop, part_loop)))
            return merge_window(full_state, state), result

        return self._map_shards(per_shard, (False, False, False, True, True, True, False, False))(
            params, stop_packed, eos_ids, full_state, active, row_ids, key, search_enabled)

    def _turn_loop(self, model, stop_packed, eos_ids, state, result, loop, row_ids, key,
                   search_enabled, exit_rows):
        """Decode the rows (one batch shard's, or all) until at most exit_rows are still
        active. Every active row stops within its limit (at most max_new_tokens), so the
        loop ends. row_ids [R]: each row's index in the whole batch (it keys its draws)."""
        max_new = self.max_new_tokens
        window = state.tokens.shape[1]
        slots = jnp.arange(window, dtype=jnp.int32)
        turn_slots = jnp.arange(max_new, dtype=jnp.int32)
        limit = loop.limit
        init = (state, loop.active, loop.automaton, result.outcome, result.count, result.turn_tokens)

        def cond(carry):
            return jnp.sum(carry[1], dtype=jnp.int32) > exit_rows

        def body(carry):
            state, active, automaton, outcome, count, turn_tokens = carry
            token, logprob = sample_tokens(state.next_logits, row_keys(key, row_ids, count),
                                           self.sampling)
            token = jnp.where(active, token, 0)
            next_automaton, hit = stop_step(stop_packed, automaton, token, search_enabled)
            is_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
            new_count = count + active
            stopped = jnp.where(hit != NOT_STOPPED, hit,
                                jnp.where(is_eos, STOP_EOS,
                                          jnp.where(new_count >= limit, STOP_LENGTH, NOT_STOPPED)))
            at_slot = active[:, None] & (slots[None, :] == state.cache.length[:, None])
            at_turn = active[:, None] & (turn_slots[None, :] == count[:, None])
            # Inactive rows append padding: they neither advance nor gain a valid slot.
            hidden, cache = model.extend_hidden(token[:, None], active[:, None].astype(jnp.int32),
                                                state.cache)
            logits = model.logits(hidden[:, 0])
            state = RolloutState(
                cache=cache,
                next_logits=jnp.where(active[:, None], logits, state.next_logits),
                tokens=jnp.where(at_slot, token[:, None], state.tokens),
                logprobs=jnp.where(at_slot, logprob[:, None], state.logprobs),
                policy=state.policy | at_slot)
            return (state, active & (stopped == NOT_STOPPED), jnp.where(active, next_automaton, automaton),
                    jnp.where(active, stopped, outcome), new_count,
                    jnp.where(at_turn, token[:, None], turn_tokens))

        state, active, automaton, outcome, count, turn_tokens = jax.lax.while_loop(cond, body, init)
        result = TurnResult(outcome=outcome, count=count, turn_tokens=turn_tokens)
        return state, result, LoopState(active=active, automaton=automaton, limit=limit)
