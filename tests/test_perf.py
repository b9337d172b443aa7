"""The efficient step: documents padded to the batch's longest, and the step benchmark's smoke run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from grerank_dist.config import DataConfig
from grerank_dist.data import Collator

WORDS = [f"w{i}" for i in range(40)]


def _records(lengths: list[list[int]]) -> list[dict]:
    """One record per row of ``lengths``, each document that many words long."""
    records = []
    for q, row in enumerate(lengths):
        ctxs = [{"title": "", "text": " ".join(WORDS[(q + i + j) % 40] for j in range(n))} for i, n in enumerate(row)]
        records.append({"id": str(q), "question": f"w{q} w{q + 1} ?", "answers": [f"w{q + 2} w{q + 3}"], "ctxs": ctxs})
    return records


def _with_fixed_width(fmt):
    return dataclasses.replace(fmt, docs_pad_to_batch=False)


@pytest.mark.parametrize("family", ["cepe", "fid"])
def test_documents_padded_to_the_batch_longest_score_as_at_the_fixed_width(family):
    """CEPE's and FiD's encoders see relative positions only (RoPE, T5 buckets) and mask padding
    keys, so padding documents to the batch's longest instead of doc_max_tokens leaves every
    answer log-probability (and its gradient w.r.t. the log-mask) unchanged up to fp32 rounding."""
    from grerank_dist.models import load_generator

    data = DataConfig(n_candidates=3, doc_max_tokens=16, doc_template="{title} {text}", prompt_template="{question}")
    records = _records([[3, 5, 2], [7, 1, 4]])
    texts = WORDS + ["?"]
    model, tokenizer = load_generator("random:tiny" if family == "cepe" else "random:tiny-fid", texts, seed=1, data=data)
    fmt = model.input_format
    short = Collator(data, tokenizer, None, 0, input_format=fmt)(records, [0, 1])
    full = Collator(data, tokenizer, None, 0, input_format=_with_fixed_width(fmt))(records, [0, 1])
    assert full.encoder_input_ids.shape[-1] == 16
    assert short.encoder_input_ids.shape[-1] == int(short.encoder_attention_mask.sum(-1).max()) < 16

    log_mask = torch.log(torch.tensor([[0.9, 0.2, 0.6], [0.3, 1.0, 0.5]]))
    results = []
    for batch in (short, full):
        mask = log_mask.clone().requires_grad_(True)
        contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        answer = model.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, mask)
        (grad,) = torch.autograd.grad(answer.sum().sum(), mask)
        results.append((answer.sum().detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=2e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=2e-5)
    assert results[0][0].abs().min() > 0.1  # real log-likelihoods, not a trivially equal zero


def test_decoder_only_documents_keep_the_fixed_width():
    """A decoder-only generator places documents at absolute positions after a shared prefix, so
    their width moves the prompt relative to the prefix: it keeps doc_max_tokens."""
    from grerank_dist.models import load_generator

    data = DataConfig(n_candidates=3, doc_max_tokens=16, doc_template="{title} {text}", prompt_template="{question}")
    records = _records([[3, 5, 2], [7, 1, 4]])
    model, tokenizer = load_generator("random:tiny-llama", WORDS + ["?"], seed=1, data=data)
    batch = Collator(data, tokenizer, None, 0, input_format=model.input_format)(records, [0, 1])
    assert batch.encoder_input_ids.shape[-1] == 16


def test_bench_runs_at_the_tiny_shape_and_prints_every_column(tmp_path):
    """`grerank bench` smoke run: every variant steps through the real trainer path and the table
    has every column (no timing thresholds)."""
    import json
    import os
    import subprocess
    import sys

    from grerank_dist.bench import PHASES, VARIANTS

    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "grerank_dist.cli", "bench", "--shape", "tiny", "--steps", "1", "--warmup", "0",
         "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["variant"])
    for column in (*PHASES, "step", "q/s", "GFLOP", "%peak", "RSS"):
        assert column in header, column
    assert "efficient vs naive" in proc.stdout and "bf16 vs fp32 generator" in proc.stdout
    assert "total   = 3*F_rr" in proc.stdout  # the FLOP formula is printed
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == set(VARIANTS)
    # Same records for every variant: same useful FLOPs; the naive one pads to doc_max_tokens.
    assert results["naive"]["flops_useful"] == results["efficient"]["flops_useful"] > 0
    assert results["naive"]["flops_executed"] > results["efficient"]["flops_executed"]
    # The bf16 generator scores the same answers as the fp32 one up to bf16 rounding.
    for fp32, bf16 in zip(results["efficient"]["answer_loglik"], results["bf16"]["answer_loglik"]):
        assert abs(fp32 - bf16) < 0.05 and fp32 < 0
