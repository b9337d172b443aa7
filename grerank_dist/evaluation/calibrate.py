"""Pick a decoder-only generator's parallel-context alignment (T, S) on a dev file (issue 30).

    grerank calibrate --config FILE [--data DEV_FILE] [--temperatures 0.5,0.7,1.0] [--scales 0.5,1,2,4]
                      [--top-k K | --all-candidates] [--queries N] [--out DIR] [--write-config OUT.yaml]
                      [key=value ...]

An off-the-shelf LLM reads independently encoded (parallel) documents worse than the same
documents in one sequence; ``generator.doc_key_temperature`` T and
``generator.doc_attention_scale`` S (models/decoder_only.py) narrow the gap. This command
grid-searches them by the generator setting's SubEM, in the config's form of T,
``generator.doc_temperature_form`` (APE's ``group`` by default; the override
``generator.doc_temperature_form=per_key`` calibrates the other): at every (T, S) the generator
answers each query greedily from the parallel context of the chosen documents (all candidates
by default, the case the alignment is for, or the retriever's top k), exactly as ``grerank eval
--setting generator`` does (:class:`grerank_dist.evaluation.evaluate.TopKAnswerer`).

The reference is sequential reading: the same documents' tokens one after the other between the
same prefix (BOS, instruction, chat-template head) and prompt, answered by the plain transformers
model inside the wrapper through its own ``generate`` and scored the same way. Each point's SubEM
is reported with its ratio to that reference. The chosen point has the highest SubEM, ties going
to the point nearest (1, 1), the unaligned model, which is always tried.

Outputs in ``--out``: ``calibration.json`` (the reference, every point, the chosen one),
``calibration.md`` (the table printed on stdout) and ``predictions.jsonl`` (per query: the
sequential answer and each point's answer, in the order of the points); the first two name the
form. ``--write-config`` writes the run's config (overrides applied, paths resolved, every key
written out, the form beside T and S) with the chosen T and S.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from transformers import GenerationConfig

from grerank_dist.atomic import write_text
from grerank_dist.config import TrainConfig, group_form_backend_problem, load_config
from grerank_dist.data.records import read_records
from grerank_dist.evaluation.evaluate import RETRIEVER, decode_answers, make_answerer, method_rankings
from grerank_dist.evaluation.evaluate import single_process_generator
from grerank_dist.method.metrics import substring_exact_match
from grerank_dist.models import RANDOM_PREFIX, generator_family
from grerank_dist.models.decoder_only import FAMILY as DECODER_ONLY
from grerank_dist.models.decoder_only import DecoderOnlyGenerator

DEFAULT_TEMPERATURES = "0.5,0.7,1.0"
DEFAULT_SCALES = "0.5,1,2,4"


@dataclass
class GridPoint:
    """One (T, S) tried: its SubEM and the ratio to the sequential reference (None when that is 0)."""

    doc_key_temperature: float
    doc_attention_scale: float
    subem: float
    ratio_to_sequential: float | None


@dataclass
class Calibration:
    """What :func:`calibrate` wrote, for callers that go on (tests, scripts)."""

    sequential_subem: float
    points: list[GridPoint]
    chosen: GridPoint
    table: str
    doc_temperature_form: str  # the form every point ran in (the config's)


def alignment_grid(temperatures: list[float], scales: list[float]) -> list[tuple[float, float]]:
    """Every (T, S) of the two lists in order, with (1, 1) first if missing: the unaligned
    model is the point an alignment has to beat."""
    points = list(dict.fromkeys((float(t), float(s)) for t in temperatures for s in scales))
    return points if (1.0, 1.0) in points else [(1.0, 1.0), *points]


def choose(points: list[GridPoint]) -> GridPoint:
    """The highest SubEM; among equals the point nearest (1, 1) in log space (the least change
    to the model; T and S act as factors, so 0.5 and 2 are equally far), then the first tried."""
    return max(points, key=lambda p: (p.subem, -math.hypot(math.log(p.doc_key_temperature), math.log(p.doc_attention_scale))))


# --------------------------------------------------------------------------- the sequential reference


def sequential_prompt_ids(
    generator: DecoderOnlyGenerator, tokenizer: Any, config: TrainConfig, record: dict[str, Any], k: int
) -> list[int]:
    """The query as the plain model reads a RAG prompt: the generator's prefix, then the
    retriever's first k documents' tokens one after the other (each tokenised and truncated to
    ``data.doc_max_tokens`` as in parallel mode, so only the encoding differs), then the prompt."""
    fmt = generator.input_format
    docs = [fmt.doc_template.format(title=c["title"], text=c["text"], question=record["question"]) for c in record["ctxs"][:k]]
    doc_ids = tokenizer(docs, add_special_tokens=False, truncation=True, max_length=config.data.doc_max_tokens)["input_ids"]
    prompt = tokenizer(fmt.prompt_template.format(question=record["question"]), add_special_tokens=False)["input_ids"]
    return [*generator.prefix_ids, *(t for ids in doc_ids for t in ids), *prompt]


@torch.no_grad()
def sequential_answers(
    generator: DecoderOnlyGenerator,
    tokenizer: Any,
    config: TrainConfig,
    records: list[dict[str, Any]],
    k: int,
    stop_ids: list[int],
    device: torch.device,
) -> list[str]:
    """Greedy answers of the plain LM (``generator.lm.generate``) from the sequential prompts,
    left-padded into one batch, stopping where the parallel decoder stops."""
    rows = [sequential_prompt_ids(generator, tokenizer, config, record, k) for record in records]
    pad = generator.config.pad_token_id if generator.config.pad_token_id is not None else stop_ids[0]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    greedy = GenerationConfig(
        max_new_tokens=config.generator.max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop_ids, pad_token_id=pad
    )
    tokens = generator.lm.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=greedy
    )
    return decode_answers(tokenizer, tokens[:, width:])


# --------------------------------------------------------------------------- the search


def load_decoder_only(
    config: TrainConfig, records: list[dict[str, Any]], device: torch.device
) -> tuple[DecoderOnlyGenerator, Any]:
    """The configured generator on ``device`` in ``generator.dtype`` (auto: bf16 on GPU, fp32 on
    CPU), one process, no engine. Its checkpoint's generation config is replaced by the global
    defaults: the parallel decoder's greedy loop applies no logits processor (repetition penalty,
    sampling), so the reference must not either."""
    name = config.generator.dtype
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if name == "auto" else getattr(torch, name)
    if config.generator.path.startswith(RANDOM_PREFIX):
        print(f"generator.path {config.generator.path!r}: a random model's answers mean nothing (smoke run)", flush=True)
    generator, tokenizer = single_process_generator(config, records, dtype)
    generator.lm.generation_config = GenerationConfig()
    return generator.to(device), tokenizer


def check_request(
    config: TrainConfig, top_k: int | None, max_queries: int | None, batch_size: int | None,
    temperatures: list[float] = (1.0,),
) -> tuple[int, int]:
    """(k, batch size) of a calibration, or a ValueError that says why it cannot run, before
    any weights are read: only decoder-only generators have T and S, and the group form at
    T != 1 runs on the eager backend only."""
    problem = group_form_backend_problem(config.generator.doc_temperature_form, temperatures,
                                         config.generator.attention_backend)
    if problem:
        raise ValueError(f"generator.attention_backend (at the grid's temperatures): {problem}")
    family = generator_family(config.generator.path)
    if family is not DECODER_ONLY:
        raise ValueError(
            f"generator.path {config.generator.path!r} is a {family.name} generator: generator.doc_key_temperature and "
            f"generator.doc_attention_scale apply to decoder-only generators only (CEPE and FiD read the documents "
            f"through cross-attention, which has no T or S), so there is nothing to calibrate"
        )
    n = config.data.n_candidates
    k = n if top_k is None else top_k
    if not 1 <= k <= n:
        raise ValueError(f"--top-k must be in [1, data.n_candidates={n}], got {k}")
    bsz = batch_size or config.train.micro_batch_size
    if bsz < 1 or (max_queries is not None and max_queries < 1):
        raise ValueError(f"the batch size and --queries must be >= 1, got {bsz} and {max_queries}")
    return k, bsz


def calibrate(
    config: TrainConfig,
    data_file: str,
    out_dir: Path,
    temperatures: list[float],
    scales: list[float],
    top_k: int | None = None,
    max_queries: int | None = None,
    batch_size: int | None = None,
    write_config: Path | None = None,
) -> Calibration:
    """Answer every query of ``data_file`` (its first ``max_queries``) sequentially and at every
    grid point, write the outputs and (``write_config``) the calibrated config. ``top_k`` None:
    all candidates."""
    k, bsz = check_request(config, top_k, max_queries, batch_size, temperatures)
    records, report = read_records(data_file, config.data.n_candidates, config.data.skip_bad_records, config.data.candidate_order)
    records = records[:max_queries]
    print(report.summary(), flush=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    generator, tokenizer = load_decoder_only(config, records, device)
    answerer = make_answerer(generator, tokenizer, config, k, device)
    grid = alignment_grid(temperatures, scales)
    form = config.generator.doc_temperature_form

    started = time.perf_counter()
    sequential: list[str] = []
    parallel: list[list[str]] = [[] for _ in grid]
    for start in tqdm(range(0, len(records), bsz), desc="calibrate"):
        batch_records = records[start : start + bsz]
        rankings = {RETRIEVER: method_rankings(RETRIEVER, batch_records, [])}
        batch, contexts = answerer.encode(batch_records, list(range(start, start + len(batch_records))))
        for answers, (temperature, scale) in zip(parallel, grid):
            generator.set_context_alignment(temperature, scale, form)
            answers += answerer.answer(batch, contexts, rankings)[RETRIEVER]
        sequential += sequential_answers(generator, tokenizer, config, batch_records, k, answerer.stop_ids, device)
    elapsed = time.perf_counter() - started

    def subem(predictions: list[str]) -> float:
        return sum(substring_exact_match(p, r["answers"]) for p, r in zip(predictions, records)) / len(records)

    reference = subem(sequential)
    points = [
        GridPoint(t, s, value, value / reference if reference > 0 else None)
        for (t, s), value in zip(grid, map(subem, parallel))
    ]
    chosen = choose(points)
    documents = "all candidates" if top_k is None else f"the retriever's top {k}"
    table = calibration_table(reference, points, chosen, form)
    summary = {
        "config": config.source,
        "generator": config.generator.path,
        "data": str(data_file),
        "n_queries": len(records),
        "documents": documents,
        "top_k": top_k,
        "max_new_tokens": config.generator.max_new_tokens,
        "doc_temperature_form": form,
        "seconds": elapsed,
        "sequential": {"subem": reference},
        "points": [asdict(p) for p in points],
        "chosen": asdict(chosen),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "calibration.json", json.dumps(summary, indent=2))
    write_text(out_dir / "calibration.md", table)
    write_text(out_dir / "predictions.jsonl", "".join(
        json.dumps({"id": r["id"], "question": r["question"], "answers": r["answers"], "sequential": sequential[i],
                    "parallel": [answers[i] for answers in parallel]}) + "\n"
        for i, r in enumerate(records)
    ))
    print(table, flush=True)
    print(
        f"{len(records)} queries, {documents}, {len(points)} points in {elapsed:.1f}s; chosen T={chosen.doc_key_temperature:g} "
        f"S={chosen.doc_attention_scale:g} ({form} form); wrote {out_dir}", flush=True,
    )
    if write_config is not None:
        write_calibrated_config(config, chosen, write_config, data_file)
        print(f"wrote {write_config}", flush=True)
    return Calibration(reference, points, chosen, table, form)


def calibration_table(reference: float, points: list[GridPoint], chosen: GridPoint, form: str) -> str:
    """A markdown table: the sequential reference, then every point (SubEM in percent); the
    header names T's form."""
    lines = [f"| Context | T ({form} form) | S | SubEM | Ratio to sequential |", "|---|---:|---:|---:|---:|",
             f"| sequential (plain model) | – | – | {100 * reference:.1f} | {'1.00' if reference > 0 else '–'} |"]
    for p in points:
        name = "parallel, chosen" if p is chosen else "parallel"
        ratio = "–" if p.ratio_to_sequential is None else f"{p.ratio_to_sequential:.2f}"
        lines.append(f"| {name} | {p.doc_key_temperature:g} | {p.doc_attention_scale:g} | {100 * p.subem:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def write_calibrated_config(config: TrainConfig, chosen: GridPoint, path: Path, data_file: str) -> None:
    """The run's config as YAML with the chosen T and S: every key written out (the form the
    points ran in too, so a later change of its default does not change the run), file paths
    as they were resolved, so it loads to the same run from any directory."""
    tree = config.to_dict()
    tree.pop("source")
    tree["generator"]["doc_key_temperature"] = chosen.doc_key_temperature
    tree["generator"]["doc_attention_scale"] = chosen.doc_attention_scale
    header = (f"# {config.source or 'the default config'} with the parallel-context alignment chosen by "
              f"`grerank calibrate` on {data_file} ({config.generator.doc_temperature_form} form, "
              f"SubEM {100 * chosen.subem:.1f})\n")
    write_text(path, header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------- command line


def _positive_floats(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers > 0, got {text!r}")
    return values


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "At every (T, S), in the config's generator.doc_temperature_form, the generator answers each dev query "
        "greedily from the parallel context of the chosen documents; the reference is the plain model reading the "
        "same documents in one sequence (same prefix, instruction, chat template and prompt). The table (SubEM, ratio to the reference) is printed and written "
        "to OUT/calibration.md and OUT/calibration.json, the answers to OUT/predictions.jsonl. The chosen point has "
        "the highest SubEM, ties going to the point nearest (1, 1). Decoder-only generators only."
    )
    parser.add_argument("--config", required=True, help="YAML config of the run (a decoder-only generator.path, data templates)")
    parser.add_argument("--data", default=None, help="dev records (default: data.eval_file)")
    parser.add_argument(
        "--temperatures", type=_positive_floats, default=DEFAULT_TEMPERATURES, metavar="T,T,...",
        help=f"generator.doc_key_temperature values T to try, comma-separated (default {DEFAULT_TEMPERATURES})",
    )
    parser.add_argument(
        "--scales", type=_positive_floats, default=DEFAULT_SCALES, metavar="S,S,...",
        help=f"generator.doc_attention_scale values S to try, comma-separated (default {DEFAULT_SCALES}); "
        "every (T, S) pair is tried, and (1, 1) always",
    )
    documents = parser.add_mutually_exclusive_group()
    documents.add_argument("--top-k", type=int, default=None, metavar="K",
                           help="answer from the retriever's first K candidates (and the reference reads those)")
    documents.add_argument("--all-candidates", action="store_true",
                           help="answer from all candidates of each query, in retriever order (the default)")
    parser.add_argument("--queries", type=int, default=None, metavar="N", help="use the first N dev queries (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="queries per batch (default train.micro_batch_size)")
    parser.add_argument("--out", default=None, help="output directory (default OUTPUT/calibrate)")
    parser.add_argument("--write-config", default=None, metavar="OUT.yaml",
                        help="write the config with the chosen generator.doc_key_temperature and doc_attention_scale "
                        "(and the doc_temperature_form they ran in) here")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted key=value")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    data = args.data or config.data.eval_file
    if not data:
        raise SystemExit("no data: pass --data or set data.eval_file in the config")
    out = Path(args.out) if args.out else Path(config.output_dir) / "calibrate"
    try:
        check_request(config, args.top_k, args.queries, args.batch_size, args.temperatures)
    except ValueError as exc:
        raise SystemExit(f"grerank calibrate: {exc}") from exc
    calibrate(config, data, out, args.temperatures, args.scales, args.top_k, args.queries, args.batch_size,
              Path(args.write_config) if args.write_config else None)
    return 0
