"""Run logs: a JSON-lines metrics file and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the scalars to
    TensorBoard under ``tensorboard/``. On ranks other than 0 every call is a no-op.

    ``resume_step``: the step the run (re)starts from. Records after it were logged by an
    earlier run past its last checkpoint and are logged again now, so they are dropped first
    (and TensorBoard purges them), leaving each step in the file once.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
        self._jsonl = path.open("a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": v for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self._writer.add_scalar(f"{prefix}/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()


def _step_of(line: str) -> int | None:
    """The step of one metrics line; None for a blank line or one a killed run left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class ThroughputWindow:
    """Throughput over a logging window rather than one step's sample: queries per second of
    wall time since the last log (logging and checkpoints included), and the mean per-step
    wait for batches (DataLoader workers prepare them during the step) apart from the model step."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._reset()

    def _reset(self) -> None:
        self._start = self._clock()
        self._queries = 0
        self._steps = 0
        self._data_time = 0.0
        self._step_time = 0.0

    def add_step(self, queries: int, data_time: float, step_time: float) -> None:
        self._queries += queries
        self._steps += 1
        self._data_time += data_time
        self._step_time += step_time

    def summary(self) -> dict[str, float]:
        """The window's rates and mean times; starts the next window."""
        elapsed = self._clock() - self._start
        steps = max(1, self._steps)
        values = {
            "queries_per_s": self._queries / elapsed if elapsed > 0 else float("nan"),
            "data_time_s": self._data_time / steps,
            "step_time_s": self._step_time / steps,
        }
        self._reset()
        return values


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
