"""Generator-setting SubEM of parallel reading against sequential reading, by which documents are read.

    python scripts/parallel_reading.py --run-dir runs/reproduce_real/seed0 --method g-rerank \
        --temperature 0.5 --scale 0.5 --form group --out runs/parallel_reading \
        --write docs/REAL_MODELS.md generator.path=SMOLLM2_DIR

On the test split of a SmolLM2 demo run (``RUN_DIR/data/test.jsonl``, the decoy records, and the
trained rerankers' scores in ``RUN_DIR/eval/reranker/predictions.jsonl``, as ``grerank demo
--generator smollm2`` and ``scripts/reproduce_real.py`` write them), the frozen generator answers
each query greedily from:

- the gold passage alone;
- the retriever's (BM25's) top 1 / 3 / 5;
- the trained reranker's (``--method``) top 1 / 3 / 5;
- all candidates;

each read three ways, through :func:`grerank_dist.evaluation.calibrate.calibrate` (the code of
``grerank calibrate``): sequentially (the documents' tokens one after the other, the plain model's
own ``generate``), in parallel-context mode unaligned (T = S = 1), and in parallel-context mode
with the given alignment (``generator.doc_key_temperature`` T, ``doc_attention_scale`` S,
``doc_temperature_form``; pick them with ``grerank calibrate`` on a dev split, never the test
split). The reranker's order enters as each candidate's ``score``, so the same "top k by score"
code reads both orders.

A setting whose directory holds ``calibration.json`` is read back, not repeated; ``OUT/request.json``
records what OUT holds (run, method, T, S, form, overrides), and a different request on the same
``--out`` is refused rather than mixed with it. ``--write``
puts the table into a markdown file between this script's markers for the form (one table per form).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grerank_dist.atomic import write_marked_section, write_text  # noqa: E402
from grerank_dist.config import load_config  # noqa: E402
from grerank_dist.evaluation.calibrate import calibrate  # noqa: E402

CONFIG = ROOT / "configs" / "demo_smollm2.yaml"


def markers(form: str) -> tuple[str, str]:
    """The markers around a table in the ``--write`` file: one table per form of T."""
    return f"<!-- parallel_reading.py {form}: start -->", f"<!-- parallel_reading.py {form}: end -->"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gold_alone(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record with its supporting passage as the only candidate."""
    out = []
    for record in records:
        gold = [c for c in record["ctxs"] if c.get("is_supporting")]
        if len(gold) != 1:
            raise ValueError(f"record {record['id']}: expected one ctx with is_supporting, found {len(gold)}")
        out.append({**record, "ctxs": gold})
    return out


def reranked(records: list[dict[str, Any]], predictions: Path, method: str) -> list[dict[str, Any]]:
    """Each record's candidates with the method's reranker scores as ``score`` (from the
    evaluation's predictions.jsonl: scores in the record's candidate order), best first."""
    by_id = {}
    for line, row in enumerate(read_jsonl(predictions), 1):
        if method not in row["methods"]:
            raise ValueError(f"{predictions}:{line}: no method {method!r} (has {', '.join(row['methods'])})")
        by_id[row["id"]] = row["methods"][method]
    out = []
    for record in records:
        if record["id"] not in by_id:
            raise ValueError(f"{predictions}: no prediction for record {record['id']}")
        scores = by_id[record["id"]]["scores"]
        if len(scores) != len(record["ctxs"]):
            raise ValueError(f"{predictions}: record {record['id']} has {len(record['ctxs'])} candidates, "
                             f"{len(scores)} scores")
        ctxs = [{**c, "score": float(s)} for c, s in zip(record["ctxs"], scores)]
        out.append({**record, "ctxs": sorted(ctxs, key=lambda c: -c["score"])})
    return out


def settings(method: str) -> list[tuple[str, str, int | None]]:
    """(row name, data file's name, top k or None for all candidates), in table order."""
    rows = [("gold passage alone", "gold", 1)]
    rows += [(f"retriever (BM25) top-{k}", "test", k) for k in (1, 3, 5)]
    rows += [(f"{method} reranker top-{k}", "reranked", k) for k in (1, 3, 5)]
    rows.append(("all candidates (7-8)", "test", None))
    return rows


def claim_out_dir(out: Path, request: dict[str, Any]) -> None:
    """Record ``request`` in ``OUT/request.json``, or refuse an ``OUT`` that holds another one's
    results (they would be read back as this request's)."""
    path = out / "request.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != request:
            changed = ", ".join(f"{key}: {before.get(key)!r} -> {value!r}" for key, value in request.items()
                                if before.get(key) != value)
            raise SystemExit(f"{out} holds the results of another request ({changed}); pass another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(request, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a SmolLM2 demo/reproduction run of one seed")
    parser.add_argument("--method", default="g-rerank", help="the trained reranker whose order to read")
    parser.add_argument("--temperature", type=float, required=True, help="generator.doc_key_temperature T")
    parser.add_argument("--scale", type=float, required=True, help="generator.doc_attention_scale S")
    parser.add_argument("--form", choices=("group", "per_key"), default="group", help="generator.doc_temperature_form")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/parallel_reading"))
    parser.add_argument("--write", type=Path, default=None, help="markdown file to put the table in (between markers)")
    parser.add_argument("overrides", nargs="*", help="config overrides (generator.path=... is needed)")
    args = parser.parse_args()

    request = {"run_dir": str(args.run_dir.resolve()), "method": args.method, "temperature": args.temperature,
               "scale": args.scale, "form": args.form, "overrides": args.overrides}
    claim_out_dir(args.out, request)
    records = read_jsonl(args.run_dir / "data" / "test.jsonl")
    files = {"test": records, "gold": gold_alone(records),
             "reranked": reranked(records, args.run_dir / "eval" / "reranker" / "predictions.jsonl", args.method)}
    for name, rows in files.items():
        write_text(args.out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(CONFIG, [*args.overrides, f"generator.doc_temperature_form={args.form}"])

    table_rows = []
    for row, file_name, k in settings(args.method):
        out_dir = args.out / f"{file_name}_{'all' if k is None else f'top{k}'}"
        if not (out_dir / "calibration.json").is_file():
            calibrate(config, str(args.out / f"{file_name}.jsonl"), out_dir, [args.temperature], [args.scale],
                      top_k=k, batch_size=args.batch_size)
        result = json.loads((out_dir / "calibration.json").read_text())
        unaligned, aligned = (next(p for p in result["points"]
                                   if (p["doc_key_temperature"], p["doc_attention_scale"]) == point)
                              for point in ((1.0, 1.0), (args.temperature, args.scale)))
        sequential = result["sequential"]["subem"]
        table_rows.append((row, sequential, unaligned["subem"], aligned["subem"], result["n_queries"]))

    alignment = f"T = {args.temperature:g}, S = {args.scale:g}, {args.form}"
    lines = [f"| documents | sequential (plain model) | parallel, T = S = 1 | parallel, {alignment} | aligned / sequential |",
             "|---|---:|---:|---:|---:|"]
    for row, sequential, unaligned, aligned, _ in table_rows:
        ratio = f"{aligned / sequential:.2f}" if sequential > 0 else "–"
        lines.append(f"| {row} | {100 * sequential:.1f} | {100 * unaligned:.1f} | {100 * aligned:.1f} | {ratio} |")
    table = "\n".join(lines) + "\n"
    write_text(args.out / "table.md", table)
    print(table, flush=True)
    if args.write:
        n_queries = table_rows[0][4]
        start, end = markers(args.form)
        section = (f"{start}\n`scripts/parallel_reading.py --run-dir {args.run_dir} --method {args.method} "
                   f"--temperature {args.temperature:g} --scale {args.scale:g} --form {args.form}`: generator-setting "
                   f"SubEM in percent on {n_queries} test queries, the same queries in every cell.\n\n{table}{end}\n")
        write_marked_section(args.write, start, end, section)
        print(f"wrote the table into {args.write}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
