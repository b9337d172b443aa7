"""Evaluation in the paper's three settings (Sec. 4): mining, reranker, generator.

    grerank eval --config FILE --reranker DIR [--reranker NAME=DIR ...] [--data FILE]
                 [--setting reranker|generator|mining] [--k 5 --k 10] [--out DIR]

Each method ranks the n candidates of every query: the given rerankers by their scores, and in
the same run the retriever's own order and, where gold labels exist, the oracle. Retrieval
metrics (Recall@k, NDCG@k, MRR, indirect recall) come from those rankings; in the generator
setting the frozen generator answers from each method's top-k documents (a hard 0/-inf
log-mask, greedy decoding) and EM, SubEM and F1 are added. Queries are sharded over ranks and
gathered before averaging, so a distributed run gives exactly the single-process numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from grerank_dist.config import TrainConfig, load_config
from grerank_dist.data import Collator, read_records, reranker_pairs
from grerank_dist.metrics import aggregate_metrics, gold_labels, metrics_table_markdown, rank_by_scores
from grerank_dist.metrics import answer_query_metrics, retrieval_query_metrics
from grerank_dist.models import RANDOM_PREFIX, load_generator
from grerank_dist.reranker import load_reranker, reranker_scores
from grerank_dist.strategy import DeepSpeedStrategy

SETTINGS = ("reranker", "generator", "mining")
RETRIEVER, ORACLE = "retriever", "oracle"


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, Any]]  # method -> flat metric keys
    table: str
    out_dir: Path


def topk_log_mask(rankings: list[list[int]], k: int, n: int) -> torch.Tensor:
    """A hard log-mask [B, n]: 0 on each ranking's first k candidates, -inf elsewhere."""
    mask = torch.full((len(rankings), n), -math.inf)
    for row, ranking in enumerate(rankings):
        mask[row, ranking[:k]] = 0.0
    return mask


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the newline token(s): CEPE's evaluation stops at the first newline."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids += [t for t in newline if tokenizer.decode([t]).strip(" ") == "\n"]
    return sorted(set(ids))


def clean_prediction(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _method_rankings(
    method: str, scores: torch.Tensor | None, records: list[dict[str, Any]], n: int
) -> list[list[int]]:
    rankings = []
    for row, record in enumerate(records):
        count = min(len(record["ctxs"]), n)
        if method == RETRIEVER:
            rankings.append(list(range(count)))
        elif method == ORACLE:
            relevant, _ = gold_labels(record)
            rankings.append(rank_by_scores([float(r) for r in relevant[:count]]))
        else:
            rankings.append(rank_by_scores(scores[row, :count]))
    return rankings


def evaluate(
    config: TrainConfig,
    rerankers: dict[str, str],
    data_file: str,
    setting: str,
    ks: tuple[int, ...],
    out_dir: Path,
    batch_size: int | None = None,
    strategy: DeepSpeedStrategy | None = None,
) -> EvalResult:
    """Score ``data_file`` with each reranker and the reference rankings; write the outputs."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    strategy = strategy or DeepSpeedStrategy(config)
    n, k_gen = config.data.n_candidates, config.relax.k
    records, report = read_records(data_file, n, config.data.skip_bad_records)
    if strategy.is_main:
        print(report.summary(), flush=True)

    models = {name: load_reranker(path) for name, path in rerankers.items()}
    for model, _ in models.values():
        model.to(strategy.device).eval()
    has_gold = all(any(c.get(f) is not None for c in r["ctxs"] for f in ("has_answer", "is_supporting")) for r in records)
    methods = list(models) + [RETRIEVER] + ([ORACLE] if has_gold else [])

    generate = setting == "generator"
    gen_model, gen_tokenizer = None, None
    if generate:
        if config.generator.path.startswith(RANDOM_PREFIX):
            raise ValueError(
                f"generator.path {config.generator.path!r}: the generator setting needs a generator checkpoint "
                "directory (a random generator's answers mean nothing)"
            )
        gen_model, gen_tokenizer = load_generator(config.generator.path, seed=config.generator.seed)
        gen_model.config.cross_attn_backend = config.generator.attention_backend
        gen_model = strategy.build_generator_engine(gen_model)
        stops = stop_token_ids(gen_tokenizer)
    gen_collator = Collator(config.data, gen_tokenizer, None, config.reranker.max_length) if generate else None

    # Shard: rank r takes records r, r+W, ...; every rank runs the same number of batches
    # (ZeRO-3 generation needs lock step), a short shard repeating its last record as filler.
    bsz = batch_size or config.train.micro_batch_size
    mine = list(range(strategy.rank, len(records), strategy.world_size))
    per_rank = math.ceil(len(records) / strategy.world_size)
    n_batches = math.ceil(per_rank / bsz)
    started = time.perf_counter()
    per_query: list[dict[str, Any]] = []
    bar = tqdm(total=n_batches, disable=not strategy.is_main, desc=f"eval ({setting})")
    for b in range(n_batches):
        ids = mine[b * bsz : (b + 1) * bsz]
        real = len(ids)
        ids = ids + [mine[-1] if mine else 0] * (bsz - real) if real < bsz else ids
        batch_records = [records[i] for i in ids]
        rankings, scores_of = {}, {}
        with torch.no_grad():
            for name, (model, tokenizer) in models.items():
                inputs, valid = reranker_pairs(batch_records, tokenizer, config.data, config.reranker.max_length)
                inputs = {key: value.to(strategy.device) for key, value in inputs.items()}
                scores_of[name] = reranker_scores(model, inputs, n).cpu().masked_fill(~valid, -math.inf)
                rankings[name] = _method_rankings(name, scores_of[name], batch_records, n)
            for name in (RETRIEVER, ORACLE):
                if name in methods:
                    rankings[name] = _method_rankings(name, None, batch_records, n)
            predictions: dict[str, list[str]] = {}
            if generate:
                gb = gen_collator(batch_records, ids).to(strategy.device)
                contexts = gen_model.encode_contexts(gb.encoder_input_ids, gb.encoder_attention_mask)
                for name in methods:
                    log_mask = topk_log_mask(rankings[name], k_gen, n).to(strategy.device)
                    out = gen_model.generate(
                        contexts, gb.prompt_ids, gb.prompt_attention_mask, log_mask,
                        max_new_tokens=config.generator.max_new_tokens, stop_token_ids=stops,
                    )
                    predictions[name] = [clean_prediction(t) for t in gen_tokenizer.batch_decode(out, skip_special_tokens=True)]
        for row in range(real):
            record = batch_records[row]
            relevant, indirect = gold_labels(record)
            entry: dict[str, Any] = {"index": ids[row], "id": record["id"], "type": record["type"] or None, "methods": {}}
            for name in methods:
                ranking = rankings[name][row]
                metrics = retrieval_query_metrics(ranking, relevant, ks, indirect)
                result = {"ranking": [record["ctxs"][i]["id"] for i in ranking], "metrics": metrics}
                if name in scores_of:
                    result["scores"] = [round(float(s), 6) for s in scores_of[name][row, : len(record["ctxs"])]]
                if generate:
                    result["prediction"] = predictions[name][row]
                    metrics.update(answer_query_metrics(predictions[name][row], record["answers"]))
                entry["methods"][name] = result
            per_query.append(entry)
        bar.update(1)
    bar.close()
    if generate:
        strategy.release_generator_params()

    gathered = [q for part in strategy.all_gather_object(per_query) for q in part]
    gathered.sort(key=lambda q: q["index"])
    elapsed = time.perf_counter() - started
    metrics = {
        name: aggregate_metrics({"type": q["type"], **q["methods"][name]["metrics"]} for q in gathered)
        for name in methods
    }
    for name in methods:
        metrics[name]["queries_per_s"] = len(gathered) / elapsed
    columns = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    if any("indirect_mrr" in m for m in metrics.values()):
        columns += [f"indirect_recall@{k}" for k in ks]
    if generate:
        columns += ["em", "subem", "f1"]
    table = metrics_table_markdown(metrics, columns)
    if strategy.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_dir / "metrics.json", json.dumps({"setting": setting, "data": str(data_file), "methods": metrics}, indent=2))
        _atomic_write(out_dir / "predictions.jsonl", "".join(json.dumps(q) + "\n" for q in gathered))
        _atomic_write(out_dir / "metrics.md", table)
        print(table, flush=True)
        print(f"{len(gathered)} queries in {elapsed:.1f}s ({len(gathered) / elapsed:.1f} queries/s)", flush=True)
    strategy.barrier()
    return EvalResult(metrics, table, out_dir)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_rerankers(values: list[str]) -> dict[str, str]:
    """``DIR`` or ``NAME=DIR`` -> {name: dir}; a bare DIR is named after its folder."""
    rerankers = {}
    for value in values:
        name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        name = name or Path(path).name or path
        if name in rerankers or name in (RETRIEVER, ORACLE):
            raise ValueError(f"--reranker {value!r}: the name {name!r} is taken; use NAME=DIR")
        rerankers[name] = path
    return rerankers


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the YAML config of the run (data, generator, relax.k)")
    parser.add_argument("--reranker", action="append", default=[], help="reranker directory, or NAME=DIR; repeatable")
    parser.add_argument("--data", default=None, help="records to evaluate (default: data.eval_file; mining: data.train_file)")
    parser.add_argument("--setting", choices=SETTINGS, default="reranker", help="which of the paper's settings")
    parser.add_argument("--k", type=int, action="append", default=None, help="cut-off for Recall/NDCG; repeatable (default 5)")
    parser.add_argument("--batch-size", type=int, default=None, help="queries per rank per batch (default train.micro_batch_size)")
    parser.add_argument("--out", default=None, help="output directory (default OUTPUT/eval/SETTING)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted key=value")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    data = args.data or (config.data.train_file if args.setting == "mining" else config.data.eval_file)
    if not data:
        raise SystemExit("no data: pass --data or set data.eval_file / data.train_file in the config")
    out = Path(args.out) if args.out else Path(config.output_dir) / "eval" / args.setting
    strategy = DeepSpeedStrategy(config, local_rank=args.local_rank)
    evaluate(config, parse_rerankers(args.reranker), data, args.setting, tuple(args.k or [5]), out, args.batch_size, strategy)
    return 0
