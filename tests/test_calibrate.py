"""`grerank calibrate` (grerank_dist.evaluation.calibrate) on a tiny random Llama, against an
independent decoding loop for every (T, S) point in the config's form of T and the plain
transformers model's own `generate` for the sequential reference."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from toy import toy_records, write_jsonl
from transformers import AutoModelForCausalLM

from grerank_dist.cli import main as cli_main
from grerank_dist.config import TrainConfig, load_config
from grerank_dist.evaluation.calibrate import GridPoint, alignment_grid, choose
from grerank_dist.method.metrics import substring_exact_match
from grerank_dist.models import load_generator
from grerank_dist.training.train import record_texts

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
# 3 queries per batch over 5 queries: a full and a short batch.
OVERRIDES = ["generator.path=random:tiny-llama", "data.instruction=read the documents", "data.n_candidates=4",
             "generator.max_new_tokens=4", "train.micro_batch_size=3"]
GRID = [(0.5, 1.0), (0.5, 3.0), (1.0, 1.0), (1.0, 3.0)]  # --temperatures 0.5,1 --scales 1,3


def _clean(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _independent_answers(config: TrainConfig, records: list[dict], k: int) -> tuple[dict, list[str], Any]:
    """Every point's answers from a loop of one query at a time (the first k documents encoded
    alone, no mask), and the sequential answers of a separate plain eager model given the
    prefix, the documents' tokens in a row and the prompt."""
    gen, tok = load_generator(config.generator.path, record_texts(records, config), seed=config.generator.seed, data=config.data)
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(gen.lm.config), attn_implementation="eager")
    plain.load_state_dict(gen.lm.state_dict())
    plain.eval()
    stops = sorted({tok.eos_token_id, *(t for t in tok("\n", add_special_tokens=False)["input_ids"] if tok.decode([t]) == "\n")})
    d, width, new = config.data, config.data.doc_max_tokens, config.generator.max_new_tokens
    parallel: dict[tuple[float, float], list[str]] = {point: [] for point in GRID}
    sequential = []
    for record in records:
        texts = [d.doc_template.format(title=c["title"], text=c["text"], question=record["question"]) for c in record["ctxs"][:k]]
        doc_ids = tok(texts, add_special_tokens=False, truncation=True, max_length=width)["input_ids"]
        docs, mask = torch.full((1, k, width), tok.pad_token_id), torch.zeros(1, k, width, dtype=torch.long)
        for i, ids in enumerate(doc_ids):
            docs[0, i, width - len(ids) :], mask[0, i, width - len(ids) :] = torch.tensor(ids), 1
        prompt = tok(d.prompt_template.format(question=record["question"]), add_special_tokens=False)["input_ids"]
        contexts = gen.encode_contexts(docs, mask)
        for point, answers in parallel.items():
            gen.set_context_alignment(*point, config.generator.doc_temperature_form)
            tokens = gen.generate(contexts, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), None,
                                  max_new_tokens=new, stop_token_ids=stops)
            answers.append(_clean(tok.decode(tokens[0], skip_special_tokens=True)))
        ids = torch.tensor([gen.prefix_ids + [t for row in doc_ids for t in row] + prompt])
        with torch.no_grad():
            out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id)
        sequential.append(_clean(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    return parallel, sequential, tok


@pytest.mark.parametrize("documents, forms", [(["--all-candidates"], []), (["--top-k", "2"], ["per_key"])],
                         ids=["all-group", "top2-per_key"])
def test_calibrate_matches_independent_decoding_and_writes_a_loadable_config(tmp_path, capsys, documents, forms):
    overrides = [*OVERRIDES, *(f"generator.doc_temperature_form={form}" for form in forms)]
    form = forms[0] if forms else "group"  # the default
    config = load_config(CONFIG, overrides)
    k = config.data.n_candidates if documents[0] == "--all-candidates" else 2
    records = toy_records(5, 4, seed=7)
    parallel, sequential, tok = _independent_answers(config, records, k)
    # Gold answers that the tiny model gives at some points only: the (0.5, 3) point's answer,
    # and for every other query the sequential one too, so the SubEMs differ. They are words of
    # the vocabulary already, so the random model (built over the records' words) stays the same.
    for i, record in enumerate(records):
        gold = [parallel[(0.5, 3.0)][i], sequential[i] if i % 2 == 0 else ""]
        record["answers"] = [answer for answer in gold if answer] or record["answers"]
        assert all(tok.unk_token_id not in tok(answer)["input_ids"] for answer in record["answers"])
    data = write_jsonl(tmp_path / "dev.jsonl", records)
    out, written = tmp_path / "out", tmp_path / "calibrated.yaml"
    assert cli_main(["calibrate", "--config", str(CONFIG), "--data", data, "--temperatures", "0.5,1", "--scales", "1,3",
                     *documents, "--out", str(out), "--write-config", str(written), *overrides]) == 0

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    assert [row["sequential"] for row in rows] == sequential
    for index, point in enumerate(GRID):
        assert [row["parallel"][index] for row in rows] == parallel[point], point

    def subem(answers: list[str]) -> float:
        return sum(substring_exact_match(a, r["answers"]) for a, r in zip(answers, records)) / len(records)

    summary = json.loads((out / "calibration.json").read_text())
    assert summary["n_queries"] == 5 and summary["top_k"] == (None if k == 4 else 2)
    assert summary["doc_temperature_form"] == form
    reference = subem(sequential)
    assert summary["sequential"]["subem"] == pytest.approx(reference) and reference > 0
    expected = [GridPoint(t, s, subem(parallel[(t, s)]), subem(parallel[(t, s)]) / reference) for t, s in GRID]
    assert [GridPoint(**p) for p in summary["points"]] == pytest.approx(expected)
    assert len({p.subem for p in expected}) > 1, "a grid whose points all tie checks little"
    best = max(p.subem for p in expected)
    nearest = min((p for p in expected if p.subem == best),
                  key=lambda p: math.hypot(math.log(p.doc_key_temperature), math.log(p.doc_attention_scale)))
    assert GridPoint(**summary["chosen"]) == nearest
    table = (out / "calibration.md").read_text()
    assert table in capsys.readouterr().out and table.count("| parallel") == len(GRID)
    assert table.splitlines()[0].startswith(f"| Context | T ({form} form) | S |")

    calibrated = load_config(written)
    assert (calibrated.generator.doc_key_temperature, calibrated.generator.doc_attention_scale) == (
        nearest.doc_key_temperature, nearest.doc_attention_scale)
    # The form is written out beside T and S (not left to the default), also where it is the default.
    generator = list(yaml.safe_load(written.read_text())["generator"].items())
    at = [name for name, _ in generator].index("doc_key_temperature")
    assert generator[at + 1 : at + 3] == [("doc_attention_scale", nearest.doc_attention_scale), ("doc_temperature_form", form)]
    unchanged = {**calibrated.to_dict(), "source": ""}
    unchanged["generator"].update(doc_key_temperature=1.0, doc_attention_scale=1.0)
    assert unchanged == {**config.to_dict(), "source": ""}


@pytest.mark.parametrize("path", ["random:tiny", "random:tiny-fid"])
def test_cepe_and_fid_generators_are_refused(tmp_path, path):
    data = write_jsonl(tmp_path / "dev.jsonl", toy_records(2, 4))
    with pytest.raises(SystemExit, match="decoder-only generators only"):
        cli_main(["calibrate", "--config", str(CONFIG), "--data", data, "--out", str(tmp_path / "out"), *OVERRIDES,
                  f"generator.path={path}"])
    assert not (tmp_path / "out").exists()


def test_a_group_form_grid_on_a_fused_backend_is_refused_before_weights_load(tmp_path, monkeypatch):
    """The config's own T is 1 (valid with sdpa), but the grid tries T != 1 in group form: refused
    with the way out, before any model is built; per_key on sdpa passes the check."""
    from grerank_dist.evaluation import calibrate as calibrate_module

    monkeypatch.setattr(calibrate_module, "load_decoder_only", lambda *a, **k: pytest.fail("weights were loaded"))
    data = write_jsonl(tmp_path / "dev.jsonl", toy_records(2, 4))
    with pytest.raises(SystemExit, match="'sdpa' cannot carry the group form's per-query offset"):
        cli_main(["calibrate", "--config", str(CONFIG), "--data", data, "--out", str(tmp_path / "out"),
                  "--temperatures", "0.5", *OVERRIDES, "generator.attention_backend=sdpa"])
    config = load_config(CONFIG, [*OVERRIDES, "generator.attention_backend=sdpa", "generator.doc_temperature_form=per_key"])
    assert calibrate_module.check_request(config, None, None, None, [0.5, 1.0]) == (4, 3)


def test_grid_always_holds_the_unaligned_point_and_ties_go_to_the_nearest_to_it(capsys):
    assert alignment_grid([0.5], [2.0, 4.0]) == [(1.0, 1.0), (0.5, 2.0), (0.5, 4.0)]
    assert alignment_grid([1.0, 0.5], [1.0]) == [(1.0, 1.0), (0.5, 1.0)]
    points = [GridPoint(0.5, 1.0, 0.6, None), GridPoint(1.0, 2.0, 0.6, None), GridPoint(0.7, 1.0, 0.6, None),
              GridPoint(1.0, 1.0, 0.4, None)]
    assert choose(points) is points[2]
    assert choose([*points, GridPoint(1.0, 1.0, 0.6, None)]).doc_key_temperature == 1.0
    with pytest.raises(SystemExit):
        cli_main(["calibrate", "--help"])
    usage = capsys.readouterr().out
    assert all(option in usage for option in ("--temperatures", "--scales", "--top-k", "--all-candidates", "--queries",
                                               "--write-config", "sequence"))
