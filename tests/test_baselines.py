"""The LLM-supervised baselines on a real tiny CEPE: the m masks of a query share one copy of
its documents' keys and values, batched masks equal one-by-one calls, ADist's attention mass
against an eager softmax recomputed here, and only the reranker receives gradients."""

from __future__ import annotations

import pytest
import torch

import grerank_dist.models.cepe as cepe_module
from grerank_dist.method.attention import available_backends, masked_attention
from grerank_dist.config import ObjectiveConfig, RelaxConfig
from grerank_dist.method.objectives import GENERATOR_FREE_OBJECTIVES, OBJECTIVES, single_document_masks
from helpers_cepe import build_tiny_model, make_batch

NEG_INF = float("-inf")


def _reference_attention(q, k, v, bias):
    """softmax(q k^T / sqrt(D) + bias) v with the keys and values repeated per row and per head."""
    rows, heads = q.shape[:2]
    k = k.repeat_interleave(rows // k.shape[0], 0).repeat_interleave(heads // k.shape[1], 1).double()
    v = v.repeat_interleave(rows // v.shape[0], 0).repeat_interleave(heads // v.shape[1], 1).double()
    logits = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias.double()[:, None, None, :]
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32, requires_grad=False))
def test_masks_sharing_one_copy_of_the_keys_equal_repeated_keys(backend):
    gen = torch.Generator().manual_seed(0)
    batch, masks, heads, kv_heads, n_keys, dim = 2, 3, 4, 2, 10, 8
    q = torch.randn(batch * masks, heads, 5, dim, generator=gen)
    k, v = torch.randn(batch, kv_heads, n_keys, dim, generator=gen), torch.randn(batch, kv_heads, n_keys, dim, generator=gen)
    bias = torch.randn(batch * masks, n_keys, generator=gen)
    bias[1, :6] = NEG_INF  # a mask that removes documents
    bias.requires_grad_(backend == "eager")
    out = masked_attention(q, k, v, bias, backend=backend)
    reference = _reference_attention(q, k, v, bias.detach())
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=0)
    if backend == "eager":  # the mask gradient too, against autograd through the reference
        weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (out.double() * weights).sum().backward()
        ref_bias = bias.detach().double().requires_grad_(True)
        (_reference_attention(q, k, v, ref_bias) * weights).sum().backward()
        torch.testing.assert_close(bias.grad.double(), ref_bias.grad, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=3)


def test_single_document_masks_run_as_one_call_over_one_copy_of_the_keys(model, monkeypatch):
    batch = make_batch(2, 4, seed=5)
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    masks = single_document_masks(valid)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    key_rows = []
    real = cepe_module.masked_attention

    def recording(q, k, v, key_bias, **kwargs):
        key_rows.append((q.shape[0], k.shape[0]))
        return real(q, k, v, key_bias, **kwargs)

    monkeypatch.setattr(cepe_module, "masked_attention", recording)
    batched = model.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, masks)
    assert key_rows and all(rows == 8 and keys == 2 for rows, keys in key_rows)  # 2 queries x 4 masks, 2 copies
    for i in range(4):
        alone = model.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, masks[:, i])
        torch.testing.assert_close(batched.token_logprobs[:, i], alone.token_logprobs, atol=1e-5, rtol=0)


def test_attention_mass_matches_an_eager_softmax_over_the_recorded_inputs(model, monkeypatch):
    """Each cross-attention layer's inputs are captured; the head-, layer- and answer-position
    mean of softmax(q k^T + bias) per document is recomputed here and compared."""
    batch = make_batch(2, 3, seed=7)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    log_mask = torch.tensor([[0.0, -1.0, NEG_INF], [-0.5, 0.0, -2.0]])
    captured = []
    layers = [layer.cross_attn for layer in model.model.layers if layer.cross_attn is not None]
    hooks = [a.register_forward_pre_hook(lambda mod, args: captured.append((mod, args))) for a in layers]
    try:
        mass = model.document_attention_mass(contexts, batch.input_ids, batch.attention_mask, batch.labels, log_mask)
        weighted = model.document_attention_mass(contexts, batch.input_ids, batch.attention_mask, batch.labels,
                                                 log_mask, value_norm=True)
    finally:
        for hook in hooks:
            hook.remove()
    predicting = torch.zeros(batch.labels.shape, dtype=torch.bool)
    predicting[:, :-1] = batch.labels[:, 1:] != -100
    expected = []
    for norm in (False, True):
        per_layer = []
        for mod, (hidden, keys, values, bias) in captured[len(layers) * norm: len(layers) * (norm + 1)]:
            q = mod.q_proj(mod.layernorm(hidden)).view(*hidden.shape[:2], mod.num_heads, mod.head_dim).transpose(1, 2)
            k = keys.repeat_interleave(mod.num_heads // keys.shape[1], 1)
            probs = torch.softmax(q @ k.transpose(-1, -2) / mod.head_dim**0.5 + bias[:, None, None, :], -1)
            if norm:
                probs = probs * values.repeat_interleave(mod.num_heads // values.shape[1], 1).norm(dim=-1)[:, :, None, :]
            per_layer.append(probs.mean(1).view(2, hidden.shape[1], 3, -1).sum(-1))
        per_position = torch.stack(per_layer).mean(0)
        expected.append(torch.stack([per_position[b][predicting[b]].mean(0) for b in range(2)]))
    torch.testing.assert_close(mass, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(weighted, expected[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    assert mass[0, 2].item() == 0.0  # a removed document gets no attention
    # recording leaves the layers as they were: the next answer pass reads no recorder
    assert all(a.mass_recorder is None for a in layers)


class _Reranker(torch.nn.Module):
    """Scores from fixed candidate features: a stand-in for the cross-encoder."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.features = torch.randn(2, n, 5, generator=torch.Generator().manual_seed(1))
        self.linear = torch.nn.Linear(5, 1)

    def forward(self) -> torch.Tensor:
        return self.linear(self.features).squeeze(-1)


# grerank, nogumbel and grerank_pdist backpropagate through the generator's attention by design
@pytest.mark.parametrize("objective", sorted(set(OBJECTIVES) - GENERATOR_FREE_OBJECTIVES - {"grerank", "nogumbel", "grerank_pdist"}))
def test_only_the_reranker_receives_gradients(objective):
    """The hard-mask baselines read the generator as a constant target: even a generator whose
    parameters require grad (frozen in training) receives none."""
    model = build_tiny_model(seed=4).requires_grad_(True)
    batch = make_batch(2, 4, seed=9)
    batch.valid = torch.tensor([[True] * 4, [True, True, True, False]])
    reranker = _Reranker(4)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    out = OBJECTIVES[objective](model, contexts, batch, reranker(), RelaxConfig(k=2, tau=0.5),
                                torch.Generator().manual_seed(0), ObjectiveConfig())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert reranker.linear.weight.grad is not None and reranker.linear.weight.grad.abs().sum() > 0
    reached = [name for name, p in model.named_parameters() if p.grad is not None]
    assert reached == [], reached


@pytest.mark.distributed
def test_two_processes_train_with_dro(tmp_path):
    """torchrun, 2 ranks on gloo, ZeRO-3 generator: DRO's m sampled subsets per query run as one
    decoder call per step in a fixed module order (the prefetch trace stays complete), the
    reranker stays identical across ranks, the generator unchanged, and DRO's own statistics
    reach the log."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from toy import toy_records, write_jsonl

    root = Path(__file__).resolve().parents[1]
    data = write_jsonl(tmp_path / "train.jsonl", toy_records(40, 6, seed=3))
    out = tmp_path / "run"
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{root / 'tests'}:{root}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "tests" / "dist_worker.py"), str(root / "configs" / "tiny_cpu.yaml"), str(out / "worker.json"),
               f"output_dir={out}", f"data.train_file={data}", "train.objective=dro", "relax.k=2",
               "objective.dro_samples=3", "train.max_steps=3", "train.micro_batch_size=4", "train.save_every=0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [json.loads((out / f"worker.json.rank{r}").read_text()) for r in range(2)]
    assert ranks[0]["reranker_hash"] == ranks[1]["reranker_hash"]
    for rank in ranks:
        assert rank["prefetch_trace_complete"] and rank["generator_max_abs_change"] == 0.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert 1 / 3 - 1e-6 <= record["train/weight_max"] <= 1 + 1e-6 and record["train/subset_logp"] < 0
