"""`grerank demo --quick`: every stage runs and writes every artifact."""

import json
import subprocess
import sys
from pathlib import Path

from test_train import ROOT, check, clean_env


def test_quick_demo_writes_every_artifact(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "grerank_dist.cli", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=clean_env(), cwd=ROOT)
    check(result)
    for name in ("results.md", "summary.json", "retrieval_over_training.png", "mask_weight_over_training.png",
                 "data/train.jsonl", "data/test.jsonl", "reader/config.json", "initial_reranker/model.safetensors",
                 "train/reranker/model.safetensors", "train/metrics.jsonl"):
        assert (out / name).is_file(), name
    for setting in ("reranker", "generator", "mining"):
        metrics = json.loads((out / "eval" / setting / "metrics.json").read_text())
        assert set(metrics["methods"]) == {"initial", "g-rerank", "retriever", "oracle"}
        assert metrics["methods"]["oracle"]["recall@2"] == 1.0
        if setting == "generator":
            assert "subem" in metrics["methods"]["g-rerank"]
    summary = json.loads((out / "summary.json").read_text())
    assert [point["step"] for point in summary["history"]] == [0, 2, 4]
    assert (out / "results.md").read_text().startswith("# G-Rerank demo")
    assert Path(out / "retrieval_over_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
