"""Tune the SmolLM2 demo's G-Rerank settings on a dev split (never the demo's test split).

    python scripts/tune_smollm2.py --steps 20 --out runs/tune_smollm2 \
        --point default --point tau=1.0:relax.tau=1.0 --point lr=1e-4:train.lr=1e-4

Every point trains the same untrained MiniLM (the demo's, same seed) on the demo's training
split for ``--steps`` steps with the demo's config plus the point's overrides, then ranks a dev
split of its own seed (100 queries by default, disjoint from the demo's test queries) in the
reranker setting. A point whose directory holds ``dev_metrics.json`` is read back, so the sweep
resumes. Writes ``tuning.md`` (Recall@1, Recall@3, MRR, the last logged mean largest weight,
train seconds) and ``tuning.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grerank_dist.demos.demo_smollm2 import FULL, prepare_run  # noqa: E402
from grerank_dist.evaluation.evaluate import evaluate  # noqa: E402
from grerank_dist.training.tracking import read_metrics  # noqa: E402
from grerank_dist.training.train import train  # noqa: E402


KEYS = ("recall@1", "recall@3", "mrr")


def parse_point(text: str) -> tuple[str, list[str]]:
    """``name`` (no override) or ``name:key=value[,key=value...]``."""
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def run_point(out: Path, name: str, overrides: list[str], steps: int, dev: int, seed: int) -> dict:
    point_dir = out / name
    done = point_dir / "dev_metrics.json"
    if done.is_file():
        print(f"reusing {done}", flush=True)
        return json.loads(done.read_text())
    config, splits, untrained = prepare_run(
        point_dir, seed, {"train": FULL["splits"]["train"], "dev": dev},
        [f"train.max_steps={steps}", f"train.save_every={steps}", *overrides],
    )
    started = time.perf_counter()
    result = train(config, resume="none")
    train_s = time.perf_counter() - started
    metrics = evaluate(config, {name: str(result.reranker_dir), "untrained": str(untrained)}, str(splits["dev"]), "reranker",
                       (1, 3), point_dir / "eval_dev", batch_size=16, strategy=result.strategy).metrics
    logged = [row for row in read_metrics(point_dir / "train" / "metrics.jsonl") if "train/mean_max_weight" in row]
    row = {"overrides": overrides, **{key: metrics[name][key] for key in KEYS},
           "final_mean_max_weight": logged[-1]["train/mean_max_weight"], "train_s": train_s,
           "references": {method: {key: metrics[method][key] for key in KEYS} for method in ("untrained", "retriever")}}
    done.write_text(json.dumps(row, indent=2))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", action="append", required=True, help="name[:key=value,...]; repeat for each point")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dev", type=int, default=100, help="dev queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/tune_smollm2"))
    args = parser.parse_args()
    rows = {name: run_point(args.out, name, overrides, args.steps, args.dev, args.seed)
            for name, overrides in map(parse_point, args.point)}
    table = "\n".join([
        "| point | overrides | Recall@1 | Recall@3 | MRR | mean largest weight | train s |", "|---|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {' '.join(r['overrides']) or '(demo config)'} | {100 * r['recall@1']:.1f} | {100 * r['recall@3']:.1f} | "
          f"{100 * r['mrr']:.1f} | {100 * r['final_mean_max_weight']:.1f} | {r['train_s']:.0f} |" for name, r in rows.items()),
        *(f"| {method} | (reference) | {100 * m['recall@1']:.1f} | {100 * m['recall@3']:.1f} | {100 * m['mrr']:.1f} | | |"
          for method, m in next(iter(rows.values()))["references"].items()),
    ])
    command = "python scripts/tune_smollm2.py " + " ".join(sys.argv[1:])
    (args.out / "tuning.json").write_text(json.dumps(rows, indent=2))
    (args.out / "tuning.md").write_text(f"    {command}\n\n{args.steps} steps, dev split of {args.dev} queries\n\n{table}\n")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
