"""`grerank demo`: the whole system on a laptop CPU in minutes, through the real code paths.

    grerank demo [--out runs/demo] [--seed 0] [--quick] [--generator cepe|fid] [--reader DIR] [--initial DIR] [key=value ...]
    grerank demo --generator smollm2 [--quick] [key=value ...]   (real models: grerank_dist.demos.demo_smollm2)

1. make the synthetic multi-hop benchmark (bridge questions whose answer needs a document that
   does not contain it, and comparison questions);
2. train a tiny reader on it, CEPE or (``--generator fid``, configs/demo_fid.yaml) FiD, and
   freeze it (its SubEM with both gold documents, each alone, all candidates and none is
   reported); ``--reader`` reuses one;
3. give a random-init tiny cross-encoder a weak start (a short distillation of the retriever's
   scores, ``train.objective=retriever_distillation``; ``--initial`` reuses one), then train it
   with G-Rerank through the real trainer (DeepSpeed, ZeRO-3 generator engine, the same code as
   a cluster run), checkpointing as it goes;
4. evaluate the initial and the trained reranker, the retriever's order and the oracle in the
   paper's three settings, and every checkpoint on the dev split;
5. write the table (markdown + JSON), PNG plots and the exported reranker.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from grerank_dist.config import TrainConfig, load_config
from grerank_dist.data.records import read_records
from grerank_dist.evaluation.evaluate import evaluate
from grerank_dist.method.metrics import metrics_table_markdown
from grerank_dist.evaluation.plots import plot_mask_weight, plot_metric_history
from grerank_dist.demos.reader import (
    DEMO_CONFIGS,
    READER_GENERATORS,
    READER_TRAINING_FILE,
    REPORT_CONDITIONS,
    ReaderConfig,
    build_reader_tokenizer,
    load_reader,
    reader_data,
    reader_report,
    train_reader,
)
from grerank_dist.models.reranker import export_reranker, tiny_reranker
from grerank_dist.demos.synthetic import generate_records, split_seed, write_synthetic_splits
from grerank_dist.training.tracking import read_metrics
from grerank_dist.training.train import train

DEFAULT_OUT = "runs/demo"

# Sizes: the full demo (about 10 minutes on 2 cores) and a quick pass through every stage. The
# reader gets its own, larger split: on 3,000 queries a tiny reader memorises the training
# answers instead of learning to read the two hops.
# That split is generated in memory (about 200 MB as JSON lines); it is reproducible from the seed.
FULL = {"splits": {"train": 3000, "dev": 200, "test": 400}, "reader_queries": 48000, "reader_steps": 4000,
        "weak_start_steps": 1200, "rerank_steps": 300, "mining": 400}
QUICK = {"splits": {"train": 96, "dev": 32, "test": 32}, "reader_queries": 96, "reader_steps": 4, "weak_start_steps": 2,
         "rerank_steps": 4, "mining": 32}


# The weak start trains a random cross-encoder and needs a larger rate than G-Rerank's refinement
# (configs/demo.yaml's train.lr), and a sharper target: the retriever's scores are read at this
# temperature instead of relax.tau. On the demo's data, 1,250 steps reached dev Recall@2 66.5 at
# (2e-3, 0.5) against 40.3 at (1e-3, 0.5) and 27.8 after 800 steps at (1e-3, 1.0).
WEAK_START_LR = 2e-3
WEAK_START_TAU = 0.5


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


def trained_method_name(config: TrainConfig) -> str:
    """The table's name for the reranker this run trains: G-Rerank, its no-Gumbel ablation, a
    baseline objective (emdr, pdist, ...) or the gold-label reference."""
    objective = config.train.objective
    if objective == "grerank":
        return "g-rerank" if config.relax.noise else "no-gumbel"
    return {"nogumbel": "no-gumbel", "gold_labels": "gold-labels"}.get(objective, objective.replace("_", "-"))


def run_demo(
    out_dir: Path,
    seed: int = 0,
    quick: bool = False,
    overrides: list[str] | None = None,
    reader: Path | None = None,
    initial: Path | None = None,
    generator: str = "cepe",
) -> dict[str, Any]:
    """Run every stage with a ``generator`` ("cepe" or "fid") reader (reusing the frozen
    ``reader`` and the ``initial`` reranker if given); returns the summary also written to
    ``out_dir/summary.json``."""
    sizes = QUICK if quick else FULL
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    t = _stage("1/5 synthetic multi-hop data")
    splits = write_synthetic_splits(out_dir / "data", sizes["splits"], seed)
    mining_file = _write_subset(splits["train"], out_dir / "data" / "mining.jsonl", sizes["mining"])
    if generator not in READER_GENERATORS:
        raise ValueError(f"--generator must be one of {', '.join(READER_GENERATORS)}, got {generator!r}")
    config = load_config(
        DEMO_CONFIGS[generator],
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
    config.data = reader_data(config.data, generator)
    timings["data_s"] = time.perf_counter() - t

    records, _ = read_records(splits["train"], config.data.n_candidates, candidate_order=config.data.candidate_order)
    test_records, _ = read_records(splits["test"], config.data.n_candidates, candidate_order=config.data.candidate_order)
    if reader is None:
        t = _stage(f"2/5 reader: train the tiny {generator} generator, then freeze it")
        reader_records = generate_records(sizes["reader_queries"], split_seed(seed, "reader"))
        reader_config = ReaderConfig(steps=sizes["reader_steps"], seed=seed, generator=generator)
        # the synthetic vocabulary covers every split, so the train split's texts suffice here
        reader = train_reader(reader_records, build_reader_tokenizer(records, config.data, generator), reader_config,
                              out_dir / "reader", data=config.data)
        del reader_records
    else:
        t = _stage(f"2/5 reader: reuse the frozen reader in {reader}")
        check_reader_family(reader, generator)
    config.generator.path = str(reader)
    reader_model, reader_tokenizer = load_reader(reader, config.data)
    reader_subem = reader_report(reader_model, reader_tokenizer, test_records, config.data,
                                 max_new_tokens=config.generator.max_new_tokens)
    del reader_model
    print(json.dumps(reader_subem, indent=2), flush=True)
    timings["reader_s"] = time.perf_counter() - t

    t = _stage("3/5 reranker: a weak start from the retriever's scores, then G-Rerank from the frozen reader")
    if initial is None:
        texts = [r["question"] for r in records] + [
            config.data.passage_template.format(title=c["title"], text=c["text"]) for r in records for c in r["ctxs"]
        ]
        random_init = export_reranker(*tiny_reranker(texts, seed=seed), out_dir / "random_reranker")
        initial = weak_start(config, random_init, sizes["weak_start_steps"], out_dir / "weak_start")
    config.reranker.path = str(initial)
    result = train(config, resume="none")
    timings["train_s"] = time.perf_counter() - t

    t = _stage("4/5 evaluation in the paper's three settings")
    rerankers = {"initial": str(initial), trained_method_name(config): str(result.reranker_dir)}
    ks = (2, 5)
    settings = {
        "reranker": evaluate(config, rerankers, str(splits["test"]), "reranker", ks, out_dir / "eval" / "reranker", strategy=result.strategy),
        "generator": evaluate(config, rerankers, str(splits["test"]), "generator", ks, out_dir / "eval" / "generator", strategy=result.strategy),
        "mining": evaluate(config, rerankers, str(mining_file), "mining", ks, out_dir / "eval" / "mining", strategy=result.strategy),
    }
    history = checkpoint_history(config, splits["dev"], ks, out_dir / "eval" / "history", result.strategy)
    timings["eval_s"] = time.perf_counter() - t

    _stage("5/5 report")
    timings["total_s"] = time.perf_counter() - started  # all but writing the report
    summary = {
        "seed": seed,
        "generator": generator,
        "sizes": sizes,
        "reader": reader_subem,
        "settings": {name: res.metrics for name, res in settings.items()},
        "history": history,
        "timings": timings,
    }
    if result.strategy.is_main:
        write_report(out_dir, summary, settings, history, result.reranker_dir)
    print(f"\ndemo finished in {timings['total_s']:.0f}s; outputs in {out_dir}", flush=True)
    return summary


def check_reader_family(reader: Path, generator: str) -> None:
    """A reused reader must be of the family the demo runs: its input format (templates,
    document length) follows the family, so a CEPE reader read as FiD would answer from garbage."""
    training = Path(reader) / READER_TRAINING_FILE
    if not training.is_file():
        return  # a reader trained elsewhere: its config.json alone decides how it loads
    trained = json.loads(training.read_text()).get("reader", {}).get("generator", "cepe")
    if trained != generator:
        raise ValueError(f"{training}: field reader.generator is {trained!r}, but the demo runs --generator {generator}")


def weak_start(config: TrainConfig, reranker: Path, steps: int, out_dir: Path) -> Path:
    """Distil the retriever's scores into ``reranker`` for ``steps`` steps (the same trainer,
    ``train.objective=retriever_distillation``); returns the exported reranker. A random
    cross-encoder puts the gold documents in G-Rerank's top-k masks too rarely for the answer
    loss to rank them; a paper-scale run starts from a pretrained reranker instead."""
    start = copy.deepcopy(config)
    start.output_dir = str(out_dir)
    start.reranker.path = str(reranker)
    start.train.objective = "retriever_distillation"
    start.train.lr = WEAK_START_LR
    start.relax.tau = WEAK_START_TAU
    start.train.max_steps = steps
    start.train.save_every = steps
    return train(start, resume="none").reranker_dir


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
    parts = ["# G-Rerank demo", "", "## frozen reader: SubEM with only the given documents visible", "",
             reader_table_markdown(summary["reader"]), ""]
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


def reader_table_markdown(report: dict[str, Any]) -> str:
    """One row per question type, one column per visibility condition (percent SubEM)."""
    rows = {kind: {c: report[kind][c] for c in REPORT_CONDITIONS} | {"queries": report[kind]["queries"]}
            for kind in sorted(report, key=lambda k: (k == "all", k))}
    return metrics_table_markdown(rows, [*REPORT_CONDITIONS, "queries"]).replace("| Method |", "| Questions |")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default runs/demo, runs/demo_smollm2 for --generator smollm2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the noise")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a pass through every stage in about a minute")
    parser.add_argument("--generator", choices=(*READER_GENERATORS, "smollm2"), default="cepe",
                        help="cepe or fid: the synthetic benchmark with a tiny reader of that family trained here "
                        "(configs/demo.yaml, configs/demo_fid.yaml); smollm2: the decoy reading records (no lexical shortcut) with the frozen "
                        "SmolLM2-135M-Instruct and a MiniLM reranker (the `grerank fetch-models` cache, "
                        "configs/demo_smollm2.yaml; --reader/--initial do not apply)")
    parser.add_argument("--reader", type=Path, help="reuse this frozen reader directory instead of training one "
                        "(it must come from the same --seed and --generator, whose data the demo regenerates)")
    parser.add_argument("--initial", type=Path, help="start from this reranker directory instead of making a weak "
                        "start (e.g. an earlier run's weak_start/reranker, same --seed)")
    parser.add_argument("overrides", nargs="*", help="training config overrides as dotted key=value")


def run(args: argparse.Namespace) -> int:
    if args.generator == "smollm2":
        if args.reader or args.initial:
            raise SystemExit("grerank demo: --reader and --initial apply to --generator cepe|fid only")
        from grerank_dist.demos.demo_smollm2 import run_smollm2_demo

        out = Path(args.out) if args.out != DEFAULT_OUT else Path("runs/demo_smollm2")
        run_smollm2_demo(out, seed=args.seed, quick=args.quick, overrides=args.overrides)
        return 0
    run_demo(Path(args.out), seed=args.seed, quick=args.quick, overrides=args.overrides, reader=args.reader,
             initial=args.initial, generator=args.generator)
    return 0
