"""scripts/reproduce_real.py's pure parts: the answer-string heuristic's order and the report.
(The whole script runs with `--quick` in about three minutes with the real models; it is run by
hand, not in the suite.)"""

import importlib.util
import statistics

from grerank_dist.demos.decoy_reading import generate_decoy_records
from test_train import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_real", ROOT / "scripts" / "reproduce_real.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_answer_string_heuristic_puts_every_answer_bearing_candidate_first_in_a_seeded_random_order():
    script = load_script()
    records = generate_decoy_records(40, seed=2)
    ordered = script.answer_string_order(records, seed=5)
    gold_first = 0
    for before, after in zip(records, ordered):
        flags = [ctx["has_answer"] for ctx in after["ctxs"]]
        assert flags == sorted(flags, reverse=True) and sorted(c["id"] for c in after["ctxs"]) == sorted(c["id"] for c in before["ctxs"])
        gold_first += after["ctxs"][0]["is_supporting"]
    assert 0 < gold_first < 40  # ties broken at random among gold and decoys, not always the gold
    assert ordered == script.answer_string_order(records, seed=5) != script.answer_string_order(records, seed=6)


def test_the_report_gives_mean_and_sd_over_seeds_and_keeps_the_rest_of_the_file(tmp_path):
    script = load_script()
    per_seed = []
    for seed, recall in enumerate((0.2, 0.4, 0.6)):
        rows = {m: {c: recall for c in script.COLUMNS} for m in ("bm25", "answer-string", "untrained", "oracle", *script.METHODS)}
        rows["g-rerank"]["median_step_s"] = 2.0
        rows["pdist"]["median_step_s"] = 3.0
        per_seed.append(rows)
    report = tmp_path / "REAL.md"
    report.write_text("# Real\n\nhand-written text\n")
    script.write_report(report, [0, 1, 2], per_seed, "first command")
    script.write_report(report, [0, 1, 2], per_seed, "second command")
    text = report.read_text()
    assert text.count(script.MARKERS[0]) == 1 and "hand-written text" in text and "first command" not in text
    sd = 100 * statistics.stdev([0.2, 0.4, 0.6])
    assert f"| pdist | 40.0 ± {sd:.1f} |" in text and "| 1.50× |" in text
    # a seed evaluated in the reranker setting only adds to the retrieval columns alone
    for rows in per_seed[2].values():
        del rows["subem@top1"], rows["subem@top3"]
    script.write_report(report, [0, 1, 2], per_seed, "third command")
    assert f"| pdist | 40.0 ± {sd:.1f} | 40.0 ± {sd:.1f} | 40.0 ± {sd:.1f} | 30.0 ± 14.1 (2 seeds) |" in report.read_text()
