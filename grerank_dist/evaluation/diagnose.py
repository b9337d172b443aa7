"""Where an objective's signal points at the start of training, by kind of document.

Records whose ctxs carry a ``kind`` (``grerank_dist.demos.decoy_reading``: gold, decoy, overlap,
other) are read by the frozen generator under the reranker's initial scores, and this module
reports, averaged over queries and per kind:

* the answer's log-likelihood with each document alone (what PDist and EMDR distil);
* for G-Rerank's relaxed mask at each (tau, k), soft or straight-through (hard forward), over a
  few Gumbel samples: d loss / d score (negative: a gradient step raises the score), the mask
  weight the kind receives, and the answer log-likelihood under the sampled masks;
* the same gradient for the no-Gumbel ablation, PDist and EMDR, through their own functions.

Every gradient is that of the objective's own function in ``method.objectives`` on the real
collated batch, with the scores as the leaf, so a defect in the relaxed-mask path shows here.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import torch

from grerank_dist.config import TrainConfig
from grerank_dist.data.collate import Collator
from grerank_dist.evaluation.evaluate import candidate_scores, make_answerer
from grerank_dist.interface import ParallelContextGenerator
from grerank_dist.method.objectives import OBJECTIVES, answer_under_masks, single_document_masks
from grerank_dist.method.metrics import substring_exact_match
from grerank_dist.method.relax import gumbel_attention_mask, noise_generator


def kind_matrix(records: list[dict[str, Any]], n: int) -> list[list[str | None]]:
    """[B][n] the ``kind`` of each candidate, None for padding."""
    return [[ctx.get("kind") for ctx in record["ctxs"][:n]] + [None] * max(0, n - len(record["ctxs"]))
            for record in records]


def _by_kind(values: torch.Tensor, kinds: list[list[str | None]], sums: dict, counts: dict, key: str) -> None:
    for row, row_kinds in enumerate(kinds):
        for column, kind in enumerate(row_kinds):
            if kind is not None:
                sums[(key, kind)] += float(values[row, column])
                counts[(key, kind)] += 1


def signal_diagnosis(
    generator: ParallelContextGenerator,
    collator: Collator,
    reranker: torch.nn.Module,
    reranker_tokenizer: Any,
    config: TrainConfig,
    records: list[dict[str, Any]],
    settings: list[tuple[str, float, int]],
    samples: int,
    batch_size: int,
) -> dict[str, Any]:
    """Per-kind means of every statistic above. ``settings``: (mode, tau, k), mode one of
    "soft", "straight_through", "no_gumbel"; plus "pdist" and "emdr" rows (tau, k unused)."""
    n = config.data.n_candidates
    sums: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    gold_best = queries = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        kinds = kind_matrix(chunk, n)
        batch = collator(chunk, list(range(start, start + len(chunk))))
        with torch.no_grad():
            initial = candidate_scores(reranker, reranker_tokenizer, chunk, config, torch.device("cpu"))
        initial = initial.masked_fill(~batch.valid, 0.0)
        contexts = generator.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        alone = answer_under_masks(generator, contexts, batch, single_document_masks(batch.valid))
        _by_kind(alone.sum(), kinds, sums, counts, "alone_logp")
        _by_kind(alone.mean(), kinds, sums, counts, "alone_token_logp")
        _by_kind(initial, kinds, sums, counts, "initial_score")
        for row, row_kinds in enumerate(kinds):
            real = [i for i, kind in enumerate(row_kinds) if kind is not None]
            best = max(real, key=lambda i: float(alone.sum()[row, i]))
            gold_best += row_kinds[best] == "gold"
            queries += 1
        for mode, tau, k in settings:
            relax = dataclasses.replace(config.relax, tau=tau, k=k, noise=mode != "no_gumbel",
                                        straight_through=mode == "straight_through")
            draws = 1 if mode in ("no_gumbel", "pdist", "emdr") else samples
            objective = OBJECTIVES["grerank" if mode in ("soft", "straight_through", "no_gumbel") else mode]
            key = f"{mode}|{tau}|{k}"
            for draw in range(draws):
                scores = initial.clone().requires_grad_(True)
                noise = noise_generator(config.seed, 0, start * 1000 + draw)
                out = objective(generator, contexts, batch, scores, relax, noise, config.objective)
                # per-query gradients: the batch loss is a mean, so scale by the batch size
                (grad,) = torch.autograd.grad(out.loss * len(chunk), scores)
                _by_kind(grad, kinds, sums, counts, f"grad|{key}")
                if mode in ("soft", "straight_through", "no_gumbel"):
                    noise = noise_generator(config.seed, 0, start * 1000 + draw)
                    log_mask = gumbel_attention_mask(initial, k, tau, relax.kappa, generator=noise, valid=batch.valid,
                                                     noise=relax.noise, straight_through=relax.straight_through)
                    _by_kind(log_mask.exp(), kinds, sums, counts, f"weight|{key}")
                    with torch.no_grad():
                        mixed = generator.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels,
                                                          log_mask)
                    sums[("mixture_logp", key)] += float(mixed.sum().sum())
                    counts[("mixture_logp", key)] += len(chunk)
    means = {f"{name}|{kind}": sums[(name, kind)] / counts[(name, kind)] for name, kind in sums}
    means["queries"] = queries
    means["gold_most_likely_alone"] = gold_best / max(1, queries)
    return means


def reading_alone(
    generator: ParallelContextGenerator, tokenizer: Any, config: TrainConfig, records: list[dict[str, Any]],
    batch_size: int, kinds: tuple[str, ...] = ("gold", "decoy", "overlap"),
) -> dict[str, float]:
    """SubEM (percent) of the generator's greedy answer from the first passage of each kind
    alone: does the frozen generator read the gold, and how much does a decoy alone give away?"""
    answerer = make_answerer(generator, tokenizer, config, 1, torch.device("cpu"))
    hits = dict.fromkeys(kinds, 0)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        rankings = {kind: [[next(i for i, c in enumerate(r["ctxs"]) if c["kind"] == kind)] for r in chunk] for kind in kinds}
        answers = answerer(chunk, list(range(start, start + len(chunk))), rankings)
        for kind in kinds:
            hits[kind] += sum(substring_exact_match(a, r["answers"]) for a, r in zip(answers[kind], chunk))
    return {kind: 100.0 * count / len(records) for kind, count in hits.items()}
