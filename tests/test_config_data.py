"""Config loading/validation and record checking: errors name the file, the line and the field."""

import json

import pytest

from grerank_dist.config import ConfigError, load_config
from grerank_dist.data import Collator, MicroBatchSchedule, RecordError, read_records, training_answer
from grerank_dist.tokenization import build_word_tokenizer
from grerank_dist.train import record_texts


def write_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_overrides_and_defaults(tmp_path):
    path = write_yaml(tmp_path, "relax:\n  k: 3\ntrain:\n  lr: 1.0e-4\n")
    config = load_config(path, ["relax.tau=0.25", "train.weight_decay=2e-3", "data.n_candidates=10", "reranker.lora={r: 4}"])
    assert (config.relax.k, config.relax.tau, config.train.lr) == (3, 0.25, 1e-4)
    assert config.data.n_candidates == 10 and config.train.weight_decay == 2e-3
    assert config.reranker.lora.r == 4 and config.reranker.lora.alpha == 16


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("relax:\n  kk: 3\n", [], "relax: unknown key(s) ['kk']"),
        ("nonsense: 1\n", [], "unknown key(s) ['nonsense']"),
        ("", ["relax.k=30"], "relax.k: k=30 exceeds data.n_candidates=20"),
        ("", ["relax.tau=0"], "relax.tau: must be > 0"),
        ("", ["relax.k=0"], "relax.k: must be an integer >= 1"),
        ("", ["train.objective=foo"], "train.objective: must be one of"),
        ("", ["data.doc_template='{passage}'"], "data.doc_template: unknown placeholder {passage}"),
        # placeholders the collator fills for one template but not for another
        ("", ["data.prompt_template='{title}: {question}'"], "data.prompt_template: unknown placeholder {title}"),
        ("", ["data.passage_template='{question} {text}'"], "data.passage_template: unknown placeholder {question}"),
        ("", ["data.passage_template='{0} {text}'"], "data.passage_template: unknown placeholder {0}"),
        ("", ["data.doc_template='{text.upper}'"], "data.doc_template: unknown placeholder {text.upper}"),
        ("", ["data.doc_template='{text'"], "data.doc_template: malformed template"),
        ("", ["data.candidate_order=rank"], "data.candidate_order: must be one of ('score', 'file'), got 'rank'"),
        ("", ["relax.k=three"], "relax.k: expected int, got 'three'"),
        ("", ["train.lr=[1]"], "train.lr: expected float"),
        ("relax: [1, 2]\n", [], "relax: expected a mapping"),
        ("", ["relax.k"], "expected key.sub=value"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, needle):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert needle in str(err.value)


def test_doc_template_may_hold_the_question_and_the_collator_fills_it(tmp_path):
    """FiD-style encoder inputs ("question: ... title: ... context: ..."): {question} passes
    validation and reaches every document of its query, padding candidates included."""
    template = "question: {question} title: {title} context: {text}"
    config = load_config(None, [f"data.doc_template='{template}'", "data.n_candidates=3", "data.doc_max_tokens=16",
                                   "relax.k=1"])
    records = [
        {"question": "who wrote it", "answers": ["ann"], "ctxs": [
            {"title": "book", "text": "ann wrote it"}, {"title": "film", "text": "bob made it"}]},
        {"question": "where is it", "answers": ["oslo"], "ctxs": [{"title": "city", "text": "it is in oslo"}] * 3},
    ]
    tokenizer = build_word_tokenizer(record_texts(records, config), "decoder")  # as random:tiny runs build it
    batch = Collator(config.data, tokenizer, None, config.reranker.max_length)(records, [0, 1])
    decoded = [[tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(*rows)]
               for rows in zip(batch.encoder_input_ids, batch.encoder_attention_mask)]
    assert decoded[0][:2] == ["question : who wrote it title : book context : ann wrote it",
                              "question : who wrote it title : film context : bob made it"]
    assert decoded[0][2] == "question : who wrote it title : context :"  # the padding candidate
    assert decoded[1][0] == "question : where is it title : city context : it is in oslo"


def test_malformed_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "relax: {k: 3\n")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(path)


GOOD = {"question": "q?", "answers": ["a"], "ctxs": [{"title": "t", "text": "x", "hasanswer": True, "score": "1.5"}]}


def write_lines(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        (json.dumps({"answers": ["a"], "ctxs": GOOD["ctxs"]}), "d.jsonl:2: field 'question'"),
        (json.dumps({"question": "q", "ctxs": GOOD["ctxs"]}), "d.jsonl:2: field 'answers': missing or empty"),
        (json.dumps({"question": "q", "answers": [], "ctxs": GOOD["ctxs"]}), "d.jsonl:2: field 'answers'"),
        (json.dumps({"question": "q", "answers": ["a"], "ctxs": []}), "d.jsonl:2: field 'ctxs': empty"),
        (json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"title": "t"}]}), "d.jsonl:2: field 'ctxs[0].text'"),
        (
            json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "score": "high"}]}),
            "d.jsonl:2: field 'ctxs[0].score'",
        ),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, bad, needle):
    path = write_lines(tmp_path, [json.dumps(GOOD), bad, json.dumps(GOOD)])
    with pytest.raises(RecordError) as err:
        read_records(path, n_candidates=5)
    assert needle in str(err.value)
    records, report = read_records(path, n_candidates=5, skip_bad=True)
    assert len(records) == 2 and sum(report.skipped.values()) == 1
    assert [r["line"] for r in records] == [1, 3]


def test_record_normalisation(tmp_path):
    fid = {"question": "q", "target": "t1", "ctxs": [{"text": str(i), "score": str(i)} for i in range(7)]}
    path = write_lines(tmp_path, [json.dumps(GOOD), json.dumps(fid)])
    records, report = read_records(path, n_candidates=5)
    assert records[0]["ctxs"][0]["has_answer"] is True and records[0]["ctxs"][0]["score"] == 1.5
    assert records[1]["answers"] == ["t1"] and len(records[1]["ctxs"]) == 5
    assert (report.truncated, report.padded) == (1, 1)


def test_candidates_are_ordered_by_score_before_truncation(tmp_path):
    """A shuffled file (HotpotQA paragraphs, merged runs) keeps its best-scored candidates, best
    first, ties in file order; file order only on request or when a candidate has no score."""
    scores = [2, 5, 1, 5, 3, 4]
    shuffled = {"question": "q", "answers": ["a"], "ctxs": [
        {"id": f"p{i}", "text": "x", "score": str(s)} for i, s in enumerate(scores)]}
    unscored = {"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "score": 9}, {"text": "y"}, {"text": "z", "score": 10}]}
    path = write_lines(tmp_path, [json.dumps(shuffled), json.dumps(unscored)])
    records, report = read_records(path, n_candidates=4)
    # by score: 5 (p1), 5 (p3, the tie after p1), 4 (p5), 3 (p4) | 2 (p0), 1 (p2) cut
    assert [c["id"] for c in records[0]["ctxs"]] == ["p1", "p3", "p5", "p4"]
    assert [c["score"] for c in records[0]["ctxs"]] == [5.0, 5.0, 4.0, 3.0]
    assert [c["text"] for c in records[1]["ctxs"]] == ["x", "y", "z"]  # a score is missing: file order
    assert [c["id"] for c in records[1]["ctxs"]] == ["0", "1", "2"]
    assert report.reordered == 1 and "1 reordered by score" in report.summary()
    records, report = read_records(path, n_candidates=4, candidate_order="file")
    assert [c["id"] for c in records[0]["ctxs"]] == ["p0", "p1", "p2", "p3"] and report.reordered == 0
    with pytest.raises(ValueError, match="candidate_order must be one of"):
        read_records(path, n_candidates=4, candidate_order="rank")
    # errors name the candidate's position in the file, not in the sorted list
    bad = {"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "score": 1}, {"title": "t", "score": 2}]}
    with pytest.raises(RecordError, match=r"d.jsonl:1: field 'ctxs\[1\].text'"):
        read_records(write_lines(tmp_path, [json.dumps(bad)]), n_candidates=4)


def test_answer_choice():
    record = {"id": "x", "answers": ["longer one", "short"], "line": 1}
    assert training_answer(record, "first", 0, 0) == "longer one"
    assert training_answer(record, "shortest", 0, 0) == "short"
    picks = {training_answer(record, "random", 0, epoch) for epoch in range(20)}
    assert picks == {"longer one", "short"}
    assert training_answer(record, "random", 0, 3) == training_answer(record, "random", 0, 3)


def test_schedule_partitions_each_epoch_across_ranks():
    n, bsz, world = 23, 2, 3
    schedules = [MicroBatchSchedule(n, bsz, world, rank, seed=7) for rank in range(world)]
    steps = schedules[0].steps_per_epoch
    assert steps == 23 // 6
    for epoch in range(2):
        seen = [i for s in schedules for step in range(epoch * steps, (epoch + 1) * steps) for i in s.indices(step)]
        assert len(seen) == len(set(seen)) == steps * bsz * world  # disjoint across ranks and steps
    assert schedules[0].indices(0) != schedules[0].indices(steps)  # a new permutation each epoch
    assert MicroBatchSchedule(n, bsz, world, 1, seed=7).indices(5) == schedules[1].indices(5)
