"""G-Rerank against the baselines with real models, over seeds, on records with no lexical shortcut.

    python scripts/reproduce_real.py --seeds 0 1 2 --out runs/reproduce_real --write docs/REAL_MODELS.md

Per seed: the decoy records (``grerank_dist.demos.decoy_reading``: 600 training, 100 test
queries, 7-8 candidates in BM25 order), the frozen SmolLM2-135M-Instruct and the pretrained
MiniLM with a new head drawn from the seed, saved once: every method starts from exactly it.
Each trained method is one ``grerank train`` run with the SmolLM2 demo's config at 8 candidates
and the same steps, learning rate and batch (``--steps``, ``--lr``); then the test split is
ranked (reranker setting: Recall@1/3, MRR) and answered from each method's top 1 and top 3
(generator setting: SubEM), every method in the same evaluation call.

References, not trained: BM25 (the retriever order), the untrained MiniLM, the oracle, and the
answer-string heuristic: candidates holding an answer string first, in a random order drawn from
the seed, then the others. The heuristic reads the test answers, so it is legitimate only as a
source of training labels; it is reported as the bound such labels give.

A run whose directory holds ``done.json`` is read back, not repeated, and ``grerank train``
resumes from its last checkpoint: an interrupted reproduction continues where it stopped.
``--quick`` runs every stage at tiny sizes (the CPU test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grerank_dist.atomic import write_marked_section  # noqa: E402
from grerank_dist.demos.demo_smollm2 import write_reading_splits  # noqa: E402
from grerank_dist.demos.synthetic import split_seed  # noqa: E402
from grerank_dist.method.metrics import metrics_table_markdown  # noqa: E402
from grerank_dist.models.fetch import fetch_model  # noqa: E402
from grerank_dist.models.reranker import export_reranker, load_reranker  # noqa: E402
from grerank_dist.training.tracking import read_metrics  # noqa: E402

CONFIG = ROOT / "configs" / "demo_smollm2.yaml"
# method -> overrides of the common config; every method trains from the same untrained MiniLM.
METHODS = {
    "g-rerank": [],
    "g-rerank-tau2": ["relax.tau=2.0"],
    "g-rerank+pdist": ["train.objective=grerank_pdist"],
    "no-gumbel": ["relax.noise=false"],
    "emdr": ["train.objective=emdr"],
    "pdist": ["train.objective=pdist"],
    "dro": ["train.objective=dro"],
    "gold-labels": ["train.objective=gold_labels"],
}
UNTRAINED, BM25, HEURISTIC, ORACLE = "untrained", "bm25", "answer-string", "oracle"
COLUMNS = ["recall@1", "recall@3", "mrr", "subem@top1", "subem@top3"]
STEP_COLUMN = "step_time_vs_g-rerank"
FULL = {"train": 600, "test": 100, "eval_batch": 16,
        "overrides": ["relax.k=1", "relax.tau=0.5", "data.n_candidates=8", "train.micro_batch_size=4", "train.warmup_steps=5", "train.save_every=10",
                      "train.log_every=5", "generator.max_new_tokens=24"]}
QUICK = {"train": 8, "test": 4, "eval_batch": 4,
         "overrides": ["relax.k=1", "relax.tau=0.5", "data.n_candidates=8", "data.doc_max_tokens=24", "train.micro_batch_size=2", "train.warmup_steps=0",
                       "train.save_every=1", "train.log_every=1", "generator.max_new_tokens=3", "train.max_steps=2"]}


def answer_string_order(records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The heuristic's ranking as retriever scores: answer-bearing candidates first (1 + u),
    the others after (u), u uniform from the seed, so ties break at random."""
    rng = random.Random(seed)
    ranked = []
    for record in records:
        ctxs = [{**ctx, "score": float(ctx["has_answer"]) + rng.random()} for ctx in record["ctxs"]]
        ranked.append({**record, "ctxs": sorted(ctxs, key=lambda ctx: -ctx["score"])})
    return ranked


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepare_seed(seed: int, out: Path, sizes: dict[str, Any], cache_dir: Path | None) -> dict[str, Path]:
    """Data files, the models and the seed's untrained MiniLM (written once)."""
    models = {name: fetch_model(name, cache_dir) for name in ("smollm2", "minilm")}
    paths = {"smollm2": models["smollm2"], UNTRAINED: out / "untrained_reranker"}
    if not (paths[UNTRAINED] / "config.json").is_file():
        torch.manual_seed(seed)
        export_reranker(*load_reranker(models["minilm"]), paths[UNTRAINED])
    splits = {split: out / "data" / f"{split}.jsonl" for split in ("train", "test")}
    if not all(path.is_file() for path in splits.values()):
        splits = write_reading_splits(out / "data", {split: sizes[split] for split in splits}, seed)  # the demo's
    paths.update(splits)
    paths[HEURISTIC] = out / "data" / "test_answer_string_order.jsonl"
    if not paths[HEURISTIC].is_file():
        test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
        write_jsonl(paths[HEURISTIC], answer_string_order(test, split_seed(seed, "answer-string")))
    return paths


def grerank(args: list[str], log: Path, threads: int) -> None:
    """One ``grerank`` command in a subprocess (its own DeepSpeed state), output to ``log``."""
    command = [sys.executable, "-m", "grerank_dist.cli", *args]
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    with log.open("a") as stream:
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                       stdout=stream, stderr=subprocess.STDOUT)
    print(f"  {time.perf_counter() - started:.0f} s", flush=True)


def run_seed(seed: int, out: Path, methods: list[str], steps: int, lr: float, threads: int, sizes: dict[str, Any],
             cache_dir: Path | None, generator_setting: bool = True) -> dict[str, Any]:
    """Train every method of one seed, then evaluate all of them together; returns method -> row.
    ``generator_setting`` False: the reranker setting only (no SubEM columns for this seed)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = prepare_seed(seed, out, sizes, cache_dir)
    common = [f"seed={seed}", f"generator.path={paths['smollm2']}", f"reranker.path={paths[UNTRAINED]}",
              f"data.train_file={paths['train']}", f"data.eval_file={paths['test']}", f"train.max_steps={steps}",
              f"train.lr={lr}", *sizes["overrides"]]
    rows: dict[str, dict[str, Any]] = {}
    rerankers = {UNTRAINED: paths[UNTRAINED]}
    # methods asked for, and any other this seed's directory already finished (a wider earlier run)
    for method in [*methods, *(m for m in METHODS if m not in methods and (out / m / "done.json").is_file())]:
        run_dir = out / method
        done = run_dir / "done.json"
        if not done.is_file():
            grerank(["train", "--config", str(CONFIG), f"output_dir={run_dir}", *common, *METHODS[method]],
                    out / f"{method}.log", threads)
            logged = read_metrics(run_dir / "metrics.jsonl")
            step_times = [r["train/step_time_s"] for r in logged if "train/step_time_s" in r]
            done.write_text(json.dumps({"median_step_s": statistics.median(step_times)}))
        rows[method] = json.loads(done.read_text())
        rerankers[method] = run_dir / "reranker"
    names = [f"--reranker={name}={path}" for name, path in rerankers.items()]
    # name -> (options, overrides); the overrides go last so that relax.k is the setting's
    evaluations = {
        "reranker": (["--setting", "reranker", "--k", "1", "--k", "3"], []),
        "top1": (["--setting", "generator", "--k", "1"], ["relax.k=1"]),
        "top3": (["--setting", "generator", "--k", "3"], ["relax.k=3"]),
    }
    if not generator_setting:
        evaluations = {"reranker": evaluations["reranker"]}
    for name, (options, overrides) in evaluations.items():
        for data, target in (("test", name), (HEURISTIC, f"{name}_answer_string")):
            metrics_file = out / "eval" / target / "metrics.json"
            if not metrics_file.is_file() or (data == "test" and not set(rerankers) <= set(
                    json.loads(metrics_file.read_text())["methods"])):
                grerank(["eval", "--config", str(CONFIG), f"--data={paths[data]}", *(names if data == "test" else []),
                         "--batch-size", str(sizes["eval_batch"]), "--out", str(metrics_file.parent), *options,
                         f"output_dir={out / 'eval'}", *common, *overrides], out / "eval.log", threads)
    results = {target.name: json.loads((target / "metrics.json").read_text())["methods"]
               for target in (out / "eval").iterdir() if (target / "metrics.json").is_file()}
    for method in [*rerankers, BM25, HEURISTIC, ORACLE]:
        source, suffix = ("retriever", "_answer_string") if method == HEURISTIC else (
            "retriever" if method == BM25 else method, "")
        row = rows.setdefault(method, {})
        row.update({key: results[f"reranker{suffix}"][source][key] for key in ("recall@1", "recall@3", "mrr")})
        if generator_setting:
            row.update({f"subem@{name}": results[f"{name}{suffix}"][source]["subem"] for name in ("top1", "top3")})
    return rows


def summarise(per_seed: list[dict[str, Any]], method: str) -> dict[str, str | None]:
    """``mean ± sd`` in percent over seeds (sample sd; the value alone for one seed) and the mean
    step-time ratio to G-Rerank measured in the same seed."""
    cells: dict[str, str | None] = {}
    per_seed = [rows for rows in per_seed if method in rows]
    cells["seeds"] = str(len(per_seed))
    for column in COLUMNS:
        values = [100 * rows[method][column] for rows in per_seed if column in rows[method]]
        if not values:
            cells[column] = None
            continue
        mean = statistics.fmean(values)
        cells[column] = f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"
        if len(values) < len(per_seed):
            cells[column] += f" ({len(values)} seeds)"
    ratios = [rows[method]["median_step_s"] / rows["g-rerank"]["median_step_s"]
              for rows in per_seed if "median_step_s" in rows[method] and "g-rerank" in rows]
    cells[STEP_COLUMN] = f"{statistics.fmean(ratios):.2f}×" if ratios else None
    return cells


MARKERS = ("<!-- reproduce_real.py: start -->", "<!-- reproduce_real.py: end -->")


def write_report(path: Path, seeds: list[int], per_seed: list[dict[str, Any]], command: str) -> str:
    """The table between this script's markers in ``path`` (the rest of the file is kept)."""
    order = [BM25, HEURISTIC, UNTRAINED, *(m for m in METHODS if any(m in rows for rows in per_seed)), ORACLE]
    table = metrics_table_markdown({m: summarise(per_seed, m) for m in order}, [*COLUMNS, STEP_COLUMN, "seeds"],
                                   percent=False)
    section = f"""{MARKERS[0]}
Produced by

    {command}

Test split of each seed (100 queries, 7-8 candidates), percent, mean ± sample sd over seeds
{", ".join(map(str, seeds))}. Reranker setting: Recall@1/3, MRR; generator setting: SubEM of the frozen
SmolLM2's greedy answer from the method's top 1 and top 3 (parallel context). `answer-string`
reads the test answers (a bound for answer-string training labels, not a method); `oracle` puts
the gold first. Step time: the method's median logged step over G-Rerank's in the same seed.

{table}{MARKERS[1]}
"""
    write_marked_section(path, *MARKERS, section)
    return section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce_real"))
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "REAL_MODELS.md")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per run")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the fetch-models cache (default: the usual)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a check that every stage runs")
    parser.add_argument("--generator-eval-seeds", type=int, nargs="+", default=None,
                        help="seeds whose methods are also answered in the generator setting (default: all)")
    args = parser.parse_args()
    methods = ["g-rerank", *(m for m in args.methods if m != "g-rerank")]  # the step-time reference first
    sizes = QUICK if args.quick else FULL
    per_seed = []
    for seed in args.seeds:
        generator_setting = args.generator_eval_seeds is None or seed in args.generator_eval_seeds
        per_seed.append(run_seed(seed, args.out / f"seed{seed}", methods, args.steps, args.lr, args.threads, sizes,
                                 args.cache_dir, generator_setting))
        (args.out / "per_seed.json").write_text(json.dumps(per_seed, indent=2))
    command = "python scripts/reproduce_real.py " + shlex.join(
        ["--seeds", *map(str, args.seeds), "--out", str(args.out), "--write", str(args.write), "--steps", str(args.steps),
         "--lr", str(args.lr)] + (["--methods", *args.methods] if args.methods != list(METHODS) else [])
        + (["--generator-eval-seeds", *map(str, args.generator_eval_seeds)] if args.generator_eval_seeds else [])
        + (["--quick"] if args.quick else []))
    print(write_report(args.write, args.seeds, per_seed, command), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
