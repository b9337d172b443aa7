"""A seeded synthetic multi-hop QA benchmark in the project's record format.

Why it exists: the demo must show, on a laptop CPU, that G-Rerank credits *indirectly relevant*
documents (gold documents that do not contain the answer). That only works if the reader truly
needs both hops, so the world is built to defeat every shortcut:

* bridge questions ("in which city was the author of <work> , of the <last> family , born ?"):
  the family document lists the family's two members with their birth cities and years, so the
  answer document alone leaves a coin flip; the work document names the family and a city the
  author was *not* born in ("<work> is a novel by a berg whose birthplace is not oslo ."; supporting,
  no answer), which settles it. The question names the family, so a reranker that reads one
  document at a time can recognise both gold documents; the hop is in what the reader must do.
  The link is an exclusion rather than an entity chain ("written by the youngest berg") because
  the demo's tiny reader did not learn to chain entities across documents within a CPU budget
  (docs/RESULTS.md lists what was tried), while it learns the exclusion in a few thousand steps;
* comparison questions ("who was born first , <A> or <B> ?"): the two family documents that hold
  A's and B's birth years; telling which is earlier needs both years;
* hard negatives: first-name lookalikes of the people asked about (other families), works whose
  titles share a word with the asked work (by lookalikes, so a complete but wrong exclusion
  exists), a review of the asked work by the other family member (same title, same family, an
  exclusion that does not concern the author), documents sharing the question's wording, random
  documents;
* every query draws a fresh combination of names, cities, years and titles from fixed pools, so no
  fact is shared across queries: a reader cannot memorise the world, it must read;
* a lexical retriever score with noise orders the candidates, an imperfect baseline that often
  puts the bridge document below lexical lookalikes.

Entity names are single words so a word-level tokenizer makes each one a single token.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from grerank_dist.method.metrics import has_answer

FIRST_NAMES = (
    "anna boris carla dmitri elena felix greta hugo ines jonas karla lukas mila nils olga pavel "
    "rosa sven tilde ugo vera walter xenia yusuf zora amir bruno clara dario edith farid gemma "
    "hedda igor jana kurt lena marco nora oskar petra rafael sofia tomas ursula viktor wanda yara"
).split()
LAST_NAMES = (
    "berg kim novak silva moreau tanaka okafor larsen costa weber petrov haddad nakamura fischer "
    "rossi dubois kowalski jensen horvat castillo mendes yilmaz singh abe lindqvist brandt keller "
    "marsh quinn drake fontaine garcia holm ito janssen kaur lund meyer nilsson ortega park reyes "
    "sato torres vargas wolff young zeller"
).split()
CITIES = (
    "oslo lima rome cairo quito perth dakar hanoi riga porto accra basel bremen delhi dublin evora "
    "fez genoa ghent graz havana kyoto lagos leeds lyon malmo minsk munich nantes osaka padua parma "
    "pune recife salta seville tallinn tunis turin utrecht valencia vienna vilnius warsaw zagreb "
    "zurich aarhus adelaide ankara athens baku bilbao bonn bristol cork cusco dresden durban geneva "
    "tbilisi toledo tripoli verona"
).split()
TITLE_ADJECTIVES = (
    "silent hidden broken golden distant quiet frozen burning endless fallen hollow lonely secret "
    "scarlet wild ancient bitter crimson dark gentle iron lost pale restless shining stolen sunken "
    "tender velvet wandering yellow narrow"
).split()
TITLE_NOUNS = (
    "river garden mirror harbor lantern forest tower orchard compass island meadow candle letter "
    "voyage shadow violin feather mountain window kingdom season promise stranger lighthouse "
    "sparrow desert horizon palace clock anchor thread ember"
).split()
GENRES = ("novel", "poem", "play", "memoir")
YEARS = tuple(str(year) for year in range(1900, 2000))

BRIDGE_QUESTION = "in which city was the author of {work} , of the {last} family , born ?"
COMPARISON_QUESTION = "who was born first , {first} or {second} ?"
WORK_TEXT = "{work} is a {genre} by a {last} whose birthplace is not {city} ."
REVIEW_TEXT = "{work} is a {genre} reviewed by a {last} whose birthplace is not {city} ."
PERSON_LINE = "{name} was born in {city} in {year} ."
FAMILY_TITLE = "{last} family"
CITY_WORDING_TEXT = "{city} is a city where many authors were born ."
CITY_WORDING_TITLE = "{city}"
_TEMPLATES = (
    BRIDGE_QUESTION,
    COMPARISON_QUESTION,
    WORK_TEXT,
    REVIEW_TEXT,
    PERSON_LINE,
    FAMILY_TITLE,
    CITY_WORDING_TEXT,
)
# Question words that carry no content for the lexical retriever.
_RETRIEVER_STOPWORDS = frozenset("in which was the of who or , ? a is by".split())


@dataclass
class SyntheticConfig:
    """Knobs of the generator; the defaults are the demo's benchmark.

    Every family has two members, the eldest and the youngest (a family document is then 23 word
    tokens with its title, inside the demo's ``doc_max_tokens`` of 24); ``review_probability`` is
    the chance that a bridge query gets a same-title review document by a relative (the hardest
    negative: same title, same family); ``retriever_noise`` is the standard deviation of the
    Gaussian noise added to the word-overlap score.
    """

    n_candidates: int = 20
    bridge_fraction: float = 0.5
    first_name_lookalikes: int = 2
    distractor_works: int = 4
    review_probability: float = 0.5
    wording_docs: int = 2
    retriever_noise: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 <= self.bridge_fraction <= 1.0:
            raise ValueError(f"SyntheticConfig.bridge_fraction must be in [0, 1], got {self.bridge_fraction}")
        if not 0.0 <= self.review_probability <= 1.0:
            raise ValueError(f"SyntheticConfig.review_probability must be in [0, 1], got {self.review_probability}")
        if self.retriever_noise < 0:
            raise ValueError(f"SyntheticConfig.retriever_noise must be >= 0, got {self.retriever_noise}")
        gold_and_hard = 2 + self.first_name_lookalikes + self.distractor_works + 1 + self.wording_docs
        if self.n_candidates < gold_and_hard:
            raise ValueError(
                f"SyntheticConfig.n_candidates={self.n_candidates} cannot hold the gold and hard-negative "
                f"documents ({gold_and_hard} with these settings); lower the negatives or raise n_candidates"
            )


@dataclass(frozen=True)
class _Person:
    first: str
    last: str
    city: str
    year: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class _Doc:
    title: str
    text: str
    kind: str  # family | work | review | wording
    is_supporting: bool = False


class _QueryWorld:
    """The entities of one query: families (one document each) and the pools still free.

    Every last name belongs to at most one family per query, so a full name names exactly one
    person and lives in exactly one family document.
    """

    def __init__(self, rng: random.Random, config: SyntheticConfig, reserved_city: str | None) -> None:
        self.rng = rng
        self.config = config
        self.families: dict[str, list[_Person]] = {}
        self.free_last_names = list(LAST_NAMES)
        rng.shuffle(self.free_last_names)
        self.other_cities = [city for city in CITIES if city != reserved_city]

    def person(self, first: str, city: str | None = None, year: str | None = None) -> _Person:
        """A new person with a last name no family of this query uses yet."""
        return _Person(
            first,
            self.free_last_names.pop(),
            city if city is not None else self.rng.choice(self.other_cities),
            year if year is not None else self.rng.choice(YEARS),
        )

    def add_family(self, anchor: _Person | None = None) -> list[_Person]:
        """The family of ``anchor`` (or of a new random person) with one relative: same last
        name, another first name, city and birth year. Members are stored eldest first."""
        anchor = anchor if anchor is not None else self.person(self.rng.choice(FIRST_NAMES))
        relative = _Person(
            self.rng.choice([name for name in FIRST_NAMES if name != anchor.first]),
            anchor.last,
            self.rng.choice(self.other_cities),
            self.rng.choice([year for year in YEARS if year != anchor.year]),
        )
        members = sorted([anchor, relative], key=lambda person: int(person.year))
        self.families[anchor.last] = members
        return members

    def relative(self, person: _Person) -> _Person:
        """The other member of ``person``'s family."""
        return next(member for member in self.families[person.last] if member != person)

    def family_docs(self, supporting_last_names: set[str]) -> list[_Doc]:
        docs = []
        for last, members in self.families.items():
            lines = [
                PERSON_LINE.format(name=member.name, city=member.city, year=member.year) for member in members
            ]
            self.rng.shuffle(lines)  # so the line order does not tell who was born first
            docs.append(_Doc(FAMILY_TITLE.format(last=last), " ".join(lines), "family", last in supporting_last_names))
        return docs

    def people(self) -> list[_Person]:
        return [member for members in self.families.values() for member in members]


def _random_title(rng: random.Random, exclude: set[str]) -> str:
    while True:
        title = f"{rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"
        if title not in exclude:
            return title


def _lookalike_title(rng: random.Random, work: str, exclude: set[str]) -> str:
    """A title sharing exactly one word with ``work`` (same adjective or same noun)."""
    adjective, noun = work.split()
    while True:
        if rng.random() < 0.5:
            title = f"{adjective} {rng.choice(TITLE_NOUNS)}"
        else:
            title = f"{rng.choice(TITLE_ADJECTIVES)} {noun}"
        if title != work and title not in exclude:
            return title


def _work_doc(world: _QueryWorld, work: str, genre: str, author: _Person, supporting: bool = False) -> _Doc:
    text = WORK_TEXT.format(work=work, genre=genre, last=author.last, city=world.relative(author).city)
    return _Doc(work, text, "work", supporting)


def _wording_docs(world: _QueryWorld, count: int) -> list[_Doc]:
    cities = world.rng.sample(world.other_cities, count)
    return [
        _Doc(CITY_WORDING_TITLE.format(city=city), CITY_WORDING_TEXT.format(city=city), "wording") for city in cities
    ]


def _fill_with_random_docs(world: _QueryWorld, docs: list[_Doc], n_candidates: int, forbidden_authors: set[str]) -> None:
    """Pad ``docs`` (in place; family documents count) with random families and random works."""
    titles = {doc.title for doc in docs if doc.kind == "work"}
    while len(docs) + len(world.families) < n_candidates:
        if world.rng.random() < 0.6:
            world.add_family()
        else:
            authors = [person for person in world.people() if person.name not in forbidden_authors]
            title = _random_title(world.rng, titles)
            titles.add(title)
            docs.append(_work_doc(world, title, world.rng.choice(GENRES), world.rng.choice(authors)))


def _bridge_docs(rng: random.Random, config: SyntheticConfig) -> tuple[str, str, list[_Doc]]:
    answer_city = rng.choice(CITIES)
    world = _QueryWorld(rng, config, reserved_city=answer_city)
    author = world.person(rng.choice(FIRST_NAMES), city=answer_city)
    world.add_family(author)
    relative = world.relative(author)
    lookalikes = [world.person(author.first) for _ in range(config.first_name_lookalikes)]
    for lookalike in lookalikes:
        world.add_family(lookalike)
    work = _random_title(rng, set())
    genre = rng.choice(GENRES)
    docs = [_work_doc(world, work, genre, author, supporting=True)]
    # Complete but wrong exclusions: works whose title shares a word, by lookalikes (same first
    # name, other family). Nothing the relative wrote is among the candidates: its exclusion
    # would name the answer city.
    titles = {work}
    for _ in range(config.distractor_works):
        title = _lookalike_title(rng, work, titles)
        titles.add(title)
        docs.append(_work_doc(world, title, rng.choice(GENRES), rng.choice(lookalikes)))
    if rng.random() < config.review_probability:
        # same title and family as the gold work document; its exclusion concerns the reviewer
        city = world.rng.choice([c for c in world.other_cities if c != relative.city])
        text = REVIEW_TEXT.format(work=work, genre=genre, last=relative.last, city=city)
        docs.append(_Doc(work, text, "review"))
    docs += _wording_docs(world, config.wording_docs)
    _fill_with_random_docs(world, docs, config.n_candidates, forbidden_authors={relative.name})
    docs += world.family_docs(supporting_last_names={author.last})
    return BRIDGE_QUESTION.format(work=work, last=author.last), answer_city, docs


def _comparison_docs(rng: random.Random, config: SyntheticConfig) -> tuple[str, str, list[_Doc]]:
    world = _QueryWorld(rng, config, reserved_city=None)
    first_a, first_b = rng.sample(FIRST_NAMES, 2)
    year_a, year_b = rng.sample(YEARS, 2)
    person_a, person_b = world.person(first_a, year=year_a), world.person(first_b, year=year_b)
    world.add_family(person_a)
    world.add_family(person_b)
    for index in range(config.first_name_lookalikes):
        world.add_family(world.person(first_a if index % 2 == 0 else first_b))
    earlier = person_a if int(year_a) < int(year_b) else person_b
    docs = _wording_docs(world, config.wording_docs)
    _fill_with_random_docs(world, docs, config.n_candidates, forbidden_authors={person_a.name, person_b.name})
    docs += world.family_docs(supporting_last_names={person_a.last, person_b.last})
    pair = [person_a.name, person_b.name]
    rng.shuffle(pair)
    return COMPARISON_QUESTION.format(first=pair[0], second=pair[1]), earlier.name, docs


def _retriever_score(question: str, doc: _Doc, noise: float, rng: random.Random) -> float:
    """Distinct question content words found in the document, plus Gaussian noise."""
    question_words = set(question.split()) - _RETRIEVER_STOPWORDS
    doc_words = set(doc.title.split()) | set(doc.text.split())
    return round(len(question_words & doc_words) + rng.gauss(0.0, noise), 4)


def _build_record(query_index: int, seed: int, rng: random.Random, config: SyntheticConfig) -> dict:
    question_type = "bridge" if rng.random() < config.bridge_fraction else "comparison"
    builder = _bridge_docs if question_type == "bridge" else _comparison_docs
    question, answer, docs = builder(rng, config)
    rng.shuffle(docs)  # so that score ties (noise 0) do not follow construction order
    if len(docs) != config.n_candidates:
        raise AssertionError(f"built {len(docs)} candidates, expected {config.n_candidates}")
    scored = [(_retriever_score(question, doc, config.retriever_noise, rng), doc) for doc in docs]
    scored.sort(key=lambda pair: -pair[0])
    record_id = f"syn{seed}-{query_index}"
    return {
        "id": record_id,
        "question": question,
        "answers": [answer],
        "type": question_type,
        "ctxs": [
            {
                "id": f"{record_id}-d{position}",
                "title": doc.title,
                "text": doc.text,
                "score": score,
                "has_answer": has_answer({"title": doc.title, "text": doc.text}, [answer]),
                "is_supporting": doc.is_supporting,
            }
            for position, (score, doc) in enumerate(scored)
        ],
    }


def generate_records(
    n_queries: int, seed: int, n_candidates: int = 20, bridge_fraction: float = 0.5, **config_overrides: object
) -> list[dict]:
    """``n_queries`` records, identical for identical arguments (one private RNG, no global state).

    ``config_overrides`` are further :class:`SyntheticConfig` fields.
    """
    known = {field.name for field in fields(SyntheticConfig)}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise TypeError(f"generate_records got unknown SyntheticConfig fields {unknown}; known: {sorted(known)}")
    config = SyntheticConfig(n_candidates=n_candidates, bridge_fraction=bridge_fraction, **config_overrides)
    rng = random.Random(seed)
    return [_build_record(index, seed, rng, config) for index in range(n_queries)]


def split_seed(seed: int, split: str) -> int:
    """A per-split seed, so that splits never share a random stream (or a query id)."""
    return int(hashlib.sha256(f"{seed}/{split}".encode()).hexdigest()[:8], 16)


def write_synthetic_splits(
    out_dir: str | Path, sizes: Mapping[str, int], seed: int, **config_overrides: object
) -> dict[str, Path]:
    """Write ``<split>.jsonl`` for every split in ``sizes`` plus ``synthetic_config.json``;
    returns split -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, size in sizes.items():
        records = generate_records(size, split_seed(seed, split), **config_overrides)
        paths[split] = out / f"{split}.jsonl"
        with paths[split].open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    config = asdict(SyntheticConfig(**config_overrides))  # type: ignore[arg-type]
    (out / "synthetic_config.json").write_text(
        json.dumps({"seed": seed, "sizes": dict(sizes), "config": config}, indent=2) + "\n", encoding="utf-8"
    )
    return paths


def synthetic_vocabulary() -> list[str]:
    """Every word a synthetic record can contain (sorted), for building a word-level tokenizer.

    Pass it together with the prompt and document templates to
    :func:`grerank_dist.models.tokenization.build_word_tokenizer`.
    """
    template_words = {word for template in _TEMPLATES for word in template.split() if not word.startswith("{")}
    pools = (FIRST_NAMES, LAST_NAMES, CITIES, TITLE_ADJECTIVES, TITLE_NOUNS, GENRES, YEARS)
    return sorted(template_words.union(*pools))


def _check_pools_are_disjoint() -> None:
    """Entity words must be unambiguous: a city that is also a first name would break has_answer."""
    pools = {
        "FIRST_NAMES": FIRST_NAMES,
        "LAST_NAMES": LAST_NAMES,
        "CITIES": CITIES,
        "TITLE_ADJECTIVES": TITLE_ADJECTIVES,
        "TITLE_NOUNS": TITLE_NOUNS,
        "GENRES": GENRES,
    }
    template_words = {word for template in _TEMPLATES for word in template.split() if not word.startswith("{")}
    seen: dict[str, str] = {word: "templates" for word in template_words}
    for pool_name, words in pools.items():
        if len(set(words)) != len(words):
            raise AssertionError(f"{pool_name} has duplicate words")
        for word in words:
            if word in seen:
                raise AssertionError(f"word {word!r} is in both {seen[word]} and {pool_name}")
            seen[word] = pool_name


_check_pools_are_disjoint()
