"""Why does G-Rerank learn or fail on the decoy records? The signal at the start of training.

    python scripts/diagnose_signal.py --out runs/diagnose [--queries 48] [--samples 4] [key=value ...]

Frozen SmolLM2-135M-Instruct and the untrained MiniLM (new head, the seed's), both from the
`grerank fetch-models` cache, on ``--queries`` queries of ``grerank_dist.demos.decoy_reading``
drawn from the seed's "train" stream (a draw of its own: neither the benchmark's training nor
its test split),
with the SmolLM2 demo's config at 8 candidates. Writes ``diagnosis.json`` and ``diagnosis.md``:

1. the generator's SubEM (greedy, generator setting) with the gold, the first decoy and the
   first overlap passage alone: does it read the gold?
2. the answer log-likelihood with each kind alone, and how often the gold is the most likely;
3. d loss / d score per kind for G-Rerank (soft and straight-through) at each tau and k, the
   no-Gumbel ablation, PDist and EMDR (grerank_dist.evaluation.diagnose).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grerank_dist.config import load_config  # noqa: E402
from grerank_dist.data.collate import Collator  # noqa: E402
from grerank_dist.demos.decoy_reading import DECOY, GOLD, OTHER, OVERLAP, generate_decoy_records  # noqa: E402
from grerank_dist.demos.synthetic import split_seed  # noqa: E402
from grerank_dist.evaluation.diagnose import reading_alone, signal_diagnosis  # noqa: E402
from grerank_dist.evaluation.evaluate import single_process_generator  # noqa: E402
from grerank_dist.models.fetch import fetch_model  # noqa: E402
from grerank_dist.models.reranker import load_reranker  # noqa: E402

TAUS = (0.25, 0.5, 1.0, 2.0)
KS = (1, 2)
KINDS = (GOLD, DECOY, OVERLAP, OTHER)


def markdown(result: dict, settings: list[tuple[str, float, int]]) -> str:
    means = result["means"]

    def cell(name: str, kind: str, scale: float = 1.0, fmt: str = "{:+.3f}") -> str:
        value = means.get(f"{name}|{kind}")
        return "" if value is None else fmt.format(scale * value)

    lines = ["# The training signal at the start, by kind of document", "",
             f"{means['queries']} training queries of the decoy records, untrained MiniLM, frozen SmolLM2-135M-Instruct.", "",
             "## Reading one passage alone", "",
             "| passage | SubEM (greedy) | answer log-lik. (sum) | per token | initial MiniLM score |", "|---|---:|---:|---:|---:|"]
    for kind in KINDS:
        lines.append(f"| {kind} | {result['subem_alone'].get(kind, float('nan')):.1f} | {cell('alone_logp', kind, fmt='{:.2f}')} | "
                     f"{cell('alone_token_logp', kind, fmt='{:.2f}')} | {cell('initial_score', kind)} |")
    lines += ["", f"Gold is the most likely single passage for {100 * means['gold_most_likely_alone']:.1f}% of queries.", "",
              "## d loss / d score at the start (negative: a step raises the kind's score)", "",
              "Mean over queries and documents of each kind; G-Rerank rows average "
              f"{result['samples']} Gumbel samples. Weight: the mask's mean weight on the kind. Mixture: the answer "
              "log-likelihood (sum) under the sampled masks.", "",
              "| objective | tau | k | gold | decoy | overlap | other | weight gold | weight decoy | mixture log-lik. |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, tau, k in settings:
        key = f"{mode}|{tau}|{k}"
        generic = mode in ("pdist", "emdr")
        lines.append(f"| {mode} | {'' if generic else tau} | {'' if generic else k} | "
                     + " | ".join(cell(f"grad|{key}", kind) for kind in KINDS)
                     + f" | {cell(f'weight|{key}', 'gold', fmt='{:.3f}')} | {cell(f'weight|{key}', 'decoy', fmt='{:.3f}')} | "
                     + f"{'' if generic else '{:.2f}'.format(means.get(f'mixture_logp|{key}', float('nan')))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4, help="Gumbel samples per query and setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    models = {name: fetch_model(name, args.cache_dir) for name in ("smollm2", "minilm")}
    config = load_config(ROOT / "configs" / "demo_smollm2.yaml",
                         [f"generator.path={models['smollm2']}", f"reranker.path={models['minilm']}", "data.n_candidates=8",
                          f"seed={args.seed}", *args.overrides])
    records = generate_decoy_records(args.queries, split_seed(args.seed, "train"))
    torch.manual_seed(args.seed)
    reranker, reranker_tokenizer = load_reranker(models["minilm"])
    reranker.eval()
    generator, tokenizer = single_process_generator(config, records)
    collator = Collator(config.data, tokenizer, reranker_tokenizer, config.reranker.max_length,
                        input_format=generator.input_format)
    settings = [(mode, tau, k) for mode in ("soft", "straight_through") for k in KS for tau in TAUS]
    settings += [("no_gumbel", 0.5, 1), ("pdist", 0.5, 1), ("emdr", 0.5, 1)]
    means = signal_diagnosis(generator, collator, reranker, reranker_tokenizer, config, records, settings,
                             args.samples, args.batch_size)
    subem = reading_alone(generator, tokenizer, config, records, 16)
    result = {"means": means, "subem_alone": subem, "samples": args.samples, "seconds": time.perf_counter() - started,
              "config": {"relax": vars(config.relax), "n_candidates": config.data.n_candidates}}
    (args.out / "diagnosis.json").write_text(json.dumps(result, indent=2))
    report = markdown(result, settings)
    (args.out / "diagnosis.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
