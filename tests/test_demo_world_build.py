"""The cached demo build: files, parquet, SFT rows, tokenizer, model config, cache behaviour."""
import filecmp
import json
import os
import re
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from searchr1_jax.data.prompts import base_prompt
from searchr1_jax.data.schema import read_examples
from searchr1_jax.demo import build, tokenizer
from searchr1_jax.demo.tokenizer import EOS_TOKEN, PAD_TOKEN, TAGS
from searchr1_jax.demo.trajectories import Noise
from searchr1_jax.models.config import config_from_hf_dict
from searchr1_jax.retrieval.index import load_retriever
from searchr1_jax.retrieval.observation import format_passages, wrap_information
from searchr1_jax.rollout.observations import corrective_text


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build.build_demo(tmp_path_factory.mktemp("demo_cache"), size="small", seed=0)


@pytest.fixture(scope="module")
def hf_tokenizer(demo):
    return AutoTokenizer.from_pretrained(demo.tokenizer, local_files_only=True)


@pytest.fixture(scope="module")
def sft_rows(demo):
    return [json.loads(line) for line in demo.sft.read_text().splitlines()]


def all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_build_writes_every_file(demo):
    for path in (demo.corpus, demo.train, demo.test, demo.sft, demo.model_config, demo.manifest,
                 demo.tokenizer / "tokenizer.json", demo.index / "meta.json"):
        assert path.is_file(), path
    assert demo.root.parent == demo.corpus.parent.parent and demo.root.name.startswith("demo-small-seed0-")
    assert not [p for p in os.listdir(demo.root.parent) if p.startswith(".")]  # no staging leftovers


def test_manifest_statistics(demo):
    stats = json.loads(demo.manifest.read_text())["statistics"]
    # small: 10 countries (3 test) x 3 cities x (1 asked + 1 distractor person)
    assert stats["entities"] == {"countries": 10, "cities": 30, "persons": 60}
    assert stats["passages"] == 100
    assert stats["questions"] == {"train/demo_single_hop": 7 + 21 + 21, "train/demo_two_hop": 14 + 21,
                                  "test/demo_single_hop": 3 + 9 + 9, "test/demo_two_hop": 6 + 9}
    assert stats["bm25_ideal_query_top3"] >= 0.98 and stats["bm25_garbled_query_top3"] <= 0.4
    assert stats["sft_trajectories"] == 2 * 84  # the demo's world and one copy (relabeled)
    # world 0 is noisy (~25% correct), the copy is played well (~85% correct)
    assert 0.35 <= stats["sft_correct_rate"] <= 0.75


def test_corpus_is_wiki18_jsonl(demo):
    rows = [json.loads(line) for line in demo.corpus.read_text().splitlines()]
    assert len(rows) == 100 and all(set(r) == {"id", "contents"} for r in rows)
    title, text = rows[0]["contents"].split("\n")
    assert title.startswith('"') and title.endswith('"') and text.startswith(title.strip('"') + " is a country.")


def test_parquet_files_are_readable_search_r1_rows(demo):
    train, test = read_examples(demo.train), read_examples(demo.test)
    assert (len(train), len(test)) == (84, 36)
    for split, examples in (("train", train), ("test", test)):
        assert {e.data_source for e in examples} == {"demo_single_hop", "demo_two_hop"}
        for e in examples:
            assert e.split == split and len(e.golden_answers) == 1
            assert e.prompt == [{"role": "user", "content": base_prompt(e.question)}]
            assert e.prompt_text == e.prompt[0]["content"]
        for source in ("demo_single_hop", "demo_two_hop"):
            indices = [e.index for e in examples if e.data_source == source]
            assert indices == list(range(len(indices)))
    train_answers = {e.golden_answers[0] for e in train}
    assert not train_answers & {e.golden_answers[0] for e in test}


def test_sft_rows_replay_the_real_retriever(demo, sft_rows):
    """World 0's rows replay the demo's index; a copied world's rows state its own facts."""
    retriever = load_retriever(demo.index)
    train_prompts = {e.question: e.prompt_text for e in read_examples(demo.train)}
    assert sorted({row["world"] for row in sft_rows}) == [0, 1]
    the_world = build.make_demo_world(build.SIZES["small"], 0)
    copied = build.sft_worlds(the_world, build.SIZES["small"], 0)[1]
    copied_texts = {p.text for p in copied.passages}
    for row in sft_rows:
        if row["world"] == 1:
            assert row["correct"] == (row["mistakes"] == [])
            for obs in row["segments"][1::2]:
                stated = re.findall(r'Doc \d+\(Title: "[^"]*"\) (.*?)(?=\nDoc \d+\(|</information>)', obs["text"])
                assert stated and set(stated) <= copied_texts
            continue
        kinds = [s["kind"] for s in row["segments"]]
        assert kinds[0] == kinds[-1] == "policy" and kinds[1::2] == ["obs"] * (len(kinds) // 2)
        assert row["prompt"] in train_prompts.values()
        assert row["segments"][-1]["text"].endswith(f"<answer> {row['answer']} </answer>")
        assert row["correct"] == (row["answer"] == row["golden_answers"][0]) == (row["mistakes"] == [])
        for policy, obs in zip(row["segments"][0::2], row["segments"][1::2]):
            query = policy["text"].rsplit("<search> ", 1)[1].removesuffix(" </search>")
            assert obs["text"] == wrap_information(format_passages(retriever.search([query], 3)[0]))


def test_tokenizer_loads_offline_with_tags_as_single_tokens(hf_tokenizer, demo):
    config = json.loads((demo.tokenizer / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["clean_up_tokenization_spaces"] is False
    assert hf_tokenizer.eos_token == EOS_TOKEN and hf_tokenizer.pad_token == PAD_TOKEN
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 1)
    for tag in TAGS:
        ids = hf_tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and hf_tokenizer.decode(ids) == tag
    ids = hf_tokenizer.encode("<answer> Katora </answer>", add_special_tokens=False)
    assert hf_tokenizer.convert_ids_to_tokens(ids) == ["<answer>", "ĠKa", "to", "ra", "Ġ", "</answer>"]
    ids = hf_tokenizer.encode("<search> capital of Katora </search>", add_special_tokens=False)
    assert hf_tokenizer.convert_ids_to_tokens(ids) == ["<search>", "Ġcapital", "Ġof", "ĠKa", "to", "ra", "Ġ", "</search>"]


def test_tokenizer_round_trips_every_demo_text(hf_tokenizer, sft_rows, demo):
    texts = [row["prompt"] for row in sft_rows] + [s["text"] for row in sft_rows for s in row["segments"]]
    texts += [e.prompt_text for e in read_examples(demo.test)]
    texts += ["  odd   spacing\n\n\tTabs, Ünïcödé 中文 and <|endoftext|>", "Doc 3(Title: \"Xy\") 42%\n"]
    for text in texts:
        assert hf_tokenizer.decode(hf_tokenizer.encode(text, add_special_tokens=False)) == text


def test_corrective_message_is_one_token_per_word(hf_tokenizer):
    text = corrective_text("<search>", "</search>", "<answer>", "</answer>")
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == text
    expected = ("ĊĊ <information> My Ġprevious Ġaction Ġis Ġinvalid . ĠIf ĠI Ġwant Ġto Ġsearch , ĠI Ġshould Ġput "
                "Ġthe Ġquery Ġbetween Ġ <search> Ġand Ġ </search> . ĠIf ĠI Ġwant Ġto Ġgive Ġthe Ġfinal Ġanswer , ĠI "
                "Ġshould Ġput Ġthe Ġanswer Ġbetween Ġ <answer> Ġand Ġ </answer> . ĠLet Ġme Ġtry Ġagain . "
                "</information> ĊĊ").split(" ")
    assert hf_tokenizer.convert_ids_to_tokens(ids) == expected


def test_segments_tokenize_the_same_apart_and_joined(hf_tokenizer, sft_rows):
    for row in sft_rows[:40]:
        pieces = [row["prompt"]] + [s["text"] for s in row["segments"]]
        apart = [i for text in pieces for i in hf_tokenizer.encode(text, add_special_tokens=False)]
        assert apart == hf_tokenizer.encode("".join(pieces), add_special_tokens=False)


def test_held_out_names_use_only_tokens_that_train_answers_use(hf_tokenizer, demo):
    world = build.make_demo_world(build.SIZES["small"], seed=0)

    def name_tokens(split: str) -> set[int]:
        names = {n for q in world.questions_of(split) for hop in q.hops for n in (hop.subject, hop.answer)}
        return {i for n in names for i in hf_tokenizer.encode(f" {n}", add_special_tokens=False)}

    train, test = name_tokens("train"), name_tokens("test")
    assert len(test) > 30 and test <= train


def test_demo_texts_need_no_byte_fallback(hf_tokenizer, sft_rows):
    # Byte fallback spells a word letter by letter; no demo word or syllable is a single letter.
    for row in sft_rows:
        tokens = hf_tokenizer.tokenize(row["prompt"] + "".join(s["text"] for s in row["segments"]))
        assert not [t for t in tokens if len(t) == 1 and t.isascii() and t.isalpha()]


def test_model_config_is_a_tiny_qwen2(demo, hf_tokenizer):
    raw = json.loads(demo.model_config.read_text())
    config = config_from_hf_dict(raw, source=str(demo.model_config))
    assert config.family == "qwen2" and config.vocab_size == len(hf_tokenizer)
    assert config.tie_word_embeddings and (config.num_heads, config.num_kv_heads) == (4, 2)
    assert config.eos_token_ids == (0,) and config.pad_token_id == 1
    # hand count: embeddings 128V; per layer q 128*128+128, k,v 128*64+64 each, o 128*128,
    # mlp 3*128*384, two norms 2*128; final norm 128
    layer = (128 * 128 + 128) + 2 * (128 * 64 + 64) + 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert config.num_params == 128 * config.vocab_size + 4 * layer + 128 < 3_000_000


def test_second_build_reuses_the_cache_without_rewriting(demo):
    before = {p: (demo.root / p).stat().st_mtime_ns for p in all_files(demo.root)}
    started = time.perf_counter()
    again = build.build_demo(demo.root.parent, size="small", seed=0)
    assert time.perf_counter() - started < 1.0
    assert again == demo
    assert {p: (demo.root / p).stat().st_mtime_ns for p in all_files(demo.root)} == before


def test_same_seed_gives_identical_files_and_other_seeds_differ(demo, tmp_path):
    twin = build.build_demo(tmp_path / "twin", size="small", seed=0)
    files = all_files(demo.root)
    assert files == all_files(twin.root)
    # meta.json of the index records its build time and absolute path; everything else is bytes-equal.
    compared = [p for p in files if p != Path("bm25/meta.json")]
    match, mismatch, errors = filecmp.cmpfiles(demo.root, twin.root, [str(p) for p in compared], shallow=False)
    assert (mismatch, errors) == ([], []) and len(match) == len(compared)
    other = build.build_demo(tmp_path / "other", size="small", seed=1)
    assert other.corpus.read_bytes() != demo.corpus.read_bytes()


def test_instruction_and_noise_are_parameters(tmp_path):
    messages = build.prompt_messages("Where was Mira Katora born", "short")
    assert messages == [{"role": "user", "content": build.SHORT_INSTRUCTION.format(question="Where was Mira Katora born?")}]
    assert build.prompt_messages("Where was Mira Katora born", "search_r1") == [
        {"role": "user", "content": base_prompt("Where was Mira Katora born")}]
    assert build.cache_key("small", 0, "short", Noise()) != build.cache_key("small", 0, "search_r1", Noise())
    assert build.cache_key("small", 0, "short", Noise()) != build.cache_key("small", 0, "short", Noise(no_search=0.1))
    with pytest.raises(ValueError, match="instruction must be one of"):
        build.build_demo(tmp_path, size="small", instruction="long")
    with pytest.raises(ValueError, match="size must be one of"):
        build.build_demo(tmp_path, size="huge")


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(texts, **options):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tokenizer, "train_tokenizer", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        build.build_demo(tmp_path, size="small", seed=3)
    assert os.listdir(tmp_path) == []


def test_an_incomplete_cache_directory_is_reported(tmp_path):
    stale = tmp_path / f"demo-small-seed4-{build.cache_key('small', 4, 'search_r1', Noise())}"
    stale.mkdir()
    (stale / "corpus.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="no manifest.json"):
        build.build_demo(tmp_path, size="small", seed=4)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    return build.build_demo(tmp_path_factory.mktemp("demo_reduced"), size="reduced", seed=0, instruction="short")


def test_reduced_build_has_one_token_names_that_the_copies_train_as_outputs(reduced):
    """The suite's learning test world: every name word is one token, and every held-out name
    is written by the policy in some copied world's episodes, with other facts each time."""
    tok = AutoTokenizer.from_pretrained(reduced.tokenizer, local_files_only=True)
    the_world = build.make_demo_world(build.SIZES["reduced"], 0)
    assert all(" " not in p.name for p in the_world.persons)
    for word in the_world.name_words:
        assert len(tok.tokenize(f" {word}")) == 1 and len(tok.tokenize(f'"{word}')) == 2, word
    rows = [json.loads(line) for line in reduced.sft.read_text().splitlines()]
    assert sorted({row["world"] for row in rows}) == list(range(9))
    written_in_copies = {w for row in rows if row["world"] > 0 for s in row["segments"] if s["kind"] == "policy"
                         for w in re.findall(r"[A-Z][a-z]+", s["text"])}
    test_words = {w for name in the_world.entity_names("test") for w in name.split(" ")}
    assert test_words <= written_in_copies
    # The copies state other facts about those names: a held-out fact recurs only by chance.
    test_texts = {the_world.passages[int(q.hops[0].passage_id)].text for q in the_world.questions_of("test")}
    for copy in build.sft_worlds(the_world, build.SIZES["reduced"], 0)[1:]:
        assert len(test_texts & {p.text for p in copy.passages}) <= 2
    config = json.loads(reduced.model_config.read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == len(tok)
