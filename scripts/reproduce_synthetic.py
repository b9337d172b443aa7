"""Reproduce the paper's qualitative claims on the synthetic multi-hop benchmark, over seeds.

    python scripts/reproduce_synthetic.py --seeds 0 1 2 --out runs/reproduce --write docs/RESULTS.md [--generator fid]

For every seed, ``grerank demo`` makes the data, trains and freezes the reader, gives the
reranker its weak start and trains G-Rerank; one more demo run per method reuses that frozen
reader, that weak start and the same data to train: the no-Gumbel ablation (``relax.noise=false``,
the paper's Sec. 4.4), the LLM-supervised baselines (EMDR, PDist, LOOP, ADist, DRO; App. B) and
the gold-label reference (``train.objective=gold_labels``, the reranker trained on the
supporting-document labels, an upper reference for what the answer signal could teach); every
method has the same steps, learning rate and batch (``--methods`` picks a subset). All
rerankers start from the same weak start (the demo's random cross-encoder after its retriever
distillation). Reported on the test split in the reranker setting: Recall@2 and indirect
Recall@2 (App. E) overall and per question type, with the mean and sample standard deviation
over seeds, the last logged mean largest reranker weight (Fig. 5), each method's median step
time against G-Rerank's, and the reader's SubEM by visible documents. A method whose run
directory already holds a ``summary.json`` is read back, not trained again, so an interrupted
reproduction resumes where it stopped. ``--generator fid`` makes the reader a FiD model (``grerank demo
--generator fid``); its section of the report sits next to CEPE's, each between its own markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grerank_dist.atomic import write_marked_section  # noqa: E402
from grerank_dist.demos.demo import reader_table_markdown  # noqa: E402
from grerank_dist.method.metrics import metrics_table_markdown  # noqa: E402
from grerank_dist.demos.reader import READER_GENERATORS  # noqa: E402
from grerank_dist.training.tracking import read_metrics  # noqa: E402

# method -> extra demo overrides; the first trains the reader the others reuse. ADist's target is
# a log attention fraction, distilled at T_g = 1 (docs/OBJECTIVES.md), the others keep the defaults.
METHODS = {
    "g-rerank": [],
    "no-gumbel": ["relax.noise=false"],
    "emdr": ["train.objective=emdr"],
    "pdist": ["train.objective=pdist"],
    "loop": ["train.objective=loop"],
    "adist": ["train.objective=adist", "objective.target_temperature=1.0"],
    "dro": ["train.objective=dro"],
    "gold-labels": ["train.objective=gold_labels"],
}
REFERENCES = ("retriever", "initial", "oracle")
COLUMNS = ["recall@2", "indirect_recall@2", "bridge/recall@2", "bridge/indirect_recall@2", "comparison/recall@2",
           "comparison/indirect_recall@2", "final_mean_max_weight"]
STEP_COLUMN = "step_time_vs_g-rerank"


def run_seed(
    seed: int, out: Path, threads: int, quick: bool = False, generator: str = "cepe", methods: list[str] | None = None
) -> dict[str, Any]:
    """The runs of one seed with a ``generator`` reader, G-Rerank's first; returns method ->
    reranker-setting test metrics (+ Fig. 5 value and median step time)."""
    rows: dict[str, Any] = {}
    first = None
    for method in ["g-rerank", *(m for m in methods or METHODS if m != "g-rerank")]:
        overrides = METHODS[method]
        run_dir = out / f"seed{seed}" / method
        command = [sys.executable, "-m", "grerank_dist.cli", "demo", "--out", str(run_dir), "--seed", str(seed),
                   "--generator", generator]
        if first is not None:
            command += ["--reader", str(first / "reader"), "--initial", str(first / "weak_start" / "reranker")]
        command += ["--quick"] if quick else []
        command += overrides
        if (run_dir / "summary.json").is_file():
            print(f"reusing the finished run {run_dir}", flush=True)
        else:
            print(f"$ {shlex.join(command)}", flush=True)
            started = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            with (out / f"seed{seed}_{method}.log").open("w") as log:
                subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f"  {time.perf_counter() - started:.0f}s", flush=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = summary["settings"]["reranker"]
        logged = read_metrics(run_dir / "train" / "metrics.jsonl")
        weights = [r["train/mean_max_weight"] for r in logged if "train/mean_max_weight" in r]
        step_times = [r["train/step_time_s"] for r in logged if "train/step_time_s" in r]
        rows[method] = {**metrics[method], "final_mean_max_weight": weights[-1],
                        "median_step_s": statistics.median(step_times)}
        if first is None:
            first = run_dir
            rows["reader"] = summary["reader"]
            rows.update({name: metrics[name] for name in REFERENCES})
            rows["wall_s"] = summary["timings"]["total_s"]
    return rows


def step_time_ratio(seed_rows: dict[str, Any], method: str) -> float | None:
    """A method's median step time over G-Rerank's in the same seed (None for the references)."""
    own, grerank = seed_rows[method].get("median_step_s"), seed_rows["g-rerank"].get("median_step_s")
    return own / grerank if own is not None and grerank else None


def mean_and_spread(per_seed: list[dict[str, Any]], method: str) -> dict[str, str]:
    """``mean ± std`` (percent, sample std over seeds) for each column, the mean step-time ratio to
    G-Rerank; the mean alone for one seed."""
    ratios = [r for r in (step_time_ratio(seed_rows, method) for seed_rows in per_seed) if r is not None]
    cells = {STEP_COLUMN: f"{statistics.fmean(ratios):.2f}×" if ratios else None}
    for column in COLUMNS:
        values = [seed_rows[method].get(column) for seed_rows in per_seed]
        values = [v for v in values if v is not None]
        if not values:
            cells[column] = None
            continue
        mean = 100 * statistics.fmean(values)
        cells[column] = f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"
    return cells


def section_markers(generator: str) -> tuple[str, str]:
    """The start and end markers of a reader family's section (CEPE's keep their original text)."""
    tag = "" if generator == "cepe" else f" {generator}"
    return f"<!-- reproduce_synthetic.py{tag}: start -->", f"<!-- reproduce_synthetic.py{tag}: end -->"


READER_NAMES = {"cepe": "CEPE", "fid": "FiD"}


def write_results(
    path: Path, seeds: list[int], per_seed: list[dict[str, Any]], command: str, generator: str = "cepe"
) -> str:
    """Write the report as the ``generator``'s section between its markers in ``path``
    (hand-written text and the other family's section are kept), or append it. Returns the section."""
    section_start, section_end = section_markers(generator)
    reader_name = "" if generator == "cepe" else f", {READER_NAMES[generator]} reader"
    trained = [m for m in METHODS if m in per_seed[0]]
    methods = [*REFERENCES[:2], *trained, REFERENCES[2]]
    summary_rows = {m: mean_and_spread(per_seed, m) for m in methods}
    table = metrics_table_markdown(summary_rows, [*COLUMNS, STEP_COLUMN], percent=False)
    per_seed_tables = "\n".join(
        f"#### seed {seed}\n\n" + metrics_table_markdown({m: rows[m] for m in methods}, COLUMNS)
        + "\nMedian step time: " + ", ".join(f"{m} {rows[m]['median_step_s']:.3f} s" for m in trained
                                               if "median_step_s" in rows[m]) + ".\n"
        + "\nReader SubEM (%) by visible documents:\n\n" + reader_table_markdown(rows["reader"])
        + f"\nWall time of the seed's demo run: {rows['wall_s']:.0f} s.\n"
        for seed, rows in zip(seeds, per_seed)
    )
    section = f"""{section_start}
## Reproduction over seeds{reader_name}: G-Rerank against the baselines, the no-Gumbel ablation and the gold-label reference

Produced by

    {command}

on a 2-core CPU machine. Test split, reranker setting; values in percent, mean ± sample standard
deviation over seeds {", ".join(map(str, seeds))} (one seed: the value alone). `Indirect Recall@2`: the share of the
indirectly relevant gold documents (supporting documents without the answer, App. E) ranked in
the top 2; per question type for bridge (the work document) and comparison (the family document
of the later-born person). `Final Mean Max Weight`: the last logged mean over queries of
max_i softmax(κ·w/τ)_i (the paper's Fig. 5 statistic; 1/20 = 5% when the reranker cannot tell
candidates apart). Every reranker starts from the same weak start, the `initial` row (the
demo's random cross-encoder after a short distillation of the retriever's scores); the
retriever row is the synthetic lexical score's order; the oracle puts the gold documents first.
Every trained method has the same steps, learning rate, batch and k; the baselines keep the
`objective` section's defaults (ADist at T_g = 1). `Step Time Vs G-Rerank`: the method's median
logged step time over G-Rerank's in the same seed, averaged over seeds (same machine, run one
after the other, so the shared machine's load moves it by some percent).

{table}
### Per seed

{per_seed_tables}{section_end}
"""
    write_marked_section(path, section_start, section_end, section)
    return section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "RESULTS.md", help="the markdown report")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per run")
    parser.add_argument("--quick", action="store_true", help="the demo's tiny sizes (a check that every stage runs)")
    parser.add_argument("--generator", choices=READER_GENERATORS, default="cepe", help="reader family (default cepe)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="methods to train (g-rerank always runs first: it trains the reader the others reuse)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args.out, args.threads, args.quick, args.generator, args.methods))
        (args.out / "per_seed.json").write_text(json.dumps(per_seed, indent=2))
    command = "python scripts/reproduce_synthetic.py " + shlex.join(
        ["--seeds", *map(str, args.seeds), "--out", str(args.out), "--write", str(args.write), "--threads", str(args.threads)]
        + (["--quick"] if args.quick else []) + (["--generator", args.generator] if args.generator != "cepe" else [])
        + (["--methods", *args.methods] if args.methods != list(METHODS) else []))
    print(write_results(args.write, args.seeds, per_seed, command, args.generator), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
