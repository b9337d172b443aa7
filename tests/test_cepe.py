"""CEPE generator: architecture against an independent reference, the log-mask's exactness and
gradient, batched masks, loading the released layout, generation."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.distributed as dist
from transformers import AutoTokenizer

import grerank_dist.models.cepe as cepe_module
from grerank_dist.method.attention import available_backends
from grerank_dist.interface import ParallelContextGenerator
from grerank_dist.models import load_generator
from grerank_dist.models.cepe import (
    CepeConfig,
    CepeForCausalContextLM,
    cepe_7b_config,
    convert_bin_to_safetensors,
    expected_weight_shapes,
    load_cepe_config,
    tiny_cepe_config,
)
from helpers_cepe import (
    TinyBatch,
    build_tiny_model,
    make_batch,
    reference_logits,
    save_tiny_tokenizer,
    write_released_checkpoint,
)

NEG_INF = float("-inf")
ATOL = 2e-5  # fp32 logits of magnitude ~4


@pytest.fixture(scope="module")
def model() -> CepeForCausalContextLM:
    return build_tiny_model()


@pytest.fixture(scope="module")
def model64() -> CepeForCausalContextLM:
    return build_tiny_model(dtype=torch.float64)


def run(model: CepeForCausalContextLM, batch: TinyBatch, doc_log_mask=None, **kwargs):
    return model(
        batch.input_ids, batch.attention_mask, labels=batch.labels, encoder_input_ids=batch.encoder_input_ids,
        encoder_attention_mask=batch.encoder_attention_mask, doc_log_mask=doc_log_mask, **kwargs,
    )


def select_docs(batch: TinyBatch, keep: torch.Tensor) -> TinyBatch:
    """The same batch with only the documents keep[b] (indices, equal count per row)."""
    index = keep[:, :, None].expand(-1, -1, batch.encoder_input_ids.shape[-1])
    return TinyBatch(batch.encoder_input_ids.gather(1, index), batch.encoder_attention_mask.gather(1, index),
                     batch.input_ids, batch.attention_mask, batch.labels)


def real_logits(logits: torch.Tensor, batch: TinyBatch) -> torch.Tensor:
    return logits[batch.attention_mask.bool()]


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_hidden_layers": 3, "num_cross_attn_layers": 2},  # first layer without cross-attention
        {"num_hidden_layers": 3, "num_cross_attn_layers": 3, "num_cross_attn_hidden_states": 2},
    ],
    ids=["release-like", "partial-cross", "multi-hidden-states"],
)
def test_forward_matches_independent_reference(overrides):
    """Whole model vs a plain-torch CEPE written from the spec (paper's M*exp(s) weighting)."""
    model = build_tiny_model(dtype=torch.float64, **overrides)
    batch = make_batch(2, 3, seed=1)
    log_mask = torch.tensor([[-0.3, NEG_INF, -1.7], [-2.2, -0.1, -0.6]], dtype=torch.float64)
    expected = reference_logits(model, batch, log_mask)
    got = run(model, batch, log_mask).logits
    torch.testing.assert_close(real_logits(got, batch), real_logits(expected, batch), atol=1e-5, rtol=0)
    assert real_logits(expected, batch).std() > 0.5  # the check is not vacuous


def test_without_documents_the_decoder_is_transformers_llama(model):
    """No contexts: cross-attention is skipped and the decoder must be exactly Llama-2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, attn_implementation="eager",
    ))
    decoder_weights = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.") and "cross_attn" not in k}
    llama.load_state_dict(decoder_weights, strict=True)
    batch = make_batch(2, 3, seed=22)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    expected = llama(batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids).logits
    got = model(batch.input_ids, batch.attention_mask).logits
    torch.testing.assert_close(real_logits(got, batch), real_logits(expected, batch), atol=ATOL, rtol=0)


def test_seven_b_config_has_the_released_tensors():
    shapes = expected_weight_shapes(cepe_7b_config())
    assert len(shapes) == 669
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 8_516_196_352
    assert shapes["model.layers.31.cross_attn.k_proj.weight"] == (4096, 1024)
    assert shapes["encoder.embed_tokens.weight"] == (32001, 1024)
    assert not any("rotary" in name for name in shapes)


def test_decoder_is_causal_even_if_config_says_not_decoder():
    model = build_tiny_model(is_decoder=False)
    batch = make_batch(2, 3, seed=2)
    changed = batch.input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 60 + 4
    before = run(model, batch).logits
    after = model(changed, batch.attention_mask, encoder_input_ids=batch.encoder_input_ids,
                  encoder_attention_mask=batch.encoder_attention_mask).logits
    torch.testing.assert_close(after[:, :-1], before[:, :-1], atol=0, rtol=0)
    assert not torch.allclose(after[:, -1], before[:, -1])


def test_left_and_right_padded_prompts_agree(model):
    """Position ids come from the attention mask: padding on either side leaves real tokens alone."""
    batch = make_batch(1, 3, seed=3)
    tokens = torch.tensor([[1, 9, 17, 23, 40, 12]])
    pad = torch.full((1, 3), 3)
    ones, zeros = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    docs = dict(encoder_input_ids=batch.encoder_input_ids, encoder_attention_mask=batch.encoder_attention_mask)
    plain = model(tokens, ones, **docs).logits[0]
    left = model(torch.cat([pad, tokens], 1), torch.cat([zeros, ones], 1), **docs).logits[0, 3:]
    right = model(torch.cat([tokens, pad], 1), torch.cat([ones, zeros], 1), **docs).logits[0, :6]
    torch.testing.assert_close(left, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(right, plain, atol=ATOL, rtol=0)


def test_train_mode_is_deterministic(model):
    batch = make_batch(2, 3, seed=4)
    model.train()
    try:
        first, second = run(model, batch).logits, run(model, batch).logits
    finally:
        model.eval()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, run(model, batch).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------ mask exactness


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("n_keep", [1, 2, 4])
def test_hard_mask_equals_only_the_kept_documents(model, batch_size, n_keep):
    """Paper Eq. 3-4: log-mask in {0, -inf} == giving the generator only the selected documents."""
    n_docs = 5
    batch = make_batch(batch_size, n_docs, seed=10 + n_keep)
    gen = torch.Generator().manual_seed(n_keep)
    keep = torch.stack([torch.randperm(n_docs, generator=gen)[:n_keep].sort().values for _ in range(batch_size)])
    log_mask = torch.full((batch_size, n_docs), NEG_INF).scatter(1, keep, 0.0)
    masked = run(model, batch, log_mask)
    only_kept = run(model, select_docs(batch, keep))
    torch.testing.assert_close(real_logits(masked.logits, batch), real_logits(only_kept.logits, batch), atol=ATOL, rtol=0)
    torch.testing.assert_close(masked.loss, only_kept.loss, atol=1e-6, rtol=0)
    everything = run(model, batch)
    assert not torch.allclose(everything.logits, masked.logits, atol=1e-3)  # the mask does matter


def test_hard_mask_with_different_counts_per_query(model):
    batch = make_batch(3, 4, seed=20)
    keep_sets = [[2], [0, 1, 3], [1, 3]]
    log_mask = torch.full((3, 4), NEG_INF)
    for row, keep in enumerate(keep_sets):
        log_mask[row, keep] = 0.0
    masked = run(model, batch, log_mask).logits
    for row, keep in enumerate(keep_sets):
        single = TinyBatch(*(t[row : row + 1] for t in (batch.encoder_input_ids, batch.encoder_attention_mask,
                                                       batch.input_ids, batch.attention_mask, batch.labels)))
        alone = run(model, select_docs(single, torch.tensor([keep]))).logits
        real = batch.attention_mask[row].bool()
        torch.testing.assert_close(masked[row][real], alone[0][real], atol=ATOL, rtol=0)


def test_zero_or_constant_log_mask_equals_no_mask(model):
    """Softmax is shift invariant: c*1 reweights every document alike."""
    batch = make_batch(2, 4, seed=5)
    no_mask = run(model, batch).logits
    for constant in (0.0, -3.7, 2.5):
        shifted = run(model, batch, torch.full((2, 4), constant)).logits
        torch.testing.assert_close(shifted, no_mask, atol=ATOL, rtol=0)


def test_fully_padded_document_is_ignored(model):
    """A padding slot (all tokens masked) must neither produce NaN nor receive attention."""
    batch = make_batch(2, 3, seed=6)
    padded = TinyBatch(batch.encoder_input_ids.clone(), batch.encoder_attention_mask.clone(),
                       batch.input_ids, batch.attention_mask, batch.labels)
    padded.encoder_input_ids[:, 1] = 0
    padded.encoder_attention_mask[:, 1] = 0
    without_slot = select_docs(batch, torch.tensor([[0, 2], [0, 2]]))
    torch.testing.assert_close(run(model, padded).logits, run(model, without_slot).logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------- gradients


def test_log_mask_gradient_matches_finite_differences_and_reference(model64):
    """Autograd vs central differences of the model's loss, and vs autograd of the independent
    float64 reference. transformers' LlamaRMSNorm normalises in fp32 even in a float64 model, so
    the model's loss is smooth only to ~1e-7: the difference step is 1e-3 (noise ~1e-4, truncation
    ~1e-6); the reference comparison carries the tight tolerance."""
    batch = make_batch(2, 3, seed=7)
    log_mask = torch.tensor([[-0.2, -1.3, -0.7], [-2.0, -0.05, -0.9]], dtype=torch.float64, requires_grad=True)
    before = state_copy(model64)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(run(model64, batch, log_mask).loss, log_mask)
        reference = reference_logits(model64, batch, log_mask)[:, :-1]
        targets = batch.labels[:, 1:]
        reference_loss = torch.nn.functional.cross_entropy(reference.reshape(-1, reference.shape[-1]), targets.reshape(-1))
        (reference_grad,) = torch.autograd.grad(reference_loss, log_mask)
    step = 1e-3
    numeric = torch.zeros_like(grad)
    with torch.no_grad():
        for index in range(log_mask.numel()):
            delta = torch.zeros(log_mask.numel(), dtype=torch.float64)
            delta[index] = step
            delta = delta.view_as(log_mask)
            plus = run(model64, batch, log_mask + delta).loss
            minus = run(model64, batch, log_mask - delta).loss
            numeric.view(-1)[index] = (plus - minus) / (2 * step)
    torch.testing.assert_close(grad, numeric, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(grad, reference_grad, atol=1e-6, rtol=1e-5)
    assert grad.abs().min() > 1e-3  # every document matters, so the check is not vacuous
    assert all(p.grad is None for p in model64.parameters())
    assert all(torch.equal(before[k], v) for k, v in model64.state_dict().items())


def test_backward_reaches_only_the_mask(model):
    batch = make_batch(2, 3, seed=8)
    log_mask = torch.zeros(2, 3, requires_grad=True)
    with torch.enable_grad():
        out = run(model, batch, log_mask)
        out.loss.backward()
    assert log_mask.grad is not None and log_mask.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert not out.contexts.states[0].requires_grad  # the frozen encoder ran without autograd


def mask_gradient(model, batch, log_mask):
    """loss.backward() as the trainer calls it (reentrant checkpointing refuses autograd.grad)."""
    leaf = log_mask.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = run(model, batch, leaf).loss
        loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_hidden_layers": 3, "num_cross_attn_layers": 2}, {"num_hidden_layers": 4, "num_cross_attn_layers": 1}],
    ids=["all-cross", "3-layers-2-cross", "4-layers-1-cross"],
)
def test_gradient_checkpointing_gives_the_same_gradient(overrides, monkeypatch):
    """Layers before the first cross-attention layer have no input that needs a gradient: they
    run unchecked (a reentrant checkpoint there fails in backward), the others are checkpointed."""
    model = build_tiny_model(**overrides)
    batch = make_batch(2, 4, seed=9)
    log_mask = torch.log(torch.tensor([[0.9, 0.2, 0.6, 0.05], [0.3, 0.8, 0.1, 0.7]]))
    loss_plain, grad_plain = mask_gradient(model, batch, log_mask)
    assert grad_plain.abs().sum() > 0
    calls = []

    def spy(function, *args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(cepe_module, "checkpoint", spy)
    model.activation_checkpointing_enable()
    try:
        loss_ckpt, grad_ckpt = mask_gradient(model, batch, log_mask)
        assert len(calls) == len(model.config.cross_attention_layer_ids())
        assert all(call == {"use_reentrant": True} for call in calls)
        calls.clear()
        with torch.enable_grad():
            run(model, batch, log_mask)  # nothing requires grad: plain forward, no checkpoint
        assert calls == []
    finally:
        model.activation_checkpointing_disable()
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=0)
    torch.testing.assert_close(grad_ckpt, grad_plain, atol=1e-7, rtol=1e-6)


def test_unsupported_checkpointing_options_are_rejected(model):
    with pytest.raises(ValueError, match="reentrant"):
        model.activation_checkpointing_enable({"use_reentrant": False})


BACKENDS = available_backends("cpu", torch.float32, requires_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_eager(model, backend):
    batch = make_batch(2, 4, seed=11)
    log_mask = torch.log(torch.tensor([[0.9, 0.2, 0.6, 0.05], [0.3, 0.8, 0.1, 0.7]]))
    log_mask[1, 2] = NEG_INF
    try:
        model.config.cross_attn_backend = "eager"
        loss_eager, grad_eager = mask_gradient(model, batch, log_mask)
        model.config.cross_attn_backend = backend
        loss, grad = mask_gradient(model, batch, log_mask)
    finally:
        model.config.cross_attn_backend = "auto"
    torch.testing.assert_close(loss, loss_eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, grad_eager, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only (bf16 kernels); CPU twin: test_every_backend_matches_eager")
def test_every_backend_matches_eager_bf16_on_gpu():
    model = build_tiny_model().to("cuda", torch.bfloat16)
    batch = make_batch(2, 4, seed=11)
    batch = TinyBatch(*(t.cuda() for t in vars(batch).values()))
    log_mask = torch.log(torch.tensor([[0.9, 0.2, 0.6, 0.05], [0.3, 0.8, 0.1, 0.7]], device="cuda"))
    model.config.cross_attn_backend = "eager"
    loss_eager, grad_eager = mask_gradient(model, batch, log_mask)
    for backend in available_backends("cuda", torch.bfloat16, requires_grad=True):
        model.config.cross_attn_backend = backend
        loss, grad = mask_gradient(model, batch, log_mask)
        torch.testing.assert_close(loss, loss_eager, atol=3e-2, rtol=0, msg=backend)
        torch.testing.assert_close(grad, grad_eager, atol=3e-2, rtol=5e-2, msg=backend)


# ------------------------------------------------------------------------------ batched masks


@pytest.mark.parametrize("per_row_inputs", [False, True], ids=["inputs-per-query", "inputs-per-row"])
def test_batched_masks_equal_separate_calls(model, per_row_inputs):
    batch = make_batch(2, 4, seed=12)
    masks = torch.log(torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)))
    masks[0, 1, :3] = NEG_INF  # a single-document mask, as the baselines use
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    inputs = (batch.input_ids, batch.attention_mask, batch.labels)
    if per_row_inputs:
        inputs = tuple(t.repeat_interleave(3, 0) for t in inputs)
    encoder_calls, kv_calls = [], []
    hooks = [model.encoder.register_forward_hook(lambda *a: encoder_calls.append(1))]
    hooks += [layer.cross_attn.k_proj.register_forward_hook(lambda *a: kv_calls.append(1)) for layer in model.model.layers]
    try:
        out = model(inputs[0], inputs[1], labels=inputs[2], encoder_input_ids=batch.encoder_input_ids,
                    encoder_attention_mask=batch.encoder_attention_mask, doc_log_mask=masks)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(encoder_calls) == 1 and len(kv_calls) == model.config.num_hidden_layers
    answer = model.answer_logprobs(contexts, *inputs, masks)
    assert answer.token_logprobs.shape == (2, 3, batch.input_ids.shape[1])
    logits = out.logits.view(2, 3, *out.logits.shape[1:])
    losses = []
    for j in range(3):
        single = model(batch.input_ids, batch.attention_mask, labels=batch.labels, contexts=contexts,
                       doc_log_mask=masks[:, j])
        losses.append(single.loss)
        torch.testing.assert_close(logits[:, j], single.logits, atol=ATOL, rtol=0)
        single_answer = model.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, masks[:, j])
        torch.testing.assert_close(answer.token_logprobs[:, j], single_answer.token_logprobs, atol=ATOL, rtol=0)
    # every mask scores the same answer tokens, so the batched token mean is the mean of the m losses
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), atol=1e-6, rtol=0)


def test_answer_logprobs_match_log_softmax_of_forward_logits(model):
    assert isinstance(model, ParallelContextGenerator)
    batch = make_batch(3, 3, seed=13)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    log_mask = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.7, 0.4], [0.3, 0.3, 0.8]]))
    out = model(batch.input_ids, batch.attention_mask, labels=batch.labels, contexts=contexts, doc_log_mask=log_mask)
    answer = model.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, log_mask)
    log_probs = torch.log_softmax(out.logits[:, :-1].double(), -1)
    targets = batch.labels[:, 1:]
    expected = log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * (targets != -100)
    assert torch.equal(answer.token_mask[:, 1:], targets != -100) and not answer.token_mask[:, 0].any()
    torch.testing.assert_close(answer.token_logprobs[:, 1:].double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(answer.token_mean_nll(), out.loss, atol=1e-5, rtol=0)


def test_bf16_answer_logprobs_come_from_fp32_logits():
    """bf16 model: the answer log-probs are lm_head applied in fp32 to the bf16 final hidden states
    (bf16 logits, rounded to ~3 significant digits, would shift them by far more than the tolerance)."""
    model = build_tiny_model(seed=4, dtype=torch.bfloat16)
    batch = make_batch(3, 3, seed=22)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    log_mask = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.7, 0.4], [0.3, 0.3, 0.8]])).bfloat16()
    finals = []
    hook = model.model.register_forward_hook(lambda module, args, output: finals.append(output))
    try:
        answer = model.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, log_mask)
    finally:
        hook.remove()
    assert finals[0].dtype == torch.bfloat16 and answer.token_logprobs.dtype == torch.float32
    targets = batch.labels[:, 1:]

    def answer_logprobs_of(logits: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.double(), -1)
        return log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * (targets != -100)

    exact_logits = finals[0][:, :-1].double() @ model.lm_head.weight.double().T
    expected = answer_logprobs_of(exact_logits)
    torch.testing.assert_close(answer.token_logprobs[:, 1:].double(), expected, atol=2e-5, rtol=0)
    assert (answer_logprobs_of(exact_logits.bfloat16()) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_head_casts_a_bf16_weight_in_blocks_with_the_whole_cast_values_and_gradients(monkeypatch, with_bias):
    """Fp32LMHead on a bf16 weight, cast 3 rows at a time (a block size that does not divide the
    37-row vocabulary), against F.linear on the whole weight cast to fp32: the same logits, and
    the same gradients for the hidden states, the weight and the bias."""
    from grerank_dist.models import cepe

    torch.manual_seed(0)
    head = cepe.Fp32LMHead(16, 37, bias=with_bias).to(torch.bfloat16)
    monkeypatch.setattr(cepe, "upcast_block_bytes", lambda device: 3 * 16 * 4)
    hidden = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference_weight = head.weight.detach().clone().requires_grad_()
    reference_bias = None if head.bias is None else head.bias.detach().clone().requires_grad_()
    logits = head(hidden)
    expected = F.linear(reference_hidden.float(), reference_weight.float(),
                        None if reference_bias is None else reference_bias.float())
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 37)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    upstream = torch.randn_like(expected)
    (logits * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)
    torch.testing.assert_close(head.weight.grad, reference_weight.grad)
    if with_bias:
        torch.testing.assert_close(head.bias.grad, reference_bias.grad)


def test_bad_shapes_are_rejected(model):
    batch = make_batch(2, 3, seed=14)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    with pytest.raises(ValueError, match="doc_log_mask must be"):
        model(batch.input_ids, batch.attention_mask, contexts=contexts, doc_log_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="rows"):
        model(batch.input_ids[:1], batch.attention_mask[:1], contexts=contexts, doc_log_mask=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="every key"):
        model(batch.input_ids, batch.attention_mask, contexts=contexts, doc_log_mask=torch.full((2, 3), NEG_INF))


# ----------------------------------------------------------------------------- reader training


def test_unfrozen_model_trains_end_to_end():
    """Reader training unfreezes everything: the encoder then runs with autograd and every
    parameter gets a gradient; one SGD step lowers the loss (also with checkpointing)."""
    model = build_tiny_model(seed=3)
    batch = make_batch(2, 3, seed=15)
    model.requires_grad_(True).train()
    grads = {}
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = run(model, batch)
        assert out.contexts.states[0].requires_grad
        out.loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.activation_checkpointing_disable()
    assert all(g.abs().sum() > 0 for g in grads[False].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    loss_before = out.loss.item()
    with torch.no_grad():
        for param in model.parameters():
            param -= 0.05 * param.grad
    assert run(model, batch).loss.item() < loss_before - 1e-3


# ------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def source_model() -> CepeForCausalContextLM:
    return build_tiny_model(seed=5)


def assert_same_logits(a: CepeForCausalContextLM, b: CepeForCausalContextLM) -> None:
    batch = make_batch(2, 3, seed=16)
    assert torch.equal(run(a, batch).logits, run(b, batch).logits)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_loads_the_released_layout(source_model, tmp_path, monkeypatch, weights):
    directory = write_released_checkpoint(source_model, tmp_path / "release", weights)
    save_tiny_tokenizer(directory, ["who", "wrote", "it"])
    load_calls = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        load_calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    loaded = CepeForCausalContextLM.from_pretrained(directory)
    if weights == "bin":
        assert load_calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in load_calls)
    else:
        assert load_calls == []
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.config.kl_loss_mode == "smooth_0.001" and loaded.config.encoder_config["is_encoder"] is True
    assert_same_logits(loaded, source_model)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    assert tokenizer.convert_tokens_to_ids("wrote") >= 4


def test_save_and_reload_round_trip(source_model, tmp_path):
    source_model.save_pretrained(tmp_path / "saved", max_shard_size="60KB")
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    loaded = CepeForCausalContextLM.from_pretrained(tmp_path / "saved")
    assert_same_logits(loaded, source_model)
    original, reloaded = source_model.config.to_dict(), loaded.config.to_dict()
    for key in ("num_cross_attn_layers", "encoder_config", "encoder_hidden_size", "cross_attn_backend",
                "rope_parameters", "num_key_value_heads", "kl_loss_mode"):
        assert reloaded[key] == original[key], key


def test_generator_save_and_load_is_silent(source_model, tmp_path):
    """save_pretrained + load_generator (weights and tokenizer) round-trips without any transformers
    warning: AutoTokenizer reads config.json, and an unknown model_type made it warn on every load."""
    directory = tmp_path / "saved"
    source_model.save_pretrained(directory)
    save_tiny_tokenizer(directory, ["who", "wrote", "it"])
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")  # does not propagate to the root (caplog)
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded, tokenizer = load_generator(str(directory))
    finally:
        transformers_logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == []
    assert isinstance(loaded.config, CepeConfig) and loaded.config.to_dict()["model_type"] == "cepe_llama"
    assert_same_logits(loaded, source_model)
    assert tokenizer.convert_tokens_to_ids("wrote") >= 4


def test_convert_bin_to_safetensors(source_model, tmp_path):
    release = write_released_checkpoint(source_model, tmp_path / "release", "bin", n_shards=2)
    save_tiny_tokenizer(release, ["a", "b"])
    converted = convert_bin_to_safetensors(release, tmp_path / "converted")
    names = sorted(p.name for p in converted.iterdir())
    assert "model-00001-of-00002.safetensors" in names and "model.safetensors.index.json" in names
    assert "tokenizer.json" in names and not any(n.endswith(".bin") or "bin.index" in n for n in names)
    assert_same_logits(CepeForCausalContextLM.from_pretrained(converted), source_model)
    halved = convert_bin_to_safetensors(release, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = CepeForCausalContextLM.from_pretrained(halved, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, source_model.lm_head.weight.to(torch.bfloat16))


def rewrite_shard(directory: Path, edit) -> None:
    """Apply edit(dict) to the shard holding the decoder's last cross-attention k_proj."""
    from safetensors.torch import load_file, save_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"]["model.layers.1.cross_attn.k_proj.weight"]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.cross_attn.k_proj.weight"),
         r"missing weight\(s\) model\.layers\.1\.cross_attn\.k_proj\.weight"),
        (lambda t: t.update({"model.layers.1.cross_attn.k_proj.weight": torch.zeros(32, 64)}),
         r"model\.layers\.1\.cross_attn\.k_proj\.weight in model-0000\d-of-00003\.safetensors has shape \[32, 64\], "
         r"config expects \[32, 48\]"),
        (lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}),
         r"unexpected weight\(s\) model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"),
    ],
    ids=["missing", "wrong-shape", "unexpected"],
)
def test_bad_weights_fail_with_the_key_and_file(source_model, tmp_path, edit, message):
    directory = write_released_checkpoint(source_model, tmp_path / "release", "safetensors")
    rewrite_shard(directory, edit)
    with pytest.raises(ValueError, match=message) as info:
        CepeForCausalContextLM.from_pretrained(directory)
    assert str(directory) in str(info.value)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda text, cfg: text[:-5], r"not valid JSON \(line \d+, column \d+\)"),
        (lambda text, cfg: json.dumps({**cfg, "hidden_size": "big"}), "hidden_size"),
        (lambda text, cfg: json.dumps({**cfg, "num_cross_attn_layers": "two"}), "num_cross_attn_layers"),
        (lambda text, cfg: json.dumps({k: v for k, v in cfg.items() if k != "encoder_config"}), "'encoder_config' is missing"),
        (lambda text, cfg: json.dumps({**cfg, "num_cross_attn_layers": 7}), "'num_cross_attn_layers'"),
        (lambda text, cfg: json.dumps({**cfg, "encode_mode": "with_query-8"}), "'encode_mode'"),
        (lambda text, cfg: json.dumps({**cfg, "encoder_config": {**cfg["encoder_config"], "hidden_size": None}}),
         "'encoder_config.hidden_size'"),
        (lambda text, cfg: json.dumps({**cfg, "model_type": "bert"}), "'model_type'"),
    ],
    ids=["bad-json", "bad-type", "bad-cepe-type", "no-encoder", "too-many-cross-layers", "encode-mode", "encoder-field", "model-type"],
)
def test_malformed_config_names_the_file_and_field(source_model, tmp_path, corrupt, message):
    directory = write_released_checkpoint(source_model, tmp_path / "release", "safetensors")
    config_file = directory / "config.json"
    text = config_file.read_text()
    config_file.write_text(corrupt(text, json.loads(text)))
    with pytest.raises(ValueError, match=message) as info:
        CepeForCausalContextLM.from_pretrained(directory)
    assert str(config_file) in str(info.value)


def test_config_keeps_unknown_keys_and_round_trips(tmp_path):
    config = tiny_cepe_config(replug_passage_temperature=0.7)
    config.save_pretrained(tmp_path)
    again = load_cepe_config(tmp_path / "config.json")
    assert again.replug_passage_temperature == 0.7
    assert again.to_dict() == {**config.to_dict(), "_name_or_path": again.to_dict()["_name_or_path"]}
    assert isinstance(again, CepeConfig) and again.model_type == "cepe_llama"


# --------------------------------------------------------------------------------- generation


def greedy_inputs(batch_size: int, seed: int) -> tuple[TinyBatch, torch.Tensor]:
    batch = make_batch(batch_size, 4, seq_len=6, answer_len=1, seed=seed)
    return batch, torch.log(torch.rand(batch_size, 4, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("masks_per_query", [None, 2])
def test_generation_with_cache_equals_without(model, masks_per_query):
    batch, log_mask = greedy_inputs(3, seed=17)
    if masks_per_query:
        log_mask = torch.stack([log_mask, log_mask.flip(-1)], dim=1)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    args = (contexts, batch.input_ids, batch.attention_mask, log_mask, 8)
    with warnings.catch_warnings():
        # e.g. transformers' FutureWarning for a renamed cache keyword, which would later stop the
        # cache from updating: the deprecated spelling must not be used
        warnings.simplefilter("error")
        cached = model.generate(*args, stop_token_ids=[], use_cache=True)
    recomputed = model.generate(*args, stop_token_ids=[], use_cache=False)
    assert torch.equal(cached, recomputed)
    expected_shape = (3, 2, 8) if masks_per_query else (3, 8)
    assert cached.shape[: len(expected_shape) - 1] == expected_shape[:-1]
    # first token = argmax of the forward pass (an independent path: full logits, no cache)
    flat = model(batch.input_ids, batch.attention_mask, contexts=contexts, doc_log_mask=log_mask).logits[:, -1]
    assert torch.equal(cached.reshape(flat.shape[0], -1)[:, 0], flat.argmax(-1))


def test_stop_tokens_end_rows_and_pad_after(model):
    batch, log_mask = greedy_inputs(3, seed=18)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    args = (contexts, batch.input_ids, batch.attention_mask, log_mask, 8)
    free = model.generate(*args, stop_token_ids=[])
    eos = model.config.eos_token_id
    stop = int(free[0, 2])
    stopped = model.generate(*args, stop_token_ids=[stop])
    expected = []
    for row in free.tolist():
        ends = [i for i, token in enumerate(row) if token in (stop, eos)]
        cut = ends[0] + 1 if ends else len(row)
        expected.append(row[:cut] + [model.config.pad_token_id] * (len(row) - cut))
    expected = torch.tensor(expected)
    length = stopped.shape[1]
    assert torch.equal(stopped, expected[:, :length])
    assert (expected[:, length:] == model.config.pad_token_id).all()
    assert length < 8 or not all(stop in r or eos in r for r in free.tolist())


def test_generation_keeps_ranks_in_lock_step(model, monkeypatch):
    """A rank whose rows are done keeps stepping (padding) until the other rank reports done."""
    batch, log_mask = greedy_inputs(2, seed=19)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    args = (contexts, batch.input_ids, batch.attention_mask, log_mask, 8)
    first_tokens = model.generate(*args, stop_token_ids=[])[:, 0].tolist()
    other_rank_done_after = 5
    reduce_calls = []

    def fake_all_reduce(flag, op):
        assert op == dist.ReduceOp.MIN
        reduce_calls.append(int(flag))
        flag.fill_(min(int(flag), int(len(reduce_calls) >= other_rank_done_after)))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    steps = []
    hook = model.model.register_forward_hook(lambda *a: steps.append(1))
    try:
        out = model.generate(*args, stop_token_ids=first_tokens)
    finally:
        hook.remove()
    assert len(steps) == other_rank_done_after and out.shape == (2, other_rank_done_after)
    assert reduce_calls == [1] * other_rank_done_after  # locally done from the first step on
    assert torch.equal(out[:, 0], torch.tensor(first_tokens))
    assert (out[:, 1:] == model.config.pad_token_id).all()


def test_generate_rejects_right_padded_prompts(model):
    batch, log_mask = greedy_inputs(2, seed=20)
    contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
    right_padded = torch.ones_like(batch.attention_mask)
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(contexts, batch.input_ids, right_padded, log_mask, 4)


# ----------------------------------------------------------------------------------- ZeRO-3

ZERO3_WORKER = textwrap.dedent(
    """
    import json, sys
    import deepspeed, deepspeed.ops, torch
    from transformers.integrations import HfDeepSpeedConfig
    sys.path.insert(0, sys.argv[3])
    from helpers_cepe import make_batch
    from grerank_dist.models.cepe import CepeForCausalContextLM

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}}
    keep_alive = HfDeepSpeedConfig(ds_config)
    model = CepeForCausalContextLM.from_pretrained(sys.argv[1])
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.activation_checkpointing_enable()
    batch = make_batch(2, 3, seed=21)
    log_mask = torch.tensor([[-0.2, -1.3, -0.7], [-2.0, -0.05, -0.9]], requires_grad=True)
    loss = engine.module(batch.input_ids, batch.attention_mask, labels=batch.labels,
                         encoder_input_ids=batch.encoder_input_ids,
                         encoder_attention_mask=batch.encoder_attention_mask, doc_log_mask=log_mask).loss
    loss.backward()
    json.dump({"partitioned": partitioned, "loss": loss.item(), "grad": log_mask.grad.tolist()}, open(sys.argv[2], "w"))
    from grerank_dist.training.strategy import shutdown_distributed
    shutdown_distributed()
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.distributed
def test_zero3_partitioned_model_gives_the_unsharded_gradient(source_model, tmp_path):
    """Loaded under HfDeepSpeedConfig (ZeRO-3 partitioned, one CPU process), with checkpointing."""
    source_model.save_pretrained(tmp_path / "ckpt")
    script = tmp_path / "worker.py"
    script.write_text(ZERO3_WORKER)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "out.json"), str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sharded = json.loads((tmp_path / "out.json").read_text())
    batch = make_batch(2, 3, seed=21)
    loss, grad = mask_gradient(source_model, batch, torch.tensor([[-0.2, -1.3, -0.7], [-2.0, -0.05, -0.9]]))
    assert sharded["partitioned"]
    assert sharded["loss"] == pytest.approx(loss.item(), abs=1e-6)
    torch.testing.assert_close(torch.tensor(sharded["grad"]), grad, atol=1e-6, rtol=1e-5)
