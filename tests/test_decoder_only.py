"""Decoder-only LMs in parallel-context mode against the plain model's own forward and generate.

Architectures covered: Llama, Qwen2 (q/k/v biases) and Mistral, each a tiny random model. The
properties that hold for any parallel-context alignment (T, S, form) run at the default and at
others, and every prompt/answer attention backend is held against eager.
"""

from __future__ import annotations

import copy
import math

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grerank_dist.config import DataConfig, GeneratorConfig
from grerank_dist.data.collate import Collator
from grerank_dist.method.attention import available_backends
from grerank_dist.method.checks import deferred_checks
from grerank_dist.models import configure_generator, load_generator
from grerank_dist.models.decoder_only import DecoderOnlyGenerator, decoder_input_format

ARCHS = ("llama", "qwen2", "mistral")  # every property below
ALL_ARCHS = (*ARCHS, "qwen3", "gemma")  # the equivalence with the plain model
# (doc_key_temperature T, doc_attention_scale S, doc_temperature_form): the default (no change)
# and both changed in either form; the fused backends take the group form at T = 1 only.
Alignment = tuple[float, float, str]
ALIGNMENTS = [(1.0, 1.0, "group"), (0.6, 2.5, "per_key"), (0.6, 2.5, "group")]
FUSED_ALIGNMENTS = [a for a in ALIGNMENTS if a[0] == 1.0 or a[2] == "per_key"]
CPU = torch.device("cpu")
# Prompt/answer backends besides eager that train on CPU (sdpa, folded), and those that only infer (flex).
FUSED = [b for b in available_backends(CPU, torch.float32, requires_grad=True, query_mask=True) if b != "eager"]
INFERENCE_ONLY = [b for b in available_backends(CPU, torch.float32, requires_grad=False, query_mask=True)
                  if b not in FUSED and b != "eager"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _generator(
    arch: str, instruction: str = "answer the question", dtype: torch.dtype = torch.float32,
    alignment: Alignment = (1.0, 1.0, "group"),
) -> DecoderOnlyGenerator:
    data = DataConfig(instruction=instruction)
    model, _ = load_generator(f"random:tiny-{arch}", [" ".join(WORDS)], seed=0, dtype=dtype, data=data)
    model.set_context_alignment(*alignment)
    return model


def _plain(gen: DecoderOnlyGenerator) -> torch.nn.Module:
    """The same weights as an ordinary model with transformers' eager attention (the reference)."""
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(gen.lm.config), attn_implementation="eager", dtype=gen.lm.dtype)
    plain.load_state_dict(gen.lm.state_dict())
    return plain.eval()


def _ids(*words: str) -> list[int]:
    return [4 + WORDS.index(w) for w in words]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_one_document_equals_plain_forward_and_generate(arch: str) -> None:
    gen = _generator(arch)
    plain = _plain(gen)
    prefix, doc, prompt, answer = gen.prefix_ids, _ids("beta", "gamma", "delta"), _ids("eta", "theta"), _ids("iota", "mu")
    assert len(prefix) > 1  # BOS + instruction words
    contexts = gen.encode_contexts(torch.tensor([[doc]]), torch.ones(1, 1, len(doc), dtype=torch.long))
    seq = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    got = gen.answer_logprobs(contexts, seq, torch.ones_like(seq), labels, None)
    full = torch.tensor([prefix + doc + prompt + answer])
    with torch.no_grad():
        logits = plain(full).logits.float().log_softmax(-1)
    start = len(prefix) + len(doc) + len(prompt)
    expected = logits[0, start - 1 : start - 1 + len(answer)].gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
    torch.testing.assert_close(got.token_logprobs[0, len(prompt) :], expected, atol=1e-5, rtol=1e-5)
    assert got.token_mask.sum() == len(answer)

    prompt_ids = torch.tensor([prompt])
    tokens = gen.generate(contexts, prompt_ids, torch.ones_like(prompt_ids), None, max_new_tokens=6, pad_token_id=3)
    context_ids = torch.tensor([prefix + doc + prompt])
    with torch.no_grad():
        reference = plain.generate(context_ids, attention_mask=torch.ones_like(context_ids), max_new_tokens=6, do_sample=False,
                                   eos_token_id=2, pad_token_id=3)[:, context_ids.shape[1] :]
    assert tokens.tolist() == reference[:, : tokens.shape[1]].tolist()


def _batch(gen: DecoderOnlyGenerator, n: int = 4, batch: int = 2) -> tuple:
    """Padded documents of different lengths and right-padded prompt+answer rows."""
    torch.manual_seed(1)
    docs, masks = torch.full((batch, n, 6), 3), torch.zeros(batch, n, 6, dtype=torch.long)
    for b in range(batch):
        for i in range(n):
            length = 2 + (b + i) % 5
            docs[b, i, 6 - length :] = torch.randint(4, 4 + len(WORDS), (length,))
            masks[b, i, 6 - length :] = 1
    seq = torch.tensor([_ids("eta", "theta", "iota", "mu"), _ids("pi", "rho", "sigma", "tau")])
    seq[1, 3] = 3
    mask = torch.ones_like(seq)
    mask[1, 3] = 0
    labels = seq.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return gen.encode_contexts(docs, masks), docs, masks, seq, mask, labels


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_hard_mask_equals_removing_documents_and_constant_masks_are_no_mask(arch: str, alignment: Alignment) -> None:
    gen = _generator(arch, alignment=alignment)
    contexts, docs, masks, seq, mask, labels = _batch(gen)
    keep = torch.tensor([[True, False, True, False], [False, True, True, True]])
    log_mask = torch.zeros(2, 4).masked_fill(~keep, float("-inf"))
    masked = gen.answer_logprobs(contexts, seq, mask, labels, log_mask).token_logprobs
    for b in range(2):
        kept = keep[b].nonzero().flatten()
        alone = gen.encode_contexts(docs[b : b + 1, kept], masks[b : b + 1, kept])
        removed = gen.answer_logprobs(alone, seq[b : b + 1], mask[b : b + 1], labels[b : b + 1], None).token_logprobs
        torch.testing.assert_close(masked[b], removed[0], atol=1e-5, rtol=1e-5)
    plain = gen.answer_logprobs(contexts, seq, mask, labels, None).token_logprobs
    for constant in (0.0, -2.5, 3.0):
        same = gen.answer_logprobs(contexts, seq, mask, labels, torch.full((2, 4), constant)).token_logprobs
        torch.testing.assert_close(same, plain, atol=1e-6, rtol=1e-6)
    # ... and a log-mask matters only up to a constant per row.
    shifted = gen.answer_logprobs(contexts, seq, mask, labels, log_mask + torch.tensor([[1.5], [-4.0]])).token_logprobs
    torch.testing.assert_close(shifted, masked, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("arch", ARCHS[:2])
def test_log_mask_gradient_matches_finite_differences(arch: str, alignment: Alignment) -> None:
    # fp64, but transformers' RMSNorm computes in fp32 (~1e-7 relative): central differences
    # with a step of 1e-2 keep both their truncation and that rounding near 1e-5.
    gen = _generator(arch, alignment=alignment).double()
    contexts, _, _, seq, mask, labels = _batch(gen, n=3)
    log_mask = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(lm: torch.Tensor) -> torch.Tensor:
        return gen.answer_logprobs(contexts, seq, mask, labels, lm).sum().sum()

    point = log_mask.clone().requires_grad_()
    loss(point).backward()
    step = 1e-2
    numeric = torch.zeros_like(log_mask)
    with torch.no_grad():
        for idx in range(log_mask.numel()):
            delta = torch.zeros_like(log_mask).view(-1)
            delta[idx] = step
            delta = delta.view_as(log_mask)
            numeric.view(-1)[idx] = (loss(log_mask + delta) - loss(log_mask - delta)) / (2 * step)
    assert numeric.abs().max() > 1e-3  # the mask matters, so the comparison below means something
    torch.testing.assert_close(point.grad, numeric, atol=1e-4, rtol=1e-2)
    assert all(p.grad is None for p in gen.parameters())


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_gradient_checkpointing_gives_the_same_gradient(arch: str) -> None:
    gen = _generator(arch)
    contexts, _, _, seq, mask, labels = _batch(gen, n=3)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            gen.activation_checkpointing_enable()
        log_mask = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
        gen.answer_logprobs(contexts, seq, mask, labels, log_mask).token_mean_nll().backward()
        grads.append(log_mask.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_m_masks_batched_equal_one_by_one_and_cache_equals_no_cache(arch: str, alignment: Alignment) -> None:
    gen = _generator(arch, alignment=alignment)
    contexts, _, _, seq, mask, labels = _batch(gen)
    masks = torch.randn(2, 3, 4)
    masks[:, 1, 2] = float("-inf")
    batched = gen.answer_logprobs(contexts, seq, mask, labels, masks).token_logprobs
    assert batched.shape == (2, 3, 4)
    for j in range(3):
        single = gen.answer_logprobs(contexts, seq, mask, labels, masks[:, j]).token_logprobs
        torch.testing.assert_close(batched[:, j], single, atol=1e-5, rtol=1e-5)
    prompts = torch.tensor([[3] + _ids("eta", "theta"), _ids("pi", "rho", "sigma")])
    prompt_mask = (prompts != 3).long()
    with warnings.catch_warnings():
        # No deprecated keyword reaches transformers (5.24 warns on past_key_values=, 5.40 drops it
        # silently, which would stop the cache from updating).
        warnings.simplefilter("error")
        cached = gen.generate(contexts, prompts, prompt_mask, masks, max_new_tokens=5, stop_token_ids=[], pad_token_id=3)
    uncached = gen.generate(contexts, prompts, prompt_mask, masks, max_new_tokens=5, pad_token_id=3, use_cache=False)
    assert cached.shape[:2] == (2, 3)
    assert cached.tolist() == uncached.tolist()
    for j in range(3):
        one = gen.generate(contexts, prompts, prompt_mask, masks[:, j], max_new_tokens=5, pad_token_id=3)
        assert one.tolist() == cached[:, j, : one.shape[1]].tolist()


REFERENCE_ATTENTION = "grerank_test_explicit_scores"


def _explicit_scores_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, layout=None, **kwargs):
    """The reference: one eager softmax per head over q.k * scaling * logit_scale + bias, both
    [T, T] matrices written out by the test (the model's own mask is not used). With ``group``
    (the document columns, T, S) the rows after the documents instead follow APE's merge: one
    softmax over the document columns' logits s/T + b (their LSE_doc) and one over the others
    (LSE_self), mixed with weights exp(T LSE_doc + log S) and exp(LSE_self). Each layer's
    probabilities are appended to ``record``."""
    logit_scale, bias, group, record = layout
    heads = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(heads, dim=1), value.repeat_interleave(heads, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling * logit_scale + bias
    probs = torch.softmax(scores, dim=-1)
    if group is not None:
        docs, temperature, scale = group
        is_doc = torch.zeros(scores.shape[-1], dtype=torch.bool)
        is_doc[docs] = True
        rows = scores[:, :, docs.stop :]
        doc_logits = rows.masked_fill(~is_doc, float("-inf")) - math.log(scale)  # s/T + b: the layout adds log S
        self_logits = rows.masked_fill(is_doc, float("-inf"))
        doc_weight = torch.sigmoid(temperature * doc_logits.logsumexp(-1, keepdim=True) + math.log(scale)
                                   - self_logits.logsumexp(-1, keepdim=True))
        merged = doc_weight * torch.softmax(doc_logits, dim=-1) + (1 - doc_weight) * torch.softmax(self_logits, dim=-1)
        probs = torch.cat([probs[:, :, : docs.stop], merged], dim=2)
    record.append(probs)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(REFERENCE_ATTENTION, _explicit_scores_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE_ATTENTION, eager_mask)


def _explicit_layout(prefix_len: int, n_docs: int, doc_len: int, seq_len: int, log_mask: torch.Tensor,
                     temperature: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position ids, logit scales and biases of [prefix | doc_1 ... doc_n | prompt + answer] as one
    sequence: the prefix causal; each document sees the prefix and itself causally at positions
    P..P+L-1; the prompt/answer tokens see the prefix, every document with the README's formula
    (scores / T, bias log m_i - max log m + log S; differentiable in ``log_mask``) and themselves
    causally, from position P+L."""
    docs_end = prefix_len + n_docs * doc_len
    total = docs_end + seq_len
    logit_scale, bias = torch.ones(total, total), torch.full((total, total), float("-inf"))
    causal = torch.ones(total, total).tril().bool()
    bias[:prefix_len, :prefix_len][causal[:prefix_len, :prefix_len]] = 0.0
    positions = [*range(prefix_len)]
    for i in range(n_docs):
        rows = slice(prefix_len + i * doc_len, prefix_len + (i + 1) * doc_len)
        bias[rows, :prefix_len] = 0.0
        bias[rows, rows][causal[:doc_len, :doc_len]] = 0.0
        positions += range(prefix_len, prefix_len + doc_len)
    shifted = log_mask - log_mask.max()
    bias[docs_end:, :prefix_len] = 0.0
    for i in range(n_docs):
        cols = slice(prefix_len + i * doc_len, prefix_len + (i + 1) * doc_len)
        bias[docs_end:, cols] = shifted[i] + math.log(scale)
        logit_scale[docs_end:, cols] = 1.0 / temperature
    bias[docs_end:, docs_end:][causal[:seq_len, :seq_len]] = 0.0
    positions += range(prefix_len + doc_len, prefix_len + doc_len + seq_len)
    return torch.tensor([positions]), logit_scale, bias


@pytest.mark.parametrize("form", ["per_key", "group"])
@pytest.mark.parametrize("alignment", [(0.6, 2.5), (1.5, 0.4)])
@pytest.mark.parametrize("arch", ARCHS)
def test_alignment_equals_explicit_scores_on_the_plain_model(arch: str, alignment: tuple[float, float], form: str) -> None:
    """Three documents under a soft mask at T, S != 1 against the plain model run over the whole
    layout as one sequence, with the README's scores written out per head (per_key) or APE's two
    attentions merged (group): answer log-probabilities and their log-mask gradient on every
    backend that takes the form, and the documents' attention mass."""
    temperature, scale = alignment
    gen = _generator(arch, alignment=(temperature, scale, form))
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(gen.lm.config), attn_implementation=REFERENCE_ATTENTION)
    reference.load_state_dict(gen.lm.state_dict())
    reference.requires_grad_(False).eval()
    prefix_len = len(gen.prefix_ids)
    docs = [_ids("beta", "gamma", "delta"), _ids("pi", "rho", "kappa"), _ids("mu", "nu", "xi")]
    prompt, answer = _ids("eta", "theta"), _ids("iota", "mu", "sigma")
    log_mask = torch.tensor([-0.3, -1.2, 0.4])
    reference_mask = log_mask.clone().requires_grad_()
    positions, logit_scale, bias = _explicit_layout(prefix_len, 3, 3, len(prompt + answer), reference_mask, temperature, scale)
    group = (slice(prefix_len, prefix_len + 9), temperature, scale) if form == "group" else None
    record: list[torch.Tensor] = []
    full = torch.tensor([gen.prefix_ids + sum(docs, []) + prompt + answer])
    logits = reference(full, position_ids=positions, layout=(logit_scale, bias, group, record)).logits.float().log_softmax(-1)
    start = full.shape[1] - len(answer)
    expected = logits[0, start - 1 : -1].gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), reference_mask)
    assert expected_grad.abs().max() > 1e-3
    contexts = gen.encode_contexts(torch.tensor([docs]), torch.ones(1, 3, 3, dtype=torch.long))
    seq = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    for backend in ("eager", *FUSED) if form == "per_key" else ("eager",):
        gen.config.cross_attn_backend = backend
        point = log_mask[None].clone().requires_grad_()
        got = gen.answer_logprobs(contexts, seq, torch.ones_like(seq), labels, point).token_logprobs[0, len(prompt) :]
        (grad,) = torch.autograd.grad(got.sum(), point)
        torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend}: {m}")
        torch.testing.assert_close(grad[0], expected_grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{backend} d(log-mask): {m}")
    # The mass: per document, its keys' weight averaged over layers, heads and the answer-predicting positions.
    predicting = slice(start - 1, full.shape[1] - 1)
    expected_mass = torch.stack([
        torch.stack([probs[0, :, predicting, prefix_len + 3 * i : prefix_len + 3 * i + 3].sum(-1).mean() for i in range(3)])
        for probs in record
    ]).mean(0)
    mass = gen.document_attention_mass(contexts, seq, torch.ones_like(seq), labels, log_mask[None])
    torch.testing.assert_close(mass[0], expected_mass.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alignment", FUSED_ALIGNMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_backends_equal_eager_in_outputs_gradients_and_generation(arch: str, alignment: Alignment) -> None:
    gen = _generator(arch, alignment=alignment)
    contexts, _, _, seq, mask, labels = _batch(gen)
    masks = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    masks[:, 1, 2] = float("-inf")
    prompts = torch.tensor([[3] + _ids("eta", "theta"), _ids("pi", "rho", "sigma")])  # left-padded
    results = {}
    for backend in ("eager", *FUSED):
        gen.config.cross_attn_backend = backend
        point = masks.clone().requires_grad_(True)
        out = gen.answer_logprobs(contexts, seq, mask, labels, point)
        (grad,) = torch.autograd.grad(-(out.sum()).sum(), point)
        tokens = gen.generate(contexts, prompts, (prompts != 3).long(), masks, max_new_tokens=4, stop_token_ids=[], pad_token_id=3)
        results[backend] = (out.token_logprobs.detach(), grad, tokens)
    eager_logprobs, eager_grad, eager_tokens = results["eager"]
    assert eager_grad.abs().max() > 1e-3 and bool((eager_grad[:, 1, 2] == 0).all())
    for backend in FUSED:
        logprobs, grad, tokens = results[backend]
        torch.testing.assert_close(logprobs, eager_logprobs, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend}: {m}")
        torch.testing.assert_close(grad, eager_grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend} d(log-mask): {m}")
        assert tokens.tolist() == eager_tokens.tolist(), backend
    for backend in INFERENCE_ONLY:
        gen.config.cross_attn_backend = backend
        with torch.no_grad():
            logprobs = gen.answer_logprobs(contexts, seq, mask, labels, masks).token_logprobs
        torch.testing.assert_close(logprobs, eager_logprobs, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend}: {m}")


def test_alignment_and_backend_settings_are_checked() -> None:
    gen = _generator("llama")
    settings = GeneratorConfig(doc_key_temperature=0.5, doc_attention_scale=3.0, doc_temperature_form="per_key",
                               attention_backend="sdpa")
    configure_generator(gen, settings)
    assert (gen.doc_key_temperature, gen.doc_attention_scale, gen.doc_temperature_form, gen.config.cross_attn_backend) == (
        0.5, 3.0, "per_key", "sdpa")
    with pytest.raises(ValueError, match="generator.doc_attention_scale must be a finite number > 0"):
        gen.set_context_alignment(1.0, 0.0)
    with pytest.raises(ValueError, match=r"generator.doc_temperature_form must be one of \('group', 'per_key'\), got 'ape'"):
        gen.set_context_alignment(0.5, 3.0, "ape")
    contexts, _, _, seq, mask, labels = _batch(gen)
    log_mask = torch.zeros(2, 4, requires_grad=True)
    gen.answer_logprobs(contexts, seq, mask, labels, log_mask)  # per_key: sdpa takes it
    # The group form's per-query offset is no per-key bias: refused on the fused backends at T != 1 only.
    gen.set_context_alignment(0.5, 3.0, "group")
    for backend in FUSED:
        gen.config.cross_attn_backend = backend
        with pytest.raises(ValueError, match=(
            f"generator.attention_backend='{backend}' takes a per-key bias only, but generator.doc_temperature_form='group' "
            "at generator.doc_key_temperature=0.5 adds a per-query offset: set generator.attention_backend to 'eager' or "
            "'auto', or generator.doc_temperature_form to 'per_key'"
        )):
            gen.answer_logprobs(contexts, seq, mask, labels, log_mask)
    gen.set_context_alignment(1.0, 3.0, "group")
    gen.answer_logprobs(contexts, seq, mask, labels, log_mask)
    gen.config.cross_attn_backend = "fast"
    with pytest.raises(ValueError, match="generator.attention_backend: .*unknown backend 'fast'"):
        gen.answer_logprobs(contexts, seq, mask, labels, log_mask)
    gen.config.cross_attn_backend = "flex"
    with pytest.raises(ValueError, match="generator.attention_backend: .*flex_attention has no backward on CPU"):
        gen.answer_logprobs(contexts, seq, mask, labels, log_mask)
    cepe, _ = load_generator("random:tiny", [" ".join(WORDS)])
    configure_generator(cepe, GeneratorConfig(attention_backend="eager"))  # the defaults apply to any family
    # The form acts through T only: at T = 1 it changes nothing, for CEPE either.
    configure_generator(cepe, GeneratorConfig(doc_temperature_form="per_key"))
    with pytest.raises(ValueError, match="apply to decoder-only generators only"):
        configure_generator(cepe, GeneratorConfig(doc_attention_scale=2.0))


def test_group_form_equals_per_key_at_t_1_only() -> None:
    gen = _generator("llama")
    contexts, _, _, seq, mask, labels = _batch(gen)
    log_mask = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    got = {}
    for alignment in ((1.0, 2.5, "group"), (1.0, 2.5, "per_key"), (0.6, 2.5, "group"), (0.6, 2.5, "per_key")):
        gen.set_context_alignment(*alignment)
        got[alignment] = gen.answer_logprobs(contexts, seq, mask, labels, log_mask).token_logprobs
    assert torch.equal(got[(1.0, 2.5, "group")], got[(1.0, 2.5, "per_key")])
    assert (got[(0.6, 2.5, "group")] - got[(0.6, 2.5, "per_key")]).abs().max() > 1e-3
    assert (got[(0.6, 2.5, "group")] - got[(1.0, 2.5, "group")]).abs().max() > 1e-3


def test_group_form_with_every_document_masked_out_stays_finite() -> None:
    """A row whose documents are all -inf (refused, but only when the deferred checks are read)
    gets no group offset: finite outputs and gradients, the same as without documents in either form."""
    gen = _generator("qwen2", alignment=(0.6, 2.5, "group"))
    contexts, _, _, seq, mask, labels = _batch(gen, n=3)
    log_mask = torch.tensor([[float("-inf")] * 3, [0.0, -1.0, 0.5]])
    got = {}
    for form in ("group", "per_key"):
        gen.set_context_alignment(0.6, 2.5, form)
        point = log_mask.clone().requires_grad_()
        with deferred_checks() as checks:
            out = gen.answer_logprobs(contexts, seq, mask, labels, point)
            (grad,) = torch.autograd.grad(out.sum().sum(), point)
        with pytest.raises(ValueError, match="key_bias is -inf for every key"):
            checks.raise_failed("answer")
        assert bool(torch.isfinite(out.token_logprobs).all()) and bool(torch.isfinite(grad).all())
        got[form] = out.token_logprobs.detach()
    torch.testing.assert_close(got["group"][0], got["per_key"][0])


def test_collator_uses_the_generator_format() -> None:
    data = DataConfig(n_candidates=2, doc_max_tokens=8, doc_template="{question} {title} {text}", instruction="alpha beta")
    records = [{"question": "gamma", "answers": ["delta"], "ctxs": [{"title": "eta", "text": "theta"}]}]
    gen, tok = load_generator("random:tiny-llama", ["alpha beta gamma delta eta theta question answer :"], data=data)
    batch = Collator(data, tok, None, 0, input_format=gen.input_format)(records, [0])
    assert gen.prefix_ids == [tok.bos_token_id] + tok("alpha beta", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in batch.input_ids.tolist()[0]  # BOS lives in the shared prefix
    assert tok.decode(batch.encoder_input_ids[0, 0][batch.encoder_attention_mask[0, 0].bool()]) == "gamma eta theta"
    # Without a generator's format (CEPE's): BOS opens the prompt.
    assert Collator(data, tok, None, 0)(records, [0]).input_ids.tolist()[0][0] == tok.bos_token_id


def test_document_attention_mass_equals_the_plain_models_attention_weights() -> None:
    gen = _generator("llama")
    plain = _plain(gen)
    prefix, doc, prompt, answer = gen.prefix_ids, _ids("beta", "gamma", "delta"), _ids("eta", "theta"), _ids("iota", "mu", "nu")
    contexts = gen.encode_contexts(torch.tensor([[doc]]), torch.ones(1, 1, len(doc), dtype=torch.long))
    seq = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    full = torch.tensor([prefix + doc + prompt + answer])
    with torch.no_grad():
        attentions = plain(full, output_attentions=True).attentions  # per layer [1, H, T, T]
    start = len(prefix) + len(doc) + len(prompt)
    predicting = slice(start - 1, start - 1 + len(answer))
    doc_keys = slice(len(prefix), len(prefix) + len(doc))
    expected = torch.stack([a[0, :, predicting, doc_keys].sum(-1).mean() for a in attentions]).mean()
    got = gen.document_attention_mass(contexts, seq, torch.ones_like(seq), labels, None)
    torch.testing.assert_close(got, expected.reshape(1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_document_attention_mass_under_masks(alignment: Alignment) -> None:
    gen = _generator("qwen2", alignment=alignment)
    contexts, docs, masks, seq, mask, labels = _batch(gen, n=3)
    log_mask = torch.tensor([[0.0, -1.0, float("-inf")], [-0.5, 0.0, 0.0]])
    mass = gen.document_attention_mass(contexts, seq, mask, labels, log_mask)
    assert mass.shape == (2, 3) and mass[0, 2] == 0 and bool((mass[:, :2] > 0).all())
    alone = gen.encode_contexts(docs[:1, :2], masks[:1, :2])  # removing the -inf document changes nothing
    torch.testing.assert_close(mass[0, :2], gen.document_attention_mass(alone, seq[:1], mask[:1], labels[:1], log_mask[:1, :2])[0])
    weighted = gen.document_attention_mass(contexts, seq, mask, labels, log_mask, value_norm=True)
    assert weighted[0, 2] == 0 and not torch.allclose(weighted, mass)
    stacked = torch.stack([log_mask, torch.zeros(2, 3)], dim=1)
    batched = gen.document_attention_mass(contexts, seq, mask, labels, stacked)
    torch.testing.assert_close(batched[:, 0], mass)
    torch.testing.assert_close(batched[:, 1], gen.document_attention_mass(contexts, seq, mask, labels, None))


def test_local_directory_loads_as_a_decoder_only_generator(tmp_path) -> None:
    data = DataConfig(instruction="answer the question")
    # (a random Qwen2 would not do: transformers maps a qwen2 directory to its BPE tokenizer class,
    # which cannot rebuild the word-level test tokenizer)
    gen, tok = load_generator("random:tiny-llama", [" ".join(WORDS)], data=data)
    gen.lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_generator(str(tmp_path), data=data)
    assert isinstance(loaded, DecoderOnlyGenerator) and loaded.prefix_ids == gen.prefix_ids
    assert not any(p.requires_grad for p in loaded.parameters())
    contexts, _, _, seq, mask, labels = _batch(gen)
    loaded_contexts = loaded.encode_contexts(*_batch(gen)[1:3])
    torch.testing.assert_close(
        loaded.answer_logprobs(loaded_contexts, seq, mask, labels, None).token_logprobs,
        gen.answer_logprobs(contexts, seq, mask, labels, None).token_logprobs,
    )


def test_chat_template_splits_into_prefix_and_prompt() -> None:
    _, tok = load_generator("random:tiny-llama", ["user end assistant read question answer :"])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}user {{ m['content'] }} end{% endfor %}"
        "{% if add_generation_prompt %} assistant{% endif %}"
    )
    data = DataConfig(instruction="read ", prompt_template=" question {question} answer :", chat_template=True)
    fmt, prefix = decoder_input_format(tok, data)
    assert prefix == tok("<s>user read ", add_special_tokens=False)["input_ids"]
    assert prefix[0] == tok.bos_token_id
    assert fmt.prompt_template == " question {question} answer : end assistant"
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        decoder_input_format(tok, data)


def test_eval_cli_generator_setting_with_a_decoder_only_directory(tmp_path) -> None:
    """`grerank eval --setting generator` unchanged, on a saved tiny Llama: the retriever's top-k
    answers are those the generator gives from the kept documents alone."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from toy import toy_records, write_jsonl

    from grerank_dist.config import load_config
    from grerank_dist.evaluation.evaluate import clean_prediction, stop_token_ids
    from grerank_dist.training.train import record_texts

    root = Path(__file__).resolve().parents[1]
    records = toy_records(4, 4, seed=5)
    data_file = write_jsonl(tmp_path / "test.jsonl", records)
    overrides = [f"generator.path={tmp_path / 'gen'}", "generator.max_new_tokens=3", "relax.k=2",
                 f"data.eval_file={data_file}", "data.n_candidates=4", "data.instruction=read the documents"]
    config = load_config(root / "configs" / "tiny_cpu.yaml", overrides)
    gen, tok = load_generator("random:tiny-llama", record_texts(records, config), data=config.data)
    gen.lm.save_pretrained(tmp_path / "gen")
    tok.save_pretrained(tmp_path / "gen")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root / 'tests'}:{root}"}
    result = subprocess.run(
        [sys.executable, "-m", "grerank_dist.cli", "eval", "--config", str(root / "configs" / "tiny_cpu.yaml"),
         "--setting", "generator", "--k", "2", "--out", str(tmp_path / "out"), *overrides],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4
    batch = Collator(config.data, tok, None, 8, input_format=gen.input_format)(records, list(range(4)))
    for row, prediction in enumerate(predictions):
        ids = [c["id"] for c in records[row]["ctxs"]]
        kept = [ids.index(i) for i in prediction["methods"]["retriever"]["ranking"][:2]]
        contexts = gen.encode_contexts(batch.encoder_input_ids[row : row + 1, kept], batch.encoder_attention_mask[row : row + 1, kept])
        tokens = gen.generate(contexts, batch.prompt_ids[row : row + 1], batch.prompt_attention_mask[row : row + 1], None,
                              max_new_tokens=3, stop_token_ids=stop_token_ids(tok))
        assert clean_prediction(tok.decode(tokens[0], skip_special_tokens=True)) == prediction["methods"]["retriever"]["prediction"]
