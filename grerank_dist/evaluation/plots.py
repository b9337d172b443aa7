"""PNG plots of a run: retrieval metrics over training, and the mask statistic of the paper's Fig. 5."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def plot_metric_history(
    history: Sequence[Mapping[str, Any]], keys: Sequence[str], out_png: str | Path, title: str,
    references: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """One line per metric key over ``history`` (dicts with a ``step``); horizontal dashed lines
    for reference methods (e.g. the retriever's order) measured once."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    steps = [h["step"] for h in history]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(keys):
        ax.plot(steps, [h.get(key) for h in history], marker="o", color=colors[i % len(colors)], label=key)
        for j, (name, metrics) in enumerate((references or {}).items()):
            if metrics.get(key) is not None:
                ax.axhline(metrics[key], color=colors[i % len(colors)], linestyle=("--", ":", "-.")[j % 3],
                           linewidth=1, label=f"{key} ({name})")
    ax.set_xlabel("training step")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def plot_mask_weight(train_log: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path:
    """Per training step, the mean over queries of the largest normalised reranker weight
    max_i softmax(kappa*w/tau)_i (the paper's Fig. 5) and of the largest sampled mask weight."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for key, label in (("train/mean_max_weight", "reranker weight, max_i softmax(κw/τ) (Fig. 5)"),
                       ("train/mean_max_mask", "sampled relaxed mask, max_i M_i")):
        points = [(r["step"], r[key]) for r in train_log if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean over queries of the largest weight")
    ax.set_ylim(0, 1.02)
    ax.set_title("Largest document weight per query over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
