"""Behaviour trajectories for the demo's supervised warm start: ideal or with a base model's mistakes.

A trajectory is the model's side of a Search-R1 episode as text segments, alternately
``("policy", text)`` (what the model writes; trained on) and ``("obs", text)`` (what the
retriever returned; masked out of the loss), e.g. for "What is the capital of Velo?"::

    policy  <think> I need to find the capital of Velo. </think>\\n<search> capital of Velo </search>
    obs     \\n\\n<information>Doc 1(Title: "Velo") Velo is a country. Its capital is Toka.\\n…</information>\\n\\n
    policy  <think> The capital of Velo is Toka. </think>\\n<answer> Toka </answer>

Observations are produced by the real retriever and formatted by
`searchr1_jax.retrieval.observation`, so they are byte for byte what a rollout would append.
A policy turn ends at ``</search>`` or ``</answer>``, where generation stops in a rollout.

Mistakes (`Noise`, each drawn independently where it applies), all ending in a wrong answer:

- no_search: answer at once, echoing the question's entity ("<think> I know the capital of Velo.
  </think>\n<answer> Velo </answer>"): a guess that is always wrong and, unlike a random
  name, predictable, so imitating it does not blur the model's copying of names.
- wrong_query: a search whose subject name has one syllable changed (BM25 then misses the
  passage); the model answers with a name from the useless results.
- wrong_answer: after a search, read the wrong name from the results (in a two-hop question a
  wrong bridge leads to a search about the wrong entity).
- stop_early: in a two-hop question, answer with the first hop's answer.

Wrong names are taken from the question's own split, so training trajectories never name a
test entity in the model's text.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from searchr1_jax.demo.names import SYLLABLES, split_syllables
from searchr1_jax.demo.world import RELATION_QUERIES, Question, World
from searchr1_jax.retrieval.observation import format_passages, wrap_information
from searchr1_jax.retrieval.types import Retriever

POLICY = "policy"
OBS = "obs"
ANSWER_KIND = {"capital": "city", "country": "country", "birthplace": "city"}


@dataclasses.dataclass(frozen=True)
class Noise:
    """Probability of each mistake where it can happen (see the module docstring)."""

    no_search: float = 0.6
    wrong_query: float = 0.05
    wrong_answer: float = 0.05
    stop_early: float = 0.6

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Noise.{field.name} must be a probability in [0, 1], got {value}")


IDEAL = Noise(no_search=0.0, wrong_query=0.0, wrong_answer=0.0, stop_early=0.0)


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """`segments`: (POLICY | OBS, text) pairs in order; `mistakes`: the noise events drawn."""

    segments: tuple[tuple[str, str], ...]
    answer: str
    correct: bool
    mistakes: tuple[str, ...]

    @property
    def num_searches(self) -> int:
        return sum(kind == OBS for kind, _ in self.segments)


def plan(relation: str, subject: str) -> str:
    return f"I need to find the {relation} of {subject}."


def guessed(relation: str, subject: str) -> str:
    """The thought of an episode that answers without searching; it differs from `plan` from its
    second word on, so one token decides whether the model searches."""
    return f"I know the {relation} of {subject}."


def found(relation: str, subject: str, answer: str) -> str:
    return f"The {relation} of {subject} is {answer}."


def think_text(*sentences: str) -> str:
    return f"<think> {' '.join(sentences)} </think>\n"


def search_text(query: str) -> str:
    return f"<search> {query} </search>"


def answer_text(answer: str) -> str:
    return f"<answer> {answer} </answer>"


def garble(name: str, taken: frozenset[str], rng: random.Random) -> str:
    """`name` with one syllable of its last word replaced, giving a word not in `taken`."""
    *first, last = name.split(" ")
    syllables = [s.lower() for s in split_syllables(last)]
    while True:
        position = rng.randrange(len(syllables))
        replacement = rng.choice([s for s in SYLLABLES if s != syllables[position]])
        word = "".join(syllables[:position] + [replacement] + syllables[position + 1 :]).capitalize()
        if word not in taken:
            return " ".join([*first, word])


class _Episode:
    """The segments written so far while the behaviour policy plays one question."""

    def __init__(self, question: Question, world: World, retriever: Retriever, topk: int, rng: random.Random):
        self.question, self.world, self.retriever, self.topk, self.rng = question, world, retriever, topk, rng
        self.segments: list[tuple[str, str]] = []
        self.mistakes: list[str] = []
        self.seen: list[str] = []  # entity names stated by the last search results

    def search(self, policy_text: str, query: str) -> None:
        passages = self.retriever.search([query], self.topk)[0]
        self.segments += [(POLICY, policy_text), (OBS, wrap_information(format_passages(passages)))]
        self.seen = [name for p in passages for name in self.world.mentions[self.world.passage_index(p.id)]]

    def wrong_name(self, kind: str, truth: str, then: Sequence[str] = ()) -> str:
        """A `kind` entity of the question's split other than `truth`, from the last results if any.

        `then`: the relations still to follow from the name; names from which they would
        lead to the question's answer anyway are excluded, so every mistake ends wrong.
        """
        names = [
            n for n in self.world.entity_names(self.question.split, kind)
            if n != truth and _follow(self.world, n, then) != self.question.answer
        ]
        seen = sorted(set(self.seen) & set(names))
        return self.rng.choice(seen or names)

    def finish(self, policy_text: str, answer: str) -> Trajectory:
        self.segments.append((POLICY, policy_text))
        return Trajectory(tuple(self.segments), answer, answer == self.question.answer, tuple(self.mistakes))


def behaviour_trajectory(
    question: Question,
    world: World,
    retriever: Retriever,
    rng: random.Random,
    noise: Noise = IDEAL,
    *,
    topk: int = 3,
) -> Trajectory:
    """One episode of the behaviour policy on `question`, searching `retriever` for real.

    Random draws happen only where a mistake can happen, in episode order, so the result is a
    pure function of the question, the retriever's answers and the state of `rng`.
    """
    episode = _Episode(question, world, retriever, topk, rng)
    relations = [hop.relation for hop in question.hops]
    if rng.random() < noise.no_search:
        episode.mistakes.append("no_search")
        # A lazy guess: the entity the question names (never the answer).
        return episode.finish(think_text(guessed(relations[0], question.subject)) + answer_text(question.subject),
                              question.subject)

    subject = question.subject
    thought = [plan(relations[0], subject)]
    for number, relation in enumerate(relations):
        query = RELATION_QUERIES[relation].format(subject)
        garbled = rng.random() < noise.wrong_query
        if garbled:
            episode.mistakes.append("wrong_query")
            query = RELATION_QUERIES[relation].format(garble(subject, world.name_words, rng))
        episode.search(think_text(*thought) + search_text(query), query)

        truth = world.fact(relation, subject)
        misread = not garbled and rng.random() < noise.wrong_answer
        if misread:
            episode.mistakes.append("wrong_answer")
        if garbled or misread:
            then = () if garbled else relations[number + 1 :]
            read = episode.wrong_name(ANSWER_KIND[relation], truth, then=then)
        else:
            read = truth
        last = number == len(relations) - 1
        stop_early = not (garbled or last) and rng.random() < noise.stop_early
        if stop_early:
            episode.mistakes.append("stop_early")
        if garbled or last or stop_early:
            return episode.finish(think_text(found(relation, subject, read)) + answer_text(read), read)
        thought = [found(relation, subject, read), plan(relations[number + 1], read)]
        subject = read
    raise AssertionError("unreachable: the last hop always finishes the episode")


def _follow(world: World, name: str, relations: Sequence[str]) -> str:
    for relation in relations:
        name = world.fact(relation, name)
    return name
