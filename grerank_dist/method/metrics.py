"""Evaluation metrics of the paper's three settings (mining, reranker, generator; paper §4).

Answer metrics follow the SQuAD/CEPE convention: answers are normalised (lower case, ASCII
punctuation removed, the articles a/an/the dropped, whitespace collapsed) and every metric is
the maximum over the gold answers. Retrieval metrics score a ranking (candidate indices, best
first) against binary gold relevance.

Per-query functions return plain dicts, so that ranks of a distributed evaluation can gather
them (``all_gather_object``) and :func:`aggregate_metrics` can average them once, on all
queries, instead of averaging per-rank means of unequal shards.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from grerank_dist.method.relax import rank_candidates

Relevance = set[int] | frozenset[int] | Sequence[bool] | Sequence[int] | np.ndarray
"""Gold relevance of a query's candidates: a ``set`` of relevant candidate indices, or one
boolean / 0-1 label per candidate (list, tuple, numpy array). A ``set`` is always read as
indices and any other sequence as labels, so ``[0, 1]`` means "candidate 1 is relevant"."""

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Normalised answers that token F1 scores all-or-nothing (HotpotQA's evaluation script).
_CLOSED_ANSWERS = frozenset({"yes", "no", "noanswer"})

# Column orders of the paper's tables (keys as produced here, optionally prefixed by setting).
SETTING_COLUMNS = ("recall@5", "ndcg@5", "mrr", "em", "subem", "f1")
PAPER_TABLE1_COLUMNS = (
    "mining/recall@5",
    "mining/ndcg@5",
    "reranker/recall@5",
    "reranker/ndcg@5",
    "reranker/mrr",
    "generator/em",
    "generator/subem",
    "generator/f1",
)
PAPER_TABLE2_COLUMNS = ("indirect_recall@5", "indirect_mrr", "indirect_ndcg@5")

_DISPLAY_NAMES = {
    "recall": "Recall", "ndcg": "NDCG", "hit": "Hit", "mrr": "MRR", "em": "EM", "subem": "SubEM", "f1": "F1"
}


# --------------------------------------------------------------------------- answers


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop ASCII punctuation and articles, collapse spaces."""
    without_punctuation = text.lower().translate(_DROP_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", without_punctuation).split())


def _gold_answers(answers: Sequence[str]) -> Sequence[str]:
    # A bare string would silently be scored character by character.
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(f"answers must be a list of strings, got {type(answers).__name__}")
    if not answers:
        raise ValueError("answers is empty: every query needs at least one gold answer")
    return answers


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(a) for a in _gold_answers(answers)))


def substring_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """SubEM: 1.0 when some normalised gold answer is a substring of the normalised prediction.

    Gold answers that normalise to the empty string are ignored: the empty string is a
    substring of everything and would score any prediction as correct.
    """
    normalized = normalize_answer(prediction)
    golds = (normalize_answer(a) for a in _gold_answers(answers))
    return float(any(gold and gold in normalized for gold in golds))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 (bag of normalised tokens), maximum over gold answers.

    As in the HotpotQA evaluation (which CEPE uses), where the normalised prediction or gold
    answer is one of yes / no / noanswer, F1 is 1 when they are equal and 0 otherwise: "yes it
    is" gets no partial credit against "yes".
    """
    normalized = normalize_answer(prediction)
    predicted_tokens = normalized.split()
    best = 0.0
    for answer in _gold_answers(answers):
        gold = normalize_answer(answer)
        if (normalized in _CLOSED_ANSWERS or gold in _CLOSED_ANSWERS) and normalized != gold:
            continue
        gold_tokens = gold.split()
        overlap = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
        if overlap:
            precision = overlap / len(predicted_tokens)
            recall = overlap / len(gold_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def has_answer(ctx: Mapping[str, Any], answers: Sequence[str]) -> bool:
    """Whether a candidate ``{title, text}`` contains a gold answer: the project's one rule for
    the ``has_answer`` labels (NQ/TQA relevance where a file lacks it, and the answer-bearing
    documents that indirect-evidence recall leaves out), used by the loader, the converters
    and the synthetic benchmark.

    The passage text alone is searched, not the title, as DPR labels its retrieval results.
    Whole normalised tokens match (``" " + answer + " "`` inside ``" " + text + " "``), as
    DPR's token-level check does, so that "yes" is not found in "yesterday". Answers that
    normalise to nothing never match.
    """
    return answer_finder(answers)(ctx)


def answer_finder(answers: Sequence[str]) -> Callable[[Mapping[str, Any]], bool]:
    """:func:`has_answer` for one question's answers, normalised once for many candidates."""
    golds = [f" {gold} " for gold in map(normalize_answer, _gold_answers(answers)) if gold]

    def contains_answer(ctx: Mapping[str, Any]) -> bool:
        padded_text = f" {normalize_answer(ctx['text'])} "
        return any(gold in padded_text for gold in golds)

    return contains_answer


def answer_query_metrics(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """EM, SubEM and F1 of one generated answer (the generator setting)."""
    return {
        "em": exact_match(prediction, answers),
        "subem": substring_exact_match(prediction, answers),
        "f1": token_f1(prediction, answers),
    }


# --------------------------------------------------------------------------- rankings


def _to_float_array(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on GPU or requiring grad
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per candidate), got shape {array.shape}")
    return array


def rank_by_scores(scores: Any, valid: Any = None) -> list[int]:
    """Candidate indices by score, best first; ties keep the original (retriever) order.

    ``valid`` (one boolean per candidate) leaves padding candidates out of the ranking. The
    order is :func:`grerank_dist.method.relax.rank_candidates`, the rule of the training-side hard
    masks too, so a reranker that scores all candidates alike reproduces the retriever's order
    instead of an arbitrary one, here and in the generator's hard top-k.
    """
    values = _to_float_array(scores, "scores")
    if np.isnan(values).any():
        raise ValueError(f"scores contain NaN at candidate(s) {np.flatnonzero(np.isnan(values)).tolist()}")
    keep = np.ones_like(values) if valid is None else _to_float_array(valid, "valid")
    if keep.shape != values.shape:
        raise ValueError(f"valid has {keep.shape[0]} entries but scores has {values.shape[0]}")
    order = rank_candidates(torch.from_numpy(values), torch.from_numpy(keep != 0)).tolist()
    return order[: int(np.count_nonzero(keep))]


def _relevant_indices(relevant: Relevance) -> set[int]:
    if isinstance(relevant, (set, frozenset)):
        indices = set(relevant)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0]
        if bad:
            raise ValueError(f"relevant indices must be non-negative integers, got {sorted(map(repr, bad))}")
        return {int(i) for i in indices}
    labels = np.asarray(relevant)
    if labels.ndim != 1:
        raise ValueError(f"relevance labels must be one per candidate (1-D), got shape {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"relevance labels must be booleans or 0/1, got {labels.tolist()}")
    return {int(i) for i in np.flatnonzero(labels)}


def _checked(ranking: Sequence[int], relevant: Relevance) -> tuple[list[int], set[int]]:
    """Validate a ranking against its gold relevance; return (ranking, relevant indices)."""
    gold = _relevant_indices(relevant)
    order = [int(i) for i in ranking]
    if len(set(order)) != len(order):
        raise ValueError(f"ranking lists a candidate twice: {order}")
    if order and min(order) < 0:
        raise ValueError(f"ranking has a negative candidate index: {order}")
    if not isinstance(relevant, (set, frozenset)) and order and max(order) >= len(relevant):
        raise ValueError(f"ranking names candidate {max(order)} but only {len(relevant)} relevance labels were given")
    return order, gold


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return k


def recall_at_k(ranking: Sequence[int], relevant: Relevance, k: int) -> float:
    """|relevant ∩ top-k| / |relevant|: the fraction of gold-relevant candidates in the top k.

    This is the paper's Recall@5 for the multi-hop sets (gold = supporting paragraphs, two to
    four per query, so a perfect top 5 scores 1). On NQ/TQA, where relevance is "the passage
    contains an answer", it is the fraction of answer-bearing passages in the top k, which is
    not DPR's top-k accuracy (any answer-bearing passage in the top k): see :func:`hit_at_k`.
    With no relevant candidate it is 0.0 (nothing relevant was found).
    """
    order, gold = _checked(ranking, relevant)
    if not gold:
        return 0.0
    return len(gold.intersection(order[: _check_k(k)])) / len(gold)


def hit_at_k(ranking: Sequence[int], relevant: Relevance, k: int) -> float:
    """1.0 when some relevant candidate is in the top k (DPR's "top-k accuracy" on NQ/TQA)."""
    order, gold = _checked(ranking, relevant)
    return float(any(i in gold for i in order[: _check_k(k)]))


def ndcg_at_k(ranking: Sequence[int], relevant: Relevance, k: int) -> float:
    """nDCG@k with binary gains and a log2 discount.

    DCG = Σ_{r ≤ k, doc at rank r relevant} 1 / log2(r + 1) (ranks from 1); the ideal DCG puts
    all min(k, |relevant|) relevant candidates first. With no relevant candidate the ideal is
    0 and nDCG is defined as 0.0, like MRR, rather than left undefined.
    """
    order, gold = _checked(ranking, relevant)
    top = order[: _check_k(k)]
    if not gold:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 1) for rank, i in enumerate(top, start=1) if i in gold)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(gold)) + 1))
    return dcg / ideal


def mrr(ranking: Sequence[int], relevant: Relevance) -> float:
    """Reciprocal rank of the first relevant candidate (ranks from 1); 0.0 when none is ranked."""
    order, gold = _checked(ranking, relevant)
    for rank, i in enumerate(order, start=1):
        if i in gold:
            return 1.0 / rank
    return 0.0


def indirect_relevance(supporting: Sequence[bool], contains_answer: Sequence[bool]) -> list[bool]:
    """Indirectly relevant candidates (paper §4.3, App. E): gold supporting, no answer string."""
    if len(supporting) != len(contains_answer):
        raise ValueError(
            f"supporting has {len(supporting)} labels but contains_answer has {len(contains_answer)}"
        )
    return [bool(s) and not bool(a) for s, a in zip(supporting, contains_answer)]


def indirect_recall_at_k(
    ranking: Sequence[int], supporting: Sequence[bool], contains_answer: Sequence[bool], k: int
) -> float | None:
    """Recall@k of the indirectly relevant candidates; None when the query has none.

    None, not 0, because such a query says nothing about a reranker's ability to find bridge
    evidence; averages are taken over the queries that have some (App. E).
    """
    indirect = indirect_relevance(supporting, contains_answer)
    if not any(indirect):
        return None
    return recall_at_k(ranking, indirect, k)


def _ranking_metrics(
    ranking: Sequence[int], relevant: Relevance, ks: Sequence[int], prefix: str, skip_empty: bool
) -> dict[str, Any]:
    n_relevant = len(_checked(ranking, relevant)[1])
    metrics: dict[str, Any] = {f"n_{prefix}relevant": n_relevant}
    scored = n_relevant > 0 or not skip_empty
    for k in ks:
        metrics[f"{prefix}recall@{k}"] = recall_at_k(ranking, relevant, k) if scored else None
        metrics[f"{prefix}ndcg@{k}"] = ndcg_at_k(ranking, relevant, k) if scored else None
        metrics[f"{prefix}hit@{k}"] = hit_at_k(ranking, relevant, k) if scored else None
    metrics[f"{prefix}mrr"] = mrr(ranking, relevant) if scored else None
    return metrics


def retrieval_query_metrics(
    ranking: Sequence[int],
    relevant: Relevance,
    ks: Sequence[int] = (5,),
    indirect: Relevance | None = None,
    skip_queries_without_relevant: bool = False,
) -> dict[str, Any]:
    """Recall@k, nDCG@k, Hit@k (each k), MRR of one query; ``indirect_*`` too when given.

    A query with no relevant candidate scores 0 (a miss), as DPR-style top-k accuracy on NQ/TQA
    counts it; with ``skip_queries_without_relevant`` it gets None and is left out of the
    averages. Indirect metrics are None for a query without indirectly relevant candidates
    (App. E averages over the queries that have some). ``n_relevant`` /
    ``n_indirect_relevant`` record the counts.
    """
    metrics = _ranking_metrics(ranking, relevant, ks, "", skip_queries_without_relevant)
    if indirect is not None:
        metrics.update(_ranking_metrics(ranking, indirect, ks, "indirect_", True))
    return metrics


# --------------------------------------------------------------------------- records


def _ctx_flag(ctx: Mapping[str, Any], *names: str) -> bool | None:
    for name in names:
        value = ctx.get(name)
        if value is not None:
            return bool(value)
    return None


def retriever_order(scores: Sequence[float | None]) -> list[int]:
    """Positions of a query's candidates in the retriever's ranking: by descending score, ties
    in file order (:func:`rank_by_scores`), when every candidate has a score; file order otherwise.

    The rule FiD applies when it reads retrieval files, used by the loader and the NQ/TQA
    converter before they keep the first n candidates: a file need not be sorted by score.
    """
    if any(score is None for score in scores):
        return list(range(len(scores)))
    return rank_by_scores(scores)


def gold_labels(record: Mapping[str, Any]) -> tuple[list[bool], list[bool] | None]:
    """(relevance, indirect relevance) of a record's candidates.

    Multi-hop records (some ctx carries ``is_supporting``) are judged by the gold supporting
    flags and get indirect labels; NQ/TQA-style records by ``has_answer`` (``hasanswer``
    accepted), computed from the text with :func:`has_answer` where a ctx lacks it, and have no
    indirect labels.
    """
    ctxs = record["ctxs"]
    contains = []
    for ctx in ctxs:
        flag = _ctx_flag(ctx, "has_answer", "hasanswer")
        contains.append(has_answer(ctx, record["answers"]) if flag is None else flag)
    if not any(ctx.get("is_supporting") is not None for ctx in ctxs):
        return contains, None
    supporting = [bool(ctx.get("is_supporting")) for ctx in ctxs]
    return supporting, indirect_relevance(supporting, contains)


def aggregate_metrics(per_query: Iterable[Mapping[str, Any]], group_key: str = "type") -> dict[str, Any]:
    """Average per-query metric dicts into flat keys, overall and per query type.

    Every float-valued key is averaged over the queries where it is not None; a key that is
    None everywhere is left out. ``n_queries`` counts all queries; ``n_queries_without_relevant``
    and ``n_queries_with_indirect`` come from the ``n_relevant`` / ``n_indirect_relevant``
    counts. Queries whose ``group_key`` field is a non-empty string are also averaged per
    group, under ``"{group}/{key}"`` (e.g. ``bridge/indirect_recall@5``).
    """
    queries = list(per_query)
    result = _mean_metrics(queries)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for query in queries:
        group = query.get(group_key)
        if isinstance(group, str) and group:
            groups.setdefault(group, []).append(query)
    for group, members in sorted(groups.items()):
        result.update({f"{group}/{key}": value for key, value in _mean_metrics(members).items()})
    return result


def _mean_metrics(queries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for query in queries:
        for key, value in query.items():
            if isinstance(value, float):
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
    result: dict[str, Any] = {key: sums[key] / counts[key] for key in sums}
    result["n_queries"] = len(queries)
    if any("n_relevant" in q for q in queries):
        result["n_queries_without_relevant"] = sum(q.get("n_relevant") == 0 for q in queries)
    if any("n_indirect_relevant" in q for q in queries):
        result["n_queries_with_indirect"] = sum(bool(q.get("n_indirect_relevant")) for q in queries)
    return result


@dataclass
class RetrievalEvaluator:
    """Collects per-query retrieval (and optionally answer) metrics; :meth:`compute` averages.

    ``per_query`` holds one dict per query (``id``, ``type`` and the metrics), ready to be
    gathered across ranks and passed to :func:`aggregate_metrics`.
    """

    ks: tuple[int, ...] = (1, 5, 10)
    skip_queries_without_relevant: bool = False
    per_query: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        ranking: Sequence[int],
        relevant: Relevance,
        *,
        indirect: Relevance | None = None,
        query_id: str | None = None,
        query_type: str | None = None,
        prediction: str | None = None,
        answers: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Score one query's ranking (and its generated answer when ``prediction`` is given)."""
        metrics: dict[str, Any] = {"id": query_id, "type": query_type}
        metrics.update(
            retrieval_query_metrics(ranking, relevant, self.ks, indirect, self.skip_queries_without_relevant)
        )
        if prediction is not None:
            if answers is None:
                raise ValueError("a prediction needs its gold answers")
            metrics.update(answer_query_metrics(prediction, answers))
        self.per_query.append(metrics)
        return metrics

    def add_record(
        self, record: Mapping[str, Any], scores: Any, valid: Any = None, prediction: str | None = None
    ) -> dict[str, Any]:
        """Score a project record from its candidates' scores (gold labels from :func:`gold_labels`)."""
        relevant, indirect = gold_labels(record)
        n_scores = len(_to_float_array(scores, "scores"))
        if n_scores < len(relevant):
            raise ValueError(f"record {record.get('id')!r}: {len(relevant)} candidates but {n_scores} scores")
        # Scores past the record's candidates belong to padding and are never ranked.
        ranking = [i for i in rank_by_scores(scores, valid) if i < len(relevant)]
        return self.add(
            ranking,
            relevant,
            indirect=indirect,
            query_id=record.get("id"),
            query_type=record.get("type") or None,
            prediction=prediction,
            answers=record["answers"] if prediction is not None else None,
        )

    def compute(self) -> dict[str, Any]:
        """Flat averages over every query added so far (see :func:`aggregate_metrics`)."""
        return aggregate_metrics(self.per_query)


# --------------------------------------------------------------------------- reporting


def _display_name(key: str) -> str:
    parts = key.split("/")
    name, _, k = parts[-1].partition("@")
    words = [_DISPLAY_NAMES.get(w, w) for w in name.split("_")]
    label = " ".join(w.capitalize() if w.islower() else w for w in words) + (f"@{k}" if k else "")
    return " ".join([p.capitalize() for p in parts[:-1]] + [label])


def _format_cell(value: Any, percent: bool, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):  # already formatted (e.g. "mean ± std" over seeds)
        return value
    if isinstance(value, (bool, int)):
        return str(int(value))
    return f"{value * 100 if percent else value:.{digits}f}"


def metrics_table_markdown(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] = SETTING_COLUMNS,
    percent: bool = True,
    digits: int = 1,
) -> str:
    """A markdown table, one row per method, in the paper's column order.

    Default order, the paper's Table 1 within one setting: Recall@5, NDCG@5, MRR, EM, SubEM,
    F1. :data:`PAPER_TABLE1_COLUMNS` gives the full Table 1 (mining Recall@5, NDCG@5; reranker
    Recall@5, NDCG@5, MRR; generator EM, SubEM, F1) for keys prefixed ``mining/``,
    ``reranker/``, ``generator/``; :data:`PAPER_TABLE2_COLUMNS` the indirect-evidence Table 2
    (Recall, MRR, NDCG). Fractions are shown as percentages, counts as integers, a missing
    value as "–".
    """
    header = "| Method | " + " | ".join(_display_name(c) for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [header, rule]
    for method, metrics in rows.items():
        cells = [_format_cell(metrics.get(column), percent, digits) for column in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
