"""The synthetic multi-hop benchmark: determinism, record validity, and that every question is
answerable from its gold documents, checked by parsing the documents' text with regular
expressions written here (independently of the generator's internals)."""

from __future__ import annotations

import json
import re

import pytest

from grerank_dist.data.records import read_records
from grerank_dist.demos.synthetic import generate_records, synthetic_vocabulary, write_synthetic_splits
from grerank_dist.models.tokenization import build_word_tokenizer

BRIDGE_Q = re.compile(r"^in which city was the author of (\w+ \w+) , of the (\w+) family , born \?$")
COMPARISON_Q = re.compile(r"^who was born first , (\w+ \w+) or (\w+ \w+) \?$")
WORK_DOC = re.compile(r"^(\w+ \w+) is a \w+ by a (\w+) whose birthplace is not (\w+) \.$")
PERSON_LINE = re.compile(r"(\w+ (\w+)) was born in (\w+) in (\d{4}) \.")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_records(200, seed=11)


def _contains_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def _person_lines(ctx: dict) -> list[tuple[str, str, str]]:
    """(name, city, year) of every person line."""
    return [(name, city, year) for name, _, city, year in PERSON_LINE.findall(ctx["text"])]


def _family_cities(ctx: dict, last: str) -> list[str]:
    """Birth cities of the members of family ``last`` that ``ctx`` lists."""
    return [city for _, family, city, _ in PERSON_LINE.findall(ctx["text"]) if family == last]


def _solve_from_text(record: dict) -> tuple[str, set[int]]:
    """The answer and the gold ctx positions, derived only from the question and the texts."""
    ctxs = record["ctxs"]
    bridge = BRIDGE_Q.match(record["question"])
    if bridge:
        work, family = bridge.groups()
        work_docs = [i for i, c in enumerate(ctxs) if (m := WORK_DOC.match(c["text"])) and m.group(1) == work]
        assert len(work_docs) == 1, record["id"]
        _, last, not_there = WORK_DOC.match(ctxs[work_docs[0]]["text"]).groups()
        assert last == family, record["id"]
        family_docs = [i for i, c in enumerate(ctxs) if _family_cities(c, last)]
        assert len(family_docs) == 1, record["id"]
        cities = _family_cities(ctxs[family_docs[0]], last)
        assert len(cities) == 2 and not_there in cities, record["id"]
        (answer,) = [city for city in cities if city != not_there]
        return answer, {work_docs[0], family_docs[0]}
    comparison = COMPARISON_Q.match(record["question"])
    assert comparison, record["question"]
    found = {}
    for name in comparison.groups():
        hits = [(i, int(year)) for i, c in enumerate(ctxs) for who, _, year in _person_lines(c) if who == name]
        assert len(hits) == 1, (record["id"], name)
        found[name] = hits[0]
    (name_a, (doc_a, year_a)), (name_b, (doc_b, year_b)) = found.items()
    assert year_a != year_b
    return (name_a if year_a < year_b else name_b), {doc_a, doc_b}


def test_same_seed_same_records_other_seed_other_records() -> None:
    assert generate_records(30, seed=5) == generate_records(30, seed=5)
    assert generate_records(30, seed=5) != generate_records(30, seed=6)


def test_records_have_the_project_fields_and_candidate_count(records: list[dict]) -> None:
    for record in records:
        assert set(record) == {"id", "question", "answers", "type", "ctxs"}
        assert record["type"] in ("bridge", "comparison")
        assert len(record["ctxs"]) == 20
        assert len({c["id"] for c in record["ctxs"]}) == 20
        for ctx in record["ctxs"]:
            assert set(ctx) == {"id", "title", "text", "score", "has_answer", "is_supporting"}
            assert isinstance(ctx["has_answer"], bool) and isinstance(ctx["is_supporting"], bool)
        scores = [c["score"] for c in record["ctxs"]]
        assert scores == sorted(scores, reverse=True)
    assert len({r["id"] for r in records}) == len(records)
    assert len(generate_records(3, seed=1, n_candidates=24)[0]["ctxs"]) == 24


def test_every_question_is_answerable_from_its_gold_documents_and_flags_match(records: list[dict]) -> None:
    for record in records:
        answer, gold = _solve_from_text(record)
        assert record["answers"] == [answer]
        expected_type = "bridge" if BRIDGE_Q.match(record["question"]) else "comparison"
        assert record["type"] == expected_type
        for position, ctx in enumerate(record["ctxs"]):
            assert ctx["is_supporting"] == (position in gold), (record["id"], position)
            # has_answer reads the passage text (metrics.has_answer); the title never holds the
            # answer here, so a title-and-text rule would give the same labels
            assert ctx["has_answer"] == _contains_phrase(ctx["text"], answer), (record["id"], position)
            assert not _contains_phrase(ctx["title"], answer), (record["id"], position)
        # exactly one gold document holds the answer; the other one is indirectly relevant
        assert sorted(record["ctxs"][i]["has_answer"] for i in gold) == [False, True]
        assert sum(c["has_answer"] for c in record["ctxs"]) == 1


def test_gold_answer_document_alone_is_ambiguous_and_lookalikes_exist(records: list[dict]) -> None:
    """The answer document lists two relatives (so the bridge document's exclusion is needed)
    and people sharing the asked first name live in other documents (so copying a city or year
    is usually wrong); the question names the family."""
    answer_share_of_person_lines = []
    for record in records:
        answer, gold = _solve_from_text(record)
        answer_doc = next(i for i in gold if record["ctxs"][i]["has_answer"])
        lines = _person_lines(record["ctxs"][answer_doc])
        assert len(lines) == 2
        assert len({last for last in (name.split()[1] for name, _, _ in lines)}) == 1  # one family
        asked = [name for name, city, _ in lines if city == answer or name == answer]
        if record["type"] == "bridge":
            assert len([city for _, city, _ in lines if city == answer]) == 1
        first_names = {name.split()[0] for name in asked} if record["type"] == "bridge" else {answer.split()[0]}
        lookalike_docs = [
            i
            for i, c in enumerate(record["ctxs"])
            if i not in gold and any(name.split()[0] in first_names for name, _, _ in _person_lines(c))
        ]
        assert lookalike_docs, record["id"]
        if record["type"] == "bridge":
            all_lines = [line for c in record["ctxs"] for line in _person_lines(c)]
            assert sum(city == answer for _, city, _ in all_lines) == 1
            answer_share_of_person_lines.append(1 / len(all_lines))
    # a reader copying the city of a random person line is wrong at least 7 times in 8
    assert max(answer_share_of_person_lines) <= 1 / 8


def test_retriever_order_is_an_imperfect_baseline(records: list[dict]) -> None:
    both_gold_top2, bridge_doc_top2 = [], []
    for record in records:
        _, gold = _solve_from_text(record)
        both_gold_top2.append(gold == {0, 1})
        if record["type"] == "bridge":
            bridge_doc = next(i for i in gold if not record["ctxs"][i]["has_answer"])
            bridge_doc_top2.append(bridge_doc < 2)
    assert 0.05 < sum(both_gold_top2) / len(both_gold_top2) < 0.6
    assert 0.1 < sum(bridge_doc_top2) / len(bridge_doc_top2) < 0.8
    types = [r["type"] for r in records]
    assert 0.35 < types.count("bridge") / len(types) < 0.65


def test_every_entity_is_one_token_of_a_word_tokenizer_built_from_the_vocabulary(records: list[dict]) -> None:
    tokenizer = build_word_tokenizer(synthetic_vocabulary(), "decoder")
    for record in records[:40]:
        texts = [record["question"], *record["answers"]] + [f"{c['title']} {c['text']}" for c in record["ctxs"]]
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, text
            assert len(ids) == len(text.split()), text  # one token per word: names, cities, years


def test_splits_are_written_readable_and_distinct(tmp_path) -> None:
    paths = write_synthetic_splits(tmp_path, {"train": 12, "test": 6}, seed=3)
    train, _ = read_records(paths["train"], n_candidates=20)
    test, _ = read_records(paths["test"], n_candidates=20)
    assert len(train) == 12 and len(test) == 6
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    saved = json.loads((tmp_path / "synthetic_config.json").read_text())
    assert saved["seed"] == 3 and saved["sizes"] == {"train": 12, "test": 6}
    assert write_synthetic_splits(tmp_path / "again", {"train": 12, "test": 6}, seed=3)["train"].read_text() == (
        paths["train"].read_text()
    )


def test_bad_settings_are_rejected_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="bridge_fraction"):
        generate_records(2, seed=0, bridge_fraction=1.5)
    with pytest.raises(ValueError, match="n_candidates"):
        generate_records(2, seed=0, n_candidates=5)
    with pytest.raises(TypeError, match="unknown SyntheticConfig fields"):
        generate_records(2, seed=0, no_such_knob=1)
