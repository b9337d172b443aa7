"""Relevance mining with G-Rerank (paper App. F): which of a query's candidates does the frozen
generator need to produce the known answer?

    grerank mine --config configs/tiny_cpu.yaml [--data FILE] [--out DIR] [--steps 60 --lr 0.2] [key=value ...]

No reranker: each query gets learnable per-document weights w, initialised at zero, and G-Rerank's
relaxed top-k mask over w is optimised against the answer's NLL (App. F). The learned w ranks the
candidates. Next to it, App. F.1's scalar baselines on the same queries: the answer's likelihood
with each document alone (lowest perplexity), the generator's attention mass on each document
(highest attention), and the rise of the answer's NLL without each document (largest
leave-one-out drop). Writes OUT/relevance.jsonl (per query and candidate: the learned weight and
each baseline's score), OUT/metrics.json and OUT/metrics.md (the mining-setting metrics of the
four rankings against the gold labels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from grerank_dist.atomic import write_text
from grerank_dist.config import RelaxConfig, TrainConfig, load_config
from grerank_dist.data.collate import Collator
from grerank_dist.data.records import read_records
from grerank_dist.interface import Batch
from grerank_dist.evaluation.evaluate import single_process_generator, table_columns
from grerank_dist.interface import EncodedContexts, ParallelContextGenerator
from grerank_dist.method.metrics import aggregate_metrics, gold_labels, metrics_table_markdown, rank_by_scores, retrieval_query_metrics
from grerank_dist.method.objectives import answer_under_masks, leave_one_out_masks, single_document_masks
from grerank_dist.method.relax import gumbel_attention_mask, noise_generator

MINED = "grerank_mined"
BASELINES = ("lowest_perplexity", "highest_attention", "largest_loo_drop")


def mine_relevance(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    relax: RelaxConfig,
    steps: int,
    lr: float,
    noise: torch.Generator | None,
) -> torch.Tensor:
    """Learned relevance [B, n] (-inf on padding): per-document weights from zero, Adam on the
    answer's mean per-token NLL under G-Rerank's relaxed mask. The loss is the SUM of the
    queries' losses and Adam is element-wise, so the B queries are optimised exactly as one at a
    time would be, in one batched decoder call per step."""
    weights = torch.zeros(batch.valid.shape, device=batch.valid.device, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=lr)
    for _ in range(steps):
        log_mask = gumbel_attention_mask(weights, relax.k, relax.tau, relax.kappa, generator=noise, valid=batch.valid)
        answer = generator.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, log_mask)
        optimizer.zero_grad()
        (-answer.mean()).sum().backward()
        optimizer.step()
    return weights.detach().masked_fill(~batch.valid, -torch.inf)


def scalar_baselines(
    generator: ParallelContextGenerator, contexts: EncodedContexts, batch: Batch
) -> dict[str, torch.Tensor]:
    """App. F.1's per-document scores [B, n], higher = more relevant: the answer's mean per-token
    log-likelihood with the document alone, the value-norm-weighted attention mass with all
    candidates (only where the generator offers ``document_attention_mass``), and the rise of
    the answer's NLL without the document (over all candidates: mining has no top-k set)."""
    valid = batch.valid
    alone = answer_under_masks(generator, contexts, batch, single_document_masks(valid)).mean()
    without = -answer_under_masks(generator, contexts, batch, leave_one_out_masks(valid)).mean()
    scores = {"lowest_perplexity": alone, "largest_loo_drop": without[:, :-1] - without[:, -1:]}
    if hasattr(generator, "document_attention_mass"):
        full_set = torch.zeros(valid.shape, device=valid.device).masked_fill(~valid, -torch.inf)
        with torch.no_grad():
            scores["highest_attention"] = generator.document_attention_mass(
                contexts, batch.input_ids, batch.attention_mask, batch.labels, full_set, value_norm=True
            )
    return {name: value.masked_fill(~valid, -torch.inf) for name, value in scores.items()}


def load_generator_and_collator(config: TrainConfig, records: list[dict[str, Any]]) -> tuple[ParallelContextGenerator, Collator]:
    """The frozen generator and a generator-only Collator, built as training and evaluation build
    them: the run's data config gives a decoder-only LM its instruction and chat template, and
    the generator's input format decides BOS and document padding, so mining scores the very
    inputs the generator is trained and evaluated on."""
    generator, tokenizer = single_process_generator(config, records)
    collate = Collator(
        config.data, tokenizer, None, config.reranker.max_length, seed=config.seed, input_format=generator.input_format
    )
    return generator, collate


def mine(
    config: TrainConfig, data_file: str, out_dir: Path, steps: int, lr: float, ks: tuple[int, ...] = (2, 5)
) -> dict[str, Any]:
    """Mine every query of ``data_file`` (one process); write the relevance and the metrics."""
    records, report = read_records(data_file, config.data.n_candidates, config.data.skip_bad_records,
                                   config.data.candidate_order)
    print(report.summary(), flush=True)
    generator, collate = load_generator_and_collator(config, records)
    size = config.train.micro_batch_size
    per_query: list[dict[str, Any]] = []
    rows: list[str] = []
    for start in tqdm(range(0, len(records), size), desc="mine"):
        ids = list(range(start, min(start + size, len(records))))
        batch = collate([records[i] for i in ids], ids)
        contexts = generator.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        noise = noise_generator(config.seed, 0, start, "cpu")
        scores = {MINED: mine_relevance(generator, contexts, batch, config.relax, steps, lr, noise)}
        scores.update(scalar_baselines(generator, contexts, batch))
        for row, index in enumerate(ids):
            record = records[index]
            relevant, indirect = gold_labels(record)
            n = len(record["ctxs"])
            entry = {"type": record.get("type") or None}
            for name, values in scores.items():
                ranking = rank_by_scores(values[row, :n].tolist())
                entry[name] = retrieval_query_metrics(ranking, relevant, ks, indirect)
            per_query.append(entry)
            rows.append(json.dumps({
                "id": record["id"],
                "ctx_ids": [c["id"] for c in record["ctxs"]],
                **{name: values[row, :n].tolist() for name, values in scores.items()},
            }) + "\n")
    metrics = {name: aggregate_metrics({"type": q["type"], **q[name]} for q in per_query) for name in per_query[0] if name != "type"}
    table = metrics_table_markdown(metrics, table_columns(ks, metrics, False))
    write_text(out_dir / "relevance.jsonl", "".join(rows))
    summary = {"data": str(data_file), "n_queries": len(per_query), "steps": steps, "lr": lr, "methods": metrics}
    write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
    write_text(out_dir / "metrics.md", table)
    print(table, flush=True)
    return metrics


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config: generator, data, relax (k, tau, kappa) and seed")
    parser.add_argument("--data", default=None, help="records to mine (default: data.train_file)")
    parser.add_argument("--out", default=None, help="output directory (default: OUTPUT/mine)")
    parser.add_argument("--steps", type=int, default=60, help="optimisation steps per query")
    parser.add_argument("--lr", type=float, default=0.2, help="Adam learning rate of the per-document weights")
    parser.add_argument("--k", type=int, action="append", help="metric cut-off (repeatable; default 2 and 5)")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted key=value")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    data = args.data or config.data.train_file
    if not data:
        raise SystemExit("no data: pass --data or set data.train_file in the config")
    if args.steps < 1 or args.lr <= 0:
        raise SystemExit(f"--steps must be >= 1 and --lr > 0, got {args.steps} and {args.lr}")
    out = Path(args.out) if args.out else Path(config.output_dir) / "mine"
    mine(config, data, out, args.steps, args.lr, tuple(sorted(set(args.k or [2, 5]))))
    return 0
