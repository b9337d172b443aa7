"""`grerank demo --generator smollm2`: G-Rerank with real pretrained models on a CPU.

1. reading records with no lexical shortcut (``grerank_dist.demos.decoy_reading``): one gold
   passage worded unlike the question, three decoys holding the answer string in a role that does
   not answer, three passages repeating the question's words, in BM25 order;
2. the frozen zero-shot SmolLM2-135M-Instruct (chat template, parallel context) and the
   pretrained all-MiniLM-L6-v2 as a cross-encoder with a new scoring head, both from the
   `grerank fetch-models` cache (fetched first if missing);
3. before training, the check that the generator reads the gold: SubEM with the gold alone,
   a decoy alone and a question-shaped passage alone;
4. MiniLM trained with G-Rerank through the real trainer (``grerank train``'s recipe), the
   generator's answer likelihood its only signal;
5. the untrained MiniLM, the trained one, BM25 and the oracle in the reranker setting and in the
   generator setting (SmolLM2 answering from each one's top passage).

Unlike ``grerank demo`` (a tiny reader trained on a toy language), nothing here is trained
but the reranker, and the reader is a real 135M-parameter model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from grerank_dist.config import TrainConfig, load_config
from grerank_dist.demos.decoy_reading import generate_decoy_records
from grerank_dist.evaluation.diagnose import reading_alone
from grerank_dist.evaluation.evaluate import evaluate, single_process_generator
from grerank_dist.models.fetch import fetch_model
from grerank_dist.models.reranker import export_reranker, load_reranker
from grerank_dist.demos.synthetic import split_seed
from grerank_dist.training.train import train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo_smollm2.yaml"

# The full sizes: 50 training steps (about 4 s each on 2 idle cores) and the evaluations;
# --quick passes through every stage in about a minute.
FULL = {"splits": {"train": 600, "test": 100}, "overrides": []}
QUICK = {"splits": {"train": 4, "test": 2},
         "overrides": ["data.doc_max_tokens=24", "train.max_steps=1", "train.micro_batch_size=2",
                       "train.warmup_steps=0", "train.save_every=1", "train.log_every=1", "generator.max_new_tokens=3"]}
# Evaluation batches of 16 queries: greedy decoding of this model on a CPU costs mostly per pass,
# not per row, so larger batches answer more queries per pass.
EVAL_BATCH = 16
UNTRAINED = "minilm"
TRAINED = "g-rerank"


def write_reading_splits(out_dir: Path, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    """One JSONL file per split, each from its own seed (no query shared between splits)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in sizes.items():
        records = generate_decoy_records(count, split_seed(seed, f"decoy/{split}"))
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
    paths = write_reading_splits(out_dir / "data", splits, seed)
    config.data.train_file = str(paths["train"])
    return config, paths, untrained


def run_smollm2_demo(out_dir: Path, seed: int = 0, quick: bool = False, overrides: list[str] | None = None,
                     cache_dir: Path | None = None) -> dict[str, Any]:
    """Every stage; returns the summary also written to ``out_dir/summary.json``."""
    sizes = QUICK if quick else FULL
    started = time.perf_counter()
    config, splits, untrained = prepare_run(out_dir, seed, sizes["splits"], [*sizes["overrides"], *(overrides or [])], cache_dir)
    config.data.eval_file = str(splits["test"])

    t = time.perf_counter()
    test = [json.loads(line) for line in splits["test"].read_text().splitlines()]
    generator, tokenizer = single_process_generator(config, test)
    alone = reading_alone(generator, tokenizer, config, test, EVAL_BATCH)
    del generator
    timings = {"reading_check_s": time.perf_counter() - t}

    t = time.perf_counter()
    result = train(config, resume="none")
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rerankers = {UNTRAINED: str(untrained), TRAINED: str(result.reranker_dir)}
    settings = {
        setting: evaluate(config, rerankers, str(splits["test"]), setting, (1, 3), out_dir / "eval" / setting,
                          batch_size=EVAL_BATCH, strategy=result.strategy)
        for setting in ("reranker", "generator")
    }
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    generator_metrics = settings["generator"].metrics
    reading = {"gold passage alone": alone["gold"], "a decoy alone (answer string, another role)": alone["decoy"],
               "a question-shaped passage alone": alone["overlap"],
               **{f"{name} top-1": 100 * generator_metrics[method]["subem"]
                  for name, method in (("BM25", "retriever"), (f"{UNTRAINED} (untrained)", UNTRAINED), (TRAINED, TRAINED))}}
    summary = {"seed": seed, "sizes": sizes, "config": {"relax": vars(config.relax), "lr": config.train.lr,
               "steps": config.train.max_steps, "micro_batch_size": config.train.micro_batch_size},
               "reading_subem": reading, "settings": {name: res.metrics for name, res in settings.items()}, "timings": timings}
    if result.strategy.is_main:
        parts = ["# G-Rerank demo: frozen SmolLM2-135M-Instruct, MiniLM reranker, decoy records", "",
                 "## SmolLM2's reading accuracy (SubEM, %) with the given passages", "",
                 "| passages | SubEM |", "|---|---|", *(f"| {name} | {value:.1f} |" for name, value in reading.items()), ""]
        for name, res in settings.items():
            parts += [f"## {name} setting", "", res.table, ""]
        parts.append(f"wall time: reading check {timings['reading_check_s']:.0f} s, train {timings['train_s']:.0f} s, "
                     f"evaluation {timings['eval_s']:.0f} s, total {timings['total_s']:.0f} s")
        (out_dir / "results.md").write_text("\n".join(parts) + "\n")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print("\n".join(parts), flush=True)
    return summary
