"""The multi-turn loop: generate, pause, search, append the observation, generate again.

Per rollout (R = prompts × n_samples rows):
  1. prefill every prompt once (a GRPO group shares it), then for turn = 0 … max_turns:
  2. decode one turn for every unfinished row inside one jitted loop;
  3. on the host, read each row's action from the turn's text: an answer finishes the row;
     a search collects its query; anything else is an invalid action;
  4. call the retriever once with all of the turn's queries, format the passages, tokenize
     and truncate each observation to max_obs_tokens; invalid actions get the corrective
     message instead;
  5. append every observation at its row's own cache position (nothing is recomputed).
Turn max_turns is the final one: the search tag no longer stops generation, and the row
ends whatever it did ("max_turns" unless it answered).

Streaming: `run(..., on_turn=f)` calls f(TurnEvent) on the host as each turn is settled
(step 3, before the retriever is called) and again once its observation is known (after
step 5), so a caller can show a trajectory while it is generated (see TurnEvent).

Context budget: a row holds at most RolloutConfig.context_tokens tokens. A turn generates
at most that many minus what the row holds; a row that fills its budget while generating,
or whose next observation would leave no room for a reply to it, finishes with
finish_reason "context_budget" (the observation is not appended).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from searchr1_jax.models.decoder import Decoder
from searchr1_jax.retrieval.types import Retriever
from searchr1_jax.rollout.actions import ANSWER, SEARCH, Action, read_action
from searchr1_jax.rollout.config import RolloutConfig
from searchr1_jax.rollout.engine import RolloutEngine, chunk_width
from searchr1_jax.rollout.observations import corrective_text, observation_ids, passages_text
from searchr1_jax.rollout.sampling import SamplingParams
from searchr1_jax.rollout.stops import STOP_LENGTH, build_stop_table, check_token_texts, token_texts
from searchr1_jax.rollout.trajectory import Trajectory, trajectory_arrays

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TurnEvent:
    """One row's turn, as `RolloutDriver.run` reports it to its `on_turn` callback.

    Every row that decodes in a turn is reported in stage "action" as soon as the turn's
    text is read, before the retriever is called. A row that the action left running (it
    searched, or its action was invalid) is reported again in stage "observation" once its
    observation is settled, before the next turn decodes. Order: turn by turn; within a
    turn, every "action" event, then every "observation" event, each in increasing row.

      turn:          0-based turn index.
      row:           the rollout row (prompt i's sample j is row i * n_samples + j).
      stage:         "action" or "observation".
      text:          the policy's tokens of this turn, decoded like Trajectory.responses
                     (special tokens skipped); the same in both stages.
      action:        rollout.actions.SEARCH, ANSWER or INVALID, as read from the turn.
      query:         the search query for a SEARCH, else None.
      observation:   stage "observation" only: the text appended after the turn (the
                     retrieved passages or the corrective message, decoded from the tokens
                     actually appended, so truncated as the policy sees it), or None when
                     it did not fit and the row finished instead. None in stage "action".
      finish_reason: why the row finished at this event ("answer", "max_turns",
                     "context_budget"), or "" while it goes on.

    A row's Trajectory.responses entry is the concatenation, over its events in order, of
    `text` (stage "action") and `observation` (stage "observation", when not None), up to
    a multi-byte character split across a turn and its observation (decoded separately).
    """

    turn: int
    row: int
    stage: str
    text: str
    action: str
    query: str | None
    observation: str | None
    finish_reason: str


class RolloutDriver:
    """Runs Search-R1 rollouts of `model` with `tokenizer` (a transformers tokenizer).

    EOS ids are the model config's plus the tokenizer's. With a `mesh`, rows are sharded
    over its "data"/"fsdp" axes (R must divide evenly); the weights stay where the caller
    put them.
    """

    def __init__(self, model: Decoder, tokenizer, config: RolloutConfig, *, mesh: Mesh | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        texts = token_texts(tokenizer, model.config.vocab_size)
        check_token_texts(tokenizer, texts)
        eos_ids = set(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, *sorted(eos_ids), 0) if i is not None)
        self.budget = config.context_tokens
        # A call's prompts or observations are padded to chunk_width of the longest one: a
        # few distinct widths (each compiles once), and little padding is computed.
        widest_obs = chunk_width(config.max_obs_tokens)
        self.engine = RolloutEngine(
            model,
            capacity=max(self.budget + widest_obs, chunk_width(config.max_prompt_tokens)),
            budget=self.budget,
            max_new_tokens=config.max_new_tokens,
            sampling=SamplingParams(greedy=config.greedy, temperature=config.temperature,
                                    top_k=config.top_k, top_p=config.top_p),
            stop_table=build_stop_table(texts, config.search_stop, config.answer_stop),
            eos_ids=sorted(eos_ids),
            mesh=mesh)
        self.tags = dict(search_open=config.search_open, search_stop=config.search_stop,
                         answer_open=config.answer_open, answer_stop=config.answer_stop)
        self.corrective = corrective_text(**self.tags)

    def run(self, prompts: Sequence[Sequence[int]], retriever: Retriever, key: jax.Array,
            params: nnx.State | None = None,
            on_turn: Callable[[TurnEvent], None] | None = None) -> Trajectory:
        """Roll out every prompt (token ids, no padding) n_samples times.

        key: the rollout's random key. Row r draws its t-th token of turn k with
          `sampling.row_keys(fold_in(key, k), r, t)`, so a sampled rollout is the same however
          its rows are sharded or batched.
        params: the policy weights to use (default: the model's current ones).
        on_turn: called on the host with a TurnEvent per row and stage as each turn is
          settled (see TurnEvent); its exceptions propagate. Without it nothing extra is
          decoded; with it, only the turn's tokens and observations of reported rows.
        """
        cfg, engine = self.config, self.engine
        if not isinstance(retriever, Retriever):
            raise TypeError(f"retriever {type(retriever).__name__} has no search(queries, topk) method")
        params = nnx.state(self.model) if params is None else params
        prompt_tokens, prompt_mask = self._pad_prompts(prompts)
        rows = len(prompts) * cfg.n_samples
        if rows % engine.batch_shards:
            raise ValueError(f"{len(prompts)} prompts x n_samples {cfg.n_samples} = {rows} rows do "
                             f"not divide over the mesh's {engine.batch_shards} batch shards")
        timings = dict(prefill_seconds=0.0, decode_seconds=0.0, retrieval_seconds=0.0,
                       append_seconds=0.0, obs_truncated=0.0)
        clock = time.perf_counter()
        state = jax.block_until_ready(engine.prefill(params, prompt_tokens, prompt_mask, cfg.n_samples))
        book = RowBook.start(np.repeat(prompt_mask.sum(axis=1), cfg.n_samples))
        timings["prefill_seconds"] += time.perf_counter() - clock
        for turn in range(cfg.max_turns + 1):
            final = turn == cfg.max_turns
            book.finish_rows(~book.done & (book.length >= self.budget), "context_budget")
            active = ~book.done
            if not active.any():
                break
            clock = time.perf_counter()
            state, result = engine.decode(params, state, active, jax.random.fold_in(key, turn),
                                          search_enabled=not final, lengths=book.length)
            outcome, count, turn_tokens = jax.device_get((result.outcome, result.count,
                                                          result.turn_tokens))
            timings["decode_seconds"] += time.perf_counter() - clock
            book.length += count
            book.turns += active
            active_rows = np.flatnonzero(active)
            observations, queries, actions = self._read_actions(active_rows, outcome, count,
                                                                turn_tokens, final, book)
            reported = {}
            if on_turn is not None:
                reported = self._report_actions(on_turn, turn, active_rows, count, turn_tokens,
                                                actions, book)
            if final:
                break
            if queries:
                clock = time.perf_counter()
                for (b, _), passages in zip(queries, self._search(retriever, queries, turn)):
                    observations[b] = passages_text(passages)
                    book.searches[b] += 1
                timings["retrieval_seconds"] += time.perf_counter() - clock
            if observations:
                clock = time.perf_counter()
                state, truncated, appended = self._append_observations(params, state,
                                                                       observations, book)
                timings["obs_truncated"] += truncated
                timings["append_seconds"] += time.perf_counter() - clock
                if on_turn is not None:
                    self._report_observations(on_turn, reported, sorted(observations), appended,
                                              book)
        if timings["obs_truncated"]:
            log.info("rollout: %d of the observations were truncated to %d tokens",
                     timings["obs_truncated"], cfg.max_obs_tokens)
        return self._trajectory(state, book, timings)

    # -- steps --------------------------------------------------------------------------------
    def _pad_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded prompt ids and mask [B, chunk_width(longest prompt)]."""
        if not prompts:
            raise ValueError("no prompts to roll out")
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(prompts):
            if not 1 <= len(ids) <= self.config.max_prompt_tokens:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; rollout config allows 1 to "
                                 f"max_prompt_tokens = {self.config.max_prompt_tokens}")
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
        width = chunk_width(max(map(len, prompts)))
        tokens = np.full((len(prompts), width), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), width), np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, :len(ids)] = ids
            mask[i, :len(ids)] = 1
        return tokens, mask

    def _read_actions(self, active_rows, outcome, count, turn_tokens, final: bool, book: "RowBook"
                      ) -> tuple[dict[int, str], list[tuple[int, str]], dict[int, Action]]:
        """Settle each active row's turn: finish it, or queue its query or corrective
        observation. Returns (observations by row, [(row, query)], actions by row)."""
        texts = self.tokenizer.batch_decode(
            [turn_tokens[b, :count[b]].tolist() for b in active_rows],
            skip_special_tokens=False, clean_up_tokenization_spaces=False)
        observations: dict[int, str] = {}
        queries: list[tuple[int, str]] = []
        actions: dict[int, Action] = {}
        for b, text in zip(active_rows, texts):
            action = actions[b] = read_action(int(outcome[b]), text, **self.tags)
            if action.kind == ANSWER:
                book.valid_actions[b] += 1
                book.finish_rows(b, "answer")
            elif final:  # the search tag does not stop the final turn
                book.finish_rows(b, "max_turns")
            elif action.kind == SEARCH:
                book.valid_actions[b] += 1
                queries.append((b, action.query))
            elif outcome[b] == STOP_LENGTH and book.length[b] >= self.budget:
                book.finish_rows(b, "context_budget")
            else:
                observations[b] = self.corrective
        return observations, queries, actions

    def _report_actions(self, on_turn, turn: int, active_rows, count, turn_tokens,
                        actions: dict[int, Action], book: "RowBook") -> dict[int, TurnEvent]:
        """Send each active row's "action" event; returns them by row."""
        texts = self.tokenizer.batch_decode(
            [turn_tokens[b, :count[b]].tolist() for b in active_rows],
            skip_special_tokens=True, clean_up_tokenization_spaces=False)
        events = {}
        for b, text in zip(active_rows, texts):
            action = actions[b]
            events[b] = TurnEvent(turn=turn, row=int(b), stage="action", text=text,
                                  action=action.kind, query=action.query, observation=None,
                                  finish_reason=str(book.finish[b]))
            on_turn(events[b])
        return events

    def _report_observations(self, on_turn, reported: dict[int, TurnEvent], rows: list[int],
                             appended: dict[int, list[int]], book: "RowBook") -> None:
        """Send the "observation" event of each row that was owed an observation."""
        decoded = self.tokenizer.batch_decode(
            [appended[b] for b in rows if b in appended],
            skip_special_tokens=True, clean_up_tokenization_spaces=False) if appended else []
        texts = iter(decoded)
        for b in rows:
            on_turn(dataclasses.replace(reported[b], stage="observation",
                                        observation=next(texts) if b in appended else None,
                                        finish_reason=str(book.finish[b])))

    def _search(self, retriever: Retriever, queries: list[tuple[int, str]], turn: int):
        texts = [q for _, q in queries]
        try:
            results = retriever.search(texts, self.config.topk)
        except Exception as e:
            raise RuntimeError(f"retriever {type(retriever).__name__} failed on turn {turn} "
                               f"({len(texts)} queries, first {texts[0]!r}): {e}") from e
        if len(results) != len(texts):
            raise RuntimeError(f"retriever {type(retriever).__name__} returned {len(results)} "
                               f"result lists for {len(texts)} queries on turn {turn}")
        return results

    def _append_observations(self, params, state, observations: dict[int, str], book: "RowBook"):
        """Tokenize, truncate and append the observations; rows whose observation would
        leave no room for a reply finish instead. Returns (state, number truncated, the
        appended ids by row)."""
        order = sorted(observations)
        ids, num_truncated = observation_ids(self.tokenizer, [observations[b] for b in order],
                                             self.config.max_obs_tokens)
        fits = {b: obs for b, obs in zip(order, ids) if book.length[b] + len(obs) < self.budget}
        book.finish_rows([b for b in order if b not in fits], "context_budget")
        if not fits:
            return state, num_truncated, fits
        width = chunk_width(max(map(len, fits.values())))
        tokens = np.full((len(book.length), width), self.pad_id, np.int32)
        mask = np.zeros((len(book.length), width), np.int32)
        for b, obs in fits.items():
            tokens[b, :len(obs)] = obs
            mask[b, :len(obs)] = 1
        # Waiting here only makes the timings honest: the next decode needs the result anyway.
        state = jax.block_until_ready(self.engine.append(params, state, tokens, mask,
                                                         lengths=book.length))
        book.length += mask.sum(axis=1)
        return state, num_truncated, fits

    def _trajectory(self, state, book: "RowBook", stats: dict[str, float]) -> Trajectory:
        arrays = trajectory_arrays(state.cache.valid, state.cache.length, state.tokens,
                                   state.logprobs, state.policy, self.engine.put_rows(book.prompt_len),
                                   width=self.budget, pad_id=self.pad_id)
        tokens, response_end = jax.device_get((arrays["tokens"], arrays["response_end"]))
        if not np.array_equal(response_end, book.length):  # host bookkeeping must agree
            raise AssertionError(f"rollout lengths diverged: device {response_end}, host {book.length}")
        responses = self.tokenizer.batch_decode(
            [tokens[b, book.prompt_len[b]:response_end[b]].tolist() for b in range(len(tokens))],
            skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Trajectory(**arrays, turns=book.turns, searches=book.searches,
                          valid_actions=book.valid_actions, finish_reason=book.finish.astype(str),
                          responses=list(responses), stats=stats)


@dataclasses.dataclass
class RowBook:
    """Host bookkeeping of R rows: prompt_len and length (a mirror of the cache's), done,
    finish reason, and the turns / searches / valid_actions counters, all numpy [R]."""

    prompt_len: np.ndarray
    length: np.ndarray
    done: np.ndarray
    finish: np.ndarray
    turns: np.ndarray
    searches: np.ndarray
    valid_actions: np.ndarray

    @classmethod
    def start(cls, prompt_len: np.ndarray) -> "RowBook":
        rows = len(prompt_len)
        return cls(prompt_len=prompt_len.astype(np.int32), length=prompt_len.astype(np.int32),
                   done=np.zeros(rows, bool), finish=np.full(rows, "", dtype=object),
                   turns=np.zeros(rows, np.int32), searches=np.zeros(rows, np.int32),
                   valid_actions=np.zeros(rows, np.int32))

    def finish_rows(self, rows, reason: str) -> None:
        """Mark rows (an index, a list of indices or a boolean mask) done with `reason`."""
        self.done[rows] = True
        self.finish[rows] = reason
