"""Start-up time and memory per rank of the training data: in-memory records vs Arrow.

    python scripts/bench_data.py --out runs/bench_data [--candidates 20 100] [--ranks 1 2]

Writes an NQ-sized synthetic training file per candidate count (79,168 queries, ~100-word
passages; generated once under --out), then, for 1 and 2 ranks (torch.distributed.run, gloo),
times each rank from after its imports to its first micro-batch and reads its memory:

- old: ``read_records`` into Python dicts on every rank, then the tokenising ``Collator``;
- arrow-cold: ``grerank_dist.data.dataset`` with an empty cache (rank 0 reads and tokenises the file,
  ``data.tokenize_workers`` processes, the others wait), then the first padded batch;
- arrow-warm: the same with the cache in place (a restart, a second run).

Memory: peak RSS (VmHWM) and, after the first batch, RSS, PSS and USS (private pages) from
/proc/self/smaps_rollup. Memory-mapped Arrow pages appear in the RSS of every rank that touched
them; PSS divides shared pages among the ranks and USS leaves them out. Each run is limited to
--limit-bytes of address space (prlimit --as) so that no run can exhaust the machine; a run
that hits the limit is reported as such. Tokenizers (--tokenizers): word-level ones over the
synthetic vocabulary, or the real SmolLM2 (generator) and all-MiniLM-L6 (reranker) of
``grerank fetch-models``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path.home() / ".cache" / "grerank_dist" / "models"
NQ_TRAIN_QUERIES = 79_168
LOADERS = ("old", "arrow-cold", "arrow-warm")
WORKER_ENV = "BENCH_DATA_JOB"  # a worker's job, as JSON (torch.distributed.run would take its options)


def write_synthetic(path: Path, queries: int, candidates: int, words: int, seed: int = 0) -> None:
    """NQ-shaped records (question, answers, ``candidates`` scored ctxs of ``words`` words), written once."""
    if path.is_file():
        return
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "an", "or", "el", "ul", "im", "ve", "zo"]
    vocab = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(30_000)})
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for q in range(queries):
            answer = " ".join(rng.choices(vocab, k=rng.randint(1, 3)))
            ctxs = [
                {
                    "id": f"{q}-{i}",
                    "title": " ".join(rng.choices(vocab, k=2)),
                    "text": " ".join(rng.choices(vocab, k=words)),
                    "score": round(100 - i * 0.5 + rng.random(), 3),
                    "has_answer": i == 0,
                }
                for i in range(candidates)
            ]
            question = "who " + " ".join(rng.choices(vocab, k=8)) + " ?"
            handle.write(json.dumps({"id": str(q), "question": question, "answers": [answer], "ctxs": ctxs}) + "\n")
    tmp.rename(path)


def tokenizers(data_file: str, kind: str):
    """``real``: the cached SmolLM2 and all-MiniLM-L6 tokenizers (BPE and WordPiece split the
    synthetic pseudo-words into ~3x the tokens English would give); ``word``: word-level
    tokenizers over the file's vocabulary (random:tiny's; one token per word, as English roughly has)."""
    if kind == "real":
        from transformers import AutoTokenizer

        return tuple(AutoTokenizer.from_pretrained(MODELS / name) for name in ("smollm2-135m-instruct", "all-minilm-l6-v2"))
    from grerank_dist.models.tokenization import build_word_tokenizer

    with open(data_file) as handle:  # the first records cover the synthetic vocabulary
        texts = [line for _, line in zip(range(200), handle)]
    return build_word_tokenizer(texts, "decoder"), build_word_tokenizer(texts, "cross-encoder")


def memory() -> dict[str, int]:
    """Peak RSS and current RSS/PSS/USS of this process, in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        rollup[key] = int(value.split()[0]) * 1024
    return {
        "peak_rss": int(status["VmHWM"].split()[0]) * 1024,
        "rss": rollup["Rss"],
        "pss": rollup["Pss"],
        "uss": rollup["Private_Clean"] + rollup["Private_Dirty"],
    }


def worker(args: argparse.Namespace) -> None:
    """One rank of job ``args`` (the driver's $BENCH_DATA_JOB): data to its first micro-batch
    (timed from after the imports and the tokenizers), then one JSON line of timings and memory."""
    import torch.distributed as dist

    from grerank_dist.config import DataConfig
    from grerank_dist.data.collate import Collator, MicroBatchSchedule
    from grerank_dist.data.records import read_records
    from grerank_dist.data.dataset import Ranks, StepBatches, candidate_counts, load_records, load_tokens

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    data = DataConfig(train_file=args.data, n_candidates=args.n, cache_dir=args.cache, tokenize_workers=args.tokenize_workers)
    k, micro_batch = 5, 4
    gen_tok, rr_tok = tokenizers(args.data, args.tokenizers)  # the same for both loaders: not timed
    collate = Collator(data, gen_tok, rr_tok, 256)
    started = time.perf_counter()
    if args.loader == "old":
        records, _ = read_records(data.train_file, data.n_candidates)
        records = [r for r in records if len(r["ctxs"]) > k]
        schedule = MicroBatchSchedule(len(records), micro_batch, world, rank, seed=0)
        ids = schedule.indices(0)
        batch = collate([records[i] for i in ids], ids, epoch=0)
    else:
        ranks = Ranks(rank, int(os.environ.get("LOCAL_RANK", rank)), gather)
        records, _, key = load_records(data, ranks)
        keep = [i for i, count in enumerate(candidate_counts(records)) if count > k]
        tokens = load_tokens(records, key, collate, data, ranks).select(keep)
        schedule = MicroBatchSchedule(len(tokens), micro_batch, world, rank, seed=0)
        batch = StepBatches(tokens, schedule, collate)[0]
    seconds = time.perf_counter() - started
    print(json.dumps({"rank": rank, "first_batch_s": seconds, "batch_shape": list(batch.encoder_input_ids.shape), **memory()}), flush=True)
    gather(None)  # both ranks measured before either exits
    dist.destroy_process_group()


def run(args: argparse.Namespace, loader: str, n: int, ranks: int, data: Path, cache: Path) -> dict:
    command = [
        "prlimit", f"--as={args.limit_bytes}", sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(ranks), __file__,
    ]
    job = {"loader": loader, "n": n, "data": str(data), "cache": str(cache), "tokenize_workers": args.tokenize_workers, "tokenizers": args.tokenizers}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", WORKER_ENV: json.dumps(job)}
    load = os.getloadavg()[0]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    outcome = {"loader": loader, "candidates": n, "ranks": ranks, "load_avg_1min": load, "per_rank": sorted(lines, key=lambda r: r["rank"])}
    if result.returncode != 0 or len(lines) != ranks:
        memory_error = "MemoryError" in result.stderr or "std::bad_alloc" in result.stderr or "Cannot allocate" in result.stderr
        outcome["failed"] = (f"over the {args.limit_bytes / 1e9:.0f} GB address-space limit" if memory_error
                             else f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
    return outcome


def table(results: list[dict]) -> str:
    gb = 1e9
    rows = ["| candidates | ranks | loader | first batch (s) | peak RSS / rank (GB) | RSS | PSS | USS / rank (GB) | load avg |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "failed" in r:
            rows.append(f"| {r['candidates']} | {r['ranks']} | {r['loader']} | {r['failed']} | | | | | {r['load_avg_1min']:.1f} |")
            continue
        per = r["per_rank"]

        def cell(key, scale=gb, fmt="{:.2f}"):
            return " / ".join(fmt.format(p[key] / scale) for p in per)

        rows.append(f"| {r['candidates']} | {r['ranks']} | {r['loader']} | {cell('first_batch_s', 1, '{:.1f}')} | {cell('peak_rss')} | "
                    f"{cell('rss')} | {cell('pss')} | {cell('uss')} | {r['load_avg_1min']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_data")
    parser.add_argument("--candidates", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--queries", type=int, default=NQ_TRAIN_QUERIES)
    parser.add_argument("--words", type=int, default=100, help="words per passage")
    parser.add_argument("--tokenize-workers", type=int, default=2)
    parser.add_argument("--tokenizers", choices=["real", "word"], default="word")
    parser.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    parser.add_argument("--limit-bytes", type=int, default=8_000_000_000, help="address-space limit of every process")
    args = parser.parse_args()
    if WORKER_ENV in os.environ:
        return worker(argparse.Namespace(**json.loads(os.environ[WORKER_ENV])))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.candidates:
        data = out / f"nq_synthetic_{args.queries}x{n}.jsonl"
        write_synthetic(data, args.queries, n, args.words)
        print(f"{data}: {data.stat().st_size / 1e9:.2f} GB", flush=True)
        for ranks in args.ranks:
            cache = out / f"cache_{n}_{ranks}ranks"
            shutil.rmtree(cache, ignore_errors=True)
            for loader in args.loaders:
                results.append(run(args, loader, n, ranks, data, cache))
                print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            (out / f"bench_data_{args.queries}.json").write_text(json.dumps({"cpus": os.cpu_count(), "queries": args.queries, "results": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
