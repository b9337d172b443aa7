"""Masked-attention backends against an eager reference, hard-mask equivalence and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from grerank_dist.method.attention import (
    FOLDED_MASK_VALUE,
    available_backends,
    backend_unavailable_reason,
    expand_doc_bias,
    masked_attention,
)
from grerank_dist.method.relax import hard_topk_log_mask

CPU = torch.device("cpu")
GRAD_BACKENDS = available_backends(CPU, torch.float32, requires_grad=True)
INFERENCE_BACKENDS = available_backends(CPU, torch.float32, requires_grad=False)
NEG_INF = float("-inf")


def make_inputs(batch, heads, kv_heads, queries, keys, head_dim, *, dtype=torch.float32, seed=0):
    """Random q/k/v and a bias with -inf padding keys (at least one real key per row)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, kv_heads, keys, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, kv_heads, keys, head_dim, generator=generator, dtype=dtype)
    bias = torch.randn(batch, keys, generator=generator, dtype=dtype) * 2
    padding = torch.rand(batch, keys, generator=generator) < 0.3
    padding[:, 0] = False
    return q, k, v, bias.masked_fill(padding, NEG_INF)


def attention_and_grads(backend, q, k, v, bias, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = masked_attention(*leaves, backend=backend)
    grads = torch.autograd.grad(out, leaves, upstream)
    return out, grads


def plain_attention_reference(q, k, v, bias, scale, query_mask=None):
    """Scalar-loop float64 softmax attention, independent of every backend (``query_mask``
    [B, 1, M, N] adds a per-query term)."""
    batch, heads, queries, head_dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for m in range(queries):
                logits = [
                    float(q[b, h, m] @ k[b, h // group, n]) * scale + float(bias[b, n])
                    + (0.0 if query_mask is None else float(query_mask[b, 0, m, n]))
                    for n in range(k.shape[2])
                ]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for n, weight in enumerate(weights):
                    out[b, h, m] += weight / total * v[b, h // group, n].double()
    return out


def test_eager_matches_a_scalar_loop_reference():
    q, k, v, bias = make_inputs(2, 4, 2, 3, 6, 5, dtype=torch.float64, seed=3)
    expected = plain_attention_reference(q, k, v, bias, scale=0.37)
    torch.testing.assert_close(masked_attention(q, k, v, bias, backend="eager", scale=0.37), expected)


def test_cpu_backend_lists():
    assert {"eager", "sdpa", "folded"} <= set(GRAD_BACKENDS)
    assert "flex" not in GRAD_BACKENDS and "flash" not in GRAD_BACKENDS
    assert "flex" in INFERENCE_BACKENDS


SHAPES = [
    # batch, heads, kv_heads, queries, keys, head_dim
    (2, 4, 4, 3, 17, 8),
    (3, 6, 2, 5, 40, 12),
    (1, 8, 1, 1, 9, 64),
    (2, 2, 1, 7, 33, 7),
]


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_eager_in_output_and_gradients(backend, shape):
    q, k, v, bias = make_inputs(*shape, seed=sum(shape))
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    expected_out, expected_grads = attention_and_grads("eager", q, k, v, bias, upstream)
    out, grads = attention_and_grads(backend, q, k, v, bias, upstream)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for name, grad, expected in zip(("q", "k", "v", "key_bias"), grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    assert torch.all(grads[3][torch.isneginf(bias)] == 0)


@pytest.mark.parametrize("backend", [b for b in INFERENCE_BACKENDS if b not in GRAD_BACKENDS])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_inference_only_backend_matches_eager(backend, shape):
    q, k, v, bias = make_inputs(*shape, seed=7)
    with torch.no_grad():
        expected = masked_attention(q, k, v, bias, backend="eager")
        out = masked_attention(q, k, v, bias, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_auto_backend_matches_eager():
    q, k, v, bias = make_inputs(2, 4, 2, 3, 20, 16, seed=5)
    torch.testing.assert_close(
        masked_attention(q, k, v, bias), masked_attention(q, k, v, bias, backend="eager"), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("backend", INFERENCE_BACKENDS)
def test_hard_document_mask_equals_attention_over_the_kept_documents_only(backend):
    batch, n_docs, doc_len, heads, kv_heads, queries, head_dim = 3, 6, 5, 4, 2, 4, 16
    generator = torch.Generator().manual_seed(12)
    q = torch.randn(batch, heads, queries, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, n_docs * doc_len, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, n_docs * doc_len, head_dim, generator=generator)
    token_mask = torch.ones(batch, n_docs, doc_len, dtype=torch.long)
    token_mask[0, 1, :2] = 0  # left padding, as the encoder inputs are padded
    token_mask[2, :, :1] = 0
    doc_scores = torch.randn(batch, n_docs, generator=generator)
    doc_log_mask = hard_topk_log_mask(doc_scores, 2)
    bias = expand_doc_bias(doc_log_mask, token_mask)
    with torch.no_grad():
        out = masked_attention(q, k, v, bias, backend=backend)
    for row in range(batch):
        kept_docs = torch.nonzero(doc_log_mask[row] == 0).flatten().tolist()
        kept_keys = [d * doc_len + t for d in kept_docs for t in range(doc_len) if token_mask[row, d, t]]
        k_kept, v_kept = k[row : row + 1, :, kept_keys], v[row : row + 1, :, kept_keys]
        expected = plain_attention_reference(
            q[row : row + 1], k_kept, v_kept, torch.zeros(1, len(kept_keys)), scale=head_dim**-0.5
        )
        torch.testing.assert_close(out[row : row + 1].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends(CPU, torch.float64, requires_grad=True))
def test_gradients_match_finite_differences_in_float64(backend):
    q, k, v, bias = make_inputs(2, 4, 2, 3, 7, 6, dtype=torch.float64, seed=9)
    padding_bias = torch.where(torch.isneginf(bias), NEG_INF, 0.0).double()
    finite_bias = torch.where(torch.isneginf(bias), 0.0, bias)

    def attend(q, k, v, finite_bias):
        return masked_attention(q, k, v, finite_bias + padding_bias, backend=backend)

    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k, v, finite_bias))
    assert torch.autograd.gradcheck(attend, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_folded_backend_is_exact_for_extreme_but_finite_biases():
    """Finite biases far below the row maximum, or a row maximum far from 0, must not leak to removed keys."""
    q, k, v, _ = make_inputs(2, 2, 2, 3, 6, 8, seed=4)
    bias = torch.tensor(
        [[-4e5, -4e5 + 1.5, NEG_INF, -4e5 - 0.5, NEG_INF, -4e5 + 0.2], [3e3, 3e3 - 2.0, -7e4, NEG_INF, 3e3, 2 * FOLDED_MASK_VALUE]]
    )
    # The float64 reference: float32 eager itself rounds logits of magnitude 4e5 to 0.03.
    expected = masked_attention(q.double(), k.double(), v.double(), bias.double(), backend="eager")
    folded = masked_attention(q, k, v, bias, backend="folded")
    torch.testing.assert_close(folded.double(), expected, rtol=1e-5, atol=1e-5)


BF16_BACKENDS = available_backends(CPU, torch.bfloat16, requires_grad=True)


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bfloat16_backend_close_to_float32_eager(backend):
    q, k, v, bias = make_inputs(2, 4, 2, 5, 24, 16, seed=2)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    reference_inputs = [t.float() for t in (q, k, v)] + [bias.bfloat16().float()]
    expected_out, expected_grads = attention_and_grads("eager", *reference_inputs, upstream)
    out, grads = attention_and_grads(backend, q, k, v, bias, upstream.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected_out, rtol=2e-2, atol=2e-2)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", INFERENCE_BACKENDS)
def test_row_with_every_key_removed_raises(backend):
    q, k, v, bias = make_inputs(2, 2, 2, 3, 5, 8)
    bias[1] = NEG_INF
    with pytest.raises(ValueError, match=r"every key of a batch row: that query would attend to nothing \(rows \[1\]\)"):
        with torch.no_grad():
            masked_attention(q, k, v, bias, backend=backend)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v, b: (q, k, v, b.index_fill(1, torch.tensor([2]), float("nan"))), "NaN or \\+inf"),
        (lambda q, k, v, b: (q, k, v, b[:, :-1]), "key_bias must be"),
        (lambda q, k, v, b: (q, k[:, :, :, :-1], v[:, :, :, :-1], b), "head dim"),
        (lambda q, k, v, b: (q[:, :3], k, v, b), "multiple of key/value heads"),
        (lambda q, k, v, b: (q, k, v[:, :, :-1], b), "same shape"),
        (lambda q, k, v, b: (q[0], k, v, b), "4-D"),
        (lambda q, k, v, b: (q, k, v, b > 0), "float"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        masked_attention(*change(*make_inputs(2, 4, 2, 3, 5, 8)), backend="eager")


def test_unavailable_backend_says_why():
    q, k, v, bias = make_inputs(1, 2, 2, 2, 4, 8)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="'flex' is unavailable: flex_attention has no backward on CPU"):
        masked_attention(q, k, v, bias, backend="flex")
    with pytest.raises(ValueError, match="'flash' is unavailable: .*(not installed|only on CUDA)"):
        masked_attention(q, k, v, bias, backend="flash")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        masked_attention(q, k, v, bias, backend="fast")


def causal_query_mask(batch, queries, keys, dtype=torch.float32):
    """[B, 1, M, N]: the M queries are the last M keys, each sees every earlier key and itself
    (the decoder-only prompt over [documents, own tokens]); the dtype's lowest value elsewhere."""
    allowed = torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]
    mask = torch.zeros(queries, keys, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.expand(batch, 1, queries, keys).clone()


def test_query_mask_matches_a_scalar_loop_reference():
    q, k, v, bias = make_inputs(2, 4, 2, 3, 9, 5, dtype=torch.float64, seed=13)
    query_mask = causal_query_mask(2, 3, 9, torch.float64)
    expected = plain_attention_reference(q, k, v, bias, 0.41, query_mask)
    assert not torch.allclose(expected, plain_attention_reference(q, k, v, bias, 0.41), atol=1e-3)  # the mask matters
    for backend in available_backends(CPU, torch.float64, requires_grad=False, query_mask=True):
        out = masked_attention(q, k, v, bias, backend=backend, scale=0.41, query_mask=query_mask)
        torch.testing.assert_close(out, expected, msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("backend", available_backends(CPU, torch.float32, requires_grad=True, query_mask=True))
@pytest.mark.parametrize("shape", SHAPES)
def test_query_mask_backend_matches_eager_in_output_and_gradients(backend, shape):
    q, k, v, bias = make_inputs(*shape, seed=sum(shape) + 1)
    query_mask = causal_query_mask(shape[0], shape[3], shape[4])
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def run(name):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = masked_attention(*leaves, backend=name, query_mask=query_mask)
        return out, torch.autograd.grad(out, leaves, upstream)

    (expected_out, expected_grads), (out, grads) = run("eager"), run(backend)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for name, grad, expected in zip(("q", "k", "v", "key_bias"), grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_query_mask_inputs_are_checked():
    q, k, v, bias = make_inputs(4, 2, 2, 3, 5, 8)
    query_mask = causal_query_mask(4, 3, 5)
    with pytest.raises(ValueError, match=r"query_mask must be \[B, 1, M, N\]"):
        masked_attention(q, k, v, bias, backend="eager", query_mask=query_mask[:, :, :2])
    with pytest.raises(ValueError, match="one row of keys per query row"):
        masked_attention(q, k[:2], v[:2], bias, backend="eager", query_mask=query_mask)
    reason = backend_unavailable_reason("flash", "cuda", torch.bfloat16, True, query_mask=True)
    assert reason is not None and "no per-query mask" in reason
    assert "flash" not in available_backends("cuda", torch.bfloat16, True, query_mask=True)


def test_expand_doc_bias_hand_computed():
    doc_log_mask = torch.tensor([[0.0, -1.5, NEG_INF], [-0.2, 0.0, -3.0]], requires_grad=True)
    token_mask = torch.tensor([[[1, 1], [0, 1], [1, 1]], [[1, 0], [1, 1], [0, 0]]])
    bias = expand_doc_bias(doc_log_mask, token_mask)
    expected = torch.tensor(
        [[0.0, 0.0, NEG_INF, -1.5, NEG_INF, NEG_INF], [-0.2, NEG_INF, 0.0, 0.0, NEG_INF, NEG_INF]]
    )
    assert bias.tolist() == expected.tolist()
    (grad,) = torch.autograd.grad((bias.masked_fill(torch.isinf(bias), 0.0) * 1.0).sum(), doc_log_mask)
    assert grad.tolist() == [[2.0, 1.0, 0.0], [1.0, 2.0, 0.0]]


def test_expand_doc_bias_with_several_masks_per_query():
    token_mask = torch.tensor([[[1, 1], [1, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    doc_log_mask = torch.tensor([[0.0, NEG_INF], [NEG_INF, 0.0], [-1.0, -2.0], [-3.0, -4.0]])
    bias = expand_doc_bias(doc_log_mask, token_mask)
    assert bias.tolist() == [
        [0.0, 0.0, NEG_INF, NEG_INF],
        [NEG_INF, NEG_INF, 0.0, NEG_INF],
        [NEG_INF, -1.0, -2.0, -2.0],
        [NEG_INF, -3.0, -4.0, -4.0],
    ]
    with pytest.raises(ValueError, match="multiple of key_padding's batch"):
        expand_doc_bias(doc_log_mask[:3], token_mask)
    with pytest.raises(ValueError, match="2 documents per row but key_padding has 3"):
        expand_doc_bias(doc_log_mask, torch.ones(2, 3, 2))
