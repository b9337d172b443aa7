"""Generator placement on several ranks: bytes all-gathered per step, counted, beside the prediction.

    grerank bench --shape tiny --world-size 2 [--placements zero3,replicated,hpz] [--steps 3 --warmup 2]

Launches ``torch.distributed.run`` with ``--world-size`` CPU ranks (gloo); every rank builds the
engines of ``grerank_dist.perf.bench`` for each placement of the frozen generator (ZeRO-3
partitioned, stage 0 replicated, ZeRO-3 with hierarchical partitioning ``zero_hpz_partition_size``
= the world) and runs :func:`grerank_dist.training.train.training_step` itself. Collectives are counted by
DeepSpeed's own comms logger (``deepspeed.comm``: every collective DeepSpeed issues, with its
message size), split into the step's forward, backward and optimizer step; an all-gather's bytes
are its gathered buffer (input shard x group size), what lands on each rank. Memory is counted as
live tensor bytes (a ``TorchDispatchMode`` that follows every storage an op allocates until it
dies, over the tensors alive when the steps start): what ``torch.cuda.max_memory_allocated``
would report on a GPU, where process RSS would also count the interpreter, the allocator's
retained pages and the full model built before ZeRO-3 partitions it. Predictions come from
:mod:`grerank_dist.perf.cost_model` (shapes and config values only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

PLACEMENTS = ("zero3", "zero3-release", "replicated", "hpz")
# zero3-release: the repository's ZeRO-3 file with no reuse window and no prefetch, so every use
# of a parameter gathers it (what a 7B generator sees, whose layers do not fit a reuse window).
RELEASE_EVERY_USE = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}


# ---------------------------------------------------------------------------------------- counting


def logged_collectives() -> dict[str, tuple[int, int]]:
    """(calls, bytes) per collective logged so far by DeepSpeed's comms logger; all-gather bytes
    are the gathered buffer (the logged input shard x the world size)."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    totals: dict[str, tuple[int, int]] = {}
    for op, by_size in dist.comms_logger.get_raw_data().items():
        scale = world if op.startswith("all_gather") else 1
        calls = sum(record[0] for record in by_size.values())
        nbytes = sum(size * record[0] * scale for size, record in by_size.items())
        totals[op] = (calls, nbytes)
    return totals


def collective_delta(after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """What was logged between two :func:`logged_collectives` snapshots."""
    delta = {}
    for op, (calls, nbytes) in after.items():
        c0, b0 = before.get(op, (0, 0))
        if calls > c0:
            delta[op] = (calls - c0, nbytes - b0)
    return delta


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector knows of."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


class TensorMemoryMeter(TorchDispatchMode):
    """Live bytes of the storages allocated by ops inside the block, and their peak.

    Each new storage is counted once (views share it) and uncounted when it is freed (a weak
    reference's callback), so ``peak`` is the most tensor memory the block held at once on top of
    what existed before it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._sizes:
            return
        nbytes = storage.nbytes()
        self._sizes[storage] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def freed(_: Any, nbytes: int = nbytes) -> None:
            self.live -= nbytes

        self._refs.append(weakref.ref(storage, freed))


# ---------------------------------------------------------------------------------------- one rank


@dataclass
class PlacementResult:
    placement: str
    world_size: int
    steps: list[dict[str, dict[str, tuple[int, int]]]]  # per steady step: phase -> op -> (calls, bytes)
    resident_bytes: int  # tensors alive when the steady steps start
    peak_step_bytes: int  # most tensor bytes allocated inside a steady step and alive at once
    ds_config: dict[str, Any]
    predicted: dict[str, int]  # the cost model's numbers for this placement (shapes and configs only)
    error: str = ""


def placement_overrides(placement: str, world_size: int, zero: dict[str, Any]) -> list[str]:
    """Training-config overrides that put the generator where ``placement`` says, with ``zero``
    merged into its ``zero_optimization`` section (ZeRO-3 placements only)."""
    from grerank_dist.perf.shapes import DS_CONFIGS

    files = {"zero3": "generator_zero3.json", "zero3-release": "generator_zero3.json",
             "replicated": "generator_replicated.json", "hpz": "generator_zero3_hpz.json"}
    section = {} if placement == "replicated" else dict(zero)
    if placement == "zero3-release":
        section.update(RELEASE_EVERY_USE)
    if placement == "hpz":
        section["zero_hpz_partition_size"] = world_size
    overrides = [f"deepspeed.generator_config={DS_CONFIGS / files[placement]}"]
    if section:  # an empty section would replace the file's zero_optimization (stage included)
        overrides.append(f"deepspeed.generator_overrides={json.dumps({'zero_optimization': section})}")
    return overrides


def run_placement(shape_name: str, placement: str, steps: int, warmup: int, seed: int, zero: dict[str, Any],
                  extra: list[str]) -> PlacementResult:
    """Build one placement's engines on this rank and count the collectives of its steps."""
    import deepspeed.comm as dist

    from grerank_dist.perf.shapes import SHAPES, bench_config, build_engines, synthetic_records
    from grerank_dist.method.relax import noise_generator
    from grerank_dist.training.train import training_step

    shape = SHAPES[shape_name]
    world = int(os.environ["WORLD_SIZE"])
    config = bench_config(shape, "efficient", placement_overrides(placement, world, zero) + extra)
    gc.collect()
    before = live_tensor_bytes()  # earlier placements' leftovers are not this one's
    built = build_engines(shape, config, seed)
    strategy = built.strategy
    records = synthetic_records(shape, shape.batch * (warmup + steps) * world, seed)
    batches = []
    for s in range(warmup + steps):
        first = (s * world + strategy.rank) * shape.batch
        batches.append(built.collate(records[first : first + shape.batch], list(range(shape.batch))))

    marks: dict[str, dict[str, tuple[int, int]]] = {}
    backward, step = strategy.backward, strategy.step

    def marked_backward(loss: torch.Tensor) -> None:
        marks["backward"] = logged_collectives()
        backward(loss)

    def marked_step() -> None:
        marks["step"] = logged_collectives()
        step()

    strategy.backward, strategy.step = marked_backward, marked_step
    dist.configure(enabled=True, prof_all=True, verbose=False)
    per_step: list[dict[str, dict[str, tuple[int, int]]]] = []
    resident = peak = 0
    batch_bytes = sum(t.untyped_storage().nbytes() for b in batches for t in tree_flatten(vars(b))[0]
                      if isinstance(t, torch.Tensor))
    for s, batch in enumerate(batches):
        if s == warmup:
            gc.collect()
            resident = live_tensor_bytes() - batch_bytes - before
        dist.comms_logger.reset_data()
        start = logged_collectives()
        noise = noise_generator(config.seed, strategy.rank, s, strategy.device)
        with TensorMemoryMeter() as meter:
            training_step(strategy, built.reranker, built.generator, batch, config, noise)
        end = logged_collectives()
        if s >= warmup:
            peak = max(peak, meter.peak)
            per_step.append({"forward": collective_delta(marks["backward"], start),
                             "backward": collective_delta(marks["step"], marks["backward"]),
                             "step": collective_delta(end, marks["step"])})
    dist.configure(enabled=False)
    ds_config = strategy.generator_ds_config()
    predicted = predict(built, shape, batches[warmup:], ds_config, strategy.reranker_ds_config(), world)
    strategy.release_generator_params()
    del built, strategy, batches
    gc.collect()
    return PlacementResult(placement, world, per_step, resident, peak, ds_config, predicted)


def predict(built: Any, shape: Any, batches: list[Any], gen_ds: dict[str, Any], rr_ds: dict[str, Any],
            world: int) -> dict[str, int]:
    """The cost model's numbers for one placement: from the model classes on the meta device,
    the DeepSpeed configs and the batches' token counts; nothing read from the run."""
    from grerank_dist.perf import cost_model as cm
    from grerank_dist.models.cepe import CepeForCausalContextLM

    with torch.device("meta"):
        meta = CepeForCausalContextLM(built.model_config)
    zero = cm.ZeroSettings.from_ds_config(gen_ds, world, torch.finfo(built.strategy.dtype).bits // 8)
    schedule = cm.gather_schedule(cm.cepe_module_trace(meta), zero)
    rr_numel = sum(p.numel() for p in built.rr_model.parameters())
    rr_stage = rr_ds["zero_optimization"].get("stage", 0)
    activations = max(cm.bert_activation_bytes(built.rr_model.config, cm.batch_lengths(b, useful=False).pair_lengths)
                      for b in batches)
    bucket = cm.reduce_bucket_bytes(rr_ds)
    return {
        "gather_forward": schedule.forward_bytes, "gather_backward": schedule.backward_bytes,
        "gathers": schedule.forward_gathers + schedule.backward_gathers,
        "rr_all_reduce": rr_numel * 4 if world > 1 else 0,
        "rr_param_all_gather": cm.reranker_param_gather_bytes(rr_numel, world) if rr_stage in (1, 2) and world > 1 else 0,
        "resident": cm.generator_resident_bytes(((n, p.numel()) for n, p in meta.named_parameters()), zero)
        + cm.reranker_state_bytes(rr_numel, world, rr_stage),
        "step_gathered": schedule.peak_gathered_bytes, "step_bucket": bucket, "step_activations": activations,
        "step_peak": schedule.peak_gathered_bytes + bucket + activations,
    }


# ---------------------------------------------------------------------------------------- launcher


def launch(shape: str, world_size: int, placements: list[str], steps: int, warmup: int, seed: int,
           zero: dict[str, Any], overrides: list[str], timeout: int = 3000) -> list[list[dict[str, Any]]]:
    """Run :func:`rank_main` on ``world_size`` CPU ranks (torch.distributed.run, gloo); every
    rank's results, rank 0 first."""
    unknown = sorted(set(placements) - set(PLACEMENTS))
    if unknown:
        raise SystemExit(f"--placements: unknown {unknown}; choose from {', '.join(PLACEMENTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "traffic.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
                   "-m", "grerank_dist.perf.traffic", "--shape", shape, "--placements", ",".join(placements),
                   "--steps", str(steps), "--warmup", str(warmup), "--seed", str(seed), "--zero", json.dumps(zero),
                   "--out", str(out), *overrides]
        dist_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
        env = {k: v for k, v in os.environ.items() if k not in dist_vars}
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world_size)]


def measured(result: dict[str, Any]) -> dict[str, float]:
    """Mean per steady step of one rank's counted collectives, by what they carried."""
    def mean(phase: str, op: str) -> float:
        return sum(step[phase].get(op, (0, 0))[1] for step in result["steps"]) / len(result["steps"])

    gather_steps = [sum(step[p].get("all_gather_into_tensor", (0, 0))[0] for p in ("forward", "backward"))
                    for step in result["steps"]]
    return {
        "gather_forward": mean("forward", "all_gather_into_tensor"),
        "gather_backward": mean("backward", "all_gather_into_tensor"),
        "gathers": sum(gather_steps) / len(gather_steps),
        "rr_all_reduce": mean("backward", "all_reduce"),
        "rr_param_all_gather": mean("step", "all_gather_into_tensor"),
        "resident": result["resident_bytes"],
        "step_peak": result["peak_step_bytes"],
    }


def report(shape_name: str, batch: int, ranks: list[list[dict[str, Any]]]) -> str:
    """Measured (rank 0; every rank's byte counts must agree) beside predicted, per step and per query."""
    lines = [f"shape {shape_name}, {len(ranks)} ranks (gloo, CPU), B={batch} queries per rank per step; "
             "bytes per rank per steady step (mean), all-gathers as gathered buffers; "
             "memory as live tensor bytes (MB = 1e6 bytes)"]
    head = ["placement", "AG calls m / param gathers p", "AG fwd m", "AG fwd p", "AG bwd m", "AG bwd p", "AG/query m", "AG/query p",
            "rr AR m", "rr AR p", "rr AG m", "rr AG p", "resident MB m/p", "step peak MB m/p", "bucket MB"]
    lines.append(" | ".join(head))
    for index, result in enumerate(ranks[0]):
        if result.get("error"):
            lines.append(f"{result['placement']} | refused: {result['error']}")
            continue
        m, p = measured(result), result["predicted"]
        others = [measured(rank[index]) for rank in ranks[1:]]
        agree = all(o["gather_forward"] == m["gather_forward"] and o["gather_backward"] == m["gather_backward"]
                    for o in others)
        mb = 1e6
        cells = [result["placement"] + ("" if agree else " (ranks differ!)"), f"{m['gathers']:.0f}/{p['gathers']}",
                 f"{m['gather_forward']:.0f}", str(p["gather_forward"]), f"{m['gather_backward']:.0f}", str(p["gather_backward"]),
                 f"{(m['gather_forward'] + m['gather_backward']) / batch:.0f}",
                 f"{(p['gather_forward'] + p['gather_backward']) / batch:.0f}",
                 f"{m['rr_all_reduce']:.0f}", str(p["rr_all_reduce"]), f"{m['rr_param_all_gather']:.0f}",
                 str(p["rr_param_all_gather"]), f"{m['resident'] / mb:.2f}/{p['resident'] / mb:.2f}",
                 f"{m['step_peak'] / mb:.2f}/{p['step_peak'] / mb:.2f}", f"{p['step_bucket'] / mb:.0f}"]
        lines.append(" | ".join(cells))
    lines.append("m: measured (DeepSpeed comms logger; live-tensor meter); p: predicted (grerank_dist.perf.cost_model); "
                 "AG: generator parameter all-gathers; rr AR: reranker gradient all-reduce; rr AG: reranker "
                 "parameter all-gather after the ZeRO-1 step; resident: tensors alive between steps; step peak: "
                 "most tensor bytes allocated within a step and alive at once, of which 'bucket' is the ZeRO-1 "
                 "gradient staging buffer (reduce_bucket_size)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``grerank bench --world-size N``: launch the ranks, print measured beside predicted."""
    from grerank_dist.perf.shapes import SHAPES

    placements = [p for p in args.placements.split(",") if p]
    ranks = launch(args.shape, args.world_size, placements, args.steps, args.warmup, args.seed, json.loads(args.zero),
                   args.override)
    print(report(args.shape, SHAPES[args.shape].batch, ranks), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "world_size": args.world_size, "ranks": ranks}, indent=2))
    return 0


def rank_main(argv: list[str]) -> int:
    """One rank of ``--world-size`` (started by torch.distributed.run): every placement, one JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", required=True)
    parser.add_argument("--placements", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero", default="{}", help="JSON merged into the ZeRO-3 placements' zero_optimization")
    parser.add_argument("--out", required=True)
    parser.add_argument("override", nargs="*")
    args = parser.parse_args(argv)
    results = []
    for placement in args.placements.split(","):
        try:
            results.append(asdict(run_placement(args.shape, placement, args.steps, args.warmup, args.seed,
                                               json.loads(args.zero), args.override)))
        except Exception as exc:  # noqa: BLE001 - a placement DeepSpeed refuses is reported, not fatal
            results.append({"placement": placement, "error": f"{type(exc).__name__}: {exc}"})
    rank = int(os.environ["RANK"])
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(results))
    from grerank_dist.training.strategy import shutdown_distributed

    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
