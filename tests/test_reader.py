"""The reader stage: a short training run lowers the answer loss, the checkpoint reloads with
identical logits, the candidate views keep the evidence, and the SubEM report's hard masks give
exactly what the generator produces when it is handed only the selected documents; for the CEPE
and the FiD reader alike."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest
import torch

from grerank_dist.config import DataConfig
from grerank_dist.data.collate import Collator
from grerank_dist.method.metrics import normalize_answer
from grerank_dist.models.fid import FID_FORMAT, FidForConditionalGeneration
from grerank_dist.demos.reader import (
    REPORT_CONDITIONS,
    ReaderConfig,
    build_reader,
    build_reader_tokenizer,
    configure_parser,
    fit_reader,
    load_reader,
    reader_data,
    reader_input_format,
    reader_report,
    run,
    sample_view,
)
from grerank_dist.demos.synthetic import generate_records
from grerank_dist.models.tokenization import split_words

DATA = DataConfig(
    doc_template="{title} : {text}",
    prompt_template="question : {question} answer :",
    doc_max_tokens=24,
    answer_eos=True,
)
TINY = ReaderConfig(hidden_size=32, intermediate_size=64, attention_heads=2, batch_size=8, warmup_steps=2,
                    learning_rate=3e-3, seed=0)
# FiD: its family's input format, documents long enough for the question and the passage
FID_DATA = reader_data(dataclasses.replace(DATA, doc_max_tokens=48), "fid")
FID_TINY = dataclasses.replace(TINY, generator="fid")
SETUPS = {"cepe": (DATA, TINY), "fid": (FID_DATA, FID_TINY)}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generate_records(24, seed=4, n_candidates=12, distractor_works=2, first_name_lookalikes=1)


@pytest.fixture(scope="module")
def tokenizer(records):
    return build_reader_tokenizer(records, DATA)


@pytest.fixture(scope="module")
def fid_tokenizer(records):
    return build_reader_tokenizer(records, FID_DATA, "fid")


def _all_candidates_loss(model, tokenizer, records) -> float:
    batch = Collator(dataclasses.replace(DATA, n_candidates=12), tokenizer, None, 0)(records, list(range(len(records))))
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, batch.labels, encoder_input_ids=batch.encoder_input_ids,
                     encoder_attention_mask=batch.encoder_attention_mask).loss.item()


def test_training_lowers_the_answer_loss_and_the_checkpoint_reloads_identically(records, tokenizer, tmp_path) -> None:
    initial = _all_candidates_loss(build_reader(tokenizer, TINY), tokenizer, records)
    model, summary = fit_reader(records, tokenizer, TINY, steps=40, data=DATA, log_every=20)
    trained = _all_candidates_loss(model, tokenizer, records)
    assert trained < initial - 1.0, (initial, trained)
    assert not any(p.requires_grad for p in model.parameters())  # frozen for G-Rerank
    assert [step for step, _ in summary["loss_curve"]] == [20, 40]

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_reader(tmp_path)
    assert reloaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    batch = Collator(dataclasses.replace(DATA, n_candidates=12), tokenizer, None, 0)(records[:4], [0, 1, 2, 3])
    inputs = dict(encoder_input_ids=batch.encoder_input_ids, encoder_attention_mask=batch.encoder_attention_mask)
    with torch.no_grad():
        expected = model(batch.input_ids, batch.attention_mask, **inputs).logits
        got = reloaded(batch.input_ids, batch.attention_mask, **inputs).logits
        fresh = build_reader(tokenizer, TINY)(batch.input_ids, batch.attention_mask, **inputs).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(fresh, expected)  # the comparison can fail: training changed the logits


def test_aligned_initialisation_copies_the_decoder_embeddings(tokenizer) -> None:
    model = build_reader(tokenizer, TINY)
    decoder = model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, decoder)
    assert torch.equal(model.encoder.embed_tokens.weight[: decoder.shape[0]], decoder)
    assert model.lm_head.weight.data_ptr() != decoder.data_ptr()  # copies, not tied parameters


# words of the synthetic templates, shared by most documents (lookalikes share names and titles)
TEMPLATE_WORDS = set("was born in . the is a whose birthplace not reviewed by novel poem play memoir".split())


def test_sampled_views_keep_the_gold_documents_and_prefer_lookalikes(records) -> None:
    rng = random.Random(0)
    shared_word_draws, other_draws, shared_word_docs, other_docs = 0, 0, 0, 0
    for record in records:
        gold_texts = [c["text"] for c in record["ctxs"] if c["is_supporting"]]
        gold_words = {w for text in gold_texts for w in text.split()} - TEMPLATE_WORDS
        negatives = [c for c in record["ctxs"] if not c["is_supporting"]]
        looks_alike = {c["id"] for c in negatives if gold_words & set(c["text"].split())}
        shared_word_docs += len(looks_alike)
        other_docs += len(negatives) - len(looks_alike)
        for _ in range(30):
            view = sample_view(record, rng, max_negatives=3)
            ids = [c["id"] for c in view["ctxs"]]
            assert len(ids) == len(set(ids))
            assert sum(c["is_supporting"] for c in view["ctxs"]) == 2
            assert len(ids) - 2 <= 3
            drawn = [i for i in ids if i not in {c["id"] for c in record["ctxs"] if c["is_supporting"]}]
            shared_word_draws += sum(i in looks_alike for i in drawn)
            other_draws += sum(i not in looks_alike for i in drawn)
    # per available document, lookalikes are drawn clearly more often than the others
    assert shared_word_draws / shared_word_docs > 1.5 * other_draws / other_docs


def _reference_prediction(model, tokenizer, record: dict, keep: list[bool] | None, data: DataConfig) -> str:
    """Greedy answer when the generator is handed only the kept documents (None: no documents;
    for FiD, whose prompt is empty, the question alone as one empty passage)."""
    question_in_prompt = "{question}" in data.prompt_template
    if keep is None:
        kept = {**record, "ctxs": record["ctxs"][:1] if question_in_prompt else [{"title": "", "text": ""}]}
    else:
        kept = {**record, "ctxs": [c for c, k in zip(record["ctxs"], keep) if k]}
    batch = Collator(dataclasses.replace(data, n_candidates=len(kept["ctxs"])), tokenizer, None, 0,
                     input_format=reader_input_format(model, data))([kept], [0])
    contexts = None
    if keep is not None or not question_in_prompt:
        contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    tokens = model.generate(contexts, batch.prompt_ids, batch.prompt_attention_mask, None, 4)
    return tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True).strip()


@pytest.mark.parametrize("generator", ["cepe", "fid"])
def test_report_conditions_equal_generation_from_only_the_selected_documents(records, tokenizer, fid_tokenizer, generator) -> None:
    """Each condition's hard mask must reproduce generation with only its documents given
    (paper Eq. 3-4): scoring the report against those reference predictions gives SubEM 1."""
    data, config = SETUPS[generator]
    tokenizer = fid_tokenizer if generator == "fid" else tokenizer
    # random weights, no aligned embeddings (which make an untrained model echo its last token):
    # the answers vary with the documents given
    model = build_reader(tokenizer, dataclasses.replace(config, align_embeddings=False))
    if generator == "fid":  # a T5 at its own init answers the same whatever the documents: wider weights
        torch.manual_seed(0)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 1.0)
    subset = records[:6]
    predictions_per_condition = []
    selections = {
        "both_gold": lambda c: c["is_supporting"],
        "answer_doc": lambda c: c["is_supporting"] and c["has_answer"],
        "bridge_doc": lambda c: c["is_supporting"] and not c["has_answer"],
        "all_candidates": lambda c: True,
    }
    for condition in REPORT_CONDITIONS:
        relabelled = []
        for record in subset:
            keep = None if condition == "no_documents" else [selections[condition](c) for c in record["ctxs"]]
            prediction = _reference_prediction(model, tokenizer, record, keep, data)
            assert normalize_answer(prediction), "reference prediction normalised to nothing"
            relabelled.append({**record, "answers": [prediction]})
        predictions_per_condition.append([r["answers"][0] for r in relabelled])
        report = reader_report(model, tokenizer, relabelled, data, batch_size=4)
        assert report["all"][condition] == 1.0, (condition, report["all"])
        assert report["all"]["queries"] == len(subset)
        assert set(report) >= {"all"} | {r["type"] for r in subset}
    # the documents change the answers, so a report that ignored the masks would fail
    assert any(len(set(per_record)) > 2 for per_record in zip(*predictions_per_condition))


@pytest.mark.parametrize("generator", ["cepe", "fid"])
def test_train_reader_command_writes_checkpoint_and_report(records, tmp_path, generator) -> None:
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "data:\n  n_candidates: 12\n  doc_max_tokens: 48\n  doc_template: '{title} : {text}'\n"
        "  prompt_template: 'question : {question} answer :'\n  answer_eos: true\n"
    )
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args([
        "--train-file", str(train_file), "--eval-file", str(train_file), "--out", str(tmp_path / "reader"),
        "--config", str(config_file), "--steps", "3", "--batch-size", "4", "--hidden-size", "32",
        "--intermediate-size", "64", "--attention-heads", "2", "--eval-limit", "8", "--generator", generator,
    ])
    assert run(args) == 0
    report = json.loads((tmp_path / "reader" / "reader_report.json").read_text())
    assert report["all"]["queries"] == 8
    training = json.loads((tmp_path / "reader" / "reader_training.json").read_text())
    assert training["reader"]["steps"] == 3 and training["data"]["doc_max_tokens"] == 48
    assert training["reader"]["generator"] == generator
    # the FiD reader takes its templates from its family, whatever the config says
    expected_template = FID_FORMAT.doc_template if generator == "fid" else "{title} : {text}"
    assert training["data"]["doc_template"] == expected_template
    model_type = json.loads((tmp_path / "reader" / "config.json").read_text())["model_type"]
    assert model_type == ("t5" if generator == "fid" else "cepe_llama")
    assert (tmp_path / "reader" / "model.safetensors").is_file()


def test_bad_reader_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        ReaderConfig(hidden_size=30, attention_heads=4)
    with pytest.raises(ValueError, match="all_candidates_fraction"):
        ReaderConfig(all_candidates_fraction=2.0)
    with pytest.raises(ValueError, match="gold_only_fraction"):
        ReaderConfig(gold_only_fraction=-0.1)


def test_curriculum_shows_only_the_gold_documents_first(records, tokenizer, monkeypatch) -> None:
    """The first gold_only_fraction of the steps draw views without negatives; later steps draw
    views with up to subset_max_negatives of them, or show all candidates."""
    import grerank_dist.demos.reader as reader_module

    calls: list[int] = []
    original = reader_module.sample_view

    def spy(record, rng, max_negatives):
        calls.append(max_negatives)
        view = original(record, rng, max_negatives)
        if max_negatives == 0:
            assert all(c["is_supporting"] for c in view["ctxs"])
        return view

    monkeypatch.setattr(reader_module, "sample_view", spy)
    config = dataclasses.replace(TINY, gold_only_fraction=0.5, all_candidates_fraction=0.0, subset_max_negatives=3)
    fit_reader(records, tokenizer, config, steps=6, data=DATA, log_every=10**9)
    per_step = [calls[i : i + TINY.batch_size] for i in range(0, len(calls), TINY.batch_size)]
    assert [set(step) for step in per_step] == [{0}] * 3 + [{3}] * 3


def _answer_nll(model, tokenizer, records, data: DataConfig) -> torch.Tensor:
    """Token-mean answer NLL with every candidate visible, through the generator interface."""
    batch = Collator(dataclasses.replace(data, n_candidates=12), tokenizer, None, 0,
                     input_format=reader_input_format(model, data))(records, list(range(len(records))))
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    return model.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, None).token_mean_nll()


def test_fid_reader_trains_through_the_generator_interface_and_reloads(records, fid_tokenizer, tmp_path) -> None:
    """The FiD reader: FiD's input format (question in every document, empty prompt, answer +
    EOS), gradients through answer_logprobs reach encoder and decoder, training lowers the
    loss, the frozen model saves and reloads (as FiD, through the family loader) identically."""
    batch = Collator(dataclasses.replace(FID_DATA, n_candidates=12), fid_tokenizer, None, 0)(records[:1], [0])
    document = FID_FORMAT.doc_template.format(question=records[0]["question"], **records[0]["ctxs"][0])
    assert fid_tokenizer.decode(batch.encoder_input_ids[0, 0][batch.encoder_attention_mask[0, 0].bool()]) == (
        " ".join(split_words(document)))
    answer = fid_tokenizer(records[0]["answers"][0], add_special_tokens=False)["input_ids"]
    assert batch.labels[0][batch.labels[0] != -100].tolist() == answer + [fid_tokenizer.eos_token_id]

    fresh = build_reader(fid_tokenizer, FID_TINY)
    assert isinstance(fresh, FidForConditionalGeneration)
    fresh.requires_grad_(True)
    _answer_nll(fresh, fid_tokenizer, records[:4], FID_DATA).backward()
    no_grad = [name for name, p in fresh.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad

    with torch.no_grad():
        initial = _answer_nll(build_reader(fid_tokenizer, FID_TINY), fid_tokenizer, records, FID_DATA).item()
    model, summary = fit_reader(records, fid_tokenizer, FID_TINY, steps=40, data=FID_DATA, log_every=20)
    with torch.no_grad():
        trained = _answer_nll(model, fid_tokenizer, records, FID_DATA).item()
    assert trained < initial - 1.0, (initial, trained)
    assert not any(p.requires_grad for p in model.parameters())
    assert summary["reader"]["generator"] == "fid" and summary["data"]["prompt_template"] == ""

    model.save_pretrained(tmp_path)
    fid_tokenizer.save_pretrained(tmp_path)
    reloaded, _ = load_reader(tmp_path, FID_DATA)
    assert isinstance(reloaded, FidForConditionalGeneration)
    with torch.no_grad():
        assert torch.equal(_answer_nll(reloaded, fid_tokenizer, records[:4], FID_DATA),
                           _answer_nll(model, fid_tokenizer, records[:4], FID_DATA))
