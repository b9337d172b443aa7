"""Converters on small hand-written files in the public formats (tests/data/public_formats/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from grerank_dist.data import prepare
from grerank_dist.method.metrics import gold_labels
from grerank_dist.data.prepare import ConversionError, FormatError, convert, main

DATA = Path(__file__).parent / "data" / "public_formats"
REPO = Path(__file__).resolve().parents[1]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_array(path: Path, records: list[Any]) -> Path:
    """A JSON array with record i on line i + 2, so error lines are known."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")
    return path


def _own_and_padding(record: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    own = [c for c in record["ctxs"] if c["id"].startswith(record["id"] + "/")]
    padding = [c for c in record["ctxs"] if not c["id"].startswith(record["id"] + "/")]
    return own, padding


# ------------------------------------------------------------------ NQ / TQA


def test_nq_dpr_array_keeps_first_n_in_file_order(tmp_path: Path) -> None:
    source = json.loads((DATA / "nq_dpr_retrieval.json").read_text())
    report = convert("nq", DATA / "nq_dpr_retrieval.json", tmp_path / "nq.jsonl", n=3)
    records = _read_jsonl(tmp_path / "nq.jsonl")
    assert (report.read, report.written, dict(report.dropped)) == (2, 2, {})
    assert report.adjustments == {"ctxs cut to the first 3": 1}
    first = records[0]
    assert first["id"] == "0" and first["answers"] == ["Ernest Hemingway"]
    assert first["question"] == "who wrote the novel the old man and the sea"
    # the first three ctxs in file order, string scores parsed, the tie kept in file order
    assert [c["id"] for c in first["ctxs"]] == ["wiki:1093421", "wiki:1093425", "wiki:8734002"]
    assert [c["score"] for c in first["ctxs"]] == [82.6105, 79.912, 79.912]
    assert [c["has_answer"] for c in first["ctxs"]] == [True, False, False]
    assert [c["text"] for c in first["ctxs"]] == [c["text"] for c in source[0]["ctxs"][:3]]
    assert records[1]["answers"] == ["31 March 1889", "1889"]
    assert [c["has_answer"] for c in records[1]["ctxs"]] == [True, True, False]
    assert set(first) == {"id", "question", "answers", "ctxs"}
    assert set(first["ctxs"][0]) == {"id", "title", "text", "score", "has_answer"}


def test_tqa_fid_lines_target_hasanswer_and_computed_labels(tmp_path: Path) -> None:
    report = convert("tqa", DATA / "tqa_fid.jsonl", tmp_path / "tqa.jsonl")
    first, second = _read_jsonl(tmp_path / "tqa.jsonl")
    assert first["id"] == "tc_1067"
    # the exact duplicate "Sunset Boulevard" is removed
    assert first["answers"] == ["Sunset Boulevard", "Sunset Blvd"]
    # 'hasanswer' read under its canonical name; the unlabelled third ctx mentions
    # "Sunset Boulevard" as whole words, so its computed label is true
    assert [c["has_answer"] for c in first["ctxs"]] == [True, False, True]
    assert [c["score"] for c in first["ctxs"]] == [1.8534, 1.612, 1.4402]
    # no 'answers' field: the FiD target is the answer
    assert second["answers"] == ["The Beatles"]
    assert "hasanswer" not in first["ctxs"][0]
    assert report.adjustments["has_answer computed from the text"] == 1
    assert report.adjustments["fewer than 20 ctxs (kept as they are)"] == 2


def test_computed_has_answer_reads_the_text_not_the_title(tmp_path: Path) -> None:
    ctxs = [{"id": "1", "title": "Canberra", "text": "The city was founded in 1913."},
            {"id": "2", "title": "Australia", "text": "Its capital is Canberra."}]
    source = _write_array(tmp_path / "dpr.json", [{"question": "capital of australia?", "answers": ["Canberra"], "ctxs": ctxs}])
    convert("nq", source, tmp_path / "nq.jsonl")
    assert [c["has_answer"] for c in _read_jsonl(tmp_path / "nq.jsonl")[0]["ctxs"]] == [False, True]


def test_retrieval_ctxs_are_cut_in_score_order(tmp_path: Path) -> None:
    """A file not sorted by score (FiD sorts when it reads, so its files need not be) keeps its
    n best-scored ctxs, best first, ties in file order; file order when a score is missing."""
    scored = [{"id": str(i), "title": "", "text": "x", "score": s} for i, s in enumerate(["1.5", "7", "3", "7"])]
    unscored = [{"id": "a", "title": "", "text": "x", "score": 2}, {"id": "b", "title": "", "text": "x"},
                {"id": "c", "title": "", "text": "x", "score": 9}]
    source = _write_array(tmp_path / "fid.json", [{"question": "q?", "answers": ["y"], "ctxs": ctxs} for ctxs in (scored, unscored)])
    convert("nq", source, tmp_path / "nq.jsonl", n=3)
    first, second = _read_jsonl(tmp_path / "nq.jsonl")
    assert [c["id"] for c in first["ctxs"]] == ["1", "3", "2"] and [c["score"] for c in first["ctxs"]] == [7.0, 7.0, 3.0]
    assert [c["id"] for c in second["ctxs"]] == ["a", "b", "c"]


# ------------------------------------------------------------------ HotpotQA / 2Wiki / MuSiQue

HOTPOT_SUPPORTING = {
    "5a7a06935542990198eaf050": {"Tamsin River", "Orlen River"},
    "5ab3b0bf5542992ade7c6e39": {"Harbour Lights (1994 film)", "Alan Marsh (director)"},
    "5ae61bfd5542992663a4f261": {"Glass Orchard", "Mara Linde"},
}
HOTPOT_ANSWER_BEARING = {  # own paragraphs containing the answer as whole words
    "5a7a06935542990198eaf050": set(),  # "yes" appears nowhere
    "5ab3b0bf5542992ade7c6e39": {"Leeds International Film Festival", "Alan Marsh (director)"},
    "5ae61bfd5542992663a4f261": {"Mara Linde"},
}


def test_hotpotqa_pads_with_other_questions_paragraphs(tmp_path: Path) -> None:
    source = json.loads((DATA / "hotpotqa_dev_distractor.json").read_text())
    report = convert("hotpotqa", DATA / "hotpotqa_dev_distractor.json", tmp_path / "h.jsonl", n=6, seed=0)
    records = _read_jsonl(tmp_path / "h.jsonl")
    assert report.adjustments == {"padded with paragraphs of other questions": 3}
    assert [r["type"] for r in records] == ["comparison", "bridge", "bridge"]
    for record, raw in zip(records, source):
        own, padding = _own_and_padding(record)
        assert len(record["ctxs"]) == 6 and len(own) == 4 and len(padding) == 2
        assert {c["title"] for c in own} == {title for title, _ in raw["context"]}
        assert {c["title"] for c in own if c["is_supporting"]} == HOTPOT_SUPPORTING[record["id"]]
        assert {c["title"] for c in own if c["has_answer"]} == HOTPOT_ANSWER_BEARING[record["id"]]
        assert not any(c["is_supporting"] for c in padding)
        # a paragraph already in the question ("Kvam" is in two questions) is never padded in
        titles = [c["title"].casefold() for c in record["ctxs"]]
        assert len(set(titles)) == 6
    orlen = next(c for c in records[0]["ctxs"] if c["title"] == "Orlen River")
    # sentences joined by one space
    assert orlen["text"] == (
        "The Orlen River is a river in the east of Norway. It flows into the lake Mjøsa from the north."
    )
    # bridge question: the film paragraph is supporting but does not hold "Leeds" -> indirect
    relevant, indirect = gold_labels(records[1])
    assert {records[1]["ctxs"][i]["title"] for i, flag in enumerate(indirect) if flag} == {"Harbour Lights (1994 film)"}


def test_multihop_output_is_seeded(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        convert("hotpotqa", DATA / "hotpotqa_dev_distractor.json", tmp_path / f"{name}.jsonl", n=6, seed=seed)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_hotpotqa_trims_to_supporting_plus_first_distractors(tmp_path: Path) -> None:
    report = convert("hotpotqa", DATA / "hotpotqa_dev_distractor.json", tmp_path / "h.jsonl", n=3)
    records = _read_jsonl(tmp_path / "h.jsonl")
    # two supporting paragraphs plus the first non-supporting one in file order
    expected = [
        {"Orlen River", "Tamsin River", "Kvam"},
        {"Harbour Lights (1994 film)", "Alan Marsh (director)", "Harbour Lights (song)"},
        {"Mara Linde", "Glass Orchard", "Kvam"},
    ]
    assert [{c["title"] for c in r["ctxs"]} for r in records] == expected
    assert report.adjustments == {"paragraphs trimmed to 3": 3}


def test_more_supporting_than_n_drops_everything(tmp_path: Path) -> None:
    destination = tmp_path / "h.jsonl"
    with pytest.raises(ConversionError, match="no usable records") as caught:
        convert("hotpotqa", DATA / "hotpotqa_dev_distractor.json", destination, n=1)
    assert "3  more supporting paragraphs than n = 1" in str(caught.value)
    assert not destination.exists()


def test_2wikimultihopqa(tmp_path: Path) -> None:
    convert("2wikimultihopqa", DATA / "2wikimultihopqa_dev.json", tmp_path / "w.jsonl", n=6)
    first, second = _read_jsonl(tmp_path / "w.jsonl")
    assert (first["type"], second["type"]) == ("compositional", "comparison")
    assert first["answers"] == ["Halina Voss"]
    # both questions hold "Winter Harvest", so each pads with exactly the other's remaining paragraphs
    assert {c["title"] for c in _own_and_padding(first)[1]} == {"The Blue Orchard", "Orchard Road"}
    assert {c["title"] for c in _own_and_padding(second)[1]} == {"Halina Voss", "Irena Voss", "Summer Harvest"}
    supporting = {c["title"]: c["has_answer"] for c in first["ctxs"] if c["is_supporting"]}
    assert supporting == {"Winter Harvest": False, "Irena Voss": True}


def test_musique_aliases_types_and_unanswerable(tmp_path: Path) -> None:
    source = DATA / "musique_full_dev.jsonl"
    report = convert("musique", source, tmp_path / "m.jsonl", n=6)
    first, second = _read_jsonl(tmp_path / "m.jsonl")
    assert report.dropped == {"unanswerable": 1}
    assert report.first_dropped_at == {"unanswerable": f"{source}:3 (record 2)"}
    assert first["answers"] == ["Leeds", "City of Leeds", "Leeds, England"]
    assert (first["type"], second["type"]) == ("2hop", "3hop1")
    assert len(first["ctxs"]) == len(second["ctxs"]) == 6
    assert {c["title"] for c in second["ctxs"] if c["is_supporting"]} == {"Glass Orchard", "Mara Linde", "Uppsala"}
    # "Uppsala Castle" is only in the Uppsala paragraph: the other two supporting ones are indirect
    _, indirect = gold_labels(second)
    assert {second["ctxs"][i]["title"] for i, flag in enumerate(indirect) if flag} == {"Glass Orchard", "Mara Linde"}


# ------------------------------------------------------------------ malformed input


def test_malformed_dpr_record_names_file_line_and_field(tmp_path: Path) -> None:
    source = DATA / "nq_dpr_malformed.json"
    with pytest.raises(FormatError) as caught:
        convert("nq", source, tmp_path / "out.jsonl")
    # record 1 starts on line 17; its first ctx has score "n/a"
    assert str(caught.value) == f"{source}:17 (record 1): field 'ctxs[0].score': expected a number, got 'n/a'"
    report = convert("nq", source, tmp_path / "out.jsonl", skip_bad=True)
    assert (report.read, report.written) == (2, 1)
    assert report.dropped == {"malformed field 'ctxs[].score'": 1}


def test_malformed_json_lines_error_or_counted_skip(tmp_path: Path) -> None:
    source = DATA / "musique_malformed.jsonl"
    expected = r"musique_malformed\.jsonl:2 \(record 1\): field 'paragraphs\[1\]\.paragraph_text': missing"
    with pytest.raises(FormatError, match=expected):
        convert("musique", source, tmp_path / "out.jsonl")
    report = convert("musique", source, tmp_path / "out.jsonl", skip_bad=True)
    assert report.written == 1
    assert report.dropped == {"malformed field 'paragraphs[].paragraph_text'": 1, "invalid JSON": 1}
    assert report.first_dropped_at["invalid JSON"] == f"{source}:3 (record 2)"


HOTPOT_RECORD = json.loads((DATA / "hotpotqa_dev_distractor.json").read_text())[1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer": 7}, "field 'answer': expected a string, got int 7"),
        ({"context": [["Only a title"]]}, "field 'context[0]': expected [title, [sentences]]"),
        (
            {"supporting_facts": [["Alan Marsh (director)", "1"]]},
            "field 'supporting_facts[0]': expected [title, sentence index]",
        ),
        ({"_id": None}, "field '_id': missing"),
    ],
)
def test_malformed_hotpotqa_fields(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    source = _write_array(tmp_path / "hotpot.json", [HOTPOT_RECORD, {**HOTPOT_RECORD, **change}])
    with pytest.raises(FormatError) as caught:
        convert("hotpotqa", source, tmp_path / "out.jsonl")
    assert str(caught.value).startswith(f"{source}:3 (record 1): {message}")


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"supporting_facts": []}, "no supporting paragraph"),
        ({"supporting_facts": [["Not A Paragraph", 0]]}, "a supporting title is not among the context paragraphs"),
        ({"answer": "The!"}, "no answer left after normalisation"),
    ],
)
def test_unusable_records_are_always_counted(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    source = _write_array(tmp_path / "hotpot.json", [HOTPOT_RECORD, {**HOTPOT_RECORD, "_id": "x", **change}])
    report = convert("hotpotqa", source, tmp_path / "out.jsonl", n=4)
    assert (report.written, report.dropped) == (1, {reason: 1})
    assert report.first_dropped_at[reason] == f"{source}:3 (record 1)"


def test_invalid_json_inside_an_array_is_fatal_even_with_skip_bad(tmp_path: Path) -> None:
    source = tmp_path / "broken.json"
    source.write_text(
        "[\n"
        '  {"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "a"}]},\n'
        '  {"question": "q2" "answers": ["a"], "ctxs": []}\n'
        "]\n"
    )
    with pytest.raises(FormatError, match=r"broken\.json:3 \(record 1\): invalid JSON in the array"):
        convert("nq", source, tmp_path / "out.jsonl", skip_bad=True)


@pytest.mark.parametrize("name", ["nq_dpr_retrieval.json", "hotpotqa_dev_distractor.json", "2wikimultihopqa_dev.json"])
def test_streamed_array_equals_json_load_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    path = DATA / name
    reference = json.loads(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    for chunk in (3, 64, 1 << 20):  # elements and multi-byte characters cut at every kind of place
        monkeypatch.setattr(prepare, "_READ_CHUNK", chunk)
        items = list(prepare._iter_json_records(path))
        assert [value for _, value in items] == reference
        assert [where.record for where, _ in items] == list(range(len(reference)))
        # each element's reported line is where its opening brace is
        for where, _ in items:
            assert "{" in lines[where.line - 1]
    if name.startswith("nq"):
        assert [where.line for where, _ in items] == [2, 38]


# ------------------------------------------------------------------ atomic writes and the CLI


def test_failed_conversion_leaves_destination_untouched(tmp_path: Path) -> None:
    destination = tmp_path / "out.jsonl"
    destination.write_text("keep me\n")
    # record 0 is valid and already streamed to the temporary file when record 1 fails
    with pytest.raises(FormatError):
        convert("nq", DATA / "nq_dpr_malformed.json", destination)
    assert destination.read_text() == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # no temporary file left behind


def test_nothing_usable_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    source = _write_array(tmp_path / "empty_ctxs.json", [{"question": "q", "answers": ["a"], "ctxs": []}])
    destination = tmp_path / "out.jsonl"
    destination.write_text("keep me\n")
    with pytest.raises(ConversionError, match=r"no usable records[\s\S]*1  no ctxs"):
        convert("nq", source, destination)
    assert destination.read_text() == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["empty_ctxs.json", "out.jsonl"]


def test_output_may_not_overwrite_input(tmp_path: Path) -> None:
    source = tmp_path / "nq.json"
    source.write_bytes((DATA / "nq_dpr_retrieval.json").read_bytes())
    with pytest.raises(ConversionError, match="overwrite the input"):
        convert("nq", source, source)


def test_cli_main_prints_report_and_returns_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["tqa", "--input", str(DATA / "tqa_fid.jsonl"), "--output", str(tmp_path / "t.jsonl"), "--n", "2"])
    assert status == 0
    assert "read 2 records, wrote 2 (n = 2 candidates, seed 0)" in capsys.readouterr().out
    assert [len(r["ctxs"]) for r in _read_jsonl(tmp_path / "t.jsonl")] == [2, 2]
    status = main(["nq", "--input", str(DATA / "nq_dpr_malformed.json"), "--output", str(tmp_path / "x.jsonl")])
    assert status == 1
    assert "field 'ctxs[0].score'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nq", "--input", "a", "--output", "b", "--n", "0"])


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "grerank_dist.data.prepare", "musique", "--input", str(DATA / "musique_full_dev.jsonl"),
         "--output", str(tmp_path / "m.jsonl"), "--skip-bad"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "unanswerable" in result.stdout
    assert len(_read_jsonl(tmp_path / "m.jsonl")) == 2
