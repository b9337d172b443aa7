"""`grerank demo --quick` (through the reproduction script, whose first run is the demo itself):
every stage runs and writes every artifact."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, check, clean_env


def assert_every_artifact(out: Path) -> None:
    """What `grerank demo --quick --out OUT` writes: data, reader, weak start, trained reranker,
    the three settings' metrics, the summary, the report and the plots."""
    for name in ("results.md", "summary.json", "retrieval_over_training.png", "mask_weight_over_training.png",
                 "data/train.jsonl", "data/test.jsonl", "reader/config.json", "random_reranker/model.safetensors", "weak_start/reranker/model.safetensors",
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


def test_reproduction_script_trains_every_method_from_one_reader_and_writes_the_report(tmp_path):
    out, report = tmp_path / "runs", tmp_path / "RESULTS.md"
    report.write_text("# Results\n\nhand-written\n\n<!-- reproduce_synthetic.py: start -->\nold\n"
                      "<!-- reproduce_synthetic.py: end -->\n\n## Later section\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce_synthetic.py"), "--quick", "--seeds", "0",
                             "--out", str(out), "--write", str(report), "--threads", "1", "--methods", "dro"],
                            capture_output=True, text=True, timeout=900, env=clean_env(), cwd=ROOT)
    check(result)
    text = report.read_text()
    for row in ("| retriever |", "| initial |", "| g-rerank |", "| dro |", "| oracle |"):
        assert row in text, row
    assert "| gold-labels |" not in text and "| no-gumbel |" not in text  # not asked for
    assert "| g-rerank | " in text and "1.00× |" in text  # step time against G-Rerank's own
    assert "--quick" in text and "--methods dro" in text  # the exact command that produced the report
    # the section between the markers is replaced; the hand-written text around it is kept
    assert text.startswith("# Results\n\nhand-written\n\n<!-- reproduce_synthetic.py: start -->")
    assert "\nold\n" not in text and text.endswith("<!-- reproduce_synthetic.py: end -->\n\n## Later section\n")
    seed_runs = out / "seed0"
    assert_every_artifact(seed_runs / "g-rerank")  # the first run is `grerank demo --quick` itself
    for method in ("dro",):  # trained from the first run's frozen reader and weak start
        assert not (seed_runs / method / "reader").exists()
        assert not (seed_runs / method / "weak_start").exists()
        config = json.loads((seed_runs / method / "train" / "train_config.json").read_text())
        assert config["generator"]["path"] == str(seed_runs / "g-rerank" / "reader")
        assert config["reranker"]["path"] == str(seed_runs / "g-rerank" / "weak_start" / "reranker")
        metrics = json.loads((seed_runs / method / "eval" / "reranker" / "metrics.json").read_text())
        assert set(metrics["methods"]) == {"initial", method, "retriever", "oracle"}
    dro = json.loads((seed_runs / "dro" / "train" / "train_config.json").read_text())
    assert dro["train"]["objective"] == "dro"
    # a second call reads the finished runs back instead of training them again
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce_synthetic.py"), "--quick", "--seeds", "0",
                            "--out", str(out), "--write", str(report), "--threads", "1", "--methods", "dro"],
                           capture_output=True, text=True, timeout=300, env=clean_env(), cwd=ROOT)
    check(again)
    assert again.stdout.count("reusing the finished run") == 2 and "$ " not in again.stdout


def test_every_objective_gets_its_own_row_name():
    """The demo names the reranker it trains after the objective (the reproduction reads that row)."""
    from grerank_dist.config import load_config
    from grerank_dist.demos.demo import trained_method_name

    cases = {(): "g-rerank", ("relax.noise=false",): "no-gumbel", ("train.objective=nogumbel",): "no-gumbel",
             ("train.objective=gold_labels",): "gold-labels", ("train.objective=emdr",): "emdr",
             ("train.objective=pdist",): "pdist", ("train.objective=dro",): "dro"}
    for overrides, name in cases.items():
        assert trained_method_name(load_config(ROOT / "configs" / "tiny_cpu.yaml", list(overrides))) == name


def test_quick_demo_with_a_fid_reader(tmp_path):
    """`grerank demo --generator fid`: the reader is a FiD (T5) model in FiD's input format, its
    five-condition report is written, and G-Rerank trains and evaluates against it."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "grerank_dist.cli", "demo", "--quick", "--generator", "fid", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=clean_env(), cwd=ROOT)
    check(result)
    assert json.loads((out / "reader" / "config.json").read_text())["model_type"] == "t5"
    training = json.loads((out / "reader" / "reader_training.json").read_text())
    assert training["reader"]["generator"] == "fid" and training["data"]["prompt_template"] == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generator"] == "fid"
    assert set(summary["reader"]["all"]) == {"both_gold", "answer_doc", "bridge_doc", "all_candidates", "no_documents", "queries"}
    config = json.loads((out / "train" / "train_config.json").read_text())
    assert config["generator"]["path"] == str(out / "reader")
    assert config["data"]["doc_template"].startswith("question: {question}")
    metrics = json.loads((out / "eval" / "generator" / "metrics.json").read_text())
    assert "subem" in metrics["methods"]["g-rerank"]


def test_reproduction_report_keeps_each_reader_family_in_its_own_section(tmp_path):
    """A FiD reproduction writes its own section next to CEPE's; rewriting one keeps the other."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_synthetic", ROOT / "scripts" / "reproduce_synthetic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    conditions = {"both_gold": 1.0, "answer_doc": 0.5, "bridge_doc": 0.0, "all_candidates": 0.9, "no_documents": 0.1, "queries": 4}
    methods = {m: {"recall@2": 0.5, "final_mean_max_weight": 0.25} for m in ("retriever", "initial", "oracle")}
    methods.update({m: {"recall@2": 0.5, "final_mean_max_weight": 0.25, "median_step_s": 0.2 + 0.1 * (m == "pdist")}
                    for m in script.METHODS})
    per_seed = [{**methods, "reader": {"all": conditions}, "wall_s": 1.0}]
    report = tmp_path / "RESULTS.md"
    report.write_text("# Results\n")
    script.write_results(report, [0], per_seed, "cepe command", "cepe")
    script.write_results(report, [0], per_seed, "fid command", "fid")
    script.write_results(report, [0], per_seed, "new cepe command", "cepe")
    text = report.read_text()
    cepe_start, cepe_end = script.section_markers("cepe")
    fid_start, fid_end = script.section_markers("fid")
    assert text.index(cepe_start) < text.index(cepe_end) < text.index(fid_start) < text.index(fid_end)
    assert "new cepe command" in text and "fid command" in text and "\n    cepe command" not in text
    assert "Reproduction over seeds, FiD reader" in text.split(fid_start)[1]
    assert "| pdist | 50.0 |" in text and "| 1.50× |" in text  # pdist's step time over G-Rerank's


def test_a_reused_reader_must_match_the_demo_generator(tmp_path):
    from grerank_dist.demos.demo import check_reader_family

    (tmp_path / "reader_training.json").write_text(json.dumps({"reader": {"generator": "cepe"}}))
    check_reader_family(tmp_path, "cepe")
    with pytest.raises(ValueError, match="reader.generator is 'cepe', but the demo runs --generator fid"):
        check_reader_family(tmp_path, "fid")
