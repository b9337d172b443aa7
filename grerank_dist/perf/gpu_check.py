"""Every GPU figure in one run: attention backends, training steps at real shapes, memory against
the analytic model, generation throughput.

    bash scripts/gpu_check.sh                    # OUT=DIR (default ./gpu_check_out)
    python -m grerank_dist.perf.gpu_check --out DIR [--tiny] [--sections a,b] [--budget-s 480]

A GPU is lent to a session for minutes, once, with nothing to download: what it should measure
must be ready beforehand and come back from one call. On CUDA the models have the real shapes
(random weights) in bf16; without CUDA, or with ``--tiny``, the same code runs at tiny shapes
(fp32 on a CPU), so that a CPU run shows every failure that is not the device's own.

Sections, in order (each records its figures, or why it has none):

- ``device``: names and versions, the bf16 peak that MFU divides by (a datasheet table,
  :data:`grerank_dist.perf.cost_model.DENSE_BF16_PEAK_FLOPS`) and a measured GEMM probe;
- ``backends``: every attention backend of :mod:`grerank_dist.method.attention` against eager in
  the run's dtype (answer loss and log-mask gradient) for CEPE's and FiD's cross-attention and
  the decoder-only prompt/answer pass (which adds a causal query mask), and each generator's
  eager path against a copy of itself in fp32 (fp64 on a CPU), at head dimension 128 (FiD 64)
  on CUDA;
- ``cepe_step`` / ``decoder_only_step``: the trainer's :func:`training_step` in its DeepSpeed
  engines (:func:`grerank_dist.perf.shapes.build_engines`) for a CEPE-LLaMA-2-7B and a
  Llama-3.1-8B generator with a BGE-reranker-base-sized reranker, B=4 queries of n=20
  documents of 256 tokens: activation checkpointing on, off, and ``grerank bench``'s naive step;
  step time, tokens/s, MFU and peak memory against :func:`step_memory_rows`'s prediction;
- ``generation``: greedy decoding throughput of both generators at the same batch.

A setting that does not fit the device runs with half the decoder layers, again, until it fits
(:func:`fit_layers`; the report says so). The JSON and the markdown are rewritten after every
section and variant; a section that outlives its time limit ends the process (a hung kernel
cannot be interrupted otherwise) after recording that, and so does an error that poisons the
CUDA context; ``scripts/gpu_check.sh`` then starts the module again, which resumes after that
section. Sections that the global budget cannot fit are skipped with the reason.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import math
import os
import statistics
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LlamaConfig

from grerank_dist.atomic import write_text
from grerank_dist.config import DataConfig
from grerank_dist.data.collate import Collator
from grerank_dist.interface import Batch
from grerank_dist.method.attention import BACKENDS, auto_backend, available_backends, backend_unavailable_reason
from grerank_dist.method.relax import noise_generator
from grerank_dist.models.cepe import cepe_7b_config, tiny_cepe_config
from grerank_dist.models.decoder_only import tiny_config
from grerank_dist.models.fid import tiny_fid_config
from grerank_dist.perf.bench import gemm_peak, synchronize
from grerank_dist.perf.cost_model import GB, LLAMA_8B, batch_lengths, dense_bf16_peak, step_flops, step_memory_rows
from grerank_dist.perf.shapes import (
    DS_CONFIGS, Shape, bench_config, build_engines, build_generator_model, close_engines, step_batches, synthetic_records,
)
from grerank_dist.training.train import training_step

JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"
DEFAULT_BUDGET_S = 480


# ---------------------------------------------------------------------------------------- mode


@dataclass(frozen=True)
class Mode:
    """Where and at which sizes this run checks: real shapes in bf16 on CUDA, or tiny shapes
    (in fp32 on a CPU, where bf16 kernels are slow emulations)."""

    tiny: bool
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def reference_dtype(self) -> torch.dtype:
        """The backends' reference copy: one precision up."""
        return torch.float32 if self.dtype == torch.bfloat16 else torch.float64

    @property
    def label(self) -> str:
        return f"{'tiny' if self.tiny else 'real'} shapes, {str(self.dtype).removeprefix('torch.')} on {self.device.type}"


def _gib(nbytes: float) -> float:
    return round(nbytes / GB, 3)


def _allocated(mode: Mode) -> float | None:
    return _gib(torch.cuda.memory_allocated(mode.device)) if mode.device.type == "cuda" else None


def _free_memory(mode: Mode) -> None:
    gc.collect()
    if mode.device.type == "cuda":
        torch.cuda.empty_cache()


@cache
def peak_flops(mode: Mode) -> dict[str, Any]:
    """The FLOP/s that MFU divides by, where it comes from, and a GEMM probe measured here."""
    on_gpu = mode.device.type == "cuda"
    probe = gemm_peak(mode.dtype, 8192 if on_gpu else 512, repeats=10 if on_gpu else 4, device=mode.device)
    if on_gpu:
        name = torch.cuda.get_device_name(mode.device)
        table = dense_bf16_peak(name)
        if table is not None:
            return {"flops": table, "gemm_probe_flops": probe,
                    "source": f"datasheet dense bf16 peak of '{name}' (cost_model.DENSE_BF16_PEAK_FLOPS)"}
        return {"flops": probe, "gemm_probe_flops": probe,
                "source": f"'{name}' is not in the datasheet table: the measured 8192^3 bf16 GEMM probe"}
    return {"flops": probe, "gemm_probe_flops": probe,
            "source": "measured 512^3 fp32 F.linear probe on this CPU's threads (as grerank bench)"}


# ---------------------------------------------------------------------------------------- shapes

# BGE-reranker-base (XLM-R base) sizes: 768 wide, 12 layers of 12 heads, 250002-token vocabulary.
_BGE_BASE = {"reranker_hidden": 768, "reranker_layers": 12, "reranker_heads": 12, "reranker_vocab": 250002}
_REAL_BATCH = {"batch": 4, "n_candidates": 20, "doc_words": (256, 256), "doc_max_tokens": 256, "question_words": 10,
               "answer_words": 4}
# Tiny: a vocabulary larger than the tokenizer's and explicit heads, so that the overrides run too.
_TINY_RERANKER = {"reranker_hidden": 64, "reranker_layers": 2, "reranker_heads": 2, "reranker_vocab": 1000}
_TINY_BATCH = {"batch": 2, "n_candidates": 4, "doc_words": (4, 12), "doc_max_tokens": 16, "question_words": 5,
               "answer_words": 2, "vocab_words": 200}


def _cepe_7b(layers: int) -> Shape:
    """CEPE-LLaMA-2-7B with ``layers`` of its 32 decoder layers (cross-attention in each) and the
    same share of its 24 encoder layers."""
    return Shape(lambda v: cepe_7b_config(num_hidden_layers=layers, num_cross_attn_layers=layers,
                                          encoder_config={"num_hidden_layers": max(1, 24 * layers // 32)}),
                 **_BGE_BASE, **_REAL_BATCH)


def _llama_8b(layers: int) -> Shape:
    return Shape(lambda v: LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": layers}), **_BGE_BASE, **_REAL_BATCH)


def _tiny_cepe(layers: int) -> Shape:
    return Shape(lambda v: tiny_cepe_config(vocab_size=v, num_hidden_layers=layers, num_cross_attn_layers=layers),
                 **_TINY_RERANKER, **_TINY_BATCH)


def _tiny_llama(layers: int) -> Shape:
    return Shape(lambda v: tiny_config("llama", v, num_hidden_layers=layers), **_TINY_RERANKER, **_TINY_BATCH)


@dataclass(frozen=True)
class Generator:
    """A generator setting of the step and generation sections, at any number of decoder layers."""

    name: str
    full_layers: int
    shape: Callable[[int], Shape]


# section -> (tiny setting, real setting)
GENERATORS: dict[str, tuple[Generator, Generator]] = {
    "cepe_step": (Generator("tiny CEPE", 2, _tiny_cepe), Generator("CEPE-LLaMA-2-7B", 32, _cepe_7b)),
    "decoder_only_step": (Generator("tiny Llama", 2, _tiny_llama),
                          Generator("Llama-3.1-8B (parallel context)", 32, _llama_8b)),
}


def _generator(section: str, mode: Mode) -> Generator:
    return GENERATORS[section][0 if mode.tiny else 1]


# Backend comparisons: tiny models on a CPU; on CUDA the real head dimensions (Llama 128, T5 64),
# which decide the fused kernels' paths and the folded channel's padding. No reranker runs here.
_NO_RERANKER = {"reranker_hidden": 64, "reranker_layers": 1}
# The documents' window holds the whole template (FiD's repeats the question first), so that
# documents differ and the mask matters.
_CMP_TINY = {"batch": 2, "n_candidates": 4, "doc_words": (3, 8), "doc_max_tokens": 16, "question_words": 3,
             "answer_words": 3, "vocab_words": 60, **_NO_RERANKER}
_CMP_REAL = {"batch": 2, "n_candidates": 8, "doc_words": (16, 64), "doc_max_tokens": 80, "question_words": 8,
             "answer_words": 4, "vocab_words": 500, **_NO_RERANKER}
_FID_IDS = {"pad_token_id": 3, "eos_token_id": 2, "decoder_start_token_id": 3}  # the word-level decoder tokenizer's
_ENCODER_128 = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 2,
                "max_position_embeddings": 512}
# family -> (tiny shape, real-head-dimension shape)
COMPARISON_SHAPES: dict[str, tuple[Shape, Shape]] = {
    "CEPE": (Shape(lambda v: tiny_cepe_config(vocab_size=v), **_CMP_TINY),
             Shape(lambda v: tiny_cepe_config(vocab_size=v, hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                                              num_key_value_heads=2, max_position_embeddings=512,
                                              encoder_config=_ENCODER_128), **_CMP_REAL)),
    "FiD": (Shape(lambda v: tiny_fid_config(vocab_size=v, **_FID_IDS), **_CMP_TINY),
            Shape(lambda v: tiny_fid_config(vocab_size=v, d_model=512, d_kv=64, d_ff=1024, num_heads=8, **_FID_IDS),
                  **_CMP_REAL)),
    "decoder-only": (Shape(lambda v: tiny_config("llama", v), **_CMP_TINY),
                     Shape(lambda v: tiny_config("llama", v, hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                                                 num_key_value_heads=2, head_dim=128), **_CMP_REAL)),
}


@dataclass(frozen=True)
class Tolerance:
    """|loss - ref| <= loss_atol (nats), and the log-mask gradient's largest error relative to
    the reference's largest element, max|g - g_ref| / max|g_ref| <= grad_rel: scale-free, so it
    stays strict whatever the gradients' magnitude (a bias that is ignored or of the wrong sign
    gives 1 or more)."""

    loss_atol: float
    grad_rel: float


# checked dtype -> (a backend against eager in that dtype, eager against the reference copy).
# bf16 backends: the SDPA/flash paths round the bias and the probabilities to bf16 where eager
# keeps an fp32 softmax (bf16 on a CPU at these shapes: <= 0.008 nats, <= 3% of the gradient; 5%
# for the tiny FiD). bf16 against fp32 rounds every matmul, and T5's unscaled attention logits
# amplify it (FiD, bf16 on a CPU: 0.01 nats, up to 30% of the gradient): a bound for gross errors.
TOLERANCES: dict[torch.dtype, tuple[Tolerance, Tolerance]] = {
    torch.bfloat16: (Tolerance(loss_atol=3e-2, grad_rel=0.1), Tolerance(loss_atol=5e-2, grad_rel=0.5)),
    torch.float32: (Tolerance(loss_atol=1e-5, grad_rel=1e-4), Tolerance(loss_atol=1e-4, grad_rel=1e-4)),
}


# ---------------------------------------------------------------------------------------- report


@dataclass
class SectionRun:
    """What a section function gets: the mode, its figures (filled in place) and the clock."""

    mode: Mode
    figures: dict[str, Any]
    deadline: float
    save: Callable[[], None]
    steps: int
    warmup: int

    def left(self) -> float:
        return self.deadline - time.time()


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    run: Callable[[SectionRun], None]
    need_s: float  # least budget left to start it on a GPU (tiny runs: a few seconds)
    limit_s: float  # after this long it is taken for hung: the process records that and ends


ASSUMPTIONS = (
    "Random weights at the real shapes: CEPE-LLaMA-2-7B (cepe_7b_config), Llama-3.1-8B (cost_model.LLAMA_8B) in "
    "bf16; the reranker a BERT cross-encoder of BGE-reranker-base / XLM-R base size (768 x 12 layers, 12 heads, "
    "250002-token vocabulary) in fp32 (the trainer's default), trained by torch AdamW in a ZeRO-1 engine.",
    "One GPU: the generator engine is replicated (ds_configs/generator_replicated.json, ZeRO stage 0), as on one "
    "device it would be; synthetic records of B=4 queries, n=20 documents of 256 tokens, 10-word questions, "
    "4-word answers, word-level tokenizers.",
    "Step time: median of the timed steps after warm-up, device synchronised around each step; data is "
    "tokenised and moved to the device ahead of the step. naive = grerank bench's naive variant: eager "
    "cross-attention, checkpointing, documents at doc_max_tokens, one query per micro-step (B micro-steps, one update).",
    "Checkpointing on/off switches the generator's and the reranker's activation checkpointing together.",
    "tokens/s: the real (unpadded) tokens a step reads (reranker pairs + documents + decoder rows) per second.",
    "MFU: model FLOPs of the real tokens (cost_model.FLOP_FORMULA, matmuls only, no recompute) per second over the "
    "device section's peak; the fp32 reranker runs at fp32 speed (TF32 off, torch's default), which MFU against "
    "the bf16 peak does not separate.",
    "Memory: torch.cuda.max_memory_allocated over the warm-up and timed steps (live tensors only: no CUDA "
    "context, NCCL buffers or allocator cache; max_memory_reserved is reported beside it) against "
    "cost_model.step_memory_rows (scripts/estimate_memory.py's model) at world size 1, generator stage 0, the "
    "step's micro-batch, padded widths and checkpointing. The model leaves out DeepSpeed's ZeRO-1 reduce "
    "bucket (reduce_bucket_size 5e7 fp32 = 0.19 GiB) and the transient buffers of a layer's backward.",
    "A setting that does not fit runs with half its decoder layers (CEPE: and encoder layers in proportion) "
    "until it fits; figures are for the layers that ran, never scaled up.",
    "Generation: greedy, with the KV cache, every document at mask weight 1 (no mask), the step's B queries; "
    "the first decode step's time includes the prompt's prefill.",
    "Backend comparisons: small models (2 layers; on CUDA 512 wide with head dimension 128, FiD 64) with weights "
    "re-drawn so that attention and the next-token distribution are far from flat (embeddings N(0, 1), matrices "
    "N(0, 1/fan_in)); a log-mask of random weights in [0.05, 1] with one document removed (-inf); loss = mean "
    "answer NLL, its log-mask gradient through loss.backward() as the trainer does; gradient error = "
    "max|g - g_ref| / max|g_ref|.",
)


class Report:
    """The run's JSON, rewritten with its markdown after every section and variant, so a crash or
    a kill loses only the part in progress. A run id shared by the restarts of one script call
    lets a restart resume it; another id starts afresh."""

    def __init__(self, out: Path, run_id: str, mode: Mode, budget_s: float) -> None:
        self.json_path, self.md_path = out / JSON_NAME, out / MARKDOWN_NAME
        self.lock = threading.Lock()
        previous = json.loads(self.json_path.read_text()) if self.json_path.is_file() else {}
        if run_id and previous.get("run_id") == run_id:
            self.data = previous
            self.data["attempts"] += 1
        else:
            self.data = {"run_id": run_id, "mode": mode.label, "tiny": mode.tiny, "device_type": mode.device.type,
                         "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": budget_s,
                         "attempts": 1, "assumptions": list(ASSUMPTIONS), "sections": {}}

    def save(self) -> None:
        with self.lock:
            self.data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_text(self.json_path, json.dumps(self.data, indent=2, default=str))
            write_text(self.md_path, render_markdown(self.data))


def _error_text(exc: BaseException) -> str:
    """The exception and the innermost frames of its traceback, short enough for a report."""
    frames = traceback.format_exception(exc)
    return f"{type(exc).__name__}: {str(exc).strip()[:600]} | " + " ".join(frames[-3:-1]).replace("\n", " ")[-900:]


def _poisons_cuda(exc: BaseException) -> bool:
    """Errors after which every later CUDA call fails too: only a new process recovers."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    text = str(exc)
    return (accelerator_error is not None and isinstance(exc, accelerator_error)) or any(
        marker in text for marker in ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure"))


def _has_errors(node: Any) -> bool:
    if isinstance(node, dict):
        return "error" in node or any(_has_errors(v) for v in node.values())
    return isinstance(node, list) and any(_has_errors(v) for v in node)


def fit_layers(start: int, attempt: Callable[[int], dict[str, Any]], mode: Mode) -> dict[str, Any]:
    """``attempt(layers)`` at ``start`` decoder layers, halving them after each out-of-memory
    error until it fits (1 layer is the last try); the result says how many ran and what did not."""
    layers, tries = start, []
    while True:
        try:
            return {"layers": layers, "out_of_memory_at": tries, **attempt(layers)}
        except torch.OutOfMemoryError as exc:
            tries.append(f"{layers} layers: {str(exc).splitlines()[0][:200]}")
        _free_memory(mode)  # outside the handler: its traceback, and the tensors its frames held, are gone
        if layers == 1:
            raise RuntimeError("out of memory even with 1 decoder layer: " + " / ".join(tries))
        layers //= 2


# ---------------------------------------------------------------------------------------- device


def device_section(run: SectionRun) -> None:
    mode, figures = run.mode, run.figures

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    figures["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           **{p: version(p) for p in ("transformers", "deepspeed", "flash-attn", "triton")}}
    if mode.device.type == "cuda":
        props = torch.cuda.get_device_properties(mode.device)
        figures.update(name=props.name, memory_gib=_gib(props.total_memory), capability=f"{props.major}.{props.minor}",
                       multiprocessors=props.multi_processor_count)
    else:
        figures.update(name=f"CPU, {torch.get_num_threads()} threads")
    figures["dtype"] = str(mode.dtype).removeprefix("torch.")
    figures["training_backends"] = available_backends(mode.device, mode.dtype, requires_grad=True)
    figures["auto_backend"] = auto_backend(mode.device, mode.dtype, requires_grad=True)
    figures["peak"] = peak_flops(mode)


# ---------------------------------------------------------------------------------------- backends


def spread_weights_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw a random model's weights at a scale where attention and the next-token
    distribution are far from flat (the default 0.02 init leaves both nearly uniform, where a
    wrong bias could hide inside the tolerances): embeddings N(0, 1) (T5's tied head scales its
    input by 1/sqrt(d_model)), other matrices N(0, 1/fan_in), norm gains 1 + N(0, 0.2^2),
    biases N(0, 0.02^2)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if id(param) in embeddings:
                param.copy_(noise)
            elif param.dim() >= 2:
                param.copy_(noise / math.sqrt(param.shape[-1]))
            else:
                param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.02 * noise)


def loss_and_mask_grad(model: torch.nn.Module, batch: Batch, log_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean answer NLL and its gradient w.r.t. the log-mask, through ``loss.backward()`` as the
    trainer calls it (reentrant checkpointing refuses ``autograd.grad``)."""
    leaf = log_mask.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        loss = model.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, leaf).token_mean_nll()
        loss.backward()
    return loss.detach().float().cpu(), leaf.grad.float().cpu()


def _compare(result: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
             tolerance: Tolerance, seconds: float) -> dict[str, Any]:
    (loss, grad), (ref_loss, ref_grad) = result, reference
    loss_diff = float((loss - ref_loss).abs())
    grad_rel = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30))
    return {"loss": round(float(loss), 6), "loss_abs_diff": loss_diff, "grad_rel_error": grad_rel,
            "grad_max_abs": float(ref_grad.abs().max()), "passed": loss_diff <= tolerance.loss_atol and grad_rel <= tolerance.grad_rel,
            "tolerance": vars(tolerance), "seconds": round(seconds, 3)}


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def compare_family(family: str, mode: Mode, out: dict[str, Any], save: Callable[[], None], seed: int = 0) -> None:
    """One generator family into ``out``: eager against a reference copy, then each backend
    against eager (flex last: its first call compiles), saved after each."""
    shape = COMPARISON_SHAPES[family][0 if mode.tiny else 1]
    data = DataConfig(n_candidates=shape.n_candidates, doc_max_tokens=shape.doc_max_tokens)
    torch.manual_seed(seed)
    model, tokenizer = build_generator_model(shape, data, torch.float32)
    spread_weights_(model, seed)
    model = model.to(mode.device, mode.dtype)
    records = synthetic_records(shape, shape.batch, seed)
    batch = Collator(data, tokenizer, None, 0, input_format=model.input_format)(records, list(range(shape.batch)))
    batch = batch.to(mode.device)
    weights = torch.rand(shape.batch, shape.n_candidates, generator=torch.Generator().manual_seed(seed)) * 0.95 + 0.05
    log_mask = weights.log()
    log_mask[-1, 1] = float("-inf")
    log_mask = log_mask.to(mode.device)
    config = model.config
    out.update(config={k: getattr(config, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                       "head_dim", "d_kv", "num_hidden_layers") if hasattr(config, k)},
               batch=f"B={shape.batch}, n={shape.n_candidates}, documents of {shape.doc_words[0]}-{shape.doc_words[1]} tokens",
               dtype=str(mode.dtype).removeprefix("torch."))
    config.cross_attn_backend = "eager"
    query_mask = family == "decoder-only"  # its fused path adds the prompt's causal mask
    eager, seconds = _timed(lambda: loss_and_mask_grad(model, batch, log_mask), mode.device)
    reference_model = copy.deepcopy(model).to(mode.reference_dtype)  # the same (rounded) weights, one precision up
    reference = loss_and_mask_grad(reference_model, batch, log_mask.to(mode.reference_dtype))
    del reference_model
    backend_tolerance, reference_tolerance = TOLERANCES[mode.dtype]
    out["reference"] = {"against": str(mode.reference_dtype).removeprefix("torch."),
                        **_compare(eager, reference, reference_tolerance, seconds)}
    out["backends"] = {"eager": {"loss": round(float(eager[0]), 6), "grad_max_abs": float(eager[1].abs().max()),
                                 "seconds": round(seconds, 3), "note": "the reference of the others"}}
    save()
    for backend in sorted(BACKENDS[1:], key=lambda name: name == "flex"):
        reason = backend_unavailable_reason(backend, mode.device, mode.dtype, requires_grad=True, query_mask=query_mask)
        if reason is not None:
            out["backends"][backend] = {"skipped": reason}
            continue
        config.cross_attn_backend = backend
        try:
            result, seconds = _timed(lambda: loss_and_mask_grad(model, batch, log_mask), mode.device)
            out["backends"][backend] = _compare(result, eager, backend_tolerance, seconds)
        except Exception as exc:  # one backend's failure must not hide the others'
            if _poisons_cuda(exc):
                raise
            out["backends"][backend] = {"error": _error_text(exc)}
        save()


def backends_section(run: SectionRun) -> None:
    for family in COMPARISON_SHAPES:
        if run.left() < (5 if run.mode.tiny else 20):
            run.figures[family] = {"skipped": f"{run.left():.0f} s of the budget left"}
            continue
        out = run.figures[family] = {}
        try:
            compare_family(family, run.mode, out, run.save)
        except Exception as exc:
            if _poisons_cuda(exc):
                raise
            out["error"] = _error_text(exc)
        run.save()


# ---------------------------------------------------------------------------------------- steps

# variant -> (grerank bench's variant whose config it starts from, activation checkpointing).
# Checkpointing on first: the layers it fits are where "off" (which needs more) starts.
STEP_VARIANTS: dict[str, tuple[str, bool]] = {
    "checkpointing on": ("efficient", True),
    "checkpointing off": ("efficient", False),
    "naive": ("naive", True),
}


def _shape_summary(shape: Shape) -> dict[str, Any]:
    return {"batch": shape.batch, "n_candidates": shape.n_candidates, "doc_tokens": list(shape.doc_words),
            "question_words": shape.question_words, "answer_words": shape.answer_words,
            "reranker": f"{shape.reranker_hidden} x {shape.reranker_layers} layers, {shape.reranker_heads} heads, "
                        f"vocab {shape.reranker_vocab}"}


def run_step_variant(shape: Shape, variant: str, run: SectionRun, seed: int = 0) -> dict[str, Any]:
    """Build one variant's engines, time warm steps, measure the peak memory and predict it."""
    mode = run.mode
    bench_variant, checkpointing = STEP_VARIANTS[variant]
    naive = bench_variant == "naive"
    flag = str(checkpointing).lower()
    config = bench_config(shape, bench_variant, [
        f"generator.dtype={str(mode.dtype).removeprefix('torch.')}", f"generator.gradient_checkpointing={flag}",
        f"reranker.gradient_checkpointing={flag}", f"deepspeed.generator_config={DS_CONFIGS / 'generator_replicated.json'}",
    ])
    held_before = _allocated(mode)
    built = build_engines(shape, config, seed, docs_pad_to_batch=not naive)
    try:
        per_call = 1 if naive else shape.batch
        total = run.warmup + run.steps
        batches, _ = step_batches(shape, built.collate, synthetic_records(shape, shape.batch * total, seed), total, per_call)
        batches = [[b.to(mode.device) for b in micro] for micro in batches]
        after_build = _allocated(mode)
        if mode.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(mode.device)
        times = []
        for s, micro in enumerate(batches):
            synchronize(mode.device)
            start = time.perf_counter()
            for m, batch in enumerate(micro):
                noise = noise_generator(config.seed, built.strategy.rank, s * len(micro) + m, mode.device)
                training_step(built.strategy, built.reranker, built.generator, batch, config, noise)
            synchronize(mode.device)
            if s >= run.warmup:
                times.append(time.perf_counter() - start)
        peak = _gib(torch.cuda.max_memory_allocated(mode.device)) if mode.device.type == "cuda" else None
        reserved = _gib(torch.cuda.max_memory_reserved(mode.device)) if mode.device.type == "cuda" else None
        step_s = statistics.median(times)
        last = batches[-1]
        useful = sum(step_flops(built.model_config, built.rr_model.config, b, useful=True)["total"] for b in last)
        executed = sum(step_flops(built.model_config, built.rr_model.config, b, useful=False)["total"] for b in last)
        tokens = 0
        for b in last:
            lengths = batch_lengths(b, useful=True)
            tokens += sum(lengths.pair_lengths) + sum(lengths.doc_lengths) + sum(lengths.row_lengths)
        first = last[0]
        widths = {"L": first.encoder_input_ids.shape[-1], "S": first.input_ids.shape[1],
                  "rr_len": first.reranker_inputs["input_ids"].shape[1]}
        rows = step_memory_rows(getattr(built.model, "lm", built.model), built.rr_model, B=per_call, n=shape.n_candidates,
                                **widths, world_size=1, generator_stage=0, generator_checkpointing=checkpointing,
                                rr_checkpointing=checkpointing)
        predicted = sum(size for _, size, _ in rows)
        peak_info = peak_flops(mode)
        backend = built.model_config.cross_attn_backend
        return {
            "step_s": round(step_s, 4), "step_times_s": [round(t, 4) for t in times],
            "queries_per_s": round(shape.batch / step_s, 3), "tokens_per_s": round(tokens / step_s, 1),
            "tokens_per_step": tokens, "micro_steps": len(last), "widths": widths,
            "model_tflop_per_step": round(useful / 1e12, 4), "executed_tflop_per_step": round(executed / 1e12, 4),
            "mfu_percent": round(100 * useful / step_s / peak_info["flops"], 3),
            "attention_backend": backend if backend != "auto" else f"auto -> {auto_backend(mode.device, mode.dtype, True)}",
            "memory_held_before_build_gib": held_before, "memory_after_build_gib": after_build,
            "peak_memory_gib": peak, "peak_reserved_gib": reserved,
            "predicted_memory_gib": round(predicted, 3),
            "measured_over_predicted": round(peak / predicted, 3) if peak is not None else None,
            "predicted_rows": [[name, round(size, 3), how] for name, size, how in rows],
        }
    finally:
        close_engines(built)
        del built
        _free_memory(mode)


def _step_section(run: SectionRun, section: str) -> None:
    mode, figures = run.mode, run.figures
    generator = _generator(section, mode)
    shape = generator.shape(generator.full_layers)
    figures.update(generator=generator.name, full_layers=generator.full_layers, shape=_shape_summary(shape),
                   peak=peak_flops(mode), steps=run.steps, warmup=run.warmup, variants={})
    start_layers = generator.full_layers
    for variant in STEP_VARIANTS:
        need = 5 if mode.tiny else 45
        if run.left() < need:
            figures["variants"][variant] = {"skipped": f"{run.left():.0f} s of the budget left; a variant needs about {need} s"}
            continue
        try:
            result = fit_layers(start_layers if variant == "checkpointing off" else generator.full_layers,
                                lambda layers: run_step_variant(generator.shape(layers), variant, run), mode)
        except Exception as exc:
            if _poisons_cuda(exc):
                raise
            result = {"error": _error_text(exc)}
        figures["variants"][variant] = result
        if variant == "checkpointing on" and "layers" in result:
            start_layers = result["layers"]
        run.save()


def cepe_step_section(run: SectionRun) -> None:
    _step_section(run, "cepe_step")


def decoder_only_step_section(run: SectionRun) -> None:
    _step_section(run, "decoder_only_step")


# ---------------------------------------------------------------------------------------- generation


def run_generation(shape: Shape, mode: Mode, new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Greedy decoding of the shape's B queries over their n documents, timed after a warm-up."""
    data = bench_config(shape, "efficient", []).data
    torch.manual_seed(seed)
    model, tokenizer = build_generator_model(shape, data, mode.dtype, mode.device)
    if hasattr(model.config, "cross_attn_backend"):
        model.config.cross_attn_backend = "auto"
    batch = Collator(data, tokenizer, None, 0, input_format=model.input_format)(
        synthetic_records(shape, shape.batch, seed), list(range(shape.batch))).to(mode.device)
    if mode.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(mode.device)

    def encode() -> Any:
        return model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)

    def generate(contexts: Any, count: int) -> torch.Tensor:
        return model.generate(contexts, batch.prompt_ids, batch.prompt_attention_mask, None, count)

    with torch.no_grad():
        generate(encode(), 2)  # warm-up: kernels, allocator, caches
        contexts, encode_s = _timed(encode, mode.device)
        tokens, decode_s = _timed(lambda: generate(contexts, new_tokens), mode.device)
    rows, steps = tokens.shape[0], tokens.shape[-1]
    return {"queries": rows, "documents_per_query": shape.n_candidates, "new_tokens_per_query": steps,
            "encode_s": round(encode_s, 4), "decode_s": round(decode_s, 4),
            "decode_tokens_per_s": round(rows * steps / decode_s, 1),
            "end_to_end_tokens_per_s": round(rows * steps / (encode_s + decode_s), 1),
            "ms_per_decode_step": round(1e3 * decode_s / steps, 2),
            "peak_memory_gib": _gib(torch.cuda.max_memory_allocated(mode.device)) if mode.device.type == "cuda" else None}


def generation_section(run: SectionRun) -> None:
    mode = run.mode
    for key in GENERATORS:
        generator = _generator(key, mode)
        if run.left() < (3 if mode.tiny else 20):
            run.figures[generator.name] = {"skipped": f"{run.left():.0f} s of the budget left"}
            continue
        try:
            run.figures[generator.name] = fit_layers(
                generator.full_layers, lambda layers: run_generation(generator.shape(layers), mode, 4 if mode.tiny else 32),
                mode)
        except Exception as exc:
            if _poisons_cuda(exc):
                raise
            run.figures[generator.name] = {"error": _error_text(exc)}
        _free_memory(mode)  # the model went with run_generation's frame
        run.save()


SECTIONS: tuple[Section, ...] = (
    Section("device", "Device, versions and the bf16 peak", device_section, need_s=5, limit_s=60),
    Section("backends", "Attention backends against eager", backends_section, need_s=30, limit_s=150),
    Section("cepe_step", "G-Rerank step, CEPE generator", cepe_step_section, need_s=60, limit_s=200),
    Section("decoder_only_step", "G-Rerank step, decoder-only generator", decoder_only_step_section, need_s=60, limit_s=200),
    Section("generation", "Greedy generation throughput", generation_section, need_s=20, limit_s=100),
)


# ---------------------------------------------------------------------------------------- markdown


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value else f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "/")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]


def _markdown_backends(figures: dict[str, Any]) -> list[str]:
    rows, notes = [], []
    for family, result in figures.items():
        if "error" in result or "skipped" in result:
            notes.append(f"- {family}: {'ERROR: ' + result['error'] if 'error' in result else 'skipped: ' + result['skipped']}")
        if "reference" not in result:
            continue
        ref = result["reference"]
        rows.append([family, f"eager vs {ref['against']} copy", ref["loss"], ref["loss_abs_diff"], ref["grad_max_abs"],
                     ref["grad_rel_error"], _tolerance(ref), "pass" if ref["passed"] else "FAIL", ref["seconds"]])
        for backend, r in result.get("backends", {}).items():
            if backend == "note":
                notes.append(f"- {family}: {r}")
            elif "skipped" in r or "error" in r:
                rows.append([family, backend, "-", "-", "-", "-", "-",
                             "skipped: " + r["skipped"] if "skipped" in r else "ERROR: " + r["error"], "-"])
            elif backend != "eager":
                rows.append([family, f"{backend} vs eager", r["loss"], r["loss_abs_diff"], r["grad_max_abs"],
                             r["grad_rel_error"], _tolerance(r), "pass" if r["passed"] else "FAIL", r["seconds"]])
        notes.append(f"- {family}: {result['batch']}, {result['dtype']}; config {result['config']}")
    return _table(["family", "comparison", "loss", "abs diff loss", "max abs grad", "grad rel error", "tolerance",
                   "result", "s (first call)"], rows) + [""] + notes


def _tolerance(result: dict[str, Any]) -> str:
    return f"{result['tolerance']['loss_atol']:g} nats, {result['tolerance']['grad_rel']:g} rel"


def _markdown_steps(figures: dict[str, Any]) -> list[str]:
    if "variants" not in figures:
        return []
    lines = [f"{figures['generator']} ({figures['full_layers']} decoder layers in full), shape {figures['shape']}; "
             f"{figures['warmup']} warm-up + {figures['steps']} timed steps; MFU against {figures['peak']['flops'] / 1e12:,.1f} "
             f"TFLOP/s ({figures['peak']['source']}).", ""]
    rows, notes = [], []
    for variant, r in figures["variants"].items():
        if "error" in r or "skipped" in r:
            notes.append(f"- {variant}: {'ERROR: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
            continue
        rows.append([variant, r["layers"], r["step_s"], r["queries_per_s"], r["tokens_per_s"], r["model_tflop_per_step"],
                     r["mfu_percent"], r["peak_memory_gib"], r["predicted_memory_gib"], r["measured_over_predicted"],
                     r["attention_backend"]])
        if r["out_of_memory_at"]:
            notes.append(f"- {variant}: did not fit at {'; '.join(r['out_of_memory_at'])}; ran with {r['layers']} layers")
        if r["peak_memory_gib"] is not None:
            notes.append(f"- {variant}: GiB allocated before the build {r['memory_held_before_build_gib']} (a leak if "
                         f"above 0), after it {r['memory_after_build_gib']}; peak reserved {r['peak_reserved_gib']}")
        notes.append(f"- {variant}: widths {r['widths']}, {r['micro_steps']} micro-step(s); predicted GiB: "
                     + "; ".join(f"{name} {size}" for name, size, _ in r["predicted_rows"]))
    return lines + _table(["variant", "layers", "step s", "queries/s", "tokens/s", "model TFLOP/step", "MFU %",
                           "peak GiB", "predicted GiB", "measured/predicted", "attention"], rows) + [""] + notes


def _markdown_generation(figures: dict[str, Any]) -> list[str]:
    rows, notes = [], []
    for name, r in figures.items():
        if "error" in r or "skipped" in r:
            notes.append(f"- {name}: {'ERROR: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
            continue
        rows.append([name, r["layers"], f"{r['queries']} x {r['documents_per_query']}", r["new_tokens_per_query"], r["encode_s"],
                     r["decode_tokens_per_s"], r["end_to_end_tokens_per_s"], r["ms_per_decode_step"], r["peak_memory_gib"]])
        if r["out_of_memory_at"]:
            notes.append(f"- {name}: did not fit at {'; '.join(r['out_of_memory_at'])}")
    return _table(["generator", "layers", "queries x documents", "new tokens", "encode s", "decode tokens/s",
                   "end-to-end tokens/s", "ms per decode step", "peak GiB"], rows) + [""] + notes


def render_markdown(data: dict[str, Any]) -> str:
    sections = data["sections"]
    device = sections.get("device", {}).get("figures", {})
    lines = [f"# GPU check: {device.get('name', data['device_type'])} ({data['mode']})", "",
             f"Run {data['run_id']}, started {data['started']}, updated {data.get('updated', '-')}; "
             f"{data['attempts']} attempt(s); budget {data['budget_s']:.0f} s. Written by `bash scripts/gpu_check.sh` "
             "(grerank_dist/perf/gpu_check.py).", ""]
    if "peak" in device:
        lines += [f"Peak for MFU: {device['peak']['flops'] / 1e12:,.1f} TFLOP/s ({device['peak']['source']}); GEMM probe "
                  f"{device['peak']['gemm_probe_flops'] / 1e12:,.1f} TFLOP/s. Versions: {device['versions']}. "
                  f"Training backends here: {device['training_backends']} (auto: {device['auto_backend']}).", ""]
    render = {"backends": _markdown_backends, "cepe_step": _markdown_steps, "decoder_only_step": _markdown_steps,
              "generation": _markdown_generation}
    for section in SECTIONS:
        entry = sections.get(section.name)
        if entry is None:
            lines += [f"## {section.title}", "", "not reached", ""]
            continue
        lines += [f"## {section.title}: {entry['status']}" + (f" ({entry['seconds']} s)" if "seconds" in entry else ""), ""]
        if entry.get("reason"):
            lines += [entry["reason"], ""]
        elif entry["status"] == "running":
            lines += ["(still running, or the whole run was stopped inside it)", ""]
        if section.name in render and entry.get("figures"):
            lines += render[section.name](entry["figures"]) + [""]
    lines += ["## Assumptions and shortcuts", ""] + [f"- {a}" for a in data["assumptions"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- main


def _give_up(report: Report, entry: dict[str, Any], limit: float) -> None:
    """The watchdog: a section past its limit is taken for hung; record it and end the process
    (the script starts the next attempt, which goes on after this section)."""
    entry.update(status="timed out", reason=f"still running after {limit:.0f} s: the process was ended so the "
                                            "remaining sections could run (figures above were recorded before)")
    try:
        report.save()
    finally:
        os._exit(124)


def run(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    mode = Mode(tiny=args.tiny or not cuda, device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline or time.time() + args.budget_s
    report = Report(out, args.run_id, mode, args.budget_s)
    selected = [s for s in args.sections.split(",") if s] if args.sections else [s.name for s in SECTIONS]
    unknown = sorted(set(selected) - {s.name for s in SECTIONS})
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(s.name for s in SECTIONS)}")
    steps, warmup = (2, 1) if mode.tiny else (5, 2)
    entries = report.data["sections"]
    for section in (s for s in SECTIONS if s.name in selected):
        entry = entries.get(section.name)
        if entry is not None:
            if entry["status"] == "running":
                entry.update(status="crashed", reason="the process ended inside this section in an earlier attempt "
                                                      "(a crash, an abort or the OOM killer); not retried")
                report.save()
            continue
        left, need = deadline - time.time(), 2 if mode.tiny else section.need_s
        if left < need:
            entries[section.name] = {"status": "skipped", "reason": f"{max(left, 0):.0f} s of the {args.budget_s:.0f} s "
                                                                    f"budget left; this section needs about {need:.0f} s"}
            report.save()
            continue
        entry = entries[section.name] = {"status": "running", "figures": {}}
        report.save()
        print(f"gpu_check: {section.name} ({mode.label}), {left:.0f} s of the budget left", flush=True)
        limit = min(section.limit_s, left)
        watchdog = threading.Timer(limit, _give_up, (report, entry, limit))
        watchdog.daemon = True
        watchdog.start()
        start, poisoned = time.time(), False
        try:
            section.run(SectionRun(mode, entry["figures"], deadline, report.save, steps, warmup))
            if entry["status"] == "running":  # not already "timed out" by the watchdog
                entry["status"] = "partial" if _has_errors(entry["figures"]) else "ok"
        except Exception as exc:
            entry.update(status="error", reason=_error_text(exc))
            poisoned = _poisons_cuda(exc)
        finally:
            watchdog.cancel()
            entry["seconds"] = round(time.time() - start, 1)
            report.save()
        if poisoned:
            print(f"gpu_check: {section.name} left the CUDA context unusable; ending this attempt", flush=True)
            return 3
    print(render_markdown(report.data), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help=f"directory of {JSON_NAME} and {MARKDOWN_NAME}")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (always so without CUDA)")
    parser.add_argument("--sections", default="", help=f"comma-separated subset of {', '.join(s.name for s in SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole run's time budget")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="absolute end of the budget (epoch seconds), shared by the restarts of one script call")
    parser.add_argument("--run-id", default="", help="resume the report in --out if it has this run id (the script's restarts)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
