"""scripts/parallel_reading.py: its data files (gold alone, the reranker's order) and one whole run
on a tiny random Llama, every row read back from calibrate's outputs into the written table."""

import importlib.util
import json
import sys

import pytest

from grerank_dist.demos.decoy_reading import generate_decoy_records
from test_train import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("parallel_reading", ROOT / "scripts" / "parallel_reading.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def fake_run_dir(tmp_path, records):
    """A run directory as reproduce_real.py leaves it: the test split and the evaluation's
    predictions, here with 'g-rerank' scores that reverse the file order."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "eval" / "reranker").mkdir(parents=True)
    (run / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = [{"id": r["id"], "methods": {"g-rerank": {"scores": [float(i) for i in range(len(r["ctxs"]))]}}} for r in records]
    (run / "eval" / "reranker" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_gold_alone_and_the_rerankers_order(tmp_path):
    script = load_script()
    records = generate_decoy_records(6, seed=3)
    gold = script.gold_alone(records)
    assert all(len(r["ctxs"]) == 1 and r["ctxs"][0]["kind"] == "gold" for r in gold)
    run = fake_run_dir(tmp_path, records)
    ordered = script.reranked(records, run / "eval" / "reranker" / "predictions.jsonl", "g-rerank")
    for before, after in zip(records, ordered):
        assert [c["id"] for c in after["ctxs"]] == [c["id"] for c in reversed(before["ctxs"])]
        assert [c["score"] for c in after["ctxs"]] == sorted((c["score"] for c in after["ctxs"]), reverse=True)
    with pytest.raises(ValueError, match=r"predictions.jsonl:1: no method 'pdist'"):
        script.reranked(records, run / "eval" / "reranker" / "predictions.jsonl", "pdist")
    broken = [{**records[0], "ctxs": [{**c, "is_supporting": True} for c in records[0]["ctxs"]]}]
    with pytest.raises(ValueError, match=f"record {records[0]['id']}: expected one ctx with is_supporting"):
        script.gold_alone(broken)


def test_a_whole_run_on_a_random_model_fills_every_row_from_calibrate(tmp_path, monkeypatch):
    script = load_script()
    records = generate_decoy_records(3, seed=4)
    run = fake_run_dir(tmp_path, records)
    out, report = tmp_path / "out", tmp_path / "REPORT.md"
    report.write_text("# kept\n")
    monkeypatch.setattr(sys, "argv", [
        "parallel_reading.py", "--run-dir", str(run), "--temperature", "0.5", "--scale", "2", "--out", str(out),
        "--write", str(report), "--batch-size", "2", "generator.path=random:tiny-llama", "data.chat_template=false",
        "generator.max_new_tokens=3",
    ])
    assert script.main() == 0
    table = (out / "table.md").read_text().splitlines()
    assert "T = 0.5, S = 2, group" in table[0]
    names = [row.split("|")[1].strip() for row in table[2:]]
    assert names == [name for name, _, _ in script.settings("g-rerank")]
    for (name, file_name, k), line in zip(script.settings("g-rerank"), table[2:]):
        result = json.loads((out / f"{file_name}_{'all' if k is None else f'top{k}'}" / "calibration.json").read_text())
        assert result["n_queries"] == 3 and result["top_k"] == k and result["doc_temperature_form"] == "group"
        cells = [cell.strip() for cell in line.split("|")[2:5]]
        points = {(p["doc_key_temperature"], p["doc_attention_scale"]): p["subem"] for p in result["points"]}
        assert cells == [f"{100 * v:.1f}" for v in (result["sequential"]["subem"], points[(1.0, 1.0)], points[(0.5, 2.0)])]
    text = report.read_text()
    assert text.startswith("# kept\n") and script.markers("group")[0] in text and "\n".join(table) in text
    # A second call reads every setting back instead of answering again.
    monkeypatch.setattr(script, "calibrate", lambda *a, **k: pytest.fail("ran a finished setting again"))
    assert script.main() == 0
    # Another request on the same --out is refused, not mixed with these results.
    monkeypatch.setattr(sys, "argv", [*sys.argv[:sys.argv.index("--scale")], "--scale", "2", "--form", "per_key",
                                      *sys.argv[sys.argv.index("--scale") + 2 :]])
    with pytest.raises(SystemExit, match=r"holds the results of another request \(form: 'group' -> 'per_key'\)"):
        script.main()
