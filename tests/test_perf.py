"""The efficient step: documents padded to the batch's longest, and the step benchmark's smoke run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from grerank_dist.config import DataConfig
from grerank_dist.data.collate import Collator

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

    from grerank_dist.perf.bench import PHASES, VARIANTS

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
    assert "efficient vs naive" in proc.stdout and "bf16 vs efficient (fp32)" in proc.stdout
    assert "bf16-all vs efficient (fp32)" in proc.stdout and "what bounds the step" in proc.stdout
    assert "total   = 3*F_rr" in proc.stdout  # the FLOP formula is printed
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == set(VARIANTS)
    # Same records for every variant: same useful FLOPs; the naive one pads to doc_max_tokens.
    assert results["naive"]["flops_useful"] == results["efficient"]["flops_useful"]
    assert set(results["efficient"]["flops_useful"]) == {"float32"}
    assert sum(results["naive"]["flops_executed"].values()) > sum(results["efficient"]["flops_executed"].values())
    # FLOPs by the dtype each part runs in: the bf16 generator's parts move to bfloat16, the
    # reranker's too in bf16-all; the total is the same.
    mixed, low = results["bf16"]["flops_useful"], results["bf16-all"]["flops_useful"]
    assert set(mixed) == {"float32", "bfloat16"} and set(low) == {"bfloat16"}
    assert abs(sum(mixed.values()) - sum(results["efficient"]["flops_useful"].values())) < 1
    # The profiled step's matmuls were found, with FLOPs in the dtypes the variant runs.
    for name, result in results.items():
        matmuls = result["matmuls"]
        assert matmuls["calls"] > 0 and matmuls["alone_seconds"] > 0, name
        assert matmuls["profiled_step_seconds"] > matmuls["step_seconds"] > 0, name
    assert set(results["efficient"]["matmuls"]["flops"]) == {"float32"}
    assert "bfloat16" in results["bf16"]["matmuls"]["flops"] and "float32" in results["bf16"]["matmuls"]["flops"]
    # The bf16 generator scores the same answers as the fp32 one up to bf16 rounding.
    for fp32, bf16 in zip(results["efficient"]["answer_loglik"], results["bf16"]["answer_loglik"]):
        assert abs(fp32 - bf16) < 0.05 and fp32 < 0


def _torchrun(*args: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dist_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{root}:{root / 'tests'}"})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.distributed
def test_collective_counter_counts_a_known_all_gather_exactly(tmp_path):
    """Two ranks each contribute a [3, 5] fp32 shard: the gathered buffer is 2 x 60 = 120 bytes."""
    import json

    out = tmp_path / "counts"
    _torchrun("tests/traffic_worker.py", str(out))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"counts.rank{rank}").read_text())
        assert result["counts"] == {"all_gather_into_tensor": [1, 120]}
        assert result["gathered"] == [0.0] * 15 + [1.0] * 15


@pytest.mark.distributed
def test_predicted_all_gather_bytes_match_the_counted_collectives_on_two_ranks():
    """Counted from DeepSpeed's collectives vs computed from parameter shapes and the config
    (grerank_dist.perf.cost_model): the ZeRO-3 generator's gathered bytes, forward and backward, with
    every use gathered (no reuse window) and with the repository's window (gathered once); a
    replicated generator gathers nothing. Persistence threshold 1000: the norms stay resident."""
    from grerank_dist.perf.traffic import launch, measured

    ranks = launch("tiny", 2, ["zero3-release", "zero3", "replicated"], steps=1, warmup=2, seed=0,
                   zero={"stage3_param_persistence_threshold": 1000}, overrides=[], timeout=600)
    for rank in ranks:
        by_placement = {r["placement"]: r for r in rank}
        assert not any(r.get("error") for r in rank), rank
        for name in ("zero3-release", "zero3"):
            m, p = measured(by_placement[name]), by_placement[name]["predicted"]
            for key in ("gather_forward", "gather_backward", "rr_all_reduce", "rr_param_all_gather"):
                assert abs(m[key] - p[key]) <= 0.05 * p[key], (name, key, m[key], p[key])
        release, once = measured(by_placement["zero3-release"]), measured(by_placement["zero3"])
        assert release["gather_backward"] > 0 and once["gather_backward"] == 0  # the frozen decoder's backward
        assert once["gather_forward"] == release["gather_forward"] > 0
        replicated = measured(by_placement["replicated"])
        assert replicated["gather_forward"] == replicated["gather_backward"] == 0


def test_gather_schedule_and_projection_arithmetic_by_hand():
    """A two-module trace at world 4: 'a' (10 elements, padded to 12) runs forward and backward,
    'b' (3 elements) is persistent; bf16. No reuse window: a is gathered twice, 2 x 12 x 2 bytes;
    a window covering the trace: once. Ring all-gather of 8 GB over 8 GPUs of a node: 7/8 x 8e9 /
    450e9 s; over 16 GPUs on two nodes: 15/16 x 8e9 / 50e9 s."""
    import math

    from grerank_dist.perf import cost_model as cm

    uses = [cm.ModuleUse("a", (("a.w", 10),), True), cm.ModuleUse("b", (("b.w", 3),), True)]
    no_window = cm.ZeroSettings(3, 4, 2, persistence_threshold=5, max_reuse_distance=0, prefetch_bucket=0)
    schedule = cm.gather_schedule(uses, no_window)
    assert (schedule.forward_bytes, schedule.backward_bytes, schedule.per_param) == (24, 24, {"a.w": 2})
    window = cm.ZeroSettings(3, 4, 2, persistence_threshold=5, max_reuse_distance=100, prefetch_bucket=0)
    assert cm.gather_schedule(uses, window).total_bytes == 24
    assert cm.gather_schedule(uses, cm.ZeroSettings(0, 4, 2)).total_bytes == 0
    assert math.isclose(cm.all_gather_seconds(8e9, 8, cm.Cluster(1), within_node=True), 7 / 8 * 8e9 / 450e9)
    assert math.isclose(cm.all_gather_seconds(8e9, 16, cm.Cluster(2), within_node=False), 15 / 16 * 8e9 / 50e9)
    assert math.isclose(cm.compute_seconds(989e12 * 0.45, cm.Cluster(1)), 1.0)


def test_gpu_path_choices_given_a_faked_capability_set(monkeypatch):
    """No GPU here: the selection logic alone. `auto` on CUDA picks flash-attn (through the folded
    channel) when installed, else the folded channel on SDPA's fused kernels for bf16, SDPA with a
    float mask for fp32; the fused AdamW is requested on CUDA and CPU."""
    from grerank_dist.method import attention
    from grerank_dist.training.strategy import DeepSpeedStrategy

    cuda = torch.device("cuda")
    monkeypatch.setattr(attention, "_flash_attn_installed", lambda: True)
    assert attention.auto_backend(cuda, torch.bfloat16, requires_grad=True) == "flash"
    monkeypatch.setattr(attention, "_flash_attn_installed", lambda: False)
    assert attention.auto_backend(cuda, torch.bfloat16, requires_grad=True) == "folded"
    assert attention.auto_backend(cuda, torch.float32, requires_grad=True) == "sdpa"
    assert attention.auto_backend(torch.device("cpu"), torch.float32, requires_grad=True) != "flash"
    assert DeepSpeedStrategy.adamw_options(cuda) == {"fused": True}
    assert DeepSpeedStrategy.adamw_options(torch.device("cpu")) == {"fused": True}
    assert DeepSpeedStrategy.adamw_options(torch.device("mps")) == {}


def test_reranker_optimizer_on_cpu_is_fused_and_steps_like_the_default_adamw():
    """The fused CPU AdamW the strategy asks for updates parameters as torch's default
    (foreach) AdamW does, over three steps with weight decay."""
    from grerank_dist.training.strategy import DeepSpeedStrategy

    torch.manual_seed(0)
    start = [torch.randn(37, 5), torch.randn(11)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    final = {}
    for name, options in (("fused", DeepSpeedStrategy.adamw_options(torch.device("cpu"))), ("default", {})):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **options)
        assert bool(optimizer.defaults["fused"]) == (name == "fused")
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        final[name] = params
    for fused, default, initial in zip(final["fused"], final["default"], start):
        assert (fused - initial).abs().mean() > 1e-2  # it moved (3 steps of lr 1e-2)
        torch.testing.assert_close(fused, default, atol=1e-6, rtol=0)


def test_median_split_takes_the_median_steps_flops_by_dtype_as_statistics_median_does():
    from grerank_dist.perf.bench import median_split

    steps = [{"float32": 1.0, "bfloat16": 3.0}, {"float32": 5.0, "bfloat16": 5.0}, {"float32": 2.0, "bfloat16": 1.0}]
    assert median_split(steps) == {"float32": 1.0, "bfloat16": 3.0}  # totals 4, 10, 3: the middle is 4
    steps.append({"float32": 20.0, "bfloat16": 0.0})  # totals 3, 4, 10, 20: the mean of 4 and 10
    assert median_split(steps) == {"float32": 3.0, "bfloat16": 4.0}
