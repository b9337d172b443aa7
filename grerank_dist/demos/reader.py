"""Train a tiny reader (the generator G-Rerank later freezes), CEPE or FiD, and measure whether
it really reads both hops.

    grerank train-reader --train-file data/train.jsonl --out runs/reader [--eval-file data/dev.jsonl] [--generator fid]

G-Rerank can only credit a document the reader *uses*; a reader that copies a city from any
birth document gives the bridge document no signal. So the recipe here is built against that
shortcut (DESIGN section 8):

* a curriculum: the first ``gold_only_fraction`` of the steps show only the gold documents, so
  the reader learns to combine the two before it must find them; every later step shows either
  all candidates or a sampled subset (the gold documents plus a few negatives, chosen preferably
  among lookalikes that share words with the gold documents), so the reader meets the evidence at
  the sizes a top-k mask gives it and also among every distractor. Without the first phase the
  tiny reader never learned to use the second gold document (docs/RESULTS.md);
* the encoder's and the output embeddings start as copies of the decoder's (same vocabulary):
  matching a question word to a document word and copying a document word to the output are then
  generic circuits at initialisation instead of one association per entity to learn;
* :func:`reader_report` measures SubEM with both gold documents, each alone, all candidates and
  none, per question type, through ``generate`` with hard 0/-inf masks over all candidates.

Plain torch, one process, AdamW. The model is the project's CEPE class (``generator="cepe"``)
or its FiD class (``"fid"``, a T5 Fusion-in-Decoder whose input format, the question in every
document, an empty prompt and the answer + EOS, comes from the FiD family); both train and are
scored through the generator interface (``encode_contexts``, ``answer_logprobs``, ``generate``),
and the saved directory loads through :func:`grerank_dist.models.load_generator` like any
released checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grerank_dist.config import DataConfig, load_config
from grerank_dist.data.collate import Collator
from grerank_dist.data.records import read_records
from grerank_dist.interface import InputFormat
from grerank_dist.method.metrics import substring_exact_match
from grerank_dist.models import load_generator
from grerank_dist.models.cepe import CepeForCausalContextLM, tiny_cepe_config
from grerank_dist.models.fid import FID_FORMAT, FidForConditionalGeneration, tiny_fid_config
from grerank_dist.demos.synthetic import synthetic_vocabulary
from grerank_dist.models.tokenization import build_word_tokenizer, split_words

READER_TRAINING_FILE = "reader_training.json"
READER_GENERATORS = ("cepe", "fid")
# The demo's training config per reader family: FiD's documents also hold the question, so they
# need more tokens (the longest synthetic one is 43 words).
DEMO_CONFIGS = {name: Path(__file__).resolve().parents[2] / "configs" / f"demo{suffix}.yaml"
                for name, suffix in (("cepe", ""), ("fid", "_fid"))}
REPORT_CONDITIONS = ("both_gold", "answer_doc", "bridge_doc", "all_candidates", "no_documents")


@dataclass
class ReaderConfig:
    """Sizes and training recipe of the reader. Defaults: the CPU demo (about 4.5 minutes on 2 cores).

    The encoder is as wide as the decoder so its embeddings can start as a copy of the decoder's.
    The first ``gold_only_fraction`` of the steps show only the gold documents; of the later
    steps, ``all_candidates_fraction`` show every candidate and the others the gold documents
    plus 0..``subset_max_negatives`` negatives. The gold-only phase is 2,800 steps because the
    hop can appear late: on the demo's seed 2 the loss left the coin-flip plateau only around
    step 2,300, after the earlier 2,100-step phase had ended.

    ``generator``: "cepe" (encoder_layers of bidirectional encoder, decoder_layers of decoder
    with cross-attention in every layer) or "fid" (T5 with encoder_layers + decoder_layers and
    tied embeddings, so ``align_embeddings`` has nothing left to copy).
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    encoder_layers: int = 1
    decoder_layers: int = 2
    attention_heads: int = 4
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gold_only_fraction: float = 0.7
    all_candidates_fraction: float = 0.25
    subset_max_negatives: int = 3
    align_embeddings: bool = True
    seed: int = 0
    generator: str = "cepe"

    def __post_init__(self) -> None:
        if self.generator not in READER_GENERATORS:
            raise ValueError(f"ReaderConfig.generator must be one of {', '.join(READER_GENERATORS)}, got {self.generator!r}")
        for name in ("hidden_size", "intermediate_size", "encoder_layers", "decoder_layers", "attention_heads", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.attention_heads:
            raise ValueError(
                f"ReaderConfig.hidden_size={self.hidden_size} must be a multiple of attention_heads={self.attention_heads}"
            )
        for name in ("gold_only_fraction", "all_candidates_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ReaderConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.steps < 0 or self.subset_max_negatives < 0 or self.warmup_steps < 0:
            raise ValueError("ReaderConfig.steps, subset_max_negatives and warmup_steps must be >= 0")


def reader_data(data: DataConfig, generator: str) -> DataConfig:
    """The data settings a reader of ``generator``'s family trains and is read with: FiD's input
    format comes from its family (:data:`grerank_dist.models.fid.FID_FORMAT`); CEPE reads the
    config's templates. ``doc_max_tokens`` and the rest stay the config's."""
    if generator not in READER_GENERATORS:
        raise ValueError(f"reader generator must be one of {', '.join(READER_GENERATORS)}, got {generator!r}")
    if generator == "fid":
        return dataclasses.replace(data, doc_template=FID_FORMAT.doc_template,
                                   prompt_template=FID_FORMAT.prompt_template, answer_eos=FID_FORMAT.answer_eos)
    return data


def reader_input_format(model: torch.nn.Module, data: DataConfig) -> InputFormat:
    """How the Collator lays out a record for ``model``: the data's templates; BOS before the
    prompt for CEPE, none for an encoder-decoder (its decoder starts from its start token)."""
    return InputFormat(data.doc_template, data.prompt_template, prompt_bos=not model.config.is_encoder_decoder)


def build_reader_tokenizer(records: list[dict[str, Any]], data: DataConfig, generator: str = "cepe") -> Any:
    """A word-level tokenizer (decoder-style for CEPE, T5-style for FiD) over the records, the
    templates and the synthetic vocabulary (so that every split of the synthetic benchmark
    tokenises without unknown words)."""
    texts = [data.prompt_template, data.doc_template]
    texts += synthetic_vocabulary()
    for record in records:
        texts.append(record["question"])
        texts += record["answers"]
        texts += [f"{ctx['title']} {ctx['text']}" for ctx in record["ctxs"]]
    return build_word_tokenizer(texts, "seq2seq" if generator == "fid" else "decoder")


def build_reader(tokenizer: Any, config: ReaderConfig) -> CepeForCausalContextLM | FidForConditionalGeneration:
    """A random-init reader sized by ``config``: CEPE (bidirectional encoder + cross-attending
    decoder) or FiD (T5)."""
    torch.manual_seed(config.seed)
    heads = config.attention_heads
    if config.generator == "fid":
        return FidForConditionalGeneration(tiny_fid_config(
            vocab_size=len(tokenizer), d_model=config.hidden_size, d_kv=config.hidden_size // heads,
            d_ff=config.intermediate_size, num_layers=config.encoder_layers, num_decoder_layers=config.decoder_layers,
            num_heads=heads, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        ))
    model_config = tiny_cepe_config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.decoder_layers,
        num_cross_attn_layers=config.decoder_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        encoder_config={
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.encoder_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    model = CepeForCausalContextLM(model_config)
    if config.align_embeddings:
        with torch.no_grad():
            decoder_embeddings = model.model.embed_tokens.weight
            model.encoder.embed_tokens.weight[: decoder_embeddings.shape[0]].copy_(decoder_embeddings)
            model.lm_head.weight.copy_(decoder_embeddings)
    return model


def _gold_positions(record: dict[str, Any]) -> list[int]:
    return [i for i, ctx in enumerate(record["ctxs"]) if ctx.get("is_supporting") or ctx.get("has_answer")]


def _lookalike_weights(record: dict[str, Any], gold: list[int]) -> dict[int, float]:
    """Sampling weight of each negative: 1 + 2 x the number of *distinctive* words (in at most a
    quarter of the candidates, such as names and titles) it shares with the gold documents, so
    that lookalikes are drawn more often than documents that only share template words."""
    words = [set(split_words(ctx["text"])) for ctx in record["ctxs"]]
    frequency = Counter(word for doc_words in words for word in doc_words)
    limit = max(2, len(words) // 4)
    gold_words = {w for i in gold for w in words[i] if frequency[w] <= limit}
    return {i: 1.0 + 2.0 * len(gold_words & doc_words) for i, doc_words in enumerate(words) if i not in gold}


def sample_view(record: dict[str, Any], rng: random.Random, max_negatives: int) -> dict[str, Any]:
    """The record with its candidates cut to the gold documents plus 0..max_negatives negatives
    (lookalikes preferred), in random order."""
    gold = _gold_positions(record)
    weights = _lookalike_weights(record, gold)
    chosen = list(gold)
    for _ in range(min(rng.randint(0, max_negatives), len(weights))):
        pick = rng.choices(list(weights), weights=list(weights.values()))[0]
        chosen.append(pick)
        del weights[pick]
    rng.shuffle(chosen)
    return {**record, "ctxs": [record["ctxs"][i] for i in chosen]}


def _log_mask(keep: torch.Tensor) -> torch.Tensor:
    """Hard mask: 0 on kept candidates, -inf on the others (the generator's exact document removal)."""
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))


def _learning_rate_factor(step: int, config: ReaderConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit_reader(
    records: list[dict[str, Any]],
    tokenizer: Any,
    config: ReaderConfig,
    steps: int | None = None,
    data: DataConfig | None = None,
    log_every: int = 100,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a reader on ``records`` (``steps`` overrides ``config.steps``); returns the frozen
    model and a summary (recipe, data templates, loss curve, wall time)."""
    data = data or DataConfig()
    total_steps = config.steps if steps is None else steps
    if not records:
        raise ValueError("fit_reader needs at least one training record")
    n_all = max(len(r["ctxs"]) for r in records)
    n_gold = max(len(_gold_positions(r)) for r in records)
    model = build_reader(tokenizer, config)
    input_format = reader_input_format(model, data)
    collators = {
        size: Collator(dataclasses.replace(data, n_candidates=size), tokenizer, None, 0, seed=config.seed,
                       input_format=input_format)
        for size in (n_all, n_gold, n_gold + config.subset_max_negatives)
    }
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _learning_rate_factor(s, config, total_steps))
    rng = random.Random(config.seed)
    losses: list[tuple[int, float]] = []
    running = None
    started = time.perf_counter()
    for step in range(total_steps):
        ids = [rng.randrange(len(records)) for _ in range(config.batch_size)]
        gold_only = step < config.gold_only_fraction * total_steps
        if not gold_only and rng.random() < config.all_candidates_fraction:
            batch = collators[n_all]([records[i] for i in ids], ids)
        else:
            max_negatives = 0 if gold_only else config.subset_max_negatives
            views = [sample_view(records[i], rng, max_negatives) for i in ids]
            batch = collators[n_gold + max_negatives](views, ids)
        # the generator interface, as G-Rerank uses it; gradients reach every parameter here
        contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        loss = model.answer_logprobs(
            contexts, batch.input_ids, batch.attention_mask, batch.labels, _log_mask(batch.valid)
        ).token_mean_nll()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == total_steps:
            losses.append((step + 1, round(running, 4)))
            print(f"reader step {step + 1}/{total_steps} loss {running:.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
    model.requires_grad_(False)
    model.eval()
    summary = {
        "reader": dataclasses.asdict(config) | {"steps": total_steps},
        "data": {key: getattr(data, key) for key in ("doc_template", "prompt_template", "doc_max_tokens", "answer_eos")},
        "training_records": len(records),
        "loss_curve": losses,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return model, summary


def train_reader(
    records: list[dict[str, Any]],
    tokenizer: Any,
    config: ReaderConfig,
    out_dir: str | Path,
    steps: int | None = None,
    data: DataConfig | None = None,
    log_every: int = 100,
) -> Path:
    """:func:`fit_reader`, then save the frozen reader with its tokenizer and
    ``reader_training.json`` in ``out_dir``; returns ``out_dir``.

    ``data`` supplies the document and prompt templates and ``doc_max_tokens``: use the same ones
    when the reader later serves as G-Rerank's generator.
    """
    model, summary = fit_reader(records, tokenizer, config, steps, data, log_every)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / READER_TRAINING_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return out


def _condition_masks(record: dict[str, Any], n: int) -> torch.Tensor:
    """[4, n] hard log-masks for both gold, answer document, bridge document, all candidates.

    The answer document is the supporting one that contains the answer; the bridge document the
    supporting one that does not (the indirectly relevant document of the paper's App. E)."""
    ctxs = record["ctxs"][:n]
    supporting = [bool(c.get("is_supporting")) for c in ctxs]
    answer = [s and bool(c.get("has_answer")) for s, c in zip(supporting, ctxs)]
    bridge = [s and not a for s, a in zip(supporting, answer)]
    real = [True] * len(ctxs)
    rows = [supporting, answer, bridge, real]
    keep = torch.zeros(len(rows), n, dtype=torch.bool)
    for j, row in enumerate(rows):
        keep[j, : len(row)] = torch.tensor(row, dtype=torch.bool)
    return _log_mask(keep)


def _decode(tokenizer: Any, token_ids: torch.Tensor) -> str:
    return tokenizer.decode(token_ids.tolist(), skip_special_tokens=True).strip()


@torch.no_grad()
def reader_report(
    model: torch.nn.Module,
    tokenizer: Any,
    records: list[dict[str, Any]],
    data: DataConfig | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 4,
) -> dict[str, Any]:
    """SubEM of greedy answers under five conditions, per question type and over all queries.

    Every candidate is encoded; the conditions are hard masks over them (0 keeps a document,
    -inf removes it exactly): both gold documents, the answer document alone, the bridge
    document alone, all candidates; and no documents at all: the decoder alone when its prompt
    holds the question (CEPE), else one empty passage, i.e. the question alone, since FiD's
    question reaches the model only through its documents. A condition that selects nothing
    for a record (e.g. no bridge document) is not scored for that record.
    Returns ``{type: {condition: subem, ..., "queries": count}}`` with the type "all".
    """
    data = data or DataConfig()
    n = max(len(r["ctxs"]) for r in records)
    input_format = reader_input_format(model, data)
    collate = Collator(dataclasses.replace(data, n_candidates=n), tokenizer, None, 0, input_format=input_format)
    question_in_prompt = "{question}" in data.prompt_template
    collate_question = Collator(dataclasses.replace(data, n_candidates=1), tokenizer, None, 0, input_format=input_format)
    model.eval()
    scores: dict[str, dict[str, list[float]]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = collate(chunk, list(range(start, start + len(chunk))))
        contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        masks = torch.stack([_condition_masks(r, n) for r in chunk])  # [B, 4, n]
        selects_something = torch.isfinite(masks).any(-1)  # [B, 4]
        # a fully masked row has no key to attend to; give it one harmless key, never scored
        masks[..., 0] = torch.where(selects_something, masks[..., 0], torch.zeros(()))
        with_docs = model.generate(
            contexts, batch.prompt_ids, batch.prompt_attention_mask, masks, max_new_tokens
        )  # [B, 4, T]
        if question_in_prompt:
            without_docs = model.generate(None, batch.prompt_ids, batch.prompt_attention_mask, None, max_new_tokens)
        else:
            alone = collate_question([{**r, "ctxs": [{"title": "", "text": ""}]} for r in chunk], list(range(len(chunk))))
            question_only = model.encode_contexts(alone.encoder_input_ids, alone.encoder_attention_mask)
            without_docs = model.generate(question_only, alone.prompt_ids, alone.prompt_attention_mask, None, max_new_tokens)
        for b, record in enumerate(chunk):
            predictions = [_decode(tokenizer, with_docs[b, j]) for j in range(4)]
            predictions.append(_decode(tokenizer, without_docs[b]))
            scored = selects_something[b].tolist() + [True]
            for key in (record.get("type") or "untyped", "all"):
                table = scores.setdefault(key, {name: [] for name in REPORT_CONDITIONS})
                for name, prediction, ok in zip(REPORT_CONDITIONS, predictions, scored):
                    if ok:
                        table[name].append(substring_exact_match(prediction, record["answers"]))
    report: dict[str, Any] = {}
    for key, table in scores.items():
        report[key] = {name: round(sum(v) / len(v), 4) if v else None for name, v in table.items()}
        report[key]["queries"] = len(table["no_documents"])
    return report


def load_reader(path: str | Path, data: DataConfig | None = None) -> tuple[torch.nn.Module, Any]:
    """A saved reader (CEPE or FiD, told apart by its config.json) and its tokenizer, frozen,
    through the generator families' loader (local directory only, no remote code)."""
    return load_generator(str(path), data=data)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-file", required=True, help="JSON-lines training records (e.g. the synthetic train split)")
    parser.add_argument("--out", required=True, help="directory for the reader checkpoint and its tokenizer")
    parser.add_argument("--eval-file", help="records to report SubEM on (five conditions, per type)")
    parser.add_argument("--eval-limit", type=int, default=400, help="report on at most this many records")
    parser.add_argument(
        "--config",
        help="training YAML whose data section (templates, doc_max_tokens) the reader must match "
        "(default: the demo's, configs/demo.yaml for CEPE, configs/demo_fid.yaml for FiD); a FiD "
        "reader takes its templates from the FiD family",
    )
    for field in dataclasses.fields(ReaderConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "generator":
            parser.add_argument(flag, choices=READER_GENERATORS, default=field.default,
                                help=f"reader family (default {field.default})")
        elif field.type in ("bool", bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=field.default,
                                help=f"(default {field.default})")
        else:
            kind = float if field.type in ("float", float) else int
            parser.add_argument(flag, type=kind, default=field.default, help=f"(default {field.default})")


def run(args: argparse.Namespace) -> int:
    reader_config = ReaderConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ReaderConfig)})
    data = reader_data(load_config(args.config or DEMO_CONFIGS[reader_config.generator]).data, reader_config.generator)
    records, read_report = read_records(args.train_file, n_candidates=data.n_candidates, candidate_order=data.candidate_order)
    print(read_report.summary(), flush=True)
    tokenizer = build_reader_tokenizer(records, data, reader_config.generator)
    out = train_reader(records, tokenizer, reader_config, args.out, data=data)
    print(f"reader saved to {out}", flush=True)
    if args.eval_file:
        eval_records, _ = read_records(args.eval_file, data.n_candidates, candidate_order=data.candidate_order)
        model, tokenizer = load_reader(out, data)
        report = reader_report(model, tokenizer, eval_records[: args.eval_limit], data)
        (out / "reader_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2), flush=True)
    return 0
