"""Rollout building blocks: stop-string automaton, sampling, action parsing, observations, config.

`make_tokenizer` (also used by test_rollout.py) builds a small byte-level BPE like Qwen's:
`<search>`, `<answer>`, `</answer>` and the information tags are single added tokens, while
`</search>` is split into several tokens ("Ġ</" "search" ">" or "<" "/" "search" ">." …).
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from searchr1_jax.data.prompts import SEARCH_R1_INSTRUCTION
from searchr1_jax.retrieval.types import Passage
from searchr1_jax.rollout.actions import ANSWER, INVALID, SEARCH, read_action
from searchr1_jax.rollout.config import RolloutConfig
from searchr1_jax.rollout.engine import chunk_width, compact_sizes
from searchr1_jax.rollout.observations import (closing_text, corrective_text, observation_ids,
                                               passages_text)
from searchr1_jax.rollout.sampling import SamplingParams, filter_logits, row_keys, sample_tokens
from searchr1_jax.rollout.stops import (NOT_STOPPED, STOP_ANSWER, STOP_SEARCH,
                                        build_char_automaton, build_stop_table,
                                        check_token_texts, stop_step, token_texts)

CORRECTIVE = ("\n\n<information>My previous action is invalid. If I want to search, I should put "
              "the query between <search> and </search>. If I want to give the final answer, I "
              "should put the answer between <answer> and </answer>. Let me try again."
              "</information>\n\n")
TAGS = dict(search_open="<search>", search_stop="</search>", answer_open="<answer>",
            answer_stop="</answer>")


def make_tokenizer():
    corpus = [SEARCH_R1_INSTRUCTION, CORRECTIVE,
              'Doc 1(Title: "Paris") Paris is the capital of France.\nDoc 2(Title: "Rome") Rome '
              'is in Italy.\n',
              "<think> I need to search </think><search> capital of france </search><answer> "
              "Paris </answer>"] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in
                    ["<search>", "<answer>", "</answer>", "<think>", "</think>", "<information>",
                     "</information>"]])
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|pad|>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# -- stop strings -------------------------------------------------------------------------------
def test_char_automaton_accepts_exactly_where_a_pattern_ends():
    patterns = ["</search>", "</answer>", "<//a"]  # overlapping prefixes and a self-overlap
    auto = build_char_automaton(patterns)
    rng = np.random.RandomState(0)
    chars = list("</searchnw>x")
    for _ in range(300):
        text = "".join(rng.choice(chars, size=rng.randint(1, 40)))
        if rng.rand() < 0.5:  # plant a pattern
            at = rng.randint(len(text) + 1)
            text = text[:at] + patterns[rng.randint(3)] + text[at:]
        state = 0
        for i, c in enumerate(text):
            state = auto.delta[state, auto.alphabet.get(c, auto.other_class)]
            ending = [k + 1 for k, p in enumerate(patterns) if text[:i + 1].endswith(p)]
            assert auto.accepts[state] == (ending[0] if ending else 0), (text, i)


def _first_stop_by_decoding(tokenizer, ids, search_enabled):
    """Reference: the first prefix whose decoded text contains a stop string, and which."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ends = {STOP_ANSWER: text.find("</answer>") + len("</answer>") if "</answer>" in text else math.inf}
        if search_enabled and "</search>" in text:
            ends[STOP_SEARCH] = text.find("</search>") + len("</search>")
        kind = min(ends, key=ends.get)
        if ends[kind] < math.inf:
            return k - 1, kind
    return None, NOT_STOPPED


SPLITS = {  # ways a tokenizer may cut the stop strings
    "</search>": [["Ġ</", "search", ">"], ["<", "/", "search", ">."], [".</", "search", "><"],
                  ["<", "/", "s", "e", "ar", "c", "h", ">"]],
    "</answer>": [["</answer>"], ["<", "/", "answer", ">"], ["Ġ</", "answer", ">."]],
}


@pytest.mark.parametrize("search_enabled", [True, False])
def test_token_automaton_matches_decoded_text_however_split(tokenizer, search_enabled):
    vocab = len(tokenizer)
    table = build_stop_table(token_texts(tokenizer, vocab), "</search>", "</answer>")
    ids_of = lambda tokens: [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    splits = [ids_of(split) for pieces in SPLITS.values() for split in pieces]
    noise = ids_of(["<", "/", "Ġ</", "Ġ<", "search", "answer", "ar", "s", ">"])
    assert None not in noise and all(None not in split for split in splits)
    rng = np.random.RandomState(1)
    sequences = []
    for _ in range(300):
        ids = [int(rng.choice(noise)) if rng.rand() < 0.7 else int(rng.randint(vocab))
               for _ in range(rng.randint(1, 12))]
        for _ in range(rng.randint(0, 3)):  # plant stop strings, cut in various ways
            at = rng.randint(len(ids) + 1)
            ids[at:at] = splits[rng.randint(len(splits))]
        sequences.append(ids)
    # All sequences step through the automaton together, as rows do in the decode loop.
    width = max(map(len, sequences))
    batch = np.zeros((len(sequences), width), np.int32)
    for row, ids in enumerate(sequences):
        batch[row, :len(ids)] = ids
    state = jnp.zeros(len(sequences), jnp.int32)
    got = [(None, NOT_STOPPED)] * len(sequences)
    for k in range(width):
        state, outcome = stop_step(jnp.asarray(table.packed), state, jnp.asarray(batch[:, k]),
                                   jnp.asarray(search_enabled))
        for row in np.flatnonzero(np.asarray(outcome)):
            if got[row][0] is None and k < len(sequences[row]):
                got[row] = (k, int(outcome[row]))
    seen = {NOT_STOPPED: 0, STOP_SEARCH: 0, STOP_ANSWER: 0}
    for ids, found in zip(sequences, got):
        assert found == _first_stop_by_decoding(tokenizer, ids, search_enabled), \
            tokenizer.convert_ids_to_tokens(ids)
        seen[found[1]] += 1
    assert min(v for k, v in seen.items() if search_enabled or k != STOP_SEARCH) >= 20, seen


def test_stop_string_split_into_four_tokens_is_one_stop(tokenizer):
    ids = tokenizer.encode("<search> capital </search>", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[-3:] == ["Ġ</", "search", ">"]
    table = build_stop_table(token_texts(tokenizer, len(tokenizer)), "</search>", "</answer>")
    state, outcomes = jnp.zeros(1, jnp.int32), []
    for token in ids:
        state, outcome = stop_step(jnp.asarray(table.packed), state, jnp.asarray([token]), True)
        outcomes.append(int(outcome[0]))
    assert outcomes == [NOT_STOPPED] * (len(ids) - 1) + [STOP_SEARCH]


def test_token_texts_check(tokenizer):
    check_token_texts(tokenizer, token_texts(tokenizer, len(tokenizer)))
    # A word-level tokenizer joins tokens with spaces when decoding: per-token texts do not add up.
    words = ["<search>", "capital", "</search>", "[UNK]"]
    word_tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    word_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level = transformers.PreTrainedTokenizerFast(tokenizer_object=word_tok, unk_token="[UNK]")
    with pytest.raises(ValueError, match="do not concatenate"):
        check_token_texts(word_level, token_texts(word_level, len(word_level)),
                          probe="<search> capital </search>")


def test_token_texts_pads_ids_beyond_tokenizer(tokenizer):
    texts = token_texts(tokenizer, len(tokenizer) + 5)
    assert texts[-5:] == [""] * 5 and texts[tokenizer.convert_tokens_to_ids("search")] == "search"


# -- sampling -----------------------------------------------------------------------------------
def test_filter_logits_hand_computed():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, k, p)))[0].tolist()
    assert kept(0, 1.0) == [True, True, True, True]
    assert kept(3, 1.0) == [False, True, True, True]
    assert kept(0, 0.7) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert kept(0, 0.5) == [False, True, False, False]
    assert kept(0, 0.81) == [False, True, True, True]
    assert kept(2, 0.4) == [False, True, False, False]


def test_sample_tokens_distribution_and_full_logprobs():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 4000))
    params = SamplingParams(temperature=2.0, top_k=3, top_p=1.0)
    tokens, logprobs = sample_tokens(logits, jax.random.split(jax.random.key(0), 4000), params)
    tempered = np.asarray([0.05, 0.5, 0.15, 0.3]) ** 0.5
    want_full = np.log(tempered / tempered.sum())
    np.testing.assert_allclose(np.asarray(logprobs), want_full[np.asarray(tokens)], rtol=1e-5)
    freq = np.bincount(np.asarray(tokens), minlength=4) / 4000
    nucleus = np.where(np.arange(4) == 0, 0.0, tempered)
    np.testing.assert_allclose(freq, nucleus / nucleus.sum(), atol=0.03)


def test_row_keyed_draws_do_not_depend_on_the_batch():
    """A row's draw depends on its own logits, id and draw count only: sampled alone, in
    another batch, or at another position, it draws the same token."""
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.normal(0, 1, (6, 50)), jnp.float32)
    ids, draws = jnp.arange(6, dtype=jnp.int32) + 10, jnp.asarray([0, 3, 1, 0, 7, 2], jnp.int32)
    key, params = jax.random.key(1), SamplingParams(temperature=1.0)
    together, _ = sample_tokens(logits, row_keys(key, ids, draws), params)
    order = np.asarray([4, 1, 5])
    apart, _ = sample_tokens(logits[order], row_keys(key, ids[order], draws[order]), params)
    assert np.asarray(apart).tolist() == np.asarray(together)[order].tolist()
    # Another id or draw count is another draw: over 6 rows of 50 near-equal tokens, some differ.
    flat = jnp.zeros((6, 50))
    first, _ = sample_tokens(flat, row_keys(key, ids, draws), params)
    other_ids, _ = sample_tokens(flat, row_keys(key, ids + 1, draws), params)
    later, _ = sample_tokens(flat, row_keys(key, ids, draws + 1), params)
    assert (first != other_ids).any() and (first != later).any()


def test_greedy_records_temperature_one_logprobs():
    logits = jnp.asarray([[1.0, 3.0, 2.0], [0.5, 0.0, -1.0]])
    tokens, logprobs = sample_tokens(logits, jax.random.key(0), SamplingParams(greedy=True, temperature=0.3))
    assert np.asarray(tokens).tolist() == [1, 0]
    want = np.asarray(jax.nn.log_softmax(logits))[[0, 1], [1, 0]]
    np.testing.assert_allclose(np.asarray(logprobs), want, rtol=1e-6)



def test_greedy_picks_the_first_of_tied_maxima():
    logits = jnp.asarray([[1.0, 3.0, 3.0, 2.0], [5.0, -1.0, 5.0, 5.0], [-2.0, -3.0, -1.0, -1.5],
                          [0.0, 0.0, 0.0, 7.0]])
    tokens, _ = sample_tokens(logits, jax.random.key(0), SamplingParams(greedy=True))
    assert np.asarray(tokens).tolist() == [1, 0, 2, 3] == np.argmax(np.asarray(logits), -1).tolist()

# -- actions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("outcome, text, kind, query", [
    (STOP_SEARCH, "<think> hm </think>\n<search> capital of France </search>", SEARCH, "capital of France"),
    (STOP_SEARCH, "<search> a <search> b </search>.", SEARCH, "b"),  # last opening tag wins
    (STOP_SEARCH, "<search></search>", SEARCH, ""),
    (STOP_SEARCH, "no opening </search>", INVALID, None),
    (STOP_ANSWER, "<answer> Paris </answer>", ANSWER, None),
    (STOP_ANSWER, "Paris </answer>", INVALID, None),
    (STOP_ANSWER, "<search> x </search> then <answer> y </answer>", ANSWER, None),
    (3, "<answer> Paris", INVALID, None),  # EOS
    (4, "<search> never closed", INVALID, None),  # token limit
])
def test_read_action(outcome, text, kind, query):
    action = read_action(outcome, text, **TAGS)
    assert (action.kind, action.query) == (kind, query)


# -- observations -------------------------------------------------------------------------------
def test_corrective_text_is_search_r1_message_wrapped():
    assert corrective_text(**TAGS) == CORRECTIVE
    assert closing_text() == "</information>\n\n"


def test_observation_truncation_keeps_closing_tag(tokenizer):
    short = passages_text([Passage(id="1", title="Paris", text="Paris is the capital.")])
    assert short == '\n\n<information>Doc 1(Title: "Paris") Paris is the capital.</information>\n\n'
    long = passages_text([Passage(id=str(i), title="Rome", text="Rome is in Italy. " * 20)
                          for i in range(3)])
    (short_ids, long_ids), truncated = observation_ids(tokenizer, [short, long], 40)
    assert truncated == 1
    assert short_ids == tokenizer.encode(short, add_special_tokens=False)
    assert len(long_ids) == 40
    text = tokenizer.decode(long_ids)
    assert text.startswith("\n\n<information>Doc 1(Title: \"Rome\") Rome is")
    assert text.endswith("</information>\n\n") and text.count("</information>") == 1
    with pytest.raises(ValueError, match="max_obs_tokens"):
        observation_ids(tokenizer, [short], 2)


# -- config -------------------------------------------------------------------------------------
def test_config_defaults_and_errors():
    cfg = RolloutConfig()
    assert cfg.context_tokens == 4096 + 5 * 500 + 4 * 500
    assert (cfg.search_open, cfg.answer_open) == ("<search>", "<answer>")
    assert RolloutConfig.from_mapping({"max_turns": 2, "greedy": True}).max_turns == 2
    from_config = RolloutConfig.from_mapping(ml_collections.ConfigDict({"top_k": 5, "n_samples": 5}))
    assert (from_config.top_k, from_config.n_samples, from_config.max_turns) == (5, 5, 4)
    with pytest.raises(ValueError, match="unknown rollout config field.*'max_turn'"):
        RolloutConfig.from_mapping({"max_turn": 2})
    with pytest.raises(ValueError, match="'temperature'"):
        RolloutConfig(temperature=0.0)
    with pytest.raises(ValueError, match="'top_p'"):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValueError, match="'max_context_tokens'"):
        RolloutConfig(max_prompt_tokens=100, max_context_tokens=100)
    with pytest.raises(ValueError, match="'search_stop'"):
        RolloutConfig(search_stop="search")


def test_chunk_width():
    # powers of two up to APPEND_PIECE (64), its multiples beyond
    assert [chunk_width(n) for n in (1, 16, 17, 33, 64, 65, 100, 129, 293, 500)] == \
        [16, 16, 32, 64, 64, 128, 128, 192, 320, 512]
    assert chunk_width(4000) == 4032 and chunk_width(3000) == 3008


def test_compact_sizes_hand_values():
    # rows per shard of the phases after the first: half a shard's rows, then a quarter
    assert [compact_sizes(16, 1), compact_sizes(16, 2), compact_sizes(16, 8), compact_sizes(8, 8)] == \
        [(8, 4), (4, 2), (1,), ()]
    assert [compact_sizes(8, 1), compact_sizes(3, 1), compact_sizes(1, 1), compact_sizes(64, 16)] == \
        [(4, 2), (1,), (), (2, 1)]
