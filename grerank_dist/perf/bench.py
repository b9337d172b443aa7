"""Time one G-Rerank training step through the real trainer path, phase by phase.

    grerank bench --shape tiny|small|7b-slice [--steps 5 --warmup 2 --variants efficient,naive,bf16,bf16-all]

Random-weight models of a named shape (a CEPE generator and a BERT cross-encoder) run
:func:`grerank_dist.training.train.training_step` inside a :class:`DeepSpeedStrategy` on this process, on
synthetic records whose documents have a realistic spread of lengths. Each variant builds its
own engines and times warm steps:

- ``efficient``: the step as the trainer runs it: documents padded to the batch's longest, the
  fastest exact cross-attention backend, all B queries in one call, no activation recompute;
- ``naive``: the step a first implementation would write: eager attention, activation
  checkpointing (so cross K/V are projected again in backward), documents at the fixed
  ``doc_max_tokens`` width, one query per micro-step (B micro-steps accumulate one update);
- ``bf16``: ``efficient`` with the generator in bf16 (the reranker stays fp32); its answer
  log-likelihoods are compared with the fp32 generator's on the same batch;
- ``bf16-all``: ``bf16`` with the reranker's engine in bf16 too (DeepSpeed's bf16 mode: fp32
  master weights, bf16 forward and backward), for CPUs and GPUs with bf16 matrix units.

Phases are timed with wall clocks around the step's own parts (module hooks and wrappers, no
change to the step): reranker forward/backward (split by a hook on the scores' gradient), document
encoding, cross K/V projections, decoder forward/backward, optimizer, communication (the c10d
calls of one extra profiled step), data (tokenisation and padding, done ahead of the step, shown
apart). FLOPs are counted analytically (the formula is printed) for the real tokens ("useful")
and for the padded shapes the step executes; the machine's matmul peak comes from a GEMM probe
in the same process, dtype and thread count, and a variant's peak time is each part's FLOPs at
the peak of the dtype it runs in. What bounds a step is read from one profiled step: its matmul
calls by shape and dtype, their time in the step, and the same products timed alone
(:func:`matmul_bounds`): time the shapes themselves cost, against time lost around them.
Timings on CPU need no device synchronisation.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import resource
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from grerank_dist.method.relax import noise_generator
from grerank_dist.perf.cost_model import FLOP_FORMULA, step_flops
from grerank_dist.perf.shapes import (
    SHAPES, Shape, bench_config, build_engines, close_engines, step_batches, synthetic_records,
)
from grerank_dist.training.strategy import DeepSpeedStrategy
from grerank_dist.training.train import training_step

PHASES = ("data", "rr_fwd", "rr_bwd", "encode", "cross_kv", "dec_fwd", "dec_bwd", "optim", "comm", "other")
VARIANTS = ("efficient", "naive", "bf16", "bf16-all")


# ---------------------------------------------------------------------------------------- timing

def gemm_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 8, device: torch.device | str = "cpu") -> float:
    """The best FLOP/s of a square ``F.linear`` (the models' matmul) in ``dtype`` on this
    process's threads, or on a GPU (each product timed to its end). (On CPUs without bf16
    instructions ``torch.mm`` in bf16 takes a path ~10x slower than ``F.linear``, which would
    understate the peak.)"""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    torch.nn.functional.linear(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(a.device)
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)
        synchronize(a.device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a wall clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- timing


@dataclass
class PhaseClock:
    """Wall time per phase of the current step, gathered by hooks around the step's parts."""

    times: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    in_backward: bool = False
    scores_grad_at: float | None = None
    _starts: dict[int, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.times = defaultdict(float)

    def wrap(self, fn: Callable, phase: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[phase] += time.perf_counter() - start

        return timed

    def time_module(self, module: torch.nn.Module, phase: Callable[[], str]) -> None:
        """Add the module's forward time to ``phase()`` (read when the forward ends)."""
        def pre(mod: torch.nn.Module, args: Any) -> None:
            self._starts[id(mod)] = time.perf_counter()

        def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
            self.times[phase()] += time.perf_counter() - self._starts.pop(id(mod))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def instrument(clock: PhaseClock, strategy: DeepSpeedStrategy, reranker: Any, generator: Any) -> None:
    """Hook the phases of :func:`training_step` without changing it."""
    clock.time_module(reranker.module, lambda: "rr_fwd")

    def mark_scores_grad(mod: torch.nn.Module, args: Any, out: Any) -> None:
        def at_grad(grad: torch.Tensor) -> None:
            clock.scores_grad_at = time.perf_counter()

        out.logits.register_hook(at_grad)

    reranker.module.register_forward_hook(mark_scores_grad)
    for layer in generator.model.layers:
        if layer.cross_attn is not None:
            for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj):
                clock.time_module(proj, lambda: "cross_kv_bwd" if clock.in_backward else "cross_kv")
    generator.encode_contexts = clock.wrap(generator.encode_contexts, "encode")
    generator.answer_logprobs = clock.wrap(generator.answer_logprobs, "dec_fwd_total")
    backward = strategy.backward

    def timed_backward(loss: torch.Tensor) -> None:
        clock.in_backward, clock.scores_grad_at = True, None
        start = time.perf_counter()
        try:
            backward(loss)
        finally:
            end = time.perf_counter()
            clock.in_backward = False
            split = clock.scores_grad_at or start
            clock.times["dec_bwd_total"] += split - start
            clock.times["rr_bwd"] += end - split

    strategy.backward = timed_backward
    strategy.step = clock.wrap(strategy.step, "optim")


def _comm_seconds(profile: Any) -> float:
    """CPU time of the collective calls (ZeRO-3 all-gathers, gradient all-reduce) in a profile."""
    keys = ("c10d", "gloo", "nccl", "all_gather", "allgather", "all_reduce", "allreduce", "reduce_scatter", "broadcast")
    return sum(e.cpu_time_total for e in profile.key_averages() if any(k in e.key.lower() for k in keys)) / 1e6


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


@dataclass
class MatmulBounds:
    """The fp32/bf16 matmul calls of one profiled step: FLOPs by dtype, their seconds in the step,
    the seconds of the same products run alone (each shape warm, the best of a few runs), and
    the profiled step's wall time (``skipped_calls``: matmuls in other dtypes, not counted)."""

    calls: int = 0
    flops: dict[str, float] = field(default_factory=dict)
    step_seconds: float = 0.0
    alone_seconds: float = 0.0
    profiled_step_seconds: float = 0.0
    skipped_calls: int = 0


# The profiler's names of the dtypes whose GEMM peak the bench probes.
PROFILED_DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16}


def _matmul_operands(name: str, shapes: list[list[int]]) -> tuple[int, int, int, int]:
    """(batch, m, k, n) of a profiled matmul from its input shapes (addmm/baddbmm: bias first)."""
    a, b = shapes[1:3] if name in ("aten::addmm", "aten::baddbmm") else shapes[:2]
    if len(a) == 3:
        return a[0], a[1], a[2], b[2]
    return 1, a[0], a[1], b[1]


def matmul_bounds(profile: Any, profiled_step_seconds: float, repeats: int = 3) -> MatmulBounds:
    """Group the CPU profile's matmuls (recorded with shapes) by (op, shape, dtype), then time
    each group's product alone: a 2-D product as ``F.linear`` (the weight layout nn.Linear
    hands to mm/addmm), a batched one as ``bmm``. The step's matmul time over the alone time
    says what the step loses around its matmuls (cache, threads, hooks), the alone time over
    the peak time what the shapes themselves allow (a 16-row product streams its weight from
    memory). CPU only: a CPU profile of CUDA work times kernel launches, not kernels."""
    groups: dict[tuple[str, tuple[int, int, int, int], str], list[float]] = defaultdict(list)
    bounds = MatmulBounds(profiled_step_seconds=profiled_step_seconds)
    for event in profile.events():
        if event.name in MATMUL_OPS and event.input_shapes:
            dtype_name = next((d for d in event.input_dtypes if d), "")
            if dtype_name not in PROFILED_DTYPES:
                bounds.skipped_calls += 1
                continue
            groups[(event.name, _matmul_operands(event.name, event.input_shapes), dtype_name)].append(event.cpu_time_total / 1e6)
    for (_, (batch, m, k, n), dtype_name), seconds in groups.items():
        dtype = PROFILED_DTYPES[dtype_name]
        if batch == 1:
            x, weight = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
            product = functools.partial(torch.nn.functional.linear, x, weight)
        else:
            product = functools.partial(torch.bmm, torch.randn(batch, m, k).to(dtype), torch.randn(batch, k, n).to(dtype))
        product()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        name = str(dtype).removeprefix("torch.")
        bounds.calls += len(seconds)
        bounds.flops[name] = bounds.flops.get(name, 0.0) + 2 * batch * m * k * n * len(seconds)
        bounds.step_seconds += sum(seconds)
        bounds.alone_seconds += best * len(seconds)
    return bounds


def peak_seconds(flops: dict[str, float], peaks: dict[str, float]) -> float:
    """Seconds of FLOPs by dtype at the GEMM peak of each dtype."""
    return sum(count / peaks[dtype] for dtype, count in flops.items() if count)


@dataclass
class VariantResult:
    name: str
    phases: dict[str, float]  # seconds per step (the median step's)
    step_s: float
    step_cpu_s: float  # the process's CPU time in that step (on a shared machine, less than wall x threads)
    queries_per_s: float
    flops_useful: dict[str, float]  # by dtype (float32, bfloat16)
    flops_executed: dict[str, float]
    peak_rss_gb: float
    answer_loglik: list[float]  # mean per-token log-likelihood per query of the first batch (no mask noise)
    matmuls: MatmulBounds | None = None
    profile_table: str = ""


def flops_by_dtype(parts: dict[str, float], generator_dtype: str, reranker_dtype: str) -> dict[str, float]:
    """A step's FLOPs split by the dtype each part runs in (the reranker's; the generator's for
    the encoder, K/V and decoder)."""
    split = defaultdict(float)
    split[reranker_dtype] += parts["reranker"]
    split[generator_dtype] += parts["total"] - parts["reranker"]
    return dict(split)


def median_split(splits: list[dict[str, float]]) -> dict[str, float]:
    """The FLOPs by dtype of the step whose total is the median (the mean of the two middle
    steps' for an even count, as ``statistics.median`` takes it)."""
    ordered = sorted(splits, key=lambda split: sum(split.values()))
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    return {dtype: statistics.mean(split.get(dtype, 0.0) for split in middle) for dtype in middle[0]}


def run_variant(
    shape: Shape, variant: str, args: argparse.Namespace, records: list[dict[str, Any]]
) -> VariantResult:
    """Build the engines of one variant, prepare its batches ahead, time warm steps."""
    built = build_engines(shape, bench_config(shape, variant, args.override), args.seed, variant != "naive")
    config, strategy, model_config, generator = built.config, built.strategy, built.model_config, built.generator
    rr_model, reranker, collate = built.rr_model, built.reranker, built.collate
    per_call = 1 if variant == "naive" else shape.batch
    steps = args.warmup + args.steps
    # Tokenisation happens ahead of the step (as DataLoader workers would do it): timed apart.
    batches, data_times = step_batches(shape, collate, records, steps, per_call)
    whole = [collate(records[(s * shape.batch) % len(records):][: shape.batch], list(range(shape.batch)))
             for s in range(steps)]

    clock = PhaseClock()
    instrument(clock, strategy, reranker, generator)
    per_step: list[dict[str, float]] = []
    totals: list[float] = []
    cpu_totals: list[float] = []
    for s, micro in enumerate(batches):
        clock.reset()
        start, cpu_start = time.perf_counter(), time.process_time()
        for m, batch in enumerate(micro):
            micro_step = s * len(micro) + m
            noise = noise_generator(config.seed, strategy.rank, micro_step, strategy.device)
            training_step(strategy, reranker, generator, batch, config, noise)
        total = time.perf_counter() - start
        if s >= args.warmup:
            totals.append(total)
            cpu_totals.append(time.process_time() - cpu_start)
            per_step.append(dict(clock.times))
    # The phases of the median step (not per-phase medians, which need not add up to a step).
    middle = sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]
    # That step's batches once more under the profiler (collectives, matmuls by shape).
    profile_table = ""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        start = time.perf_counter()
        for m, batch in enumerate(batches[args.warmup + middle]):
            training_step(strategy, reranker, generator, batch, config, noise_generator(config.seed, 0, 10**6 + m, strategy.device))
        profiled_s = time.perf_counter() - start
    comm = _comm_seconds(profile)
    if args.profile:
        profile_table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    times, step_s, step_cpu_s = per_step[middle], totals[middle], cpu_totals[middle]
    phases = {
        "data": data_times[args.warmup + middle],
        "rr_fwd": times.get("rr_fwd", 0.0),
        "rr_bwd": times.get("rr_bwd", 0.0),
        "encode": times.get("encode", 0.0),
        "cross_kv": times.get("cross_kv", 0.0) + times.get("cross_kv_bwd", 0.0),
        "dec_fwd": times.get("dec_fwd_total", 0.0) - times.get("cross_kv", 0.0),
        "dec_bwd": times.get("dec_bwd_total", 0.0) - times.get("cross_kv_bwd", 0.0),
        "optim": times.get("optim", 0.0),
        "comm": comm,
    }
    phases["other"] = step_s - sum(v for k, v in phases.items() if k not in ("data", "comm"))
    matmuls = matmul_bounds(profile, profiled_s) if strategy.device.type == "cpu" else None
    dtypes = tuple(str(d).removeprefix("torch.") for d in (strategy.dtype, strategy.reranker_dtype))

    def step_split(micro: list[Any], useful: bool) -> dict[str, float]:  # one step's FLOPs by dtype
        split: dict[str, float] = defaultdict(float)
        for batch in micro:
            for dtype, count in flops_by_dtype(step_flops(model_config, rr_model.config, batch, useful), *dtypes).items():
                split[dtype] += count
        return dict(split)

    # The median step's FLOPs (useful: whole batches of B; executed: the micro-steps run).
    useful_by_dtype = median_split([step_split([b], True) for b in whole])
    executed_by_dtype = median_split([step_split(m, False) for m in batches])
    with torch.no_grad():
        first = whole[0]
        contexts = generator.encode_contexts(first.encoder_input_ids, first.encoder_attention_mask)
        zeros = torch.zeros(first.valid.shape)
        loglik = generator.answer_logprobs(contexts, first.input_ids, first.attention_mask, first.labels, zeros).mean()
    close_engines(built)
    result = VariantResult(
        name=variant, phases=phases, step_s=step_s, step_cpu_s=step_cpu_s, queries_per_s=shape.batch / step_s,
        flops_useful=useful_by_dtype, flops_executed=executed_by_dtype, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        answer_loglik=loglik.float().tolist(), matmuls=matmuls, profile_table=profile_table,
    )
    del built, strategy, generator, reranker, rr_model
    gc.collect()
    return result


def report(shape_name: str, results: list[VariantResult], peaks: dict[str, float], threads: int) -> str:
    """The table (milliseconds per step), what bounds each step's matmuls, and the comparisons."""
    lines = [f"shape {shape_name}, {threads} threads; GEMM peak " +
             ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), FLOP_FORMULA, ""]
    head = ["variant", *PHASES, "step", "step CPU", "q/s", "GFLOP use", "GFLOP exec", "use %peak", "exec %peak",
            "use %pk CPU", "RSS GB"]
    lines.append(" ".join(f"{h:>10s}" for h in head))
    for r in results:
        useful_s, executed_s = peak_seconds(r.flops_useful, peaks), peak_seconds(r.flops_executed, peaks)
        cells = [r.name, *(f"{r.phases[p] * 1e3:.1f}" for p in PHASES), f"{r.step_s * 1e3:.1f}",
                 f"{r.step_cpu_s * 1e3:.1f}", f"{r.queries_per_s:.2f}", f"{sum(r.flops_useful.values()) / 1e9:.2f}",
                 f"{sum(r.flops_executed.values()) / 1e9:.2f}", f"{100 * useful_s / r.step_s:.1f}",
                 f"{100 * executed_s / r.step_s:.1f}", f"{100 * useful_s / (r.step_cpu_s / threads):.1f}",
                 f"{r.peak_rss_gb:.2f}"]
        lines.append(" ".join(f"{c:>10s}" for c in cells))
    lines.append("(ms per step: the phases of the median step; data is tokenisation done ahead of the step, not "
                 "in 'step'; comm: collectives of one profiled step, inside the other phases; other: step minus "
                 "the phases (relaxation, loss, hooks); %peak: the FLOPs' time at the GEMM peak of the dtype "
                 "each part runs in (the generator's: its fp32 head and softmax counted at its dtype's), over wall time, 'CPU': over the step's CPU time / threads, what a dedicated "
                 "machine would see; RSS: the process's peak so far)")
    lines.append("what bounds the step (the median step's batches again, profiled; ms): the profiled step | its "
                 "matmuls | the same products alone | their FLOPs at the GEMM peak | the rest of the step")
    for r in results:
        m = r.matmuls
        if m is None:
            lines.append(f"  {r.name}: not measured (a CPU profile times CUDA kernel launches, not kernels)")
            continue
        at_peak = peak_seconds(m.flops, peaks)
        skipped = f"; {m.skipped_calls} matmuls in other dtypes left out" if m.skipped_calls else ""
        lines.append(f"  {r.name}: {m.calls} matmuls, {sum(m.flops.values()) / 1e9:.1f} GFLOP: "
                     f"{m.profiled_step_seconds * 1e3:.0f} | {m.step_seconds * 1e3:.0f} | {m.alone_seconds * 1e3:.0f} | "
                     f"{at_peak * 1e3:.0f} | {(m.profiled_step_seconds - m.step_seconds) * 1e3:.0f} (the products alone "
                     f"reach {100 * at_peak / m.alone_seconds:.0f}% of the peak, in the step "
                     f"{100 * at_peak / m.step_seconds:.0f}%{skipped})")
    by_name = {r.name: r for r in results}
    if "efficient" in by_name and "naive" in by_name:
        naive, fast = by_name["naive"], by_name["efficient"]
        lines.append(f"efficient vs naive: {naive.step_s / fast.step_s:.2f}x faster per step in wall time, "
                     f"{naive.step_cpu_s / fast.step_cpu_s:.2f}x in CPU time")
    for name in ("bf16", "bf16-all"):
        if "efficient" in by_name and name in by_name:
            fp32, low = by_name["efficient"], by_name[name]
            diff = max(abs(a - b) for a, b in zip(fp32.answer_loglik, low.answer_loglik))
            lines.append(f"{name} vs efficient (fp32): {fp32.step_s / low.step_s:.2f}x faster per step in wall time, "
                         f"{fp32.step_cpu_s / low.step_cpu_s:.2f}x in CPU time; mean per-token answer "
                         f"log-likelihood differs by at most {diff:.4f} nats")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (medians reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print the top operators of one profiled step per variant")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--world-size", type=int, default=1,
                        help="> 1: launch that many CPU ranks and count the generator placements' collectives "
                             "(grerank_dist.perf.traffic) instead of timing variants")
    parser.add_argument("--placements", default="zero3,zero3-release,replicated,hpz",
                        help="with --world-size: comma-separated generator placements")
    parser.add_argument("--zero", default="{}", help="with --world-size: JSON merged into the ZeRO-3 placements' "
                        "zero_optimization, e.g. '{\"stage3_param_persistence_threshold\": 1000}'")
    parser.add_argument("override", nargs="*", help="training-config overrides for every variant, e.g. relax.k=3")


def run(args: argparse.Namespace) -> int:
    if args.world_size > 1:
        from grerank_dist.perf import traffic

        return traffic.run(args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    shape = SHAPES[args.shape]
    peak_size = 512 if args.shape == "tiny" else 1024
    peaks = {"float32": gemm_peak(torch.float32, peak_size)}
    if any(v.startswith("bf16") for v in variants):
        peaks["bfloat16"] = gemm_peak(torch.bfloat16, peak_size)
    records = synthetic_records(shape, shape.batch * (args.warmup + args.steps), args.seed)
    results = [run_variant(shape, v, args, records) for v in variants]
    # Probed again after the steps, for every dtype a part ran in; the better of the two is the
    # peak (the machine may be shared).
    used = {dtype for r in results for split in (r.flops_useful, r.flops_executed, r.matmuls.flops if r.matmuls else {})
            for dtype in split}
    peaks = {dtype: max(peaks.get(dtype, 0.0), gemm_peak(getattr(torch, dtype), peak_size)) for dtype in sorted(used | set(peaks))}
    text = report(args.shape, results, peaks, torch.get_num_threads())
    for r in results:
        if r.profile_table:
            print(f"--- profile of one {r.name} step\n{r.profile_table}")
    print(text, flush=True)
    if args.json:
        payload = {"shape": args.shape, "threads": torch.get_num_threads(), "gemm_peak_flops": peaks,
                   "torch": torch.__version__, "results": [asdict(r) | {"profile_table": ""} for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0
