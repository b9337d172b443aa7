"""The decoy reading records: one gold, answer-bearing decoys, question-shaped negatives, BM25 order."""

from __future__ import annotations

import math
from collections import Counter

from grerank_dist.demos.decoy_reading import DECOY, GOLD, OVERLAP, bm25_scores, generate_decoy_records, tokens
from grerank_dist.method.metrics import has_answer


def test_every_record_has_one_gold_three_answer_bearing_decoys_and_overlap_negatives_without_the_answer():
    records = generate_decoy_records(200, seed=3)
    assert {len(r["ctxs"]) for r in records} == {7, 8}
    for record in records:
        kinds = Counter(ctx["kind"] for ctx in record["ctxs"])
        assert kinds[GOLD] == 1 and kinds[DECOY] == 3 and kinds[OVERLAP] == 3
        question_words = set(tokens(record["question"]))
        for ctx in record["ctxs"]:
            assert ctx["is_supporting"] == (ctx["kind"] == GOLD)
            assert ctx["has_answer"] == has_answer(ctx, record["answers"])
            if ctx["kind"] in (GOLD, DECOY):
                assert ctx["has_answer"], ctx
            if ctx["kind"] == OVERLAP:
                assert not ctx["has_answer"]
                # most of the question's words, another fact
                assert len(question_words & set(tokens(ctx["title"] + " " + ctx["text"]))) >= len(question_words) - 1


def test_the_bm25_order_ranks_the_hard_negatives_above_the_gold():
    records = generate_decoy_records(200, seed=4)
    for record in records:
        scores = [ctx["score"] for ctx in record["ctxs"]]
        assert scores == sorted(scores, reverse=True)
    gold_rank = [next(i for i, c in enumerate(r["ctxs"]) if c["kind"] == GOLD) for r in records]
    overlap_rank = [i for r in records for i, c in enumerate(r["ctxs"]) if c["kind"] == OVERLAP]
    assert sum(rank == 0 for rank in gold_rank) / len(records) < 0.1  # BM25 Recall@1
    assert sum(gold_rank) / len(gold_rank) > sum(overlap_rank) / len(overlap_rank) + 2
    # the gold shares fewer question words than any overlap negative
    for record in records[:50]:
        shared = {c["kind"]: len(set(tokens(record["question"])) & set(tokens(c["text"]))) for c in record["ctxs"]}
        assert shared[GOLD] < shared[OVERLAP]


def test_bm25_equals_the_formula_computed_by_hand():
    # corpus of three passages; question terms "red" and "fox"
    passages = ["red fox", "red red hen", "blue sky sky sky"]
    df = Counter(term for p in passages for term in set(tokens(p)))
    average = (2 + 3 + 4) / 3
    scores = bm25_scores("red fox", passages, df, 3, average)

    def idf(n_t):
        return math.log(1 + (3 - n_t + 0.5) / (n_t + 0.5))

    def term(tf, length):
        return tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / average))

    assert math.isclose(scores[0], idf(2) * term(1, 2) + idf(1) * term(1, 2), abs_tol=1e-4)
    assert math.isclose(scores[1], idf(2) * term(2, 3), abs_tol=1e-4)
    assert scores[2] == 0.0


def test_records_are_a_pure_function_of_the_arguments():
    assert generate_decoy_records(20, seed=9) == generate_decoy_records(20, seed=9)
    assert generate_decoy_records(20, seed=9) != generate_decoy_records(20, seed=10)
