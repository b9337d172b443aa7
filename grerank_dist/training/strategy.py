"""Everything DeepSpeed, in one object: process group, the two engines, backward/step, checkpoints.

The recipe (``grerank_dist.training.train``) never touches an engine directly. Two engines live in one
process: the frozen generator under ZeRO-3 (or stage 0, replicated) with no optimizer, and the
data-parallel reranker under ZeRO 0/1/2 with the optimizer. ``backward`` and ``step`` go through
the reranker engine only; the generator is called through its module (calling the ZeRO-3 engine
itself would make the reranker's ``engine.backward`` refuse the loss).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at import; without this it looks for CUDA on CPU machines.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from grerank_dist.atomic import file_hashes, write_text
from grerank_dist.config import ConfigError, TrainConfig, load_json_with_overrides, resolve_path  # noqa: E402

LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module states file in every checkpoint
STEP_DIR = re.compile(r"step_\d+")
LEFTOVER_DIR = re.compile(r"step_\d+\.(partial|old|tmp)")  # the stages of a save (see save_checkpoint)
TRAINER_STATE = "trainer_state.json"  # in each step: the recipe's own state (the step), JSON
CHECKPOINT_MANIFEST = "grerank_manifest.json"  # in each step, written last: run id and every file's sha256
RUN_ID = "run_id"  # in the checkpoints directory: the run its steps' manifests must name


class CheckpointVerificationError(RuntimeError):
    """A checkpoint that does not match the manifest its run wrote; DeepSpeed, which unpickles
    checkpoint files (and so runs any code in them), is never given it."""


def is_complete(step_dir: Path) -> bool:
    """A checkpoint directory DeepSpeed finished writing."""
    return (Path(step_dir) / MODEL_STATES).is_file()


def checkpoint_problem(ckpt_dir: Path, step_dir: Path) -> str | None:
    """What keeps ``step_dir`` from being this run's checkpoint as saved, or None: its manifest
    must name the run in ``ckpt_dir/run_id`` and list exactly its files, each with its sha256."""
    manifest_file = step_dir / CHECKPOINT_MANIFEST
    if not manifest_file.is_file():
        return f"{manifest_file}: missing (a checkpoint not saved by this version of grerank train)"
    try:
        manifest = json.loads(manifest_file.read_text())
        saved_by, expected = str(manifest["run_id"]), dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest_file}: not a checkpoint manifest ({exc!r})"
    run_file = ckpt_dir / RUN_ID
    run = run_file.read_text().strip() if run_file.is_file() else "(missing)"
    if run != saved_by:
        return f"{step_dir} was saved by run {saved_by}, but {run_file} names run {run}"
    actual = file_hashes(step_dir)
    del actual[CHECKPOINT_MANIFEST]
    for name in sorted(expected.keys() | actual.keys()):
        path = step_dir / name
        if name not in actual:
            return f"{path}: listed in {manifest_file} but missing"
        if name not in expected:
            return f"{path}: not in the manifest {manifest_file}"
        if actual[name] != expected[name]:
            return f"{path}: sha256 {actual[name]} does not match {expected[name]} in {manifest_file}"
    return None


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a checkpoint file (no data copied); copy it where the file system cannot."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown_distributed(synchronize: bool = True) -> None:
    """Stop DeepSpeed's comms logger and destroy the process group, before the interpreter exits.

    A gloo group left alive is torn down by static destructors at exit, while its threads may
    still be joinable: the process then aborts ("terminate called without an active exception",
    SIGABRT) after its work succeeded, and torchrun reports the rank as failed. ``synchronize``
    waits for every rank first, so that none closes its sockets while a peer still talks to it;
    pass False on an error path, where a peer may never arrive.
    """
    if not dist.is_initialized():
        return
    import deepspeed.comm as ds_comm

    ds_comm.configure(enabled=False)
    if synchronize:
        dist.barrier()
    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()


def _ensure_single_process_env() -> None:
    """Without a launcher, pretend to be rank 0 of 1 (DeepSpeed otherwise goes looking for MPI)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": os.environ.get("LOCAL_RANK", "0"),
            "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port())),
        }
    )


class DeepSpeedStrategy:
    """Owns distributed state and both DeepSpeed engines for one training or evaluation run."""

    def __init__(self, config: TrainConfig, local_rank: int | None = None) -> None:
        self.config = config
        if local_rank is not None and local_rank >= 0:
            os.environ.setdefault("LOCAL_RANK", str(local_rank))
        _ensure_single_process_env()
        if not torch.cuda.is_available():
            # The shared-memory all-reduce op is JIT-compiled on CPU (~40 s) and serves only
            # inference all-reduce; training works without it.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Host-side flags (a stop signal) are agreed over a CPU group: deciding them every step
        # never waits for the GPU's queued work, as an all-reduce on a CUDA tensor would.
        self._host_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.dtype = self._resolve_dtype(config.generator.dtype)  # the generator's
        self.reranker_dtype = self._resolve_dtype(config.reranker.dtype)
        self.generator_engine: Any = None
        self.reranker_engine: Any = None

    # ----------------------------------------------------------------- basics
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _resolve_dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, name)

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a float tensor (for logging; not on the gradient path)."""
        out = value.detach().float().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (keeps ranks in lock step); a CPU
        all-reduce, so it costs no device synchronisation."""
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._host_group)
        return bool(value.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    # ----------------------------------------------------------------- configs
    def _ds_config(self, key: str, overrides: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        path = resolve_path(self.config, getattr(self.config.deepspeed, key))
        tree = load_json_with_overrides(path, overrides)
        for section in ("optimizer", "scheduler"):
            if section in tree:
                raise ConfigError(
                    f"{path}: remove the '{section}' section: the optimizer and schedule come from the "
                    "training config's train.* keys (torch AdamW with warmup and decay)"
                )
        tree.setdefault("zero_optimization", {})
        tree["train_micro_batch_size_per_gpu"] = self.config.train.micro_batch_size
        tree.pop("train_batch_size", None)
        tree["bf16"] = {"enabled": dtype == torch.bfloat16}
        tree["fp16"] = {"enabled": dtype == torch.float16}
        tree.setdefault("steps_per_print", 10**9)
        tree.setdefault("wall_clock_breakdown", False)
        return tree

    def generator_ds_config(self) -> dict[str, Any]:
        tree = self._ds_config("generator_config", self.config.deepspeed.generator_overrides, self.dtype)
        tree["gradient_accumulation_steps"] = 1  # the generator never steps
        stage = tree["zero_optimization"].get("stage", 3)
        if stage not in (0, 3):
            raise ConfigError(
                f"{self.config.deepspeed.generator_config}: zero_optimization.stage must be 3 (sharded) or "
                f"0 (replicated) for the frozen generator, got {stage}"
            )
        return tree

    def reranker_ds_config(self) -> dict[str, Any]:
        tree = self._ds_config("reranker_config", self.config.deepspeed.reranker_overrides, self.reranker_dtype)
        tree["gradient_accumulation_steps"] = self.config.train.gradient_accumulation_steps
        tree["gradient_clipping"] = float(self.config.train.max_grad_norm)
        stage = tree["zero_optimization"].get("stage", 1)
        if stage not in (0, 1, 2):
            raise ConfigError(
                f"{self.config.deepspeed.reranker_config}: zero_optimization.stage must be 0, 1 or 2 for the "
                f"reranker (it is exported from every rank's full copy), got {stage}"
            )
        return tree

    # ----------------------------------------------------------------- engines
    @contextmanager
    def generator_loading(self) -> Iterator[None]:
        """Load the generator inside this block: under ZeRO-3, ``from_pretrained`` then partitions
        each weight as it is read (transformers' ``HfDeepSpeedConfig``), so no rank ever holds the
        whole model. The hook is dropped on exit, so the reranker built next stays whole."""
        from transformers.integrations import HfDeepSpeedConfig

        ds_config = self.generator_ds_config()
        hook = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage", 3) == 3 else None
        try:
            yield
        finally:
            del hook

    def build_generator_engine(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap the frozen generator (ZeRO-3: partitioned parameters, no optimizer) and return
        the module to call. All parameters must already be frozen and in ``self.dtype``."""
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the generator must be frozen, but {len(trainable)} parameters require grad: {trainable[:3]}")
        ds_config = self.generator_ds_config()
        self._ensure_hpz_group(ds_config)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.generator_engine = engine
        return engine.module

    @staticmethod
    def _ensure_hpz_group(ds_config: dict[str, Any]) -> None:
        """Create the intra-node parameter group of hierarchical partitioning (hpZ) before the
        engine: a model built outside ``deepspeed.zero.Init`` leaves it to the engine, whose
        no-optimizer path in DeepSpeed 0.19.8 calls a method only the ZeRO-3 optimizer has
        ("'DeepSpeedEngine' object has no attribute '_set_zero_group_parallelism'")."""
        zero = ds_config["zero_optimization"]
        hpz = int(zero.get("zero_hpz_partition_size", 1))
        if zero.get("stage", 3) == 3 and hpz > 1:
            from deepspeed.utils import groups

            if groups._get_zero_param_intra_parallel_group() is None:
                groups._create_zero_param_parallel_group(hpz)

    @staticmethod
    def adamw_options(device: torch.device) -> dict[str, Any]:
        """torch AdamW's fused kernel (one pass over each parameter's state) on CUDA and CPU, the
        devices where torch has it for every floating dtype. On CPU it is ~5x the default
        (foreach) step: 26 vs 143 ms for 37M parameters on 2 threads (torch 2.13),
        where the foreach step reads and writes each state tensor in several passes."""
        return {"fused": True} if device.type in ("cuda", "cpu") else {}

    def reranker_optimizer(self, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """The reranker's client optimizer (DeepSpeed steps it on its own partitions)."""
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **self.adamw_options(self.device))

    def build_reranker_engine(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> torch.nn.Module:
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.reranker_ds_config()
        )
        if self.config.reranker.compile:
            # torch.compile of the module inside the engine (DeepSpeed's own entry point)
            engine.compile(backend=self.config.reranker.compile)
        self.reranker_engine = engine
        return engine

    # ----------------------------------------------------------------- training
    def backward(self, loss: torch.Tensor) -> None:
        if not loss.requires_grad:
            raise RuntimeError("the loss has no gradient path to the reranker (check the objective)")
        self.reranker_engine.backward(loss)

    def step(self) -> None:
        self.reranker_engine.step()

    def at_step_boundary(self) -> bool:
        return self.reranker_engine.is_gradient_accumulation_boundary()

    def grad_norm(self) -> float | None:
        norm = self.reranker_engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def learning_rate(self) -> float:
        return float(self.reranker_engine.get_lr()[0])

    def begin_generator_step(self) -> None:
        """Start a new pass of the generator: ZeRO-3 traces the order in which its modules fetch
        parameters and prefetches along that trace, but it resets the trace only in a forward
        hook of the top-level module, which the interface methods (encode_contexts,
        answer_logprobs, generate) never call. Called once per micro-step, it does that reset."""
        offload = getattr(self.generator_engine, "optimizer", None)
        if offload is not None and hasattr(offload, "get_param_coordinator"):
            offload.get_param_coordinator().reset_step()

    def release_generator_params(self) -> None:
        """Drop any ZeRO-3 parameters still gathered (after eval or generation, whose module
        order differs from training) so the next traced step starts clean."""
        engine = self.generator_engine
        offload = getattr(engine, "optimizer", None)  # ZeRO-3 without optimizer: DeepSpeedZeRoOffload
        if offload is not None and hasattr(offload, "get_param_coordinator"):
            offload.get_param_coordinator().release_and_reset_all(engine.module)

    def destroy_engines(self) -> None:
        """Free both engines and what they hold (DeepSpeed's hooks keep an engine alive after
        the last reference to it is dropped), so that a process can build others after them:
        the benchmarks build one pair per variant."""
        for engine in (self.generator_engine, self.reranker_engine):
            if engine is not None:
                engine.destroy()
        self.generator_engine = self.reranker_engine = None

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, ckpt_dir: Path, step: int, client_state: dict[str, Any], export_fn: Any = None) -> Path:
        """Write the full training state for ``step`` and point ``latest`` at it, such that
        ``latest`` names a complete checkpoint at every instant and no complete one is deleted
        before its successor is in place.

        Every rank writes into ``step_N.partial``; every rank calls ``export_fn(dir)`` (it may
        gather weights; rank 0 writes the reranker into the checkpoint). Rank 0 then renames
        the directory to ``step_N`` and replaces ``latest`` (a temp file + rename). Saving a
        step that already exists (a run resumed from an earlier checkpoint reaches it again)
        takes more care, since ``latest`` may name the old ``step_N``: ``latest`` first names
        the complete ``step_N.partial``, the old directory moves aside to ``step_N.old``, a
        hard-linked copy of the new one is renamed to ``step_N``, ``latest`` names it, and only
        then are the old and the partial directories deleted.

        ``client_state`` (the recipe's own state) is written as JSON beside DeepSpeed's files.
        Before the rename, once every rank's files and the export are written, rank 0 writes
        the manifest that ``load_checkpoint`` checks: this run's id (``checkpoints/run_id``,
        made at the run's first save) and the sha256 of every file of the step.
        """
        ckpt_dir = Path(ckpt_dir)
        tag = f"step_{step}"
        partial = ckpt_dir / f"{tag}.partial"
        if self.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for leftover in (f"{tag}.old", f"{tag}.tmp"):  # of a crash mid-save; `latest` never names them
                shutil.rmtree(ckpt_dir / leftover, ignore_errors=True)
            if self._pointer(ckpt_dir) == partial.name:  # a crash left `latest` there: finish that save
                self._install(ckpt_dir, tag)
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier()
        self.reranker_engine.save_checkpoint(str(ckpt_dir), tag=partial.name, save_latest=False)
        self.barrier()
        if export_fn is not None:
            export_fn(partial / "reranker")
        if self.is_main:
            write_text(partial / TRAINER_STATE, json.dumps(client_state))
            self._write_manifest(ckpt_dir, partial)
            self._install(ckpt_dir, tag)
            self._prune(ckpt_dir, keep=self.config.train.keep_last)
        self.barrier()
        return ckpt_dir / tag

    @staticmethod
    def _write_manifest(ckpt_dir: Path, step_dir: Path) -> None:
        """The last file of a checkpoint: the run's id (made here at the run's first save) and
        the sha256 of every other file (see ``checkpoint_problem``)."""
        run_file = ckpt_dir / RUN_ID
        if not run_file.is_file():
            write_text(run_file, uuid.uuid4().hex)
        manifest = {"run_id": run_file.read_text().strip(), "files": file_hashes(step_dir)}
        write_text(step_dir / CHECKPOINT_MANIFEST, json.dumps(manifest, indent=2))

    def start_new_run(self, ckpt_dir: Path) -> None:
        """A run starting from no checkpoint drops the run id, so steps an earlier run left in
        ``ckpt_dir`` (``--resume none``) no longer verify as this run's; its first save makes one."""
        if self.is_main:
            (Path(ckpt_dir) / RUN_ID).unlink(missing_ok=True)

    def _install(self, ckpt_dir: Path, tag: str) -> None:
        """Give the complete ``tag.partial`` checkpoint its final name and point ``latest`` at it
        (see ``save_checkpoint``); a plain rename where nothing is in the way."""
        partial, aside, linked, final = (ckpt_dir / f"{tag}{suffix}" for suffix in (".partial", ".old", ".tmp", ""))
        if not final.exists() and self._pointer(ckpt_dir) != partial.name:
            os.replace(partial, final)
        else:
            self._point_latest(ckpt_dir, partial.name)
            if final.exists():
                os.replace(final, aside)
            shutil.copytree(partial, linked, copy_function=_link_or_copy)
            os.replace(linked, final)
        self._point_latest(ckpt_dir, tag)
        for done in (aside, partial):
            shutil.rmtree(done, ignore_errors=True)

    @staticmethod
    def _point_latest(ckpt_dir: Path, tag: str) -> None:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)

    @staticmethod
    def _pointer(ckpt_dir: Path) -> str | None:
        pointer = Path(ckpt_dir) / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    @staticmethod
    def _complete_steps(ckpt_dir: Path) -> list[Path]:
        """The ``step_N`` directories holding a checkpoint, oldest first."""
        steps = [p for p in Path(ckpt_dir).glob("step_*") if STEP_DIR.fullmatch(p.name) and is_complete(p)]
        return sorted(steps, key=lambda p: int(p.name.split("_")[1]))

    @classmethod
    def _prune(cls, ckpt_dir: Path, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints and what crashed saves left behind,
        never the one ``latest`` names."""
        current = cls._pointer(ckpt_dir)
        leftovers = [p for p in Path(ckpt_dir).glob("step_*") if LEFTOVER_DIR.fullmatch(p.name)]
        for old in cls._complete_steps(ckpt_dir)[:-keep] + leftovers:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)

    def resume_tag(self, ckpt_dir: Path) -> str | None:
        """The checkpoint ``--resume auto`` continues from: the one ``latest`` names, else (it
        names a missing or incomplete directory) the newest complete ``step_N``, said in the
        log. None only where no checkpoint was ever written; an error where ``latest`` exists
        but no complete checkpoint does (starting over would overwrite the run)."""
        ckpt_dir = Path(ckpt_dir)
        current = self._pointer(ckpt_dir)
        if current is not None and is_complete(ckpt_dir / current):
            return current
        steps = self._complete_steps(ckpt_dir)
        if current is None and not steps:
            return None
        if current is None:
            problem = f"{ckpt_dir / LATEST} is missing"
        else:
            target = ckpt_dir / current
            state = "is missing" if not target.exists() else f"is incomplete (no {MODEL_STATES})"
            problem = f"{ckpt_dir / LATEST} names {target}, but {target} {state}"
        if not steps:
            raise FileNotFoundError(
                f"{problem}, and {ckpt_dir} holds no other complete checkpoint: restore it, or pass "
                "--resume none to start over (this overwrites the run's checkpoints)"
            )
        if self.is_main:
            print(f"{problem}; resuming from the newest complete checkpoint {steps[-1]}", flush=True)
        return steps[-1].name

    def reranker_master_weights(self) -> dict[str, torch.Tensor] | None:
        """The reranker's fp32 master weights by parameter name, where the engine trains a
        lower-precision copy (bf16/fp16): the optimizer's fp32 partitions, gathered over the
        data-parallel ranks (ZeRO 1/2, and the bf16 optimizer), or its replicated fp32 copies
        (stage 0). None where the module's weights are the masters.
        Collective under ZeRO 1/2: every rank calls it."""
        engine = self.reranker_engine
        if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
            return None
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.utils import safe_get_full_fp32_param

        optimizer = engine.optimizer
        replicated: dict[torch.nn.Parameter, torch.Tensor] = {}
        if isinstance(optimizer, FP16_UnfusedOptimizer):  # stage 0 with the recipe's torch AdamW
            for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
                replicated.update(zip(group, masters))
        masters = {}
        for name, param in engine.module.named_parameters():
            if not param.requires_grad:  # frozen (LoRA's base): no master copy, exported as it is
                continue
            full = replicated[param] if param in replicated else safe_get_full_fp32_param(param)
            if full is None:
                raise RuntimeError(f"reranker parameter {name}: the optimizer holds no fp32 master copy of it")
            masters[name] = full.detach().cpu()
        return masters

    def load_checkpoint(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        """Load checkpoint ``tag`` into the reranker engine and return the recipe's state saved
        with it. DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs
        any code a pickle holds, so every rank first checks the step against its manifest, and
        all refuse together if any rank finds a file changed, missing or extra, or the step
        saved by another run. The recipe's own state is JSON."""
        step_dir = Path(ckpt_dir) / tag
        if not step_dir.is_dir():
            raise FileNotFoundError(f"{step_dir}: no such checkpoint")
        problems = [p for p in self.all_gather_object(checkpoint_problem(Path(ckpt_dir), step_dir)) if p]
        if problems:
            raise CheckpointVerificationError(
                f"{problems[0]}; not resuming from {step_dir}: DeepSpeed would unpickle its files, which can run "
                "code. Resume only checkpoints this run wrote: restore the file, name another checkpoint with "
                "--resume step_N, or start over with --resume none"
            )
        path, _ = self.reranker_engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"{step_dir}: DeepSpeed found no checkpoint to load")
        return json.loads((step_dir / TRAINER_STATE).read_text())

    def write_json(self, path: Path, payload: dict[str, Any]) -> None:
        """Rank 0 writes a JSON file atomically."""
        if not self.is_main:
            return
        write_text(path, json.dumps(payload, indent=2, default=str))
