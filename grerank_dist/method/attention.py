"""Cross-attention with an additive per-key bias, on several interchangeable backends.

G-Rerank's differentiable masked attention weighs key t of document i by the soft mask M_i:
``M_i * exp(s) = exp(s + log M_i)``, so it is ordinary attention plus a per-key bias ``log M_i``
that is constant over the document's tokens (and -inf on padding keys). Every backend below
computes exactly

    out = softmax(q @ k^T * scale + key_bias[:, None, None, :]) @ v

and is differentiable w.r.t. q, k, v and key_bias. The bias is per batch row and per key: it is
broadcast over heads and query positions. The attention is non-causal (cross-attention), unless
a constant ``query_mask`` [B, 1, M, N] is also added to the logits: what depends on the query
position, such as a decoder's causal mask over its own tokens when they are keys beside the
documents (:mod:`grerank_dist.models.decoder_only`). It is a constant (no gradient), so the
folded backend hands it to the fused kernel as its mask while the bias travels in the channel.

Backends:

- ``eager``: matmul and softmax in fp32 (fp64 for fp64 inputs); the reference for the others.
- ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` with a float ``attn_mask``
  (its kernels return the mask gradient).
- ``folded``: the bias travels as one extra head channel, so a fused kernel that takes no bias
  (SDPA without a mask) still computes it; see :func:`_fold_bias_into_head_dim`.
- ``flex``: :func:`torch.nn.attention.flex_attention.flex_attention` with a ``score_mod`` adding
  the bias. It has no backward on CPU, so on CPU it is offered only when no gradient is needed.
- ``flash``: the ``flash_attn`` package (CUDA, fp16/bf16) through the folded channel (it takes
  no ``query_mask``).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from grerank_dist.method.checks import require

__all__ = [
    "BACKENDS",
    "FOLDED_MASK_VALUE",
    "auto_backend",
    "available_backends",
    "backend_unavailable_reason",
    "check_key_bias",
    "expand_doc_bias",
    "masked_attention",
    "resolve_backend",
]

BACKENDS: tuple[str, ...] = ("eager", "sdpa", "folded", "flex", "flash")

# Stand-in for a -inf bias in the folded channel, after each row's biases are shifted so that their
# largest value is 0 (softmax is invariant to that shift). Why this magnitude:
# - exactness: a key 1e4 below the row's best key gets exp(-1e4 + spread) == 0.0 exactly in fp32
#   (fp32 underflows below exp(-104)) for any spread of q.k*scale under ~9,800, far beyond real
#   attention logits, so removed keys contribute exactly 0 to outputs and gradients, as with -inf;
# - precision: the kept keys' biases travel as b - max(b) (one rounding), untouched by the
#   stand-in; only removed keys' own logits absorb its rounding, and their weight is 0 anyway;
# - range: 1e4 and the Q channel's 1/scale (<= 16 for head dims <= 256) are exact in fp16 and bf16
#   and their product (<= 1.6e5) is summed in the kernels' fp32 accumulators; a huge value such as
#   finfo(float32).min would become -inf on a cast to fp16 and overflow in the accumulator.
# Finite biases below it are clamped to it: they too weigh exactly 0 (gradient 0, as in eager).
FOLDED_MASK_VALUE: float = -1.0e4

_HEAD_DIM_MULTIPLE = 8  # fused kernels want head dims that are multiples of 8


def expand_doc_bias(doc_log_mask: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
    """Per-key bias from a per-document log-mask and the documents' token attention mask.

    Args:
        doc_log_mask: [B, n] or [B*m, n] float log-mask per document (``log M_i``; 0 keeps a
            document, -inf removes it). With B*m rows, each query's m masks are consecutive rows
            (for example the n single-document masks of a baseline), all over the same documents.
        key_padding: [B, n, L] token attention mask of the encoded documents in the
            ``encoder_attention_mask`` convention: nonzero / True for real tokens, 0 / False for
            padding.

    Returns:
        [rows, n*L] bias in ``doc_log_mask``'s dtype, laid out like the encoder states reshaped
        to [B, n*L, hidden]; padding keys are -inf. Differentiable w.r.t. ``doc_log_mask``.
    """
    if doc_log_mask.dim() != 2:
        raise ValueError(f"doc_log_mask must be [B, n] or [B*m, n], got shape {tuple(doc_log_mask.shape)}")
    if key_padding.dim() != 3:
        raise ValueError(f"key_padding must be [B, n, L], got shape {tuple(key_padding.shape)}")
    if not doc_log_mask.is_floating_point():
        raise ValueError(f"doc_log_mask must be a float tensor, got {doc_log_mask.dtype}")
    rows, n_docs = doc_log_mask.shape
    batch, n_docs_padding, doc_len = key_padding.shape
    if n_docs != n_docs_padding:
        raise ValueError(
            f"doc_log_mask has {n_docs} documents per row but key_padding has {n_docs_padding}"
        )
    if batch == 0 or rows % batch != 0:
        raise ValueError(
            f"doc_log_mask rows ({rows}) must be a positive multiple of key_padding's batch ({batch})"
        )
    is_real_token = key_padding.to(device=doc_log_mask.device) != 0
    is_real_token = is_real_token.repeat_interleave(rows // batch, dim=0)
    per_token = doc_log_mask[:, :, None].expand(rows, n_docs, doc_len)
    return per_token.masked_fill(~is_real_token, float("-inf")).reshape(rows, n_docs * doc_len)


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flex_attention_importable() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def backend_unavailable_reason(
    backend: str, device: torch.device | str, dtype: torch.dtype, requires_grad: bool, query_mask: bool = False
) -> str | None:
    """Why ``backend`` cannot run for these inputs (with a per-query mask if ``query_mask``), or None if it can."""
    device_type = torch.device(device).type
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
    if backend == "flash" and query_mask:
        return "flash_attn takes no per-query mask (a causal mask over the prompt's own keys); use 'folded' or 'sdpa'"
    if backend == "flex":
        if not _flex_attention_importable():
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if device_type == "cpu" and requires_grad:
            return "flex_attention has no backward on CPU; use 'sdpa' or 'folded' for training on CPU"
    if backend == "flash":
        if not _flash_attn_installed():
            return "the flash_attn package is not installed (pip install flash-attn, CUDA only)"
        if device_type != "cuda":
            return f"flash_attn runs only on CUDA, not on {device_type}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash_attn supports only float16/bfloat16, not {dtype}"
    return None


def available_backends(
    device: torch.device | str, dtype: torch.dtype, requires_grad: bool, query_mask: bool = False
) -> list[str]:
    """Backends that can run (forward, and backward when ``requires_grad``) for these inputs."""
    return [name for name in BACKENDS if backend_unavailable_reason(name, device, dtype, requires_grad, query_mask) is None]


def resolve_backend(
    backend: str, device: torch.device | str, dtype: torch.dtype, requires_grad: bool, query_mask: bool = False
) -> str:
    """The backend that will run: ``backend`` itself, or the fastest exact one for "auto".

    Raises:
        ValueError: ``backend`` cannot run for these inputs (the message says why).
    """
    device = torch.device(device)
    if backend == "auto":
        backend = auto_backend(device, dtype, requires_grad, query_mask)
    reason = backend_unavailable_reason(backend, device, dtype, requires_grad, query_mask)
    if reason is not None:
        raise ValueError(f"attention backend {backend!r} is unavailable: {reason}")
    return backend


def auto_backend(device: torch.device, dtype: torch.dtype, requires_grad: bool, query_mask: bool = False) -> str:
    """Fastest exact backend for the device.

    CPU (scripts/bench_attention.py, 1-2 threads, CEPE-like shapes): SDPA with a float mask is the
    fastest forward (0.45-0.96x eager) but its backward is slower (0.95-1.33x eager fwd+bwd), and
    the folded channel only adds copies; so eager for training, SDPA for inference.
    CUDA: flash-attn through the folded channel, else the folded channel on SDPA's fused kernels
    for half precision (they take no bias), else SDPA with a float mask (float32).
    """
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        preference = ("flash", "folded", "sdpa") if half else ("sdpa",)
    else:
        preference = ("eager",) if requires_grad else ("sdpa",)
    usable = available_backends(device, dtype, requires_grad, query_mask)
    return next((name for name in preference if name in usable), "eager")


def _logit_bias(key_bias, query_mask):
    """The per-key bias [B, N] as a bias broadcastable to the logits, plus the query mask if any."""
    bias = key_bias[:, None, None, :]
    return bias if query_mask is None else bias + query_mask


def _eager_attention(q, k, v, key_bias, scale, query_mask=None):
    return _eager_with_bias(q, k, v, _logit_bias(key_bias, query_mask), scale)


def _eager_with_bias(q, k, v, bias, scale):
    """Eager attention with an additive ``bias`` broadcastable to the logits [B, H, M, N]."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    logits = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2)) * scale
    probs = torch.softmax(logits + bias.to(compute_dtype), dim=-1)
    return torch.matmul(probs, v.to(compute_dtype)).to(q.dtype)


def _sdpa_attention(q, k, v, key_bias, scale, query_mask=None):
    return _sdpa_with_bias(q, k, v, _logit_bias(key_bias, query_mask), scale)


def _sdpa_with_bias(q, k, v, bias, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


def _shared_kv_attention(backend: str, q, k, v, key_bias, scale):
    """Attention of m masks per query over that query's ONE copy of the keys and values.

    ``q`` [B*m, Hkv, Q, D] (the rows of one query consecutive), ``k``/``v`` [B, Hkv, N, D],
    ``key_bias`` [B*m, N]. The eager and SDPA backends stack the m masks' queries as extra query
    rows of one attention over [B, Hkv, m*Q, D] against the shared keys, each row group with its
    own bias: no copy of the keys and values, which are what a baseline's n single-document
    masks would otherwise repeat n times. The folded backends carry the bias in a key channel,
    so there the keys differ per mask and are repeated.
    """
    rows, n_kv_heads, n_queries, head_dim = q.shape
    batch, n_keys = k.shape[0], k.shape[2]
    masks = rows // batch
    if backend not in ("eager", "sdpa"):
        k, v = k.repeat_interleave(masks, dim=0), v.repeat_interleave(masks, dim=0)
        return _BACKEND_FUNCTIONS[backend](q, k, v, key_bias, scale)
    stacked_q = q.view(batch, masks, n_kv_heads, n_queries, head_dim).transpose(1, 2)
    stacked_q = stacked_q.reshape(batch, n_kv_heads, masks * n_queries, head_dim)
    bias = key_bias.view(batch, 1, masks, 1, n_keys).expand(batch, 1, masks, n_queries, n_keys)
    bias = bias.reshape(batch, 1, masks * n_queries, n_keys)
    attend = _eager_with_bias if backend == "eager" else _sdpa_with_bias
    out = attend(stacked_q, k, v, bias, scale)
    out = out.view(batch, n_kv_heads, masks, n_queries, head_dim).transpose(1, 2)
    return out.reshape(rows, n_kv_heads, n_queries, head_dim)


def _fold_bias_into_head_dim(q, k, v, key_bias, scale):
    """Append the bias as a head channel so that ``q' . k' * scale = q . k * scale + bias``.

    Q gets the constant ``1/scale`` and K the bias itself, so the channel's product times
    ``scale`` is the bias with no division rounding (exact for power-of-two scales such as
    1/8 at head dim 64). V gets a zero channel, and all three are zero-padded to a multiple of
    8. The bias gradient arrives through dK's extra channel. Each row's biases are first shifted
    so their largest value is 0, and -inf becomes :data:`FOLDED_MASK_VALUE`. In half precision
    the bias channel is rounded to K's dtype, as SDPA rounds its mask to Q's dtype.
    """
    row_max = key_bias.amax(dim=-1, keepdim=True).detach()  # finite: all -inf rows were rejected
    folded_bias = (key_bias - row_max).clamp_min(FOLDED_MASK_VALUE)

    batch, n_heads, n_queries, head_dim = q.shape
    n_keys = k.shape[2]
    padded_dim = math.ceil((head_dim + 1) / _HEAD_DIM_MULTIPLE) * _HEAD_DIM_MULTIPLE
    pad = padded_dim - head_dim - 1
    q_channel = q.new_full((batch, n_heads, n_queries, 1), 1.0 / scale)
    k_channel = folded_bias.to(k.dtype)[:, None, :, None].expand(batch, n_heads, n_keys, 1)
    q_folded = F.pad(torch.cat([q, q_channel], dim=-1), (0, pad))
    k_folded = F.pad(torch.cat([k, k_channel], dim=-1), (0, pad))
    v_folded = F.pad(v, (0, pad + 1))
    return q_folded, k_folded, v_folded


def _folded_attention(q, k, v, key_bias, scale, query_mask=None):
    q_f, k_f, v_f = _fold_bias_into_head_dim(q, k, v, key_bias, scale)
    mask = None if query_mask is None else query_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q_f, k_f, v_f, attn_mask=mask, scale=scale)
    return out[..., : q.shape[-1]]


def _flash_attention(q, k, v, key_bias, scale, query_mask=None):  # query_mask: refused before (None)
    from flash_attn import flash_attn_func  # optional dependency, checked by backend_unavailable_reason

    q_f, k_f, v_f = _fold_bias_into_head_dim(q, k, v, key_bias, scale)
    # flash_attn wants [B, seq, heads, dim].
    out = flash_attn_func(
        q_f.transpose(1, 2), k_f.transpose(1, 2), v_f.transpose(1, 2), softmax_scale=scale, causal=False
    )
    return out.transpose(1, 2)[..., : q.shape[-1]]


_compiled_flex_attention: Callable | None = None


def _flex_attention_fn(device_type: str) -> Callable:
    """flex_attention is fast (and has a backward) only once compiled: compile it once, on CUDA."""
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return _flex_attention_unfused
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def _flex_attention_unfused(*args, **kwargs) -> torch.Tensor:
    """Uncompiled flex_attention (CPU inference): exact but unfused, so silence its advice to compile."""
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex_attention(q, k, v, key_bias, scale, query_mask=None):
    bias = key_bias.to(torch.float32)
    mask = None if query_mask is None else query_mask.to(torch.float32)

    def add_key_bias(score, batch_idx, head_idx, query_idx, key_idx):
        score = score + bias[batch_idx, key_idx]
        return score if mask is None else score + mask[batch_idx, 0, query_idx, key_idx]

    attend = _flex_attention_fn(q.device.type)
    if not torch.is_grad_enabled():
        # flex_attention refuses CPU inputs flagged requires_grad even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()
    return attend(q, k, v, score_mod=add_key_bias, scale=scale)


_BACKEND_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": _eager_attention,
    "sdpa": _sdpa_attention,
    "folded": _folded_attention,
    "flex": _flex_attention,
    "flash": _flash_attention,
}


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, query_mask: torch.Tensor | None
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, H, M, D] / [B, Hkv, N, D]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, n_heads, _, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] == 0 or batch % k.shape[0] != 0 or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch (a divisor: "
            f"rows of one query's masks share its keys) or head dim"
        )
    if k.shape[1] == 0 or n_heads % k.shape[1] != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if key_bias.shape != (batch, k.shape[2]):
        raise ValueError(f"key_bias must be [B, N] = {(batch, k.shape[2])}, got {tuple(key_bias.shape)}")
    if not key_bias.is_floating_point():
        raise ValueError(f"key_bias must be a float tensor, got {key_bias.dtype}")
    if k.shape[2] == 0:
        raise ValueError("attention over zero keys: k has N = 0")
    if query_mask is not None:
        if query_mask.shape != (batch, 1, q.shape[2], k.shape[2]):
            raise ValueError(f"query_mask must be [B, 1, M, N] = {(batch, 1, q.shape[2], k.shape[2])}, got {tuple(query_mask.shape)}")
        if k.shape[0] != batch:
            raise ValueError("a query_mask needs one row of keys per query row (keys shared by m masks take none)")


def check_key_bias(key_bias: torch.Tensor) -> None:
    """Reject NaN/+inf biases and rows whose keys are all -inf (they would attend to nothing).

    It reads the values (a device sync, deferred under :func:`grerank_dist.method.checks.deferred_checks`);
    a caller that reuses one bias in many layers checks it once here and passes
    ``check_bias=False`` to :func:`masked_attention`.
    """
    with torch.no_grad():
        bad_value = torch.isnan(key_bias) | torch.isposinf(key_bias)
        all_removed = torch.isneginf(key_bias).all(dim=-1)
        require(bad_value.any(), "key_bias contains NaN or +inf; only finite values and -inf are allowed")
        require(all_removed.any(), "key_bias is -inf for every key of a batch row: that query would attend to nothing",
                lambda: f"(rows {torch.nonzero(all_removed).flatten().tolist()})")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    *,
    backend: str = "auto",
    scale: float | None = None,
    check_bias: bool = True,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with a per-key additive bias, broadcast over heads and queries (non-causal
    unless ``query_mask`` says otherwise).

    Args:
        q: [B, H, M, D] queries.
        k, v: [B, Hkv, N, D] keys and values; H must be a multiple of Hkv (grouped-query). They
            may also have B/m rows: m consecutive query rows (m masks of one query) then share one
            row of keys and values, which is not copied on the eager and SDPA backends.
        key_bias: [B, N] float bias added to every logit of key n in batch row b; -inf removes the
            key (padding, or a document with mask 0). See :func:`expand_doc_bias`.
        backend: one of :data:`BACKENDS` or "auto" (fastest exact backend for the device).
        scale: logit scale; defaults to 1/sqrt(D).
        check_bias: validate the bias values (see :func:`check_key_bias`); shapes are always checked.
        query_mask: optional [B, 1, M, N] constant additive mask (0 / a large negative value) that
            may differ per query position, such as a causal mask; broadcast over heads, added to
            the logits with ``key_bias``. Keys must then have B rows. Not for the flash backend.

    Returns:
        [B, H, M, D] in q's dtype.

    Raises:
        ValueError: bad shapes, NaN/+inf bias, a batch row whose keys are all -inf, or a backend that
            cannot run here (the message says why).
    """
    _check_inputs(q, k, v, key_bias, query_mask)
    if check_bias:
        check_key_bias(key_bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, key_bias))
    shared_kv = k.shape[0] != q.shape[0]
    has_mask = query_mask is not None
    if backend == "auto":
        backend = auto_backend(q.device, q.dtype, requires_grad, has_mask)
        if shared_kv and backend in ("flash", "folded"):
            backend = "sdpa"  # their bias channel lives in the keys, which would need a copy per mask
    backend = resolve_backend(backend, q.device, q.dtype, requires_grad, has_mask)
    batch, n_heads, n_queries, head_dim = q.shape
    n_kv_heads, group = k.shape[1], n_heads // k.shape[1]
    # The bias depends on neither head nor query, so the query heads sharing a kv head can be
    # stacked as extra query rows: grouped-query attention without copying k and v (a query
    # mask, small beside k and v, is tiled over the group's heads to follow them).
    grouped_q = q.reshape(batch, n_kv_heads, group * n_queries, head_dim)
    if shared_kv:
        out = _shared_kv_attention(backend, grouped_q, k, v, key_bias, scale)
    else:
        if has_mask:
            query_mask = query_mask[:, :, None].expand(batch, 1, group, n_queries, k.shape[2])
            query_mask = query_mask.reshape(batch, 1, group * n_queries, k.shape[2])
        out = _BACKEND_FUNCTIONS[backend](grouped_q, k, v, key_bias, scale, query_mask)
    return out.reshape(batch, n_heads, n_queries, head_dim)
