"""Everything DeepSpeed, in one object: process group, the two engines, backward/step, checkpoints.

The recipe (``grerank_dist.train``) never touches an engine directly. Two engines live in one
process: the frozen generator under ZeRO-3 (or stage 0, replicated) with no optimizer, and the
data-parallel reranker under ZeRO 0/1/2 with the optimizer. ``backward`` and ``step`` go through
the reranker engine only; the generator is called through its module (calling the ZeRO-3 engine
itself would make the reranker's ``engine.backward`` refuse the loss).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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

from grerank_dist.config import ConfigError, TrainConfig, load_json_with_overrides, resolve_path  # noqa: E402

LATEST = "latest"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        """True on every rank when ``flag`` is True on any rank (keeps ranks in lock step)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
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
        engine, *_ = deepspeed.initialize(model=model, config=self.generator_ds_config())
        self.generator_engine = engine
        return engine.module

    def build_reranker_engine(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> torch.nn.Module:
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.reranker_ds_config()
        )
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

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, ckpt_dir: Path, step: int, client_state: dict[str, Any], export_fn: Any = None) -> Path:
        """Write the full training state for ``step`` atomically and point ``latest`` at it.

        Every rank writes into ``step_N.partial``; rank 0 adds the exported reranker
        (``export_fn(dir)``), renames the directory to ``step_N`` and then replaces ``latest``
        (a temp file + rename), so a crash at any point leaves the previous checkpoint current.
        """
        ckpt_dir = Path(ckpt_dir)
        tag = f"step_{step}"
        partial = f"{tag}.partial"
        if self.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(ckpt_dir / partial, ignore_errors=True)
        self.barrier()
        self.reranker_engine.save_checkpoint(str(ckpt_dir), tag=partial, client_state=client_state, save_latest=False)
        self.barrier()
        if self.is_main:
            if export_fn is not None:
                export_fn(ckpt_dir / partial / "reranker")
            final = ckpt_dir / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(ckpt_dir / partial, final)
            tmp = ckpt_dir / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, ckpt_dir / LATEST)
            self._prune(ckpt_dir, keep=self.config.train.keep_last)
        self.barrier()
        return ckpt_dir / tag

    @staticmethod
    def _prune(ckpt_dir: Path, keep: int) -> None:
        steps = sorted(
            (p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")),
            key=lambda p: int(p.name.split("_")[1]),
        )
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def latest_tag(ckpt_dir: Path) -> str | None:
        pointer = Path(ckpt_dir) / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (Path(ckpt_dir) / tag).is_dir() else None

    def load_checkpoint(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        path, client_state = self.reranker_engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir}/{tag}: DeepSpeed found no checkpoint to load")
        return client_state or {}

    def write_json(self, path: Path, payload: dict[str, Any]) -> None:
        """Rank 0 writes a JSON file atomically."""
        if not self.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, path)
