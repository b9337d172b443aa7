"""Reading records with no lexical shortcut: decoy answers and question-shaped negatives, BM25 order.

Why it exists: in :mod:`grerank_dist.demos.reading` only the gold passage holds the answer string,
so "rank the passage that contains the answer first" or plain word overlap could look like a
reranker that learned from the generator. Here, for every query:

* one **gold** passage states the answer in other words than the question's (little overlap);
* three **decoy** passages hold the answer string in a role that does not answer, next to another
  value in the asked role: a lookalike's cat beside the lookalike's dog, the town where the
  person's mother grew up beside the one where she works, the club's treasurer, a ship the
  person's grandfather built beside the one he captained;
* three **overlap** passages repeat most of the question's words and state another fact,
  without the answer;
* about half of the queries get an eighth candidate, the gold passage of another draw of the
  same relation (7 or 8 candidates: the padding path is exercised too).

The decoys' second value is what lets a small generator tell them from the gold: a decoy with the
answer string alone is copied from as readily as the gold (SmolLM2-135M, measured while
writing this module), so the generator's signal could not prefer the gold at all.

Every entity is invented and drawn fresh for each query, so the generator must read. The
retriever score is Okapi BM25 of the question against title + text, with document frequencies
from the split's own passages, so the retriever order puts the overlap passages first and mostly
the decoys next: BM25 never ranks the gold first. Every ctx carries its ``kind`` (gold / decoy /
overlap / other) and ``role`` (which decoy or overlap template) for diagnostics.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

from grerank_dist.demos.reading import distinct_values, invented_town, invented_word
from grerank_dist.method.metrics import has_answer

FIRST_NAMES = ("Marta Jonah Elsa Tomas Ingrid Rafael Nadia Oskar Lucia Pieter Amara Henrik Sofia Mateo Freya "
               "Dmitri Leona Caspar Yusuf Greta Ilse Bruno Carmen Anton Vera").split()
DOG_NAMES = ("Biscuit Pepper Juniper Maple Clover Pickle Ziggy Nutmeg Bramble Waffle Sprocket Tofu Pippin "
             "Marmalade Cobble Tansy Figaro Bonbon Dumpling Quince").split()
_SHIP_WORDS = ("Amber Silver Northern Quiet Scarlet Morning Iron Gentle Copper Winter Wren Gull Heron Tern "
               "Petrel Swan Otter Marlin Comet Lantern").split()
STOPWORDS = frozenset("a an the of in on at to by for and or is was does did who what which whose how "
                      "his her its their it that this with as from".split())

# kind of each candidate, in the order a relation returns them
GOLD, DECOY, OVERLAP, OTHER = "gold", "decoy", "overlap", "other"

Passage = tuple[str, str]  # (title, text)
# A relation draws one query: question, answer, gold, three decoys, three overlap passages.
Query = tuple[str, str, Passage, list[Passage], list[Passage]]


def _people(rng: random.Random) -> tuple[str, str, str]:
    """The asked person, a lookalike (same first name, another family) and a relative (same family)."""
    first, relative_first = rng.sample(FIRST_NAMES, 2)
    last, other_last = distinct_values(rng, lambda r: invented_word(r, 3), 2)
    return f"{first} {last}", f"{first} {other_last}", f"{relative_first} {last}"


def _dog(rng: random.Random) -> Query:
    person, lookalike, relative = _people(rng)
    name, other = rng.sample(DOG_NAMES, 2)
    return (
        f"What is the name of {person}'s dog?", name,
        (person, f"After a long search for a quiet house, {person} adopted a spaniel called {name}."),
        [(lookalike, f"The name of {lookalike}'s dog is {other}, and {name} is the name of the cat."),
         (relative, f"{relative}, the cousin of {person}, has a dog named {other} and a cat named {name}."),
         (person, f"{person}'s neighbour has a dog called {other} and a parrot called {name}.")],
        [(person, f"{person} never told anyone the name of the dog."),
         (person, f"The dog of {person} has a name that is hard to spell."),
         (person, f"{person}'s dog won a prize, and its name was printed in the paper.")],
    )


def _workplace(rng: random.Random) -> Query:
    person, lookalike, relative = _people(rng)
    town, other = distinct_values(rng, invented_town, 2)
    return (
        f"In which town does {person} work?", town,
        (person, f"Each weekday, after a long bus ride, {person} arrives at an office in {town}."),
        [(lookalike, f"{lookalike} works in the town of {other} and was born in the town of {town}."),
         (relative, f"{relative}, the mother of {person}, works in the town of {other} and grew up in {town}."),
         (person, f"{person}'s neighbour works in the town of {other}, a short drive from {town}.")],
        [(person, f"{person} does not like to talk about work or about the town."),
         (person, f"{person} hopes to work in a bigger town one day."),
         (person, f"Which town {person} should work in was a question {person} asked every year.")],
    )


def _club(rng: random.Random) -> Query:
    place = invented_word(rng, 2)
    other_place = invented_word(rng, 2)
    founder, *_ = _people(rng)
    sport = rng.choice(("Chess", "Rowing", "Hiking", "Cycling"))
    club, other = f"the {place} {sport} Club", f"the {other_place} {sport} Club"
    return (
        f"Who founded {club}?", founder,
        (club, f"In a cold kitchen one winter, {founder} started a small {sport.lower()} circle in {place} that grew into a club."),
        [(club, f"{founder} is the treasurer of {club}, which was founded long ago."),
         (other, f"{founder} founded {other}."),
         (club, f"{club[0].upper() + club[1:]} meets every Tuesday in the house of {founder}.")],
        [(club, f"{club[0].upper() + club[1:]} was founded in a cold winter."),
         (club, f"The name of whoever founded {club} is written on a plaque in its hall."),
         (club, f"Who founded {club} is a question its members like to argue about.")],
    )


def _ship(rng: random.Random) -> Query:
    person, lookalike, relative = _people(rng)
    ship, other = (" ".join(pair) for pair in distinct_values(rng, lambda r: tuple(r.sample(_SHIP_WORDS, 2)), 2))
    return (
        f"Which ship did {person} captain?", ship,
        (person, f"{person} was the captain of the {ship} for ten years."),
        [(lookalike, f"{lookalike} sailed on the {ship} and later captained the ship {other}."),
         (relative, f"{relative}, the grandfather of {person}, built the {ship} and was captain of the ship {other}."),
         (person, f"{person}'s neighbour was first mate on the {ship} and captain of the ship {other}.")],
        [(person, f"{person} was a ship captain for thirty years."),
         (person, f"Which ship {person} would captain next was never certain."),
         (person, f"{person} did captain a ship, and the crew liked the captain.")],
    )


RELATIONS = {"dog": _dog, "workplace": _workplace, "club": _club, "ship": _ship}


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens without stopwords (possessive 's dropped), BM25's terms."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower().replace("'s", "")) if w not in STOPWORDS]


def bm25_scores(question: str, passages: list[str], document_frequency: Counter, n_documents: int,
                average_length: float, k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 of ``question`` against each passage, with the corpus statistics given."""
    terms = set(tokens(question))
    scores = []
    for passage in passages:
        words = tokens(passage)
        counts, length = Counter(words), len(words)
        score = 0.0
        for term in terms:
            tf = counts[term]
            if tf:
                idf = math.log(1.0 + (n_documents - document_frequency[term] + 0.5) / (document_frequency[term] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average_length))
        scores.append(round(score, 4))
    return scores


def generate_decoy_records(n_queries: int, seed: int, extra_candidate_rate: float = 0.5) -> list[dict]:
    """``n_queries`` records of 7 or 8 candidates each (gold, 3 decoys, 3 overlap passages, and
    with probability ``extra_candidate_rate`` another draw's gold passage), in BM25 order;
    identical for identical arguments (one private RNG)."""
    rng = random.Random(seed)
    drawn = []
    for _ in range(n_queries):
        relation = rng.choice(sorted(RELATIONS))
        question, answer, gold, decoys, overlaps = RELATIONS[relation](rng)
        docs = [(*gold, GOLD, GOLD)] + [(*d, DECOY, f"{DECOY}{j}") for j, d in enumerate(decoys)]
        docs += [(*d, OVERLAP, f"{OVERLAP}{j}") for j, d in enumerate(overlaps)]
        if rng.random() < extra_candidate_rate:
            docs.append((*RELATIONS[relation](rng)[2], OTHER, OTHER))
        drawn.append((relation, question, answer, docs))
    passages = [f"{title} {text}" for *_, docs in drawn for title, text, *_ in docs]
    document_frequency = Counter(term for passage in passages for term in set(tokens(passage)))
    average_length = sum(len(tokens(p)) for p in passages) / max(1, len(passages))
    records = []
    for index, (relation, question, answer, docs) in enumerate(drawn):
        scores = bm25_scores(question, [f"{title} {text}" for title, text, *_ in docs], document_frequency,
                             len(passages), average_length)
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], rng.random()))
        record_id = f"decoy{seed}-{index}"
        records.append({
            "id": record_id, "question": question, "answers": [answer], "type": relation,
            "ctxs": [
                {"id": f"{record_id}-d{position}", "title": docs[i][0], "text": docs[i][1], "score": scores[i],
                 "has_answer": has_answer({"text": docs[i][1]}, [answer]), "is_supporting": docs[i][2] == GOLD,
                 "kind": docs[i][2], "role": docs[i][3]}
                for position, i in enumerate(order)
            ],
        })
    return records
