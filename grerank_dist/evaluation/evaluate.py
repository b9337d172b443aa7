"""Evaluation in the paper's three settings (Sec. 4): mining, reranker, generator.

    grerank eval --config FILE --reranker DIR [--reranker NAME=DIR ...] [--data FILE]
                 [--setting reranker|generator|mining] [--k 5 --k 10] [--skip-no-relevant] [--out DIR]

Each method ranks the candidates of every query: the given rerankers by their scores, and in
the same run the retriever (the candidates' ``score`` order, see ``data.candidate_order``) and
the oracle (gold-relevant candidates first). Retrieval metrics (Recall@k, NDCG@k, MRR, indirect
recall) come from those rankings; in the generator setting the frozen generator also answers
from each method's top ``relax.k`` documents (a hard 0/-inf log-mask, greedy decoding) and EM,
SubEM and F1 are added. The mining setting is the reranker setting on the training queries.

A query none of whose candidates is relevant scores 0 on every retrieval metric (a miss), as
DPR-style top-k accuracy on NQ/TQA counts it; ``--skip-no-relevant`` leaves such queries out of
the averages instead. Either way their number is reported (``n_queries_without_relevant``).

Queries are sharded over ranks and the per-query results gathered before averaging, so a
distributed run averages exactly the queries a single process would. Each query is computed
in a batch with others: documents are padded to a fixed width, reranker pairs and prompts to the
batch's longest. With the same ``--batch-size`` and equal padded widths a distributed run is
bit-identical to a single process; otherwise numbers may differ by float rounding only.

Outputs in ``--out``: ``metrics.json`` (flat metric keys per method, plus the run's throughput),
``predictions.jsonl`` (per query and method: ranked candidate ids, reranker scores, the
generated answer, per-query metrics) and ``metrics.md`` (a markdown table in the paper's
column order).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from grerank_dist.atomic import write_text
from grerank_dist.config import TrainConfig, load_config
from grerank_dist.data.collate import Collator, reranker_pairs
from grerank_dist.data.records import read_records
from grerank_dist.interface import Batch
from grerank_dist.interface import EncodedContexts, ParallelContextGenerator
from grerank_dist.method.metrics import aggregate_metrics, answer_query_metrics, gold_labels, metrics_table_markdown
from grerank_dist.method.metrics import rank_by_scores, retrieval_query_metrics
from grerank_dist.models import RANDOM_PREFIX, configure_generator, load_generator
from grerank_dist.models.reranker import load_reranker, reranker_scores
from grerank_dist.training.strategy import DeepSpeedStrategy
from grerank_dist.training.train import build_generator, record_texts

SETTINGS = ("reranker", "generator", "mining")
RETRIEVER, ORACLE = "retriever", "oracle"


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote, for callers that go on (demo scripts, tests)."""

    metrics: dict[str, dict[str, Any]]  # method -> flat metric keys
    queries_per_s: float
    table: str
    out_dir: Path


# --------------------------------------------------------------------------- rankings


def shard_batches(num_records: int, rank: int, world_size: int, batch_size: int) -> list[tuple[list[int], int]]:
    """This rank's batches, each (record indices, how many of them are real).

    Rank r takes records r, r+W, r+2W, ...; every rank gets the same number of batches of
    exactly ``batch_size`` records, a short shard being filled up with copies of its last record
    (record 0 for an empty shard), because ZeRO-3 generation needs every rank to make the same
    generator calls. Fillers are computed and dropped.
    """
    mine = list(range(rank, num_records, world_size))
    filler = mine[-1] if mine else 0
    n_batches = math.ceil(math.ceil(num_records / world_size) / batch_size)
    batches = []
    for start in range(0, n_batches * batch_size, batch_size):
        real = mine[start : start + batch_size]
        batches.append((real + [filler] * (batch_size - len(real)), len(real)))
    return batches


def candidate_scores(
    model: torch.nn.Module, tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig, device: torch.device
) -> torch.Tensor:
    """Reranker scores [B, n] on the CPU, -inf for padding candidates."""
    inputs, valid = reranker_pairs(records, tokenizer, config.data, config.reranker.max_length)
    scores = reranker_scores(model, {key: value.to(device) for key, value in inputs.items()}, config.data.n_candidates)
    return scores.cpu().masked_fill(~valid, -math.inf)


def method_rankings(
    method: str, records: list[dict[str, Any]], relevance: list[list[bool]], scores: torch.Tensor | None = None
) -> list[list[int]]:
    """Each record's real candidates, best first: by ``scores`` for a reranker, in their loaded
    order for the retriever (its score order: ``read_records`` sorts by score unless
    ``data.candidate_order`` is "file"), gold-relevant ones first (then that order) for the oracle."""
    if method == RETRIEVER:
        return [list(range(len(record["ctxs"]))) for record in records]
    if method == ORACLE:
        return [rank_by_scores([float(flag) for flag in labels]) for labels in relevance]
    return [rank_by_scores(scores[row, : len(record["ctxs"])]) for row, record in enumerate(records)]


# --------------------------------------------------------------------------- generation


def topk_log_mask(rankings: list[list[int]], k: int, n: int) -> torch.Tensor:
    """A hard log-mask [B, n]: 0 on each ranking's first k candidates, -inf elsewhere."""
    mask = torch.full((len(rankings), n), -math.inf)
    for row, ranking in enumerate(rankings):
        mask[row, ranking[:k]] = 0.0
    return mask


def generate_topk(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    rankings: dict[str, list[list[int]]],
    k: int,
    max_new_tokens: int,
    stop_ids: list[int],
    before_step: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """method -> greedy answer tokens [B, T] given only each query's top-k candidates of that
    method's rankings.

    The other candidates stay encoded but get log-mask -inf, which removes them exactly (paper
    Eq. 3-4): the answer is the one the generator gives with the k documents alone. That answer
    depends on the kept set only (documents keep their places whatever their rank), so each
    query's distinct sets, over all methods, are answered once, in one batched call of m masks
    per query (methods often agree: the oracle and a trained reranker, most of the time).
    """
    n = contexts.num_docs
    kept = {method: [tuple(sorted(ranking[:k])) for ranking in ranked] for method, ranked in rankings.items()}
    distinct = [list(dict.fromkeys(sets[row] for sets in kept.values())) for row in range(batch.prompt_ids.shape[0])]
    width = max(len(sets) for sets in distinct)
    # [B, width, n]; a query with fewer distinct sets repeats its last one
    log_mask = torch.stack([topk_log_mask([list(sets[min(c, len(sets) - 1)]) for c in range(width)], k, n) for sets in distinct])
    tokens = generator.generate(
        contexts, batch.prompt_ids, batch.prompt_attention_mask, log_mask.to(batch.prompt_ids.device),
        max_new_tokens=max_new_tokens, stop_token_ids=stop_ids, before_step=before_step,
    )  # [B, width, T]
    return {
        method: torch.stack([tokens[row, distinct[row].index(kept_set)] for row, kept_set in enumerate(sets)])
        for method, sets in kept.items()
    }


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the newline token(s): CEPE's evaluation stops at the first newline."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids += [t for t in newline if tokenizer.decode([t]).strip(" ") == "\n"]
    return sorted(set(ids))


def clean_prediction(text: str) -> str:
    """The answer as CEPE's evaluation scores it: up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def decode_answers(tokenizer: Any, tokens: torch.Tensor) -> list[str]:
    """Generated tokens [R, T] as the answers the generator setting scores (special tokens
    dropped, :func:`clean_prediction`)."""
    return [clean_prediction(text) for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


@dataclass
class TopKAnswerer:
    """The generator setting: the frozen generator answers from each method's top-k documents."""

    generator: ParallelContextGenerator
    tokenizer: Any
    collator: Collator
    k: int
    max_new_tokens: int
    stop_ids: list[int]
    device: torch.device
    begin_pass: Callable[[], None]  # strategy.begin_generator_step: a new ZeRO-3 trace per pass

    def __call__(
        self, records: list[dict[str, Any]], record_ids: list[int], rankings: dict[str, list[list[int]]]
    ) -> dict[str, list[str]]:
        """method -> one answer per record. The documents are encoded once, and each distinct
        top-k set of a query generated once, for all methods."""
        return self.answer(*self.encode(records, record_ids), rankings)

    def encode(self, records: list[dict[str, Any]], record_ids: list[int]) -> tuple[Batch, EncodedContexts]:
        """The records' batch on the device and their encoded documents, which every answer
        from them shares (the masks and the decoder's settings only act afterwards)."""
        batch = self.collator(records, record_ids).to(self.device)
        self.begin_pass()
        return batch, self.generator.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)

    def answer(self, batch: Batch, contexts: EncodedContexts, rankings: dict[str, list[list[int]]]) -> dict[str, list[str]]:
        """method -> one answer per record of ``batch``, from the top k of its ranking."""
        tokens = generate_topk(
            self.generator, contexts, batch, rankings, self.k, self.max_new_tokens, self.stop_ids, self.begin_pass
        )
        return {method: decode_answers(self.tokenizer, answer) for method, answer in tokens.items()}


def single_process_generator(
    config: TrainConfig, records: list[dict[str, Any]], dtype: torch.dtype = torch.float32
) -> tuple[ParallelContextGenerator, Any]:
    """The frozen generator and its tokenizer in one process, no engine (mining, calibration),
    loaded as training loads it: the run's data config (instruction, chat template), the
    generator section (attention backend, alignment), and for a ``random:`` model the records'
    vocabulary."""
    texts = record_texts(records, config) if config.generator.path.startswith(RANDOM_PREFIX) else []
    generator, tokenizer = load_generator(config.generator.path, texts, seed=config.generator.seed, dtype=dtype,
                                          data=config.data)
    configure_generator(generator, config.generator)
    return generator, tokenizer


def make_answerer(
    generator: ParallelContextGenerator,
    tokenizer: Any,
    config: TrainConfig,
    k: int,
    device: torch.device,
    begin_pass: Callable[[], None] = lambda: None,
) -> TopKAnswerer:
    """The generator setting's answerer over a loaded generator: its own input format, the run's
    templates and ``generator.max_new_tokens``, stopping at EOS or a newline."""
    return TopKAnswerer(
        generator=generator,
        tokenizer=tokenizer,
        collator=Collator(config.data, tokenizer, None, config.reranker.max_length, input_format=generator.input_format),
        k=k,
        max_new_tokens=config.generator.max_new_tokens,
        stop_ids=stop_token_ids(tokenizer),
        device=device,
        begin_pass=begin_pass,
    )


def build_answerer(config: TrainConfig, strategy: DeepSpeedStrategy) -> TopKAnswerer:
    """Load the generator checkpoint into its (ZeRO-3 or replicated) engine."""
    generator, tokenizer = build_generator(config, strategy)
    return make_answerer(generator, tokenizer, config, config.relax.k, strategy.device, strategy.begin_generator_step)


# --------------------------------------------------------------------------- evaluation


def evaluate(
    config: TrainConfig,
    rerankers: dict[str, str],
    data_file: str,
    setting: str,
    ks: tuple[int, ...],
    out_dir: Path,
    batch_size: int | None = None,
    strategy: DeepSpeedStrategy | None = None,
    skip_no_relevant: bool = False,
) -> EvalResult:
    """Rank (and in the generator setting answer) every query of ``data_file`` with each
    reranker, the retriever and the oracle; write the outputs on rank 0. ``skip_no_relevant``
    leaves queries without a relevant candidate out of the retrieval averages (default: 0)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    ks = tuple(sorted(set(ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"every cut-off k must be >= 1, got {ks}")
    bsz = batch_size or config.train.micro_batch_size
    if bsz < 1:
        raise ValueError(f"batch size must be >= 1, got {bsz}")
    if setting == "generator" and config.generator.path.startswith(RANDOM_PREFIX):
        raise ValueError(
            f"generator.path {config.generator.path!r}: the generator setting needs a generator checkpoint "
            "directory (a random generator's answers mean nothing)"
        )
    strategy = strategy or DeepSpeedStrategy(config)
    records, report = read_records(
        data_file, config.data.n_candidates, config.data.skip_bad_records, config.data.candidate_order
    )
    if strategy.is_main:
        print(report.summary(), flush=True)

    models = {name: load_reranker(path) for name, path in rerankers.items()}
    for model, _ in models.values():
        model.to(strategy.device).eval()
    methods = [*models, RETRIEVER, ORACLE]
    answerer = build_answerer(config, strategy) if setting == "generator" else None

    started = time.perf_counter()
    per_query: list[dict[str, Any]] = []
    batches = shard_batches(len(records), strategy.rank, strategy.world_size, bsz)
    for ids, real in tqdm(batches, disable=not strategy.is_main, desc=f"eval ({setting})"):
        batch_records = [records[i] for i in ids]
        labels = [gold_labels(record) for record in batch_records]  # (relevant, indirect) flags
        with torch.no_grad():
            scores = {
                name: candidate_scores(model, tokenizer, batch_records, config, strategy.device)
                for name, (model, tokenizer) in models.items()
            }
            relevance = [relevant for relevant, _ in labels]
            rankings = {name: method_rankings(name, batch_records, relevance, scores.get(name)) for name in methods}
            answers = answerer(batch_records, ids, rankings) if answerer is not None else {}
        for row in range(real):
            per_query.append(
                _query_entry(ids[row], batch_records[row], labels[row], row, ks, scores, rankings, answers, skip_no_relevant)
            )
    if answerer is not None:
        strategy.release_generator_params()

    gathered = sorted((q for part in strategy.all_gather_object(per_query) for q in part), key=lambda q: q["index"])
    elapsed = time.perf_counter() - started
    queries_per_s = len(gathered) / elapsed
    metrics = {
        name: aggregate_metrics({"type": q["type"], **q["methods"][name]["metrics"]} for q in gathered)
        for name in methods
    }
    table = metrics_table_markdown(metrics, table_columns(ks, metrics, answerer is not None))
    if strategy.is_main:
        summary = {
            "setting": setting,
            "data": str(data_file),
            "n_queries": len(gathered),
            "world_size": strategy.world_size,
            "seconds": elapsed,
            "queries_per_s": queries_per_s,
            "n_queries_without_relevant": sum(q["methods"][ORACLE]["metrics"]["n_relevant"] == 0 for q in gathered),
            "queries_without_relevant": "skipped" if skip_no_relevant else "scored 0",
            "methods": metrics,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
        write_text(out_dir / "predictions.jsonl", "".join(json.dumps(q) + "\n" for q in gathered))
        write_text(out_dir / "metrics.md", table)
        print(table, flush=True)
        print(f"{len(gathered)} queries in {elapsed:.1f}s ({queries_per_s:.1f} queries/s); wrote {out_dir}", flush=True)
    strategy.barrier()
    return EvalResult(metrics, queries_per_s, table, out_dir)


def _query_entry(
    index: int,
    record: dict[str, Any],
    labels: tuple[list[bool], list[bool] | None],
    row: int,
    ks: tuple[int, ...],
    scores: dict[str, torch.Tensor],
    rankings: dict[str, list[list[int]]],
    answers: dict[str, list[str]],
    skip_no_relevant: bool,
) -> dict[str, Any]:
    """One line of predictions.jsonl: per method the ranked ids, scores, answer and metrics."""
    relevant, indirect = labels
    entry: dict[str, Any] = {
        "index": index,
        "id": record["id"],
        "type": record["type"] or None,
        "question": record["question"],
        "answers": record["answers"],
        "methods": {},
    }
    for name, ranked in rankings.items():
        ranking = ranked[row]
        result: dict[str, Any] = {"ranking": [record["ctxs"][i]["id"] for i in ranking]}
        if name in scores:
            result["scores"] = scores[name][row, : len(record["ctxs"])].tolist()
        result["metrics"] = retrieval_query_metrics(ranking, relevant, ks, indirect, skip_no_relevant)
        if name in answers:
            result["prediction"] = answers[name][row]
            result["metrics"].update(answer_query_metrics(answers[name][row], record["answers"]))
        entry["methods"][name] = result
    return entry


def table_columns(ks: tuple[int, ...], metrics: dict[str, dict[str, Any]], with_answers: bool) -> list[str]:
    """The paper's column order: Table 1 (Recall@k, NDCG@k, MRR, EM, SubEM, F1), then Table 2's
    indirect Recall@k, MRR, NDCG@k where the data has indirectly relevant documents, then the
    number of queries without a relevant candidate (they score 0 unless skipped)."""
    columns = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    if with_answers:
        columns += ["em", "subem", "f1"]
    if any("indirect_mrr" in m for m in metrics.values()):
        columns += [f"indirect_recall@{k}" for k in ks] + ["indirect_mrr"] + [f"indirect_ndcg@{k}" for k in ks]
    return columns + ["n_queries_without_relevant"]


# --------------------------------------------------------------------------- command line


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
    parser.add_argument(
        "--skip-no-relevant", action="store_true",
        help="leave queries without a relevant candidate out of the retrieval averages (default: they score 0)",
    )
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
    evaluate(
        config, parse_rerankers(args.reranker), data, args.setting, tuple(args.k or [5]), out, args.batch_size,
        strategy, args.skip_no_relevant,
    )
    return 0
