"""Natural-sentence reading comprehension about invented entities, for real pretrained generators.

Why it exists: the synthetic benchmark (``grerank_dist.demos.synthetic``) is written in a word-level
toy language that only a reader trained on it can read. A small pretrained LLM (SmolLM2-135M)
reads ordinary English zero-shot, so this generator writes ordinary sentences instead, with the
same record format (question, answers, ctxs[{title, text, score, has_answer, is_supporting}]):

* every fact is about invented people, towns, institutions and countries, drawn fresh for each
  query, so the model cannot answer from memory and must read the gold passage;
* lookalike distractors: the same relation about a lookalike entity (same first name, another
  family name; "Tarrow Museum" for "Tarrow Institute"), and another relation about the asked
  entity whose value has the answer's type (the town someone moved to, not the one they were
  born in), so answer-type matching alone does not find the answer;
* a noisy retriever order: question-word overlap plus Gaussian noise, so the gold passage is
  often not first.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from grerank_dist.method.metrics import has_answer

FIRST_NAMES = ("Marta Jonah Elsa Tomas Ingrid Rafael Nadia Oskar Lucia Pieter Amara Henrik Sofia Mateo "
               "Freya Dmitri Leona Caspar Yusuf Greta").split()
_SYLLABLES = "bri vel lo ton mar sca dor fen gal wick ber nor tas quel rin mo vad sel kar pol thu zan".split()
_PLACE_ENDINGS = "co ford ella ton mere stad via burg holm dal".split()
INSTITUTIONS = "Institute Museum Library Academy Observatory Conservatory".split()
INSTRUMENTS = "cello trumpet harp oboe violin clarinet accordion banjo flute drums".split()
FILLERS = ("a quiet place by the river", "a market town known for its wool", "a village in the hills",
           "a fishing port on the northern coast", "a town famous for its bell tower")

STOPWORDS = frozenset("in which was the of who what does is did a an to by".split())


def invented_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def invented_town(rng: random.Random) -> str:
    return invented_word(rng, 1) + rng.choice(_PLACE_ENDINGS)


def distinct_values(rng: random.Random, make: Callable[[random.Random], str], count: int) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = make(rng)
        if value not in values:
            values.append(value)
    return values


# A relation draws one query: question, answer, gold (title, text), distractors [(title, text)].
Query = tuple[str, str, tuple[str, str], list[tuple[str, str]]]


def _birthplace(rng: random.Random) -> Query:
    first = rng.choice(FIRST_NAMES)
    last, other_last = distinct_values(rng, lambda r: invented_word(r, 3), 2)
    town, moved, lookalike_town = distinct_values(rng, invented_town, 3)
    person = f"{first} {last}"
    return (
        f"In which town was {person} born?", town,
        (person, f"{person} was born in {town}, {rng.choice(FILLERS)}, and later became a baker."),
        [(f"{first} {other_last}", f"{first} {other_last} was born in {lookalike_town}, {rng.choice(FILLERS)}."),
         (person, f"In {rng.randint(1950, 2010)}, {person} moved to {moved} to open a second bakery.")],
    )


def _founder(rng: random.Random) -> Query:
    place = invented_word(rng, 2)
    kind, other_kind = rng.sample(INSTITUTIONS, 2)
    founder, other_founder, director = (f"{rng.choice(FIRST_NAMES)} {last}" for last in distinct_values(rng, lambda r: invented_word(r, 3), 3))
    year, other_year = rng.sample(range(1850, 1990), 2)
    org, lookalike = f"the {place} {kind}", f"the {place} {other_kind}"
    return (
        f"Who founded {org}?", founder,
        (org, f"{org[0].upper() + org[1:]} was founded in {year} by {founder}."),
        [(lookalike, f"{lookalike[0].upper() + lookalike[1:]} was founded in {other_year} by {other_founder}."),
         (org, f"{director} was the director of {org} for twenty years.")],
    )


def _instrument(rng: random.Random) -> Query:
    first, sibling = rng.sample(FIRST_NAMES, 2)
    last, other_last = distinct_values(rng, lambda r: invented_word(r, 3), 2)
    own, siblings, lookalikes = rng.sample(INSTRUMENTS, 3)
    person = f"{first} {last}"
    return (
        f"What instrument does {person} play?", own,
        (person, f"{person} plays the {own} in the city orchestra."),
        [(f"{sibling} {last}", f"{sibling} {last}, a cousin of {person}, plays the {siblings} in a jazz band."),
         (f"{first} {other_last}", f"{first} {other_last} plays the {lookalikes} at weddings.")],
    )


def _capital(rng: random.Random) -> Query:
    stem = invented_word(rng, 2)
    country, lookalike = (stem + ending + "ia" for ending in rng.sample(_SYLLABLES, 2))
    capital, other_capital, port = distinct_values(rng, invented_town, 3)
    return (
        f"What is the capital of {country}?", capital,
        (country, f"The capital of {country} is {capital}, a city of old stone bridges."),
        [(lookalike, f"The capital of {lookalike} is {other_capital}, a city of canals."),
         (country, f"The largest port of {country} is {port}, on the southern coast.")],
    )


RELATIONS = {"birthplace": _birthplace, "founder": _founder, "instrument": _instrument, "capital": _capital}


def _retriever_score(question: str, text: str, noise: float, rng: random.Random) -> float:
    """Distinct question content words found in the passage, plus Gaussian noise."""
    def words(s: str) -> set[str]:
        return {w.strip("?,.").lower() for w in s.split()} - STOPWORDS

    return round(len(words(question) & words(text)) + rng.gauss(0.0, noise), 4)


def generate_reading_records(n_queries: int, seed: int, retriever_noise: float = 1.0, n_candidates: int = 3) -> list[dict]:
    """``n_queries`` records of one gold passage and ``n_candidates - 1`` distractors each, in a
    noisy retriever order; identical for identical arguments (one private RNG). The first two
    distractors are the query's own lookalikes; any further ones are the gold and lookalike
    passages of other draws of the same relation (same frame, other entities: they share the
    question's wording, not its entity)."""
    if n_candidates < 3:
        raise ValueError(f"n_candidates must be at least 3 (a gold passage and its two lookalikes), got {n_candidates}")
    rng = random.Random(seed)
    records = []
    for index in range(n_queries):
        relation = rng.choice(sorted(RELATIONS))
        question, answer, gold, distractors = RELATIONS[relation](rng)
        while len(distractors) < n_candidates - 1:
            _, _, other_gold, other_distractors = RELATIONS[relation](rng)
            distractors += [other_gold, *other_distractors][: n_candidates - 1 - len(distractors)]
        docs = [(*gold, True)] + [(title, text, False) for title, text in distractors]
        scored = sorted(((_retriever_score(question, doc[1], retriever_noise, rng), doc) for doc in docs), key=lambda pair: -pair[0])
        record_id = f"read{seed}-{index}"
        records.append({
            "id": record_id,
            "question": question,
            "answers": [answer],
            "type": relation,
            "ctxs": [
                {"id": f"{record_id}-d{position}", "title": title, "text": text, "score": score,
                 "has_answer": has_answer({"title": title, "text": text}, [answer]), "is_supporting": supporting}
                for position, (score, (title, text, supporting)) in enumerate(scored)
            ],
        })
    return records
