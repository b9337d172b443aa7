"""`grerank export`: a DeepSpeed training checkpoint -> a reranker directory the usual tools load.

    grerank export --checkpoint runs/x/checkpoints/step_200 --out my-reranker [--base DIR]

The weights come from DeepSpeed's module states (``mp_rank_00_model_states.pt``, read with
``torch.load(weights_only=True)``); the architecture and tokenizer from ``--base`` (default:
the ``reranker/`` directory saved beside the checkpoint, or the run's final export). LoRA
adapters are merged, so the result is a plain ``AutoModelForSequenceClassification`` directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from grerank_dist.config import LoraConfig
from grerank_dist.models.reranker import export_reranker, load_reranker
from grerank_dist.training.strategy import LATEST, MODEL_STATES, checkpoint_problem


def _resolve_checkpoint(path: Path) -> Path:
    """Accept a step directory or a checkpoints directory with a ``latest`` pointer."""
    if (path / MODEL_STATES).is_file():
        return path
    if (path / LATEST).is_file():
        step = path / (path / LATEST).read_text().strip()
        if (step / MODEL_STATES).is_file():
            return step
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint here (expected {MODEL_STATES} or a '{LATEST}' pointer)")


def _default_base(step_dir: Path) -> Path:
    for candidate in (step_dir / "reranker", step_dir.parent.parent / "reranker"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{step_dir}: no reranker directory beside the checkpoint to take the architecture and tokenizer "
        "from; pass --base with the reranker the run started from"
    )


def _fp32_masters(step_dir: Path) -> dict[str, torch.Tensor]:
    """A bf16/fp16 engine's module states are the rounded copy: rebuild the fp32 master weights
    from the optimizer partitions of all ranks (DeepSpeed's zero_to_fp32, ZeRO stages 1-3)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not any(step_dir.glob("*zero_pp_rank_*optim_states.pt")):
        raise ValueError(
            f"{step_dir}: the module states are bf16/fp16 and the fp32 master weights are not in ZeRO "
            "optimizer partitions (a stage-0 run): use the reranker/ export saved inside the checkpoint"
        )
    # zero_to_fp32 unpickles the optimizer files (torch.load weights_only=False): only files this
    # run wrote, as its manifest lists them, are read.
    problem = checkpoint_problem(step_dir.parent, step_dir)
    if problem:
        raise ValueError(f"{step_dir}: refusing to unpickle its optimizer files: {problem}")
    masters = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return {name: tensor.float() for name, tensor in masters.items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Write the reranker held by a DeepSpeed checkpoint to ``out_dir`` (safetensors)."""
    step_dir = _resolve_checkpoint(Path(checkpoint))
    base_dir = Path(base) if base else _default_base(step_dir)
    states = torch.load(step_dir / MODEL_STATES, map_location="cpu", weights_only=True)
    module_state = states["module"]
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in module_state.values()):
        module_state.update(_fp32_masters(step_dir))
    lora = None
    if any(key.startswith("base_model.model.") for key in module_state):
        run_config = json.loads((base_dir / "grerank_training_config.json").read_text())
        lora = LoraConfig(**run_config["reranker"]["lora"])
    model, tokenizer = load_reranker(base_dir, lora=lora)
    missing, unexpected = model.load_state_dict(module_state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{step_dir / MODEL_STATES}: weights do not fit the reranker in {base_dir}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    training_config = None
    if (base_dir / "grerank_training_config.json").is_file():
        training_config = json.loads((base_dir / "grerank_training_config.json").read_text())
    return export_reranker(model, tokenizer, out_dir, training_config)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a step_N directory, or OUTPUT/checkpoints (uses 'latest')")
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically if it exists)")
    parser.add_argument("--base", default=None, help="reranker directory giving architecture and tokenizer")


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, args.base)
    print(f"exported reranker to {out}")
    return 0
