"""`grerank demo`: the whole system on a laptop CPU in minutes, through the real code paths.

    grerank demo [--out runs/demo] [--seed 0] [--quick]

1. make the synthetic multi-hop benchmark (bridge questions whose answer needs a document that
   does not contain it, and comparison questions);
2. train a tiny CEPE-architecture reader on it and freeze it (its SubEM with both gold
   documents, each alone, all candidates and none is reported);
3. train a random-init tiny cross-encoder with G-Rerank through the real trainer (DeepSpeed,
   ZeRO-3 generator engine, the same code as a cluster run), checkpointing as it goes;
4. evaluate the initial and the trained reranker, the retriever's order and the oracle in the
   paper's three settings, and every checkpoint on the dev split;
5. write the table (markdown + JSON), PNG plots and the exported reranker.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from grerank_dist.config import TrainConfig, load_config
from grerank_dist.data import Collator, read_records
from grerank_dist.evaluate import evaluate
from grerank_dist.metrics import metrics_table_markdown
from grerank_dist.models import load_generator
from grerank_dist.plots import plot_mask_weight, plot_metric_history
from grerank_dist.reranker import export_reranker, tiny_reranker
from grerank_dist.synthetic import write_synthetic_splits
from grerank_dist.tracking import read_metrics
from grerank_dist.train import record_texts, train

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"

# Sizes: the full demo (about 10 minutes on 2 cores) and a quick pass through every stage.
FULL = {"splits": {"train": 3000, "dev": 200, "test": 400}, "reader_steps": 1500, "rerank_steps": 300, "mining": 400}
QUICK = {"splits": {"train": 96, "dev": 32, "test": 32}, "reader_steps": 4, "rerank_steps": 4, "mining": 32}


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _write_subset(source: Path, target: Path, count: int) -> Path:
    with source.open() as src, target.open("w") as dst:
        for i, line in enumerate(src):
            if i >= count:
                break
            dst.write(line)
    return target


def run_demo(out_dir: Path, seed: int = 0, quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every stage; returns the summary also written to ``out_dir/summary.json``."""
    sizes = QUICK if quick else FULL
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    t = _stage("1/5 synthetic multi-hop data")
    splits = write_synthetic_splits(out_dir / "data", sizes["splits"], seed)
    mining_file = _write_subset(splits["train"], out_dir / "data" / "mining.jsonl", sizes["mining"])
    config = load_config(
        DEMO_CONFIG,
        [
            f"output_dir={out_dir / 'train'}",
            f"seed={seed}",
            f"data.train_file={splits['train']}",
            f"data.eval_file={splits['test']}",
            f"train.max_steps={sizes['rerank_steps']}",
            *(["train.save_every=2", "train.log_every=1"] if quick else []),
            *(overrides or []),
        ],
    )
    timings["data_s"] = time.perf_counter() - t

    t = _stage("2/5 reader: train the tiny CEPE generator, then freeze it")
    records, _ = read_records(splits["train"], config.data.n_candidates)
    config.generator.path = str(train_reader(records, config, out_dir / "reader", sizes["reader_steps"], seed))
    timings["reader_s"] = time.perf_counter() - t

    t = _stage("3/5 G-Rerank: train a random-init cross-encoder from the frozen reader")
    texts = [r["question"] for r in records] + [
        config.data.passage_template.format(title=c["title"], text=c["text"]) for r in records for c in r["ctxs"]
    ]
    initial = export_reranker(*tiny_reranker(texts, seed=seed), out_dir / "initial_reranker")
    config.reranker.path = str(initial)
    result = train(config, resume="none")
    timings["train_s"] = time.perf_counter() - t

    t = _stage("4/5 evaluation in the paper's three settings")
    rerankers = {"initial": str(initial), "g-rerank": str(result.reranker_dir)}
    ks = (2, 5)
    settings = {
        "reranker": evaluate(config, rerankers, str(splits["test"]), "reranker", ks, out_dir / "eval" / "reranker", strategy=result.strategy),
        "generator": evaluate(config, rerankers, str(splits["test"]), "generator", ks, out_dir / "eval" / "generator", strategy=result.strategy),
        "mining": evaluate(config, rerankers, str(mining_file), "mining", ks, out_dir / "eval" / "mining", strategy=result.strategy),
    }
    history = checkpoint_history(config, splits["dev"], ks, out_dir / "eval" / "history", result.strategy)
    timings["eval_s"] = time.perf_counter() - t

    t = _stage("5/5 report")
    summary = {
        "seed": seed,
        "sizes": sizes,
        "settings": {name: res.metrics for name, res in settings.items()},
        "history": history,
        "timings": timings,
    }
    if result.strategy.is_main:
        write_report(out_dir, summary, settings, history, result.reranker_dir)
    timings["total_s"] = time.perf_counter() - started
    print(f"\ndemo finished in {timings['total_s']:.0f}s; outputs in {out_dir}", flush=True)
    return summary


def checkpoint_history(
    config: TrainConfig, dev_file: Path, ks: tuple[int, ...], out_dir: Path, strategy: Any
) -> list[dict[str, Any]]:
    """Retrieval metrics of every saved checkpoint's reranker on the dev split (reranker setting)."""
    ckpt_dir = Path(config.output_dir) / "checkpoints"
    steps = sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*") if not p.name.endswith(".partial"))
    rerankers = {"initial": config.reranker.path} | {f"step_{s}": str(ckpt_dir / f"step_{s}" / "reranker") for s in steps}
    metrics = evaluate(config, rerankers, str(dev_file), "reranker", ks, out_dir, strategy=strategy).metrics
    points = [{"step": 0, **metrics["initial"]}] + [{"step": s, **metrics[f"step_{s}"]} for s in steps]
    return [{**p, "retriever": metrics["retriever"], "oracle": metrics["oracle"]} for p in points]


def write_report(out_dir: Path, summary: dict[str, Any], settings: dict[str, Any], history: list[dict], reranker_dir: Path) -> None:
    columns = ["recall@2", "recall@5", "ndcg@5", "mrr", "indirect_recall@2", "bridge/indirect_recall@2",
               "comparison/indirect_recall@2"]
    parts = ["# G-Rerank demo", ""]
    for name, res in settings.items():
        cols = columns + (["em", "subem", "f1"] if name == "generator" else [])
        parts += [f"## {name} setting", "", metrics_table_markdown(res.metrics, cols), ""]
    text = "\n".join(parts)
    (out_dir / "results.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    refs = {"retriever": history[0]["retriever"], "oracle": history[0]["oracle"]}
    plot_metric_history(history, ["recall@2", "indirect_recall@2", "bridge/indirect_recall@2"],
                        out_dir / "retrieval_over_training.png", "Dev retrieval metrics over G-Rerank training",
                        references={"retriever": refs["retriever"]})
    plot_mask_weight(read_metrics(out_dir / "train" / "metrics.jsonl"), out_dir / "mask_weight_over_training.png")
    print("\n" + text, flush=True)
    print(f"exported reranker: {reranker_dir}", flush=True)


def train_reader(
    records: list[dict[str, Any]], config: TrainConfig, out_dir: Path, steps: int, seed: int,
    batch_size: int = 32, lr: float = 3e-3,
) -> Path:
    """A tiny random-init CEPE reader trained with every candidate visible (plain torch, one
    process, AdamW on the answer loss), then frozen and saved with its word-level tokenizer."""
    model, tokenizer = load_generator("random:tiny", record_texts(records, config), seed=seed)
    model.requires_grad_(True).train()
    collate = Collator(config.data, tokenizer, None, config.reranker.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        ids = rng.sample(range(len(records)), min(batch_size, len(records)))
        batch = collate([records[i] for i in ids], ids)
        loss = model(batch.input_ids, batch.attention_mask, batch.labels, encoder_input_ids=batch.encoder_input_ids,
                     encoder_attention_mask=batch.encoder_attention_mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.requires_grad_(False).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the noise")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a pass through every stage in about a minute")
    parser.add_argument("overrides", nargs="*", help="training config overrides as dotted key=value")


def run(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), seed=args.seed, quick=args.quick, overrides=args.overrides)
    return 0
