"""`grerank mine` (grerank_dist.evaluation.mine) under a decoder-only generator, and how it writes its outputs.

The mining test with the trained CEPE toy reader stays in tests/test_train.py (it shares that
module's reader fixture).
"""

from __future__ import annotations

import json
import resource
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from toy import toy_records, write_jsonl

import grerank_dist.evaluation.mine as mine_module
from grerank_dist.config import TrainConfig, load_config
from grerank_dist.data.collate import Collator
from grerank_dist.evaluation.mine import mine, scalar_baselines
from grerank_dist.models import load_generator
from grerank_dist.training.train import record_texts

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
# A non-empty instruction: the decoder-only prefix (BOS + instruction) and the tokenizer's vocabulary
# depend on it, so dropping the data config shows.
OVERRIDES = ["generator.path=random:tiny-llama", "data.instruction=read the documents", "train.micro_batch_size=4",
             "relax.k=1", "relax.tau=0.1"]
N_QUERIES = 8


@pytest.fixture
def llama_run(tmp_path: Path) -> tuple[TrainConfig, list[dict], str]:
    records = toy_records(N_QUERIES, 6, seed=3)
    return load_config(CONFIG, OVERRIDES), records, write_jsonl(tmp_path / "mine.jsonl", records)


def _reference(config: TrainConfig, records: list[dict]) -> tuple[torch.nn.Module, Collator]:
    """The generator and Collator as training and evaluation build them for these records."""
    generator, tokenizer = load_generator(
        config.generator.path, record_texts(records, config), seed=config.generator.seed, data=config.data
    )
    return generator, Collator(config.data, tokenizer, None, config.reranker.max_length, input_format=generator.input_format)


def test_mine_feeds_a_decoder_only_generator_the_training_input_format(llama_run, tmp_path, monkeypatch):
    """The batches mine builds are token for token those of training/evaluation: the prompt has no
    second BOS (the generator's prefix holds it) and documents are padded to doc_max_tokens."""
    config, records, data = llama_run
    seen = []
    original = mine_module.mine_relevance

    def spy(generator, contexts, batch, *args):
        seen.append(batch)
        return original(generator, contexts, batch, *args)

    monkeypatch.setattr(mine_module, "mine_relevance", spy)
    mine(config, data, tmp_path / "out", steps=1, lr=0.1, ks=(1,))
    generator, collate = _reference(config, records)
    bos = collate.gen_tok.bos_token_id
    assert generator.prefix_ids[0] == bos and len(seen) == N_QUERIES // config.train.micro_batch_size
    for got in seen:
        assert (got.input_ids[:, 0] != bos).all(), f"second BOS before the prompt: {got.input_ids[:, :3].tolist()}"
        assert got.encoder_input_ids.shape[-1] == config.data.doc_max_tokens, got.encoder_input_ids.shape
        want = collate([records[i] for i in got.record_ids], got.record_ids)
        for name in ("input_ids", "attention_mask", "labels", "encoder_input_ids", "encoder_attention_mask", "valid"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_mine_cli_on_a_decoder_only_generator_scores_the_correct_batch(llama_run, tmp_path):
    """`grerank mine` end to end on a tiny Llama: every scalar baseline it writes equals the one
    computed from the batch training builds, with the generator loaded under the run's data config."""
    from grerank_dist.cli import main as cli_main

    config, records, data = llama_run
    out = tmp_path / "out"
    assert cli_main(["mine", "--config", str(CONFIG), "--data", data, "--out", str(out), "--steps", "2",
                     "--k", "1", *OVERRIDES]) == 0
    rows = [json.loads(line) for line in (out / "relevance.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    generator, collate = _reference(config, records)
    batch = collate(records, list(range(len(records))))
    expected = scalar_baselines(generator, generator.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask), batch)
    assert set(expected) == set(mine_module.BASELINES)
    for name, scores in expected.items():
        got = torch.tensor([r[name] for r in rows])
        torch.testing.assert_close(got, scores, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    assert set(methods) == {mine_module.MINED, *mine_module.BASELINES}


@contextmanager
def file_size_limit(n_bytes: int):
    """Writes past ``n_bytes`` of any regular file fail with EFBIG, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not the default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_failing_part_way_leaves_the_earlier_outputs_intact(llama_run, tmp_path, capsys):
    """A mine run whose disk fills while it writes keeps the previous run's relevance.jsonl and
    metrics.json whole (no truncated file a later reader would take for a result) and leaves no
    temporary file behind. capsys keeps the captured output in memory, clear of the limit."""
    config, _, data = llama_run
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"relevance.jsonl": '{"id": "earlier run"}\n' * 200, "metrics.json": '{"methods": {}}\n', "metrics.md": "| Method |\n"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    with file_size_limit(1024), pytest.raises(OSError, match="too large"):
        mine(config, data, out, steps=1, lr=0.1, ks=(1,))
    assert {name: (out / name).read_text() for name in earlier} == earlier
    assert sorted(p.name for p in out.iterdir()) == sorted(earlier)


def test_mine_keeps_the_candidate_order_that_training_and_evaluation_read(tmp_path):
    """With retriever scores that rank the candidates against their file order, `data.candidate_order`
    decides which candidates mining reads and in which order, as it does for training and evaluation."""
    records = toy_records(4, 6, seed=5)
    for record in records:
        for position, ctx in enumerate(record["ctxs"]):
            ctx["score"] = float(position)  # the file order is the retriever's worst-first order
    data = write_jsonl(tmp_path / "scored.jsonl", records)
    for order, expected in (("file", lambda r: [c["id"] for c in r["ctxs"]]),
                            ("score", lambda r: [c["id"] for c in reversed(r["ctxs"])])):
        config = load_config(CONFIG, [*OVERRIDES, f"data.candidate_order={order}"])
        mine(config, data, tmp_path / order, steps=1, lr=0.1, ks=(1,))
        rows = [json.loads(line) for line in (tmp_path / order / "relevance.jsonl").read_text().splitlines()]
        assert [row["ctx_ids"] for row in rows] == [expected(r) for r in records], order
