"""Metrics against hand-computed values (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grerank_dist.method.metrics import (
    PAPER_TABLE1_COLUMNS,
    PAPER_TABLE2_COLUMNS,
    RetrievalEvaluator,
    aggregate_metrics,
    exact_match,
    gold_labels,
    has_answer,
    hit_at_k,
    indirect_recall_at_k,
    metrics_table_markdown,
    mrr,
    ndcg_at_k,
    normalize_answer,
    rank_by_scores,
    recall_at_k,
    retrieval_query_metrics,
    substring_exact_match,
    token_f1,
)

# ------------------------------------------------------------------ answers


@pytest.mark.parametrize(
    "text, expected",
    [
        # lower -> "the  eiffel-tower!" ; punctuation removed -> "the  eiffeltower" ; "the" dropped
        ("The  Eiffel-Tower!", "eiffeltower"),
        # "an apple, a day" -> "an apple a day" -> articles dropped -> "apple day"
        ("An apple, a day", "apple day"),
        # articles only as whole words: "theatre" and "anthem" stay
        ("Theatre anthem", "theatre anthem"),
        ("\tU.S.  Army\n", "us army"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    # "the Beatles." -> "beatles" == "The Beatles" -> "beatles"
    assert exact_match("the Beatles.", ["The Beatles"]) == 1.0
    # "beatles band" != "beatles"
    assert exact_match("Beatles band", ["The Beatles"]) == 0.0
    # several gold answers: max over them ("1889" matches the second)
    assert exact_match("1889", ["31 March 1889", "1889"]) == 1.0


def test_substring_exact_match() -> None:
    # "they were beatles of course" contains "beatles"
    assert substring_exact_match("They were The Beatles, of course", ["beatles"]) == 1.0
    # only gold-in-prediction counts: "beat" does not contain "beatles"
    assert substring_exact_match("Beat", ["Beatles"]) == 0.0
    # max over gold answers: "in 1889" contains "1889" but not "31 march 1889"
    assert substring_exact_match("in 1889", ["31 March 1889", "1889"]) == 1.0
    # a gold answer that normalises to "" must not match everything
    assert substring_exact_match("anything", ["The"]) == 0.0


def test_token_f1() -> None:
    # pred tokens [big, red, dog, barked] (4); gold "a red dog" -> [red, dog] (2); overlap 2
    # P = 2/4, R = 2/2 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert token_f1("the big red dog barked", ["a red dog"]) == pytest.approx(2 / 3)
    # second gold [big, dog, barked, loudly]: overlap 3, P = R = 3/4 -> F1 = 0.75 = max
    assert token_f1("the big red dog barked", ["a red dog", "big dog barked loudly"]) == pytest.approx(0.75)
    # repeated tokens count once per match: {dog:2, cat:1} & {dog:1, cat:2} = 2; P = R = 2/3
    assert token_f1("dog dog cat", ["dog cat cat"]) == pytest.approx(2 / 3)
    assert token_f1("Paris", ["London"]) == 0.0


def test_token_f1_yes_no_noanswer_need_an_exact_match() -> None:
    # HotpotQA/CEPE convention: where the normalised prediction or gold is yes / no / noanswer,
    # F1 is 1 when they are equal and 0 otherwise (no partial token credit)
    assert token_f1("Yes.", ["yes"]) == 1.0
    # plain token F1 would give P = 1/3, R = 1 -> 0.5
    assert token_f1("yes it is", ["yes"]) == 0.0
    # plain token F1 would give P = 1, R = 1/2 -> 2/3
    assert token_f1("no", ["no way"]) == 0.0
    assert token_f1("noanswer", ["no answer"]) == 0.0
    assert token_f1("noanswer", ["NoAnswer"]) == 1.0
    # the rule applies per gold answer, then the maximum: gold "no" gives 0, gold "yes sir
    # please" gives P = 2/2, R = 2/3 -> F1 = 2 * (2/3) / (5/3) = 0.8
    assert token_f1("yes sir", ["no", "yes sir please"]) == pytest.approx(0.8)


def test_answer_metrics_reject_a_bare_string_and_no_answers() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        exact_match("x", "x")
    with pytest.raises(ValueError, match="empty"):
        token_f1("x", [])


def passage(text: str, title: str = "") -> dict[str, str]:
    return {"title": title, "text": text}


def test_has_answer_matches_whole_normalised_tokens() -> None:
    assert has_answer(passage("He was born in Leeds, England."), ["leeds"])
    # "yes" is not a word of "yesterday"
    assert not has_answer(passage("It happened yesterday."), ["yes"])
    # tokens must be contiguous: "ernest miller hemingway" lacks "ernest hemingway"
    assert not has_answer(passage("Ernest Miller Hemingway was a novelist."), ["Ernest Hemingway"])
    # punctuation-insensitive: "the U.S. Army" -> "us army"; second gold answer matches
    assert has_answer(passage("He served in the U.S. Army."), ["Navy", "US Army"])


def test_has_answer_reads_the_passage_text_not_the_title() -> None:
    # DPR's rule: an answer in the title alone does not make the passage answer-bearing
    assert not has_answer(passage("A city in West Yorkshire.", title="Leeds"), ["Leeds"])
    assert has_answer(passage("Leeds is a city.", title="Yorkshire"), ["Leeds"])
    record = {"answers": ["Leeds"], "ctxs": [passage("A city.", title="Leeds"), passage("Born in Leeds.", title="Marsh")]}
    assert gold_labels(record) == ([False, True], None)  # unlabelled ctxs get the same rule


# ------------------------------------------------------------------ rankings


def test_rank_by_scores_breaks_ties_by_original_order() -> None:
    # 2.0 (idx 1), 2.0 (idx 4), 1.0 (idx 3), 0.5 (idx 0), 0.5 (idx 2)
    assert rank_by_scores([0.5, 2.0, 0.5, 1.0, 2.0]) == [1, 4, 3, 0, 2]
    # the invalid candidate 3 is left out
    assert rank_by_scores(np.array([0.5, 2.0, 0.5, 1.0, 2.0]), valid=[1, 1, 1, 0, 1]) == [1, 4, 0, 2]
    # equal scores reproduce the retriever's order
    assert rank_by_scores(torch.zeros(4, requires_grad=True)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="NaN"):
        rank_by_scores([0.1, float("nan")])


RANKING = [3, 0, 4, 1, 2, 5]
GOLD_SET = {0, 2, 5}
GOLD_LABELS = [1, 0, 1, 0, 0, 1]  # the same relevance as labels


@pytest.mark.parametrize("relevant", [GOLD_SET, GOLD_LABELS, np.array(GOLD_LABELS, dtype=bool)])
def test_recall_hit_ndcg_mrr(relevant) -> None:
    # top-2 = {3, 0}: one of three relevant
    assert recall_at_k(RANKING, relevant, 2) == pytest.approx(1 / 3)
    # top-5 = {3, 0, 4, 1, 2}: two of three
    assert recall_at_k(RANKING, relevant, 5) == pytest.approx(2 / 3)
    assert hit_at_k(RANKING, relevant, 1) == 0.0  # candidate 3 is not relevant
    assert hit_at_k(RANKING, relevant, 2) == 1.0
    # relevant at ranks 2 and 5: DCG = 1/log2(3) + 1/log2(6) = 0.63093 + 0.38685 = 1.01778
    # ideal, 3 relevant first: 1/log2(2) + 1/log2(3) + 1/log2(4) = 1 + 0.63093 + 0.5 = 2.13093
    assert ndcg_at_k(RANKING, relevant, 5) == pytest.approx(1.01778 / 2.13093, abs=1e-5)
    # first relevant at rank 2
    assert mrr(RANKING, relevant) == 0.5


def test_ndcg_ideal_uses_min_of_k_and_number_relevant() -> None:
    # k = 2 with 3 relevant: the top two are relevant, DCG = ideal = 1 + 1/log2(3)
    assert ndcg_at_k([0, 2, 1, 5], GOLD_SET, 2) == pytest.approx(1.0)
    # one relevant at rank 3 of k = 3: (1/log2(4)) / 1 = 0.5
    assert ndcg_at_k([1, 2, 0], {0}, 3) == pytest.approx(0.5)


def test_no_relevant_candidate_scores_zero() -> None:
    assert recall_at_k([0, 1, 2], set(), 2) == 0.0
    assert ndcg_at_k([0, 1, 2], [0, 0, 0], 2) == 0.0
    assert mrr([0, 1, 2], [0, 0, 0]) == 0.0
    assert hit_at_k([0, 1, 2], set(), 3) == 0.0


def test_ties_decide_rank_metrics_through_the_stable_order() -> None:
    # scores tie between candidates 0 and 1; relevant is 1: ranking [0, 1, 2] -> MRR 1/2
    ranking = rank_by_scores([1.0, 1.0, 0.2])
    assert mrr(ranking, {1}) == 0.5
    assert recall_at_k(ranking, {1}, 1) == 0.0


def test_ranking_and_relevance_are_checked() -> None:
    with pytest.raises(ValueError, match="twice"):
        recall_at_k([0, 0, 1], {1}, 2)
    with pytest.raises(ValueError, match="0/1"):
        recall_at_k([0, 1], [0, 2], 1)
    with pytest.raises(ValueError, match="positive integer"):
        ndcg_at_k([0, 1], {1}, 0)
    with pytest.raises(ValueError, match="only 2 relevance labels"):
        mrr([0, 1, 2], [1, 0])


def test_indirect_recall() -> None:
    # supporting [T, T, F, T, F] and answer-bearing [F, T, T, F, F]: indirect = {0, 3}
    supporting = [True, True, False, True, False]
    contains = [False, True, True, False, False]
    # ranking [1, 2, 0, 4, 3]: top-3 holds 0 of {0, 3} -> 1/2; top-5 holds both -> 1
    assert indirect_recall_at_k([1, 2, 0, 4, 3], supporting, contains, 3) == 0.5
    assert indirect_recall_at_k([1, 2, 0, 4, 3], supporting, contains, 5) == 1.0
    # every supporting document holds the answer: no indirect document -> None
    assert indirect_recall_at_k([0, 1], [True, True], [True, True], 1) is None


# ------------------------------------------------------------------ per query and aggregates


def test_retrieval_query_metrics_without_relevant() -> None:
    # DPR's top-k convention: a query with no relevant candidate is a miss, scored 0
    counted = retrieval_query_metrics([0, 1], [0, 0], ks=(1,))
    assert counted == {"n_relevant": 0, "recall@1": 0.0, "ndcg@1": 0.0, "hit@1": 0.0, "mrr": 0.0}
    skipped = retrieval_query_metrics([0, 1], [0, 0], ks=(1,), skip_queries_without_relevant=True)
    assert skipped == {"n_relevant": 0, "recall@1": None, "ndcg@1": None, "hit@1": None, "mrr": None}


MULTIHOP_RECORD = {
    "id": "q1",
    "type": "bridge",
    "question": "Where was the director of Harbour Lights born?",
    "answers": ["Leeds"],
    "ctxs": [
        {"title": "Harbour Lights", "text": "A film by Alan Marsh.", "has_answer": False, "is_supporting": True},
        {"title": "Alan Marsh", "text": "Alan Marsh was born in Leeds.", "has_answer": True, "is_supporting": True},
        {"title": "Leeds", "text": "Leeds is a city.", "has_answer": True, "is_supporting": False},
        {"title": "Whitby", "text": "Whitby is a town.", "has_answer": False, "is_supporting": False},
    ],
}


def test_evaluator_on_a_multihop_record() -> None:
    evaluator = RetrievalEvaluator(ks=(1, 5))
    # scores [0.1, 0.9, 0.8, 0.3] -> ranking [1, 2, 3, 0]; supporting {0, 1}; indirect {0}
    metrics = evaluator.add_record(MULTIHOP_RECORD, torch.tensor([0.1, 0.9, 0.8, 0.3]), prediction="leeds.")
    assert metrics["recall@1"] == 0.5  # candidate 1 of {0, 1}
    assert metrics["recall@5"] == 1.0
    assert metrics["ndcg@1"] == 1.0  # ideal over min(1, 2) = 1 slot
    # relevant at ranks 1 and 4: (1 + 1/log2(5)) / (1 + 1/log2(3)) = 1.43068 / 1.63093
    assert metrics["ndcg@5"] == pytest.approx(1.43068 / 1.63093, abs=1e-5)
    assert metrics["mrr"] == 1.0
    # the indirect document 0 sits at rank 4
    assert metrics["indirect_recall@1"] == 0.0
    assert metrics["indirect_recall@5"] == 1.0
    assert metrics["indirect_mrr"] == 0.25
    assert metrics["indirect_ndcg@5"] == pytest.approx(1 / math.log2(5))  # 0.43068
    assert (metrics["em"], metrics["subem"], metrics["f1"]) == (1.0, 1.0, 1.0)
    assert metrics["n_relevant"] == 2 and metrics["n_indirect_relevant"] == 1


def test_evaluator_on_an_nq_record_with_padding_scores() -> None:
    record = {
        "id": "nq1",
        "answers": ["Canberra"],
        "ctxs": [
            {"title": "Sydney", "text": "Sydney is a city.", "hasanswer": False},
            {"title": "Canberra", "text": "Canberra is the capital.", "hasanswer": True},
            # no label: computed from the text -> True
            {"title": "Australia", "text": "The capital is Canberra."},
        ],
    }
    relevant, indirect = gold_labels(record)
    assert relevant == [False, True, True] and indirect is None
    # five scores, the last two are padding (invalid) and must never be ranked
    metrics = RetrievalEvaluator(ks=(1,)).add_record(record, [0.5, 0.1, 0.2, 9.0, 9.0], valid=[1, 1, 1, 0, 0])
    # ranking [0, 2, 1]: first relevant (2) at rank 2
    assert metrics["mrr"] == 0.5
    assert metrics["recall@1"] == 0.0
    assert "indirect_mrr" not in metrics


@pytest.mark.parametrize("skip", [False, True])
def test_aggregate_averages_over_scored_queries_and_by_type(skip: bool) -> None:
    evaluator = RetrievalEvaluator(ks=(2,), skip_queries_without_relevant=skip)
    evaluator.add([0, 1, 2], {0}, query_type="bridge")  # recall@2 = 1
    evaluator.add([0, 1, 2], {1, 2}, query_type="comparison")  # recall@2 = 1/2
    evaluator.add([0, 1, 2], set(), query_type="bridge")  # no relevant: 0 by default, or left out
    result = evaluator.compute()
    # counted: (1 + 1/2 + 0) / 3 = 0.5; skipped: (1 + 1/2) / 2 = 0.75
    assert result["recall@2"] == pytest.approx(0.75 if skip else 0.5)
    # MRR: 1, 1/2 (and 0) -> 0.75 skipped, 0.5 counted
    assert result["mrr"] == pytest.approx(0.75 if skip else 0.5)
    assert result["n_queries"] == 3 and result["n_queries_without_relevant"] == 1
    # bridge: 1 and the query without relevant -> 1 skipped, (1 + 0) / 2 counted
    assert result["bridge/recall@2"] == (1.0 if skip else 0.5) and result["bridge/n_queries"] == 2
    assert result["comparison/recall@2"] == 0.5
    # the same dicts gathered from two "ranks" give the same aggregate
    assert aggregate_metrics(evaluator.per_query[:1] + evaluator.per_query[1:]) == result


def test_aggregate_leaves_out_metrics_no_query_has() -> None:
    per_query = [retrieval_query_metrics([0, 1], {0}, ks=(1,), indirect=[0, 0])]
    result = aggregate_metrics(per_query)
    assert "indirect_recall@1" not in result
    assert result["n_queries_with_indirect"] == 0


# ------------------------------------------------------------------ table


def test_metrics_table_markdown_in_paper_order() -> None:
    rows = {
        "G-Rerank": {"recall@5": 0.8333, "ndcg@5": 0.847, "mrr": 0.959, "em": 0.611, "subem": 0.665, "f1": 0.763},
        "EMDR": {"recall@5": 0.78, "ndcg@5": 0.805, "mrr": 0.959, "em": 0.608, "subem": 0.661},
    }
    assert metrics_table_markdown(rows) == (
        "| Method | Recall@5 | NDCG@5 | MRR | EM | SubEM | F1 |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| G-Rerank | 83.3 | 84.7 | 95.9 | 61.1 | 66.5 | 76.3 |\n"
        "| EMDR | 78.0 | 80.5 | 95.9 | 60.8 | 66.1 | – |\n"
    )


def test_paper_table_headers() -> None:
    table1 = metrics_table_markdown({}, PAPER_TABLE1_COLUMNS).splitlines()[0]
    assert table1 == (
        "| Method | Mining Recall@5 | Mining NDCG@5 | Reranker Recall@5 | Reranker NDCG@5 | Reranker MRR"
        " | Generator EM | Generator SubEM | Generator F1 |"
    )
    rows = {"G-Rerank": {"indirect_recall@5": 0.722, "indirect_mrr": 0.495, "n_queries": 7405}}
    table2 = metrics_table_markdown(rows, (*PAPER_TABLE2_COLUMNS, "n_queries")).splitlines()
    assert table2[0] == "| Method | Indirect Recall@5 | Indirect MRR | Indirect NDCG@5 | N Queries |"
    assert table2[2] == "| G-Rerank | 72.2 | 49.5 | – | 7405 |"
