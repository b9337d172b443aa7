"""`grerank demo --generator smollm2`: G-Rerank with real pretrained models on a CPU.

1. natural-sentence reading records about invented entities (``grerank_dist.demos.reading``): one gold
   passage, lookalike distractors, a noisy word-overlap retriever order;
2. the frozen zero-shot SmolLM2-135M-Instruct (chat template, parallel context) and the
   pretrained all-MiniLM-L6-v2 as a cross-encoder with a new scoring head, both from the
   `grerank fetch-models` cache (fetched first if missing);
3. MiniLM trained with G-Rerank through the real trainer (``grerank train``'s recipe), the
   generator's answer likelihood its only signal;
4. the untrained MiniLM, the trained one, the retriever's order and the oracle in the paper's
   three settings; the generator's zero-shot reading accuracy with the gold passage alone (the
   oracle's top-1), the retriever's top-1 and all candidates at once.

Unlike ``grerank demo`` (a tiny reader trained on a toy language), nothing here is trained
but the reranker, and the reader is a real 135M-parameter model.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from grerank_dist.config import TrainConfig, load_config
from grerank_dist.evaluation.evaluate import evaluate
from grerank_dist.models.fetch import fetch_model
from grerank_dist.demos.reading import generate_reading_records
from grerank_dist.models.reranker import export_reranker, load_reranker
from grerank_dist.demos.synthetic import split_seed
from grerank_dist.training.train import train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo_smollm2.yaml"

# The full sizes: 60 training steps (20-24 s each on one thread of a loaded 2-core machine) and
# an evaluation of about the same cost (docs/REAL_MODELS.md); --quick passes through every stage
# in about a minute.
FULL = {"splits": {"train": 600, "test": 100}, "mining": 100, "overrides": []}
QUICK = {"splits": {"train": 4, "test": 2}, "mining": 2,
         "overrides": ["data.n_candidates=3", "data.doc_max_tokens=24", "train.max_steps=1", "train.micro_batch_size=2",
                       "train.warmup_steps=0", "train.save_every=1", "train.log_every=1", "generator.max_new_tokens=3"]}
# Evaluation batches of 16 queries: greedy decoding of this model on a CPU costs mostly per pass,
# not per row, so larger batches answer more queries per pass.
EVAL_BATCH = 16
UNTRAINED = "minilm"
TRAINED = "g-rerank"


def write_reading_splits(out_dir: Path, sizes: dict[str, int], seed: int, n_candidates: int) -> dict[str, Path]:
    """One JSONL file per split, each from its own seed (no query shared between splits)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in sizes.items():
        records = generate_reading_records(count, split_seed(seed, split), n_candidates=n_candidates)
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(record) + "\n" for record in records))
    return paths


def prepare_run(
    out_dir: Path, seed: int, splits: dict[str, int], overrides: list[str], cache_dir: Path | None = None
) -> tuple[TrainConfig, dict[str, Path], Path]:
    """The models (fetched if missing), the untrained MiniLM (new head included, saved once:
    G-Rerank starts from it and the evaluation compares against exactly it; the same for a seed),
    the reading splits and the demo's config with ``overrides``; the train split is the config's
    train file."""
    models = {name: fetch_model(name, cache_dir) for name in ("smollm2", "minilm")}
    torch.manual_seed(seed)
    untrained = export_reranker(*load_reranker(models["minilm"]), out_dir / "untrained_reranker")
    config = load_config(CONFIG, [
        f"output_dir={out_dir / 'train'}", f"seed={seed}",
        f"generator.path={models['smollm2']}", f"reranker.path={untrained}", *overrides,
    ])
    paths = write_reading_splits(out_dir / "data", splits, seed, config.data.n_candidates)
    config.data.train_file = str(paths["train"])
    return config, paths, untrained


def run_smollm2_demo(out_dir: Path, seed: int = 0, quick: bool = False, overrides: list[str] | None = None,
                     cache_dir: Path | None = None) -> dict[str, Any]:
    """Every stage; returns the summary also written to ``out_dir/summary.json``."""
    sizes = QUICK if quick else FULL
    started = time.perf_counter()
    config, splits, untrained = prepare_run(out_dir, seed, sizes["splits"], [*sizes["overrides"], *(overrides or [])], cache_dir)
    config.data.eval_file = str(splits["test"])
    mining = out_dir / "data" / "mining.jsonl"
    mining.write_text("".join(splits["train"].read_text().splitlines(keepends=True)[: sizes["mining"]]))

    t = time.perf_counter()
    result = train(config, resume="none")
    timings = {"train_s": time.perf_counter() - t}

    t = time.perf_counter()
    rerankers = {UNTRAINED: str(untrained), TRAINED: str(result.reranker_dir)}
    ks = (1, 3)
    settings = {
        setting: evaluate(config, rerankers, str(mining if setting == "mining" else splits["test"]), setting, ks,
                          out_dir / "eval" / setting, batch_size=EVAL_BATCH, strategy=result.strategy)
        for setting in ("reranker", "generator", "mining")
    }
    # All candidates at once: the retriever's top-n is every candidate (no reranker needed).
    everything = copy.deepcopy(config)
    everything.relax.k = config.data.n_candidates
    all_candidates = evaluate(everything, {}, str(splits["test"]), "generator", ks, out_dir / "eval" / "all_candidates",
                              batch_size=EVAL_BATCH, strategy=result.strategy)
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    generator = settings["generator"].metrics
    reading = {"gold passage alone": generator["oracle"]["subem"], "retriever's top-1": generator["retriever"]["subem"],
               f"{UNTRAINED} top-1 (untrained)": generator[UNTRAINED]["subem"], f"{TRAINED} top-1": generator[TRAINED]["subem"],
               f"all {config.data.n_candidates} candidates": all_candidates.metrics["retriever"]["subem"]}
    summary = {"seed": seed, "sizes": sizes, "config": {"relax": vars(config.relax), "lr": config.train.lr,
               "steps": config.train.max_steps, "micro_batch_size": config.train.micro_batch_size},
               "reading_subem": reading, "settings": {name: res.metrics for name, res in settings.items()}, "timings": timings}
    if result.strategy.is_main:
        parts = ["# G-Rerank demo: frozen SmolLM2-135M-Instruct, MiniLM reranker", "",
                 "## SmolLM2's reading accuracy (SubEM) with the given passages", "",
                 "| passages | SubEM |", "|---|---|", *(f"| {name} | {value:.3f} |" for name, value in reading.items()), ""]
        for name, res in settings.items():
            parts += [f"## {name} setting", "", res.table, ""]
        parts.append(f"wall time: train {timings['train_s']:.0f} s, evaluation {timings['eval_s']:.0f} s, total {timings['total_s']:.0f} s")
        (out_dir / "results.md").write_text("\n".join(parts) + "\n")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print("\n".join(parts), flush=True)
    return summary
