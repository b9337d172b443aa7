"""`grerank mine` (App. F) on the toy task with a trained tiny reader: the learned per-document
weights rank the one answer-bearing candidate first, and the metrics of the scalar baselines are
written next to them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grerank_dist.cli import main as cli_main
from toy import toy_records, train_toy_reader, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    torch.manual_seed(0)
    return train_toy_reader(toy_records(400, 6, seed=3), tmp_path_factory.mktemp("reader") / "reader")


def test_mine_recovers_the_gold_candidate_and_reports_the_scalar_baselines(tmp_path, reader, capsys):
    data = write_jsonl(tmp_path / "mine.jsonl", toy_records(24, 6, seed=11))
    out = tmp_path / "mine"
    code = cli_main(["mine", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--data", data, "--out", str(out),
                     "--steps", "30", "--k", "1", f"generator.path={reader}", "train.micro_batch_size=8", "relax.k=1"])
    assert code == 0
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    assert set(methods) == {"grerank_mined", "lowest_perplexity", "highest_attention", "largest_loo_drop"}
    recall = {name: m["recall@1"] for name, m in methods.items()}
    print(f"mining recall@1 on 24 toy queries: {recall}")
    assert recall["grerank_mined"] >= 0.9, recall
    rows = [json.loads(line) for line in (out / "relevance.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["grerank_mined"]) == len(r["ctx_ids"]) == 6 for r in rows)
    assert "grerank_mined" in capsys.readouterr().out.replace(" ", "_").lower() or (out / "metrics.md").exists()
