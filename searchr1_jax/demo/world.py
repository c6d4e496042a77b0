"""A reproducible world of made-up countries, cities and people, its corpus and its questions.

Three relations, one templated sentence each:

- country → capital (a city of that country): "Velo is a country. Its capital is Toka."
- city → country: "Toka is a city in Velo."
- person → birthplace (a city): "Mira Sode is a baker who was born in Toka."

Every entity has exactly one passage (title = its name) stating its facts. Each country with
its cities and the people born there forms a cluster; whole clusters are assigned to the train
or the test split, so no test question mentions or answers with an entity that any train
question mentions or answers with. People beyond `persons_per_city` are distractors: their
passages are in the corpus (sharing given names, birthplaces and wording with asked people)
but nobody asks about them. The corpus holds the passages of both splits, as a real search
engine would.

Question types (`data_source` in parentheses), each with the ideal search query per hop:

- capital (demo_single_hop): "What is the capital of Velo?" — "capital of Velo"
- city_country (demo_single_hop): "Which country is Toka in?" — "country of Toka"
- birthplace (demo_single_hop): "Where was Mira Sode born?" — "birthplace of Mira Sode"
- person_country (demo_two_hop): "In which country was Mira Sode born?" — birthplace, then
  country of the birthplace
- city_capital (demo_two_hop): "What is the capital of the country where Toka is?" —
  country of the city, then capital of that country (asked only of non-capital cities)

A two-hop answer is never stated in the first hop's passage, so it needs two searches.
`make_world` is a pure function of its arguments.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re

from searchr1_jax.demo.names import NameGenerator
from searchr1_jax.retrieval.types import Passage

SINGLE_HOP = "demo_single_hop"
TWO_HOP = "demo_two_hop"
SPLITS = ("train", "test")
KINDS = ("country", "city", "person")
OCCUPATIONS = ("baker", "farmer", "painter", "sailor", "doctor", "teacher", "weaver", "miner")

COUNTRY_TEXT = "{name} is a country. Its capital is {capital}."
CITY_TEXT = "{name} is a city in {country}."
PERSON_TEXT = "{name} is a {occupation} who was born in {birthplace}."

# relation -> ideal search query for "the <relation> of <subject>"
RELATION_QUERIES = {"capital": "capital of {}", "country": "country of {}", "birthplace": "birthplace of {}"}
# question type -> (data_source, question template, relations followed from the subject)
QUESTION_TYPES = {
    "capital": (SINGLE_HOP, "What is the capital of {}?", ("capital",)),
    "city_country": (SINGLE_HOP, "Which country is {} in?", ("country",)),
    "birthplace": (SINGLE_HOP, "Where was {} born?", ("birthplace",)),
    "person_country": (TWO_HOP, "In which country was {} born?", ("birthplace", "country")),
    "city_capital": (TWO_HOP, "What is the capital of the country where {} is?", ("country", "capital")),
}

_TEMPLATE_WORD = re.compile(r"[A-Za-z]+")


@dataclasses.dataclass(frozen=True)
class Country:
    name: str
    capital: str
    split: str


@dataclasses.dataclass(frozen=True)
class City:
    name: str
    country: str
    split: str


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    occupation: str
    birthplace: str
    split: str
    asked: bool


@dataclasses.dataclass(frozen=True)
class Hop:
    """One search step of an ideal trajectory: "the `relation` of `subject` is `answer`"."""

    relation: str
    subject: str
    passage_id: str
    answer: str

    @property
    def query(self) -> str:
        """The ideal search query for this hop, e.g. "capital of Velo"."""
        return RELATION_QUERIES[self.relation].format(self.subject)


@dataclasses.dataclass(frozen=True)
class Question:
    """`answer` equals `hops[-1].answer`; `subject` is the entity the question names."""

    id: str
    split: str
    qtype: str
    data_source: str
    text: str
    subject: str
    answer: str
    hops: tuple[Hop, ...]


@dataclasses.dataclass(frozen=True)
class World:
    """`passages[i]` has id `str(i)`; `mentions[i]` are the entity names passage i states."""

    seed: int
    countries: tuple[Country, ...]
    cities: tuple[City, ...]
    persons: tuple[Person, ...]
    passages: tuple[Passage, ...]
    mentions: tuple[tuple[str, ...], ...]
    questions: tuple[Question, ...]

    def questions_of(self, split: str) -> list[Question]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [q for q in self.questions if q.split == split]

    def passage_index(self, passage_id: str) -> int:
        if not passage_id.isdigit() or int(passage_id) >= len(self.passages):
            raise KeyError(f"no passage with id {passage_id!r} (ids are 0..{len(self.passages) - 1})")
        return int(passage_id)

    def entity_names(self, split: str, kind: str | None = None) -> list[str]:
        """Names of one split's entities of `kind` ("country", "city", "person"; None: all)."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
        kinds = KINDS if kind is None else (kind,)
        return [e.name for k in kinds for e in self._entities[k] if e.split == split]

    def fact(self, relation: str, subject: str) -> str:
        """The object of `relation` ("capital", "country", "birthplace") for `subject`."""
        try:
            return self._facts[(relation, subject)]
        except KeyError:
            raise KeyError(f"the world has no {relation!r} fact about {subject!r}") from None

    @functools.cached_property
    def name_words(self) -> frozenset[str]:
        """Every word of every entity name (given names, family names, place names)."""
        return frozenset(w for group in self._entities.values() for e in group for w in e.name.split())

    @property
    def _entities(self) -> dict[str, tuple]:
        return {"country": self.countries, "city": self.cities, "person": self.persons}

    @functools.cached_property
    def _facts(self) -> dict[tuple[str, str], str]:
        facts = {("capital", c.name): c.capital for c in self.countries}
        facts.update({("country", c.name): c.country for c in self.cities})
        facts.update({("birthplace", p.name): p.birthplace for p in self.persons})
        return facts


def _reserved_words() -> set[str]:
    templates = [COUNTRY_TEXT, CITY_TEXT, PERSON_TEXT, *OCCUPATIONS]
    templates += [question for _, question, _ in QUESTION_TYPES.values()]
    templates += list(RELATION_QUERIES.values())
    return {w.lower() for t in templates for w in _TEMPLATE_WORD.findall(t)}


def make_world(
    seed: int,
    *,
    num_countries: int,
    num_test_countries: int,
    cities_per_country: int,
    persons_per_city: int,
    distractor_persons_per_city: int,
    num_given_names: int,
) -> World:
    """Build the world; the same arguments always give the same world.

    People's given names come from a shared pool of `num_given_names` (so a query with only a
    given name is ambiguous); family names and place names are unique. With
    `num_given_names=0` people have one name word, unique like place names. Train clusters are made
    first; test names then combine only syllables that train questions and answers use in the
    same place, so the tokens of a held-out name have all been trained on.
    """
    if not 0 < num_test_countries < num_countries:
        raise ValueError(f"num_test_countries must be in (0, num_countries={num_countries}), got {num_test_countries}")
    if cities_per_country < 2:
        raise ValueError(f"cities_per_country must be ≥ 2 (a capital and another city), got {cities_per_country}")
    if persons_per_city < 1 or distractor_persons_per_city < 0 or num_given_names < 0:
        raise ValueError("persons_per_city must be ≥ 1, distractor_persons_per_city and num_given_names ≥ 0")
    rng = random.Random(seed)
    names = NameGenerator(rng, _reserved_words())
    given_names = [names.word() for _ in range(num_given_names)]

    countries, cities, persons = [], [], []
    for split, num_clusters in (("train", num_countries - num_test_countries), ("test", num_test_countries)):
        if split == "test":
            # What the model writes when answering train questions; test names reuse its syllables.
            asked = [p.name for p in persons if p.asked]
            given_names = sorted({name.split(" ")[0] for name in asked if " " in name})
            words = [c.name for c in countries] + [c.name for c in cities] + [w for name in asked for w in name.split(" ")]
            names.restrict_to(words)
        for _ in range(num_clusters):
            country = names.word()
            city_names = [names.word() for _ in range(cities_per_country)]
            countries.append(Country(country, capital=city_names[0], split=split))
            for city in city_names:
                cities.append(City(city, country=country, split=split))
                for k in range(persons_per_city + distractor_persons_per_city):
                    given = f"{rng.choice(given_names)} " if given_names else ""
                    person = given + names.word()
                    persons.append(Person(person, rng.choice(OCCUPATIONS), city, split, asked=k < persons_per_city))

    return assemble_world(seed, countries, cities, persons, rng)


def assemble_world(seed: int, countries, cities, persons, rng: random.Random) -> World:
    """The passages (one per entity, in entity order) and the shuffled, numbered questions."""
    stated = [(c.name, COUNTRY_TEXT.format(name=c.name, capital=c.capital), (c.name, c.capital)) for c in countries]
    stated += [(c.name, CITY_TEXT.format(name=c.name, country=c.country), (c.name, c.country)) for c in cities]
    stated += [
        (p.name, PERSON_TEXT.format(name=p.name, occupation=p.occupation, birthplace=p.birthplace), (p.name, p.birthplace))
        for p in persons
    ]
    passages = [Passage(id=str(i), title=title, text=text) for i, (title, text, _) in enumerate(stated)]
    mentions = tuple(stated_names for _, _, stated_names in stated)
    passage_id = {p.title: p.id for p in passages}
    world = World(seed, tuple(countries), tuple(cities), tuple(persons), tuple(passages), mentions, ())

    def question(split: str, qtype: str, subject: str) -> Question:
        data_source, template, relations = QUESTION_TYPES[qtype]
        hops, entity = [], subject
        for relation in relations:
            answer = world.fact(relation, entity)
            hops.append(Hop(relation, entity, passage_id[entity], answer))
            entity = answer
        return Question("", split, qtype, data_source, template.format(subject), subject, entity, tuple(hops))

    questions = [question(c.split, "capital", c.name) for c in countries]
    for c in cities:
        questions.append(question(c.split, "city_country", c.name))
        if world.fact("capital", c.country) != c.name:
            questions.append(question(c.split, "city_capital", c.name))
    for p in persons:
        if p.asked:
            questions += [question(p.split, "birthplace", p.name), question(p.split, "person_country", p.name)]

    rng.shuffle(questions)
    numbered = []
    for split in SPLITS:
        in_split = [q for q in questions if q.split == split]
        numbered += [dataclasses.replace(q, id=f"{split}-{i}") for i, q in enumerate(in_split)]
    return dataclasses.replace(world, questions=tuple(numbered))


def rename(world: World, rng: random.Random, *, reuse_names: bool = False) -> World:
    """A world of the train split only, with the same facts and wording but other names.

    Every word of every train name is replaced by another word (a given name shared by several
    people stays shared):

    - by default a new two-syllable word drawn from all syllables, never a word of any test
      name or of the templates. The full demo's warm start trains on several renamings: their
      names are new combinations of syllables, as held-out names are, so a model can only
      answer by copying the retrieved name syllable by syllable. Trained on the demo's own
      names alone, it learns instead to complete a name's first syllable from memory, which
      turns the held-out "Lide" into the familiar "Lilo".
    - with `reuse_names`, a word of the world's own names of either split, drawn without
      replacement. For a demo whose name words are single tokens: in the renamed copies every
      name token, held-out ones included, names entities with changing facts, so the model
      learns to copy names and can memorise none.
    """
    if reuse_names:
        pool = sorted(world.name_words)
        rng.shuffle(pool)
        draw = iter(pool).__next__
    else:
        test_words = {w.lower() for name in world.entity_names("test") for w in name.split(" ")}
        draw = NameGenerator(rng, _reserved_words() | test_words).word
    fresh: dict[str, str] = {}

    def new(name: str) -> str:
        words = name.split(" ")
        for word in words:
            if word not in fresh:
                fresh[word] = draw()
        return " ".join(fresh[w] for w in words)

    countries = [Country(new(c.name), new(c.capital), "train") for c in world.countries if c.split == "train"]
    cities = [City(new(c.name), new(c.country), "train") for c in world.cities if c.split == "train"]
    persons = [Person(new(p.name), p.occupation, new(p.birthplace), "train", p.asked)
               for p in world.persons if p.split == "train"]
    return assemble_world(world.seed, countries, cities, persons, rng)


def relabel(world: World, rng: random.Random) -> World:
    """A world of the train split only, with the same names and wording but other facts.

    Each kind's train names are shuffled among the entities of that kind, so "Velo" may now
    be the country whose capital is "Kuko". The warm start trains on several relabelings:
    a fact it memorised from one is wrong in the next, so only reading the retrieved passage
    predicts the answer, which is what held-out questions need. Test entities are left out.
    """
    def shuffled(names: list[str]) -> dict[str, str]:
        targets = list(names)
        rng.shuffle(targets)
        return dict(zip(names, targets))

    train = [e for e in (*world.countries, *world.cities, *world.persons) if e.split == "train"]
    country = shuffled([e.name for e in train if isinstance(e, Country)])
    city = shuffled([e.name for e in train if isinstance(e, City)])
    person = shuffled([e.name for e in train if isinstance(e, Person)])
    countries = [Country(country[e.name], city[e.capital], "train") for e in train if isinstance(e, Country)]
    cities = [City(city[e.name], country[e.country], "train") for e in train if isinstance(e, City)]
    persons = [Person(person[e.name], e.occupation, city[e.birthplace], "train", e.asked)
               for e in train if isinstance(e, Person)]
    return assemble_world(world.seed, countries, cities, persons, rng)
