"""The demo world (names, entities, passages, questions) and its behaviour trajectories."""
import collections
import dataclasses
import json
import random
import re

import pytest

from searchr1_jax.demo import names, trajectories, world
from searchr1_jax.demo.trajectories import IDEAL, OBS, POLICY, Noise, behaviour_trajectory
from searchr1_jax.retrieval.bm25 import Analyzer, Bm25Retriever, build_bm25_index
from searchr1_jax.retrieval.observation import format_passages, wrap_information

DIMS = dict(num_countries=8, num_test_countries=3, cities_per_country=3, persons_per_city=2,
            distractor_persons_per_city=1, num_given_names=10)


@pytest.fixture(scope="module")
def small_world():
    return world.make_world(7, **DIMS)


@pytest.fixture(scope="module")
def retriever(small_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_world_index")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "contents": p.contents}) + "\n" for p in small_world.passages))
    build_bm25_index(corpus, root / "bm25", show_progress=False)
    return Bm25Retriever.load(root / "bm25")


def question_entities(q: world.Question) -> set[str]:
    return {q.subject, q.answer} | {h.subject for h in q.hops} | {h.answer for h in q.hops}


# ---- names -------------------------------------------------------------------------------

def test_split_syllables_hand_examples():
    assert names.split_syllables("Katora") == ["Ka", "to", "ra"]
    assert names.split_syllables("Luzu") == ["Lu", "zu"]
    for bad in ("Kat", "Aka", "Kaxa", ""):
        with pytest.raises(ValueError, match="consonant-vowel"):
            names.split_syllables(bad)


def test_name_generator_words_are_unique_single_bm25_terms():
    gen = names.NameGenerator(random.Random(0), reserved={"capital"})
    words = [gen.word() for _ in range(300)]
    assert len({w.lower() for w in words}) == 300
    analyzer = Analyzer()
    for w in words:
        assert w[0].isupper() and len(names.split_syllables(w)) == 2
        assert analyzer.terms(w) == [w.lower()]


def test_restricted_generator_reuses_only_syllables_in_their_place():
    gen = names.NameGenerator(random.Random(1), reserved=set())
    gen.restrict_to(["Kato", "Rami", "Sulo"])
    words = [gen.word() for _ in range(5)]
    assert len(set(words)) == 5
    for w in words:
        first, second = names.split_syllables(w)
        assert first in ("Ka", "Ra", "Su") and second in ("to", "mi", "lo")
    with pytest.raises(RuntimeError, match="no new name"):
        [gen.word() for _ in range(10)]  # only 3 x 3 = 9 such words exist


# ---- world -------------------------------------------------------------------------------

def test_world_is_a_pure_function_of_the_seed(small_world):
    assert world.make_world(7, **DIMS) == small_world
    assert world.make_world(8, **DIMS) != small_world


def test_world_counts(small_world):
    w = small_world
    assert (len(w.countries), len(w.cities), len(w.persons)) == (8, 24, 72)
    assert len(w.passages) == 8 + 24 + 72 and [p.id for p in w.passages] == [str(i) for i in range(104)]
    by_type = collections.Counter((q.split, q.qtype) for q in w.questions)
    # Per country: 1 capital question, 3 city questions, 2 non-capital cities, 6 asked people (x2).
    for split, countries in (("train", 5), ("test", 3)):
        assert by_type[(split, "capital")] == countries
        assert by_type[(split, "city_country")] == 3 * countries
        assert by_type[(split, "city_capital")] == 2 * countries
        assert by_type[(split, "birthplace")] == by_type[(split, "person_country")] == 6 * countries
    assert sum(p.asked for p in w.persons) == 48


def test_splits_are_disjoint_over_entities(small_world):
    train = set().union(*(question_entities(q) for q in small_world.questions_of("train")))
    test = set().union(*(question_entities(q) for q in small_world.questions_of("test")))
    assert train and test and not train & test
    assert test <= set(small_world.entity_names("test"))
    assert not set(small_world.entity_names("train")) & set(small_world.entity_names("test"))


def test_every_hop_passage_states_its_answer(small_world):
    for q in small_world.questions:
        assert q.answer == q.hops[-1].answer
        for hop in q.hops:
            passage = small_world.passages[small_world.passage_index(hop.passage_id)]
            assert passage.title == hop.subject
            assert hop.answer in passage.text.split(" is ", 1)[1]


def test_two_hop_questions_need_two_different_passages(small_world):
    two_hop = [q for q in small_world.questions if q.data_source == world.TWO_HOP]
    assert len(two_hop) == 8 * (2 + 6)  # per country: 2 non-capital cities, 6 asked people
    for q in two_hop:
        first, second = q.hops
        assert first.passage_id != second.passage_id
        assert second.subject == first.answer
        assert q.answer not in small_world.passages[int(first.passage_id)].contents
        assert q.answer not in q.text


def test_renamed_world_keeps_the_facts_under_fresh_names_and_never_uses_a_test_word(small_world):
    renamed = world.rename(small_world, random.Random(3))
    assert renamed == world.rename(small_world, random.Random(3))
    train = [e for e in (*small_world.countries, *small_world.cities, *small_world.persons) if e.split == "train"]
    new = [*renamed.countries, *renamed.cities, *renamed.persons]
    assert len(new) == len(train) and all(e.split == "train" for e in new)
    # One word map for the whole world: the renamed entity i is the old entity i.
    word_map = {}
    for old, fresh in zip(train, new):
        for a, b in zip(old.name.split(" "), fresh.name.split(" ")):
            assert word_map.setdefault(a, b) == b  # shared given names stay shared
    assert len(set(word_map.values())) == len(word_map)
    for old, fresh in zip(train, new):
        if isinstance(old, world.Country):
            assert renamed.fact("capital", fresh.name) == word_map[old.capital]
        elif isinstance(old, world.City):
            assert renamed.fact("country", fresh.name) == word_map[old.country]
        else:
            assert renamed.fact("birthplace", fresh.name) == word_map[old.birthplace]
            assert fresh.occupation == old.occupation and fresh.asked == old.asked
    test_words = {w.lower() for n in small_world.entity_names("test") for w in n.split(" ")}
    assert not test_words & {w.lower() for w in renamed.name_words}
    assert not renamed.questions_of("test")
    assert len(renamed.questions) == len(small_world.questions_of("train"))
    # Fresh words: most differ from the names they replace.
    assert sum(a != b for a, b in word_map.items()) >= 0.9 * len(word_map)


def test_renaming_with_reuse_names_permutes_the_worlds_own_words(small_world):
    renamed = world.rename(small_world, random.Random(5), reuse_names=True)
    assert renamed == world.rename(small_world, random.Random(5), reuse_names=True)
    train = [e for e in (*small_world.countries, *small_world.cities, *small_world.persons) if e.split == "train"]
    new = [*renamed.countries, *renamed.cities, *renamed.persons]
    word_map = {}
    for old, fresh in zip(train, new):
        for a, b in zip(old.name.split(" "), fresh.name.split(" ")):
            assert word_map.setdefault(a, b) == b
    assert len(set(word_map.values())) == len(word_map)  # one word never stands for two
    assert renamed.name_words <= small_world.name_words
    for old, fresh in zip(train, new):
        if isinstance(old, world.City):
            assert renamed.fact("country", fresh.name) == word_map[old.country]
        elif isinstance(old, world.Person):
            assert renamed.fact("birthplace", fresh.name) == word_map[old.birthplace]
    # Held-out words now name train entities of the copy: 3 of 8 clusters are test, so about
    # 3/8 of the copy's words are test words.
    test_words = {w for n in small_world.entity_names("test") for w in n.split(" ")}
    share = len(renamed.name_words & test_words) / len(renamed.name_words)
    assert 0.2 <= share <= 0.6, share


def test_one_word_person_names_without_given_names():
    one_word = world.make_world(7, **{**DIMS, "num_given_names": 0})
    persons = [p.name for p in one_word.persons]
    assert all(" " not in name for name in persons) and len(set(persons)) == len(persons)
    assert len(persons) == len(world.make_world(7, **DIMS).persons)
    question = next(q for q in one_word.questions if q.qtype == "birthplace")
    assert question.text == f"Where was {question.subject} born?" and " " not in question.subject


def test_hand_checked_question_texts(small_world):
    country = small_world.countries[0]
    q = next(q for q in small_world.questions if q.qtype == "capital" and q.subject == country.name)
    assert q.text == f"What is the capital of {country.name}?"
    assert q.hops[0].query == f"capital of {country.name}"
    assert small_world.passages[0].text == f"{country.name} is a country. Its capital is {country.capital}."
    person = next(p for p in small_world.persons if p.asked)
    q2 = next(q for q in small_world.questions if q.qtype == "person_country" and q.subject == person.name)
    city = next(c for c in small_world.cities if c.name == person.birthplace)
    assert q2.text == f"In which country was {person.name} born?" and q2.answer == city.country
    assert [h.query for h in q2.hops] == [f"birthplace of {person.name}", f"country of {city.name}"]


def test_bad_world_arguments_are_named():
    with pytest.raises(ValueError, match="num_test_countries"):
        world.make_world(0, **{**DIMS, "num_test_countries": 8})
    with pytest.raises(ValueError, match="cities_per_country"):
        world.make_world(0, **{**DIMS, "cities_per_country": 1})
    with pytest.raises(ValueError, match="num_given_names"):
        world.make_world(0, **{**DIMS, "num_given_names": -1})
    with pytest.raises(KeyError, match="no 'capital' fact about 'Nowhere'"):
        world.make_world(0, **DIMS).fact("capital", "Nowhere")


def test_bm25_finds_gold_passage_for_ideal_queries_but_not_for_garbled_ones(small_world, retriever):
    hops = [h for q in small_world.questions for h in q.hops]
    found = retriever.search([h.query for h in hops], 3)
    top3 = sum(any(p.id == h.passage_id for p in ps) for h, ps in zip(hops, found)) / len(hops)
    top1 = sum(ps[0].id == h.passage_id for h, ps in zip(hops, found)) / len(hops)
    assert top3 >= 0.98 and top1 >= 0.8
    rng, taken = random.Random(0), small_world.name_words
    garbled = [h.query.replace(h.subject, trajectories.garble(h.subject, taken, rng)) for h in hops]
    found = retriever.search(garbled, 3)
    assert sum(any(p.id == h.passage_id for p in ps) for h, ps in zip(hops, found)) / len(hops) <= 0.4


# ---- trajectories ------------------------------------------------------------------------

def test_garble_changes_exactly_one_syllable_of_the_last_word():
    rng = random.Random(3)
    for _ in range(50):
        out = trajectories.garble("Mira Katora", frozenset({"Katora", "Mira"}), rng)
        given, family = out.split(" ")
        assert given == "Mira" and family != "Katora"
        diffs = [a != b for a, b in zip(names.split_syllables(family), ["Ka", "to", "ra"])]
        assert sum(diffs) == 1


def test_ideal_trajectory_hand_checked(small_world, retriever):
    q = next(q for q in small_world.questions_of("train") if q.qtype == "capital")
    t = behaviour_trajectory(q, small_world, retriever, random.Random(0), IDEAL)
    country, capital = q.subject, q.answer
    obs = retriever.search([f"capital of {country}"], 3)[0]
    gold = small_world.passages[int(q.hops[0].passage_id)]
    assert t.segments == (
        (POLICY, f"<think> I need to find the capital of {country}. </think>\n<search> capital of {country} </search>"),
        (OBS, wrap_information(format_passages(obs))),
        (POLICY, f"<think> The capital of {country} is {capital}. </think>\n<answer> {capital} </answer>"),
    )
    assert t.segments[1][1].startswith("\n\n<information>Doc 1(Title: \"") and t.segments[1][1].endswith("</information>\n\n")
    assert f'(Title: "{country}") {gold.text}' in t.segments[1][1]
    assert t.correct and t.answer == capital and t.mistakes == () and t.num_searches == 1


def test_ideal_trajectories_answer_every_question(small_world, retriever):
    rng = random.Random(0)
    for q in small_world.questions:
        t = behaviour_trajectory(q, small_world, retriever, rng, IDEAL)
        assert t.correct and t.num_searches == len(q.hops)
        kinds = [k for k, _ in t.segments]
        assert kinds == [POLICY, OBS] * len(q.hops) + [POLICY]
        assert all(text.endswith("</search>") for k, text in t.segments[:-1] if k == POLICY)
        assert t.segments[-1][1].endswith(f"<answer> {q.answer} </answer>")
        for hop, (_, text) in zip(q.hops, t.segments[0::2]):
            assert text.endswith(f"<search> {hop.query} </search>")


@pytest.mark.parametrize("mistake", ["no_search", "wrong_query", "wrong_answer", "stop_early"])
def test_each_mistake_gives_a_wrong_answer(small_world, retriever, mistake):
    noise = dataclasses.replace(IDEAL, **{mistake: 1.0})
    questions = [q for q in small_world.questions_of("train") if mistake != "stop_early" or len(q.hops) == 2]
    rng = random.Random(1)
    for q in questions:
        t = behaviour_trajectory(q, small_world, retriever, rng, noise)
        assert not t.correct and t.answer != q.answer and mistake in t.mistakes
        searches = [text for k, text in t.segments if k == POLICY and "<search>" in text]
        if mistake == "no_search":
            relation = q.hops[0].relation
            assert t.segments == ((POLICY, f"<think> I know the {relation} of {q.subject}. </think>\n"
                                           f"<answer> {t.answer} </answer>"),)
        if mistake == "wrong_query":
            assert len(searches) == 1 and not searches[0].endswith(f"<search> {q.hops[0].query} </search>")
        if mistake == "stop_early":
            assert t.num_searches == 1 and t.answer == q.hops[0].answer


def test_mistake_rates_match_the_noise(small_world, retriever):
    noise = Noise(no_search=0.4, wrong_query=0.25, wrong_answer=0.3, stop_early=0.6)
    rng = random.Random(2)
    single = [q for q in small_world.questions_of("train") if len(q.hops) == 1]
    results = [behaviour_trajectory(q, small_world, retriever, rng, noise) for q in single * 40]
    n = len(results)  # 1,000 episodes: binomial standard deviation of a rate <= 0.016
    assert sum("no_search" in t.mistakes for t in results) / n == pytest.approx(0.4, abs=0.05)
    assert sum(t.correct for t in results) / n == pytest.approx(0.6 * 0.75 * 0.7, abs=0.05)


def test_training_trajectories_never_name_test_entities(small_world, retriever):
    noisy = Noise(no_search=0.3, wrong_query=0.3, wrong_answer=0.5, stop_early=0.3)
    rng = random.Random(4)
    test_names = small_world.entity_names("test")
    for q in small_world.questions_of("train") * 5:
        t = behaviour_trajectory(q, small_world, retriever, rng, noisy)
        policy = " ".join(text for k, text in t.segments if k == POLICY)
        assert not any(re.search(rf"\b{name}\b", policy) for name in test_names)


def test_noise_rates_are_checked():
    with pytest.raises(ValueError, match="Noise.wrong_answer"):
        Noise(wrong_answer=1.5)
