"""Any decoder-only causal LM as a frozen parallel-context generator (G-Rerank §3.2, §6).

Layout of one query with n candidates (positions in brackets)::

    prefix [0, P)  |  doc_1 [P, P+L)  ...  doc_n [P, P+L)  |  prompt + answer [P+L, ...)

- The shared prefix (BOS, an instruction, or the head of the chat template) is pre-filled once.
- Every document is pre-filled on its own after the prefix, without autograd, all with the same
  positions P..P+L-1 (left-padded, so a document's last token sits at P+L-1 right before the
  prompt); this yields every layer's keys and values of every document.
- The prompt and answer tokens attend, in every layer, to the prefix and all documents' keys
  with the per-document log-mask added to their scores (-inf on padding), plus their own keys
  causally; their positions continue at P+L. Each row's log-mask is first shifted so that its
  largest value is 0: log-masks then mean the same up to a constant, as for CEPE and FiD.

Parallel-context alignment, after APE (Yang, Chen, Chen, ICLR 2025: shared prefix, attention
temperature, scaling factor): ``generator.doc_key_temperature`` T, ``generator.doc_attention_scale``
S (both 1 by default, which skips them) and ``generator.doc_temperature_form``. With
s = q.k / sqrt(d) and b_j = log m_i(j) - max_i log m_i (key j's document's log-mask, row-shifted),
a prompt/answer query scores, in one softmax,

    prefix key p:       s_p
    own key t <= query: s_t
    document key j:     s_j / T + b_j + log S                   per_key
                        s_j / T + b_j + log S + (T - 1) LSE     group (the default)

with LSE = logsumexp_j'(s_j' / T + b_j') over all document keys j' (not the prefix's), per row,
head and query position. ``group`` is APE's form: the documents split their share by
softmax(s_j / T + b_j), and together weigh exp(G), G = T LSE + log S, against the prefix's and the
prompt's own exp(s). Without masks G - log S lies within [max_j s_j, max_j s_j + T log N] (N
document keys), so T sharpens the attention within the documents but barely moves their share; ``per_key`` also multiplies each
document key's weight by exp(s_j (1/T - 1)), so their share follows the scores' size (re-tune S
with T). At T = 1 both are the same softmax (the offset is not computed), and S is APE's scaling
factor. log S comes after the row shift, so a constant log-mask is still no mask and S multiplies
the documents' weight against the prefix's and the prompt's; a mask m_i multiplies its
document's weight within the documents, 0 removes it exactly, and in ``group`` its gradient also
goes through LSE (a row whose documents are all masked out stays finite, no NaN).

``per_key`` is a key scale plus a per-key bias, which every attention backend computes with the
mask's gradient, fused kernels included; ``group``'s offset depends on the query, which no
per-key bias carries, so at T != 1 it runs on the eager backend only (the others are refused at
backend resolution, ``auto`` is eager).

Everything goes through transformers' attention interface: the model runs with the attention
function registered here (:data:`ATTENTION_NAME`), which receives the documents' keys, values
and bias through the forward's keyword arguments and falls back to SDPA when there are none
(the pre-fill). No modeling file is forked, so Llama, Qwen2/Qwen3, Mistral and Gemma work
without per-model code (tests cover Llama, Qwen2 and Mistral). The documents' keys are computed
once per query.

The prompt/answer pass runs on ``config.cross_attn_backend`` (the run's
``generator.attention_backend``). ``eager`` is the hand-written softmax below, which shares one
copy of a query's document keys among its m masks (broadcast, never copied). ``sdpa``,
``folded`` and ``flex`` (inference only on CPU) go through
:func:`grerank_dist.method.attention.masked_attention` over [prefix + documents, own tokens]
with the causal mask as its ``query_mask``, keys and values concatenated per row. ``auto`` is
eager: on CPU the others are slower (``scripts/bench_decoder_only.py --backends``; PyTorch's CPU
SDPA takes a differentiable mask only on its unfused math path, and the folded channel's fused
kernel pays for the per-row key copies, a head dimension padded to a multiple of 8 and a full dK
computed for one channel's gradient), and on GPU they have not been measured yet.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grerank_dist.config import DOC_TEMPERATURE_FORMS
from grerank_dist.method.attention import check_key_bias, expand_doc_bias, masked_attention, resolve_backend
from grerank_dist.interface import (
    AnswerLogProbs,
    EncodedContexts,
    GeneratorFamily,
    InputFormat,
    answer_logprobs_from_hidden,
    checked_document_mask,
    greedy_decode,
    rows_for_masks,
    split_per_query,
    stop_token_tensor,
)
from grerank_dist.models.cepe import Fp32LMHead, _causal_padding_mask, cache_keyword

ATTENTION_NAME = "grerank_parallel_context"
# Architectures whose attention modules call the registered attention function with
# (query, key, value, mask, scaling) and nothing this module cannot honour (softcapping,
# attention sinks, per-layer sliding windows shorter than the context).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma")
_DOCS_SENTINEL = "\u27e6documents\u27e7"
_QUESTION_SENTINEL = "\u27e6question\u27e7"


@dataclass
class DecoderContexts(EncodedContexts):
    """Every layer's keys and values of the shared prefix followed by the n documents.

    ``keys[i]``/``values[i]``: layer i, [B, Hkv, P + n*L, D] (``states`` holds them all, keys
    first, so generic code that moves or inspects ``states`` sees every tensor).
    ``prefix_len`` P; the prompt's first position is ``prompt_start`` = P + L.
    """

    prefix_len: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.states) // 2

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.states[idx], self.states[self.num_layers + idx]

    @property
    def prompt_start(self) -> int:
        return self.prefix_len + self.doc_len


@dataclass
class _ParallelKeys:
    """What the registered attention function reads from the forward's keyword arguments."""

    contexts: DecoderContexts
    key_bias: torch.Tensor  # [R, P + n*L], R = B*m rows (m masks per query, consecutive); log S included
    backend: str = "eager"  # the prompt/answer pass's attention backend, resolved (never "auto")
    temperature: float = 1.0  # T, on the document keys' scores (not the prefix's)
    group_offset: bool = False  # add APE's per-query offset (T - 1) LSE to the document keys (eager only)
    log_scale: float = 0.0  # log S, in key_bias already: LSE is taken without it
    # document_attention_mass only: weight [R, S] of each query position, value-norm weighting,
    # and the per-layer [R, P + n*L] key masses it collects.
    mass_queries: torch.Tensor | None = None
    value_norm: bool = False
    masses: list[torch.Tensor] | None = None


def parallel_context_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    parallel_keys: _ParallelKeys | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of the prompt/answer tokens over [prefix + documents (biased), own tokens (causal)].

    ``query`` [R, H, S, D]; ``key``/``value`` [R, Hkv, K, D] the rows' own (cached) tokens;
    ``attention_mask`` [R, 1, S, K] additive. One softmax in fp32 (fp64 stays fp64) over both key
    sets, with the log-mask bias, T and the group form's offset on the documents' keys. Eager
    (also for ``document_attention_mass``, which reads the probabilities): the documents' keys
    [B, Hkv, N, D] are broadcast over each query's m rows by reshaping the queries, not by
    copying keys; other backends: :func:`_fused_attention`. Without ``parallel_keys`` (the
    pre-fill) this is transformers' SDPA. Returns [R, S, H, D] as every attention function does.
    """
    if parallel_keys is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{type(module).__name__}: attention logit softcapping is not supported in parallel-context mode")
    window = kwargs.get("sliding_window")
    if window is not None and parallel_keys.contexts.prompt_start + key.shape[2] > window:
        raise ValueError(
            f"{type(module).__name__}: sliding_window={window} is shorter than the parallel context "
            f"(prefix + document width + prompt = {parallel_keys.contexts.prompt_start + key.shape[2]} positions)"
        )
    doc_k, doc_v = parallel_keys.contexts.layer(module.layer_idx)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if parallel_keys.backend != "eager" and parallel_keys.masses is None:
        return _fused_attention(query, key, value, attention_mask, doc_k, doc_v, scale, parallel_keys)
    rows, n_heads, q_len, head_dim = query.shape
    batch, n_kv, n_doc_keys, _ = doc_k.shape
    per_query, group = rows // batch, n_heads // n_kv
    compute = torch.promote_types(query.dtype, torch.float32)
    q = query.to(compute)
    # Documents: [B, Hkv, m*g*S, D] queries against [B, Hkv, N, D] keys shared by the m rows.
    q_docs = q.reshape(batch, per_query, n_kv, group * q_len, head_dim).transpose(1, 2)
    doc_scores = torch.matmul(q_docs.reshape(batch, n_kv, per_query * group * q_len, head_dim), doc_k.to(compute).transpose(-1, -2))
    doc_scale = scale
    if parallel_keys.temperature != 1.0:  # one logit scale per key: the prefix's 1/sqrt(d), the documents' 1/(sqrt(d) T)
        doc_scale = doc_scores.new_full((n_doc_keys,), scale)
        doc_scale[parallel_keys.contexts.prefix_len :] = scale / parallel_keys.temperature
    doc_scores = doc_scores.reshape(batch, n_kv, per_query, group * q_len, n_doc_keys) * doc_scale
    bias = parallel_keys.key_bias.to(compute).reshape(batch, 1, per_query, 1, n_doc_keys)
    doc_scores = (doc_scores + bias).transpose(1, 2).reshape(rows, n_kv, group * q_len, n_doc_keys)
    if parallel_keys.group_offset:
        doc_scores = _add_group_offset(doc_scores, parallel_keys)
    # Own tokens: grouped heads as extra query rows, causal/padding mask per row.
    own_scores = torch.matmul(q.reshape(rows, n_kv, group * q_len, head_dim), key.to(compute).transpose(-1, -2)) * scale
    if attention_mask is not None:
        own_mask = attention_mask.to(compute)[:, :, None].expand(rows, 1, group, q_len, key.shape[2])
        own_scores = own_scores + own_mask.reshape(rows, 1, group * q_len, key.shape[2])
    probs = torch.softmax(torch.cat([doc_scores, own_scores], dim=-1), dim=-1)
    doc_probs, own_probs = probs.split([n_doc_keys, key.shape[2]], dim=-1)
    if parallel_keys.masses is not None:
        parallel_keys.masses.append(_key_mass(doc_probs, doc_v, parallel_keys, group, q_len))
    doc_probs = doc_probs.reshape(batch, per_query, n_kv, group * q_len, n_doc_keys).transpose(1, 2)
    doc_out = torch.matmul(doc_probs.reshape(batch, n_kv, per_query * group * q_len, n_doc_keys), doc_v.to(compute))
    doc_out = doc_out.reshape(batch, n_kv, per_query, group * q_len, head_dim).transpose(1, 2)
    out = doc_out.reshape(rows, n_kv, group * q_len, head_dim) + torch.matmul(own_probs, value.to(compute))
    out = out.reshape(rows, n_heads, q_len, head_dim).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _add_group_offset(doc_scores: torch.Tensor, keys: _ParallelKeys) -> torch.Tensor:
    """APE's group form of the [prefix + documents] logits [..., P + n*L]: each document logit
    x_j = s_j / T + b_j + log S plus (T - 1) (logsumexp_j x_j - log S), the same offset for all
    of a query's document keys (module docstring)."""
    prefix_len = keys.contexts.prefix_len
    prefix, docs = doc_scores.split([prefix_len, doc_scores.shape[-1] - prefix_len], dim=-1)
    # A row whose documents are all -inf (masked out) would get an infinite offset and NaN logits,
    # and NaN from logsumexp's backward: its scores are read as 0, and any finite offset leaves them -inf.
    empty = torch.isneginf(docs).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(docs.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    return torch.cat([prefix, docs + (keys.temperature - 1.0) * (lse - keys.log_scale)], dim=-1)


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    doc_k: torch.Tensor,
    doc_v: torch.Tensor,
    scale: float,
    parallel_keys: _ParallelKeys,
) -> tuple[torch.Tensor, None]:
    """The same attention as the eager path through :func:`masked_attention`: keys [prefix +
    documents, own tokens] per row, the log-mask as its per-key bias (0 on the prefix and own
    keys), the causal/padding mask as its query mask, T applied by dividing the document keys."""
    rows, q_len, own_len = query.shape[0], query.shape[2], key.shape[2]
    batch, n_doc_keys = doc_k.shape[0], doc_k.shape[2]
    if parallel_keys.temperature != 1.0:
        prefix_len = parallel_keys.contexts.prefix_len
        doc_k = torch.cat([doc_k[:, :, :prefix_len], doc_k[:, :, prefix_len:] / parallel_keys.temperature], dim=2)

    def per_row(tensor: torch.Tensor) -> torch.Tensor:  # a query's keys for each of its m rows (a view when m = 1)
        return tensor[:, None].expand(batch, rows // batch, *tensor.shape[1:]).reshape(rows, *tensor.shape[1:])

    keys = torch.cat([per_row(doc_k).to(key.dtype), key], dim=2)
    values = torch.cat([per_row(doc_v).to(value.dtype), value], dim=2)
    key_bias = torch.cat([parallel_keys.key_bias, parallel_keys.key_bias.new_zeros(rows, own_len)], dim=1)
    query_mask = None
    if attention_mask is not None:
        query_mask = torch.cat([attention_mask.new_zeros(rows, 1, q_len, n_doc_keys), attention_mask], dim=-1)
    out = masked_attention(
        query, keys, values, key_bias, backend=parallel_keys.backend, scale=scale, check_bias=False, query_mask=query_mask
    )
    return out.transpose(1, 2).contiguous(), None


def _key_mass(doc_probs: torch.Tensor, doc_v: torch.Tensor, keys: _ParallelKeys, group: int, q_len: int) -> torch.Tensor:
    """[R, P + n*L] attention mass of each prefix/document key, summed over heads and the weighted
    query positions (optionally times the key's value norm, Kobayashi et al. 2020)."""
    rows, n_kv, _, n_doc_keys = doc_probs.shape
    probs = doc_probs.reshape(rows, n_kv, group, q_len, n_doc_keys)
    if keys.value_norm:
        norms = doc_v.to(probs.dtype).norm(dim=-1)  # [B, Hkv, N]
        probs = probs * norms.repeat_interleave(rows // norms.shape[0], dim=0)[:, :, None, None, :]
    return torch.einsum("rkgsn,rs->rn", probs, keys.mass_queries.to(probs.dtype))


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, parallel_context_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)


def decoder_input_format(tokenizer: Any, data: Any) -> tuple[InputFormat, list[int]]:
    """The Collator's format and the shared prefix ids, from the run's templates.

    Plain: prefix = BOS + ``data.instruction``; documents ``data.doc_template``; prompt
    ``data.prompt_template``. With ``data.chat_template`` the model's chat template wraps one
    user turn ``instruction + documents + prompt`` and opens the assistant turn: everything
    before the documents becomes the prefix, everything after them the prompt template.
    """
    instruction = getattr(data, "instruction", "")
    prompt_template = data.prompt_template
    if getattr(data, "chat_template", False):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.chat_template is true but the generator's tokenizer has no chat template")
        content = instruction + _DOCS_SENTINEL + prompt_template.replace("{question}", _QUESTION_SENTINEL)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        head, tail = rendered.split(_DOCS_SENTINEL)
        prompt_template = tail.replace("{", "{{").replace("}", "}}").replace(_QUESTION_SENTINEL, "{question}")
        prefix = tokenizer(head, add_special_tokens=False)["input_ids"]
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prefix = bos + (tokenizer(instruction, add_special_tokens=False)["input_ids"] if instruction else [])
    fmt = InputFormat(doc_template=data.doc_template, prompt_template=prompt_template, prompt_bos=False)
    return fmt, prefix


class DecoderOnlyGenerator(nn.Module):
    """A frozen causal LM in parallel-context mode; implements
    :class:`grerank_dist.interface.ParallelContextGenerator`.

    ``doc_log_mask`` [B, n] or [B, m, n]: m masks per query run as B*m rows (row b*m + j is
    query b under mask j) over one pre-fill of the documents; decoder inputs may be per query
    ([B, S], repeated for the m masks) or per row ([B*m, S]); outputs are per row ([B, m, ...]
    for 3-D masks).
    """

    def __init__(self, lm: nn.Module, prefix_ids: list[int], input_format: InputFormat) -> None:
        super().__init__()
        model_type = lm.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a supported decoder-only generator "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        lm.config._attn_implementation = ATTENTION_NAME
        if not hasattr(lm.config, "cross_attn_backend"):
            lm.config.cross_attn_backend = "auto"
        self.lm = lm
        self.prefix_ids = list(prefix_ids)
        self.input_format = input_format
        self.checkpoint_layers = False
        self.doc_key_temperature = 1.0
        self.doc_attention_scale = 1.0
        self.doc_temperature_form = "group"
        self._cache_keyword = cache_keyword(type(lm.model).forward)
        self.lm.requires_grad_(False)
        self.lm.eval()

    @property
    def config(self) -> Any:
        return self.lm.config

    def set_context_alignment(
        self, doc_key_temperature: float, doc_attention_scale: float, doc_temperature_form: str = "group"
    ) -> None:
        """Set T, S and T's form of the prompt/answer pass (module docstring; T = S = 1 change nothing)."""
        for name, value in (("doc_key_temperature", doc_key_temperature), ("doc_attention_scale", doc_attention_scale)):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"generator.{name} must be a finite number > 0, got {value!r}")
        if doc_temperature_form not in DOC_TEMPERATURE_FORMS:
            raise ValueError(
                f"generator.doc_temperature_form must be one of {DOC_TEMPERATURE_FORMS}, got {doc_temperature_form!r}"
            )
        self.doc_key_temperature = float(doc_key_temperature)
        self.doc_attention_scale = float(doc_attention_scale)
        self.doc_temperature_form = doc_temperature_form

    @property
    def _group_offset(self) -> bool:
        """Whether the document keys take APE's per-query offset (group form; it is 0 at T = 1)."""
        return self.doc_temperature_form == "group" and self.doc_key_temperature != 1.0

    def activation_checkpointing_enable(self) -> None:
        """Recompute each decoder layer of the prompt/answer pass in backward (non-reentrant, so
        the bias passed as a keyword argument still gets its gradient); no input-embedding hook."""
        self.lm._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=False))
        self.checkpoint_layers = True

    def _layers(self) -> nn.ModuleList:
        return self.lm.model.layers

    # --- documents ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_contexts(self, encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None) -> DecoderContexts:
        """Pre-fill the shared prefix once and then the B*n documents after it, all at positions P..P+L-1."""
        encoder_attention_mask = checked_document_mask(encoder_input_ids, encoder_attention_mask)
        batch, n_docs, doc_len = encoder_input_ids.shape
        device = encoder_input_ids.device
        dtype = self.lm.get_input_embeddings().weight.dtype
        prefix_len = len(self.prefix_ids)
        cache = DynamicCache()
        if prefix_len:
            prefix = torch.tensor([self.prefix_ids], device=device)
            self.lm.model(
                input_ids=prefix, attention_mask=_causal_padding_mask(torch.ones_like(prefix), prefix_len, dtype),
                position_ids=torch.arange(prefix_len, device=device)[None], use_cache=True, **{self._cache_keyword: cache},
            )
            prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
            cache = DynamicCache()
            for idx, (k, v) in enumerate(prefix_kv):
                cache.update(k.expand(batch * n_docs, -1, -1, -1), v.expand(batch * n_docs, -1, -1, -1), idx)
        docs = encoder_input_ids.reshape(batch * n_docs, doc_len)
        mask = encoder_attention_mask.reshape(batch * n_docs, doc_len).long()
        full_mask = torch.cat([mask.new_ones(batch * n_docs, prefix_len), mask], dim=1)
        self.lm.model(
            input_ids=docs, attention_mask=_causal_padding_mask(full_mask, doc_len, dtype),
            position_ids=(prefix_len + torch.arange(doc_len, device=device)).expand(batch * n_docs, doc_len),
            use_cache=True, **{self._cache_keyword: cache},
        )
        keys, values = [], []
        for layer in cache.layers:
            for store, tensor in ((keys, layer.keys), (values, layer.values)):
                n_kv, head_dim = tensor.shape[1], tensor.shape[3]
                doc_part = tensor[:, :, prefix_len:].reshape(batch, n_docs, n_kv, doc_len, head_dim)
                doc_part = doc_part.transpose(1, 2).reshape(batch, n_kv, n_docs * doc_len, head_dim)
                prefix_part = tensor[:1, :, :prefix_len].expand(batch, -1, -1, -1)
                store.append(torch.cat([prefix_part, doc_part], dim=2))
        return DecoderContexts(states=tuple(keys + values), key_padding=encoder_attention_mask.bool(), prefix_len=prefix_len)

    # --- prompt and answer --------------------------------------------------------------------

    def _rows(
        self, contexts: DecoderContexts, doc_log_mask: torch.Tensor | None, tensors: dict[str, torch.Tensor | None]
    ) -> tuple[dict[str, torch.Tensor | None], _ParallelKeys, int | None]:
        """Check shapes; per-row decoder inputs, the attention kwargs and m (masks per query)."""
        if not isinstance(contexts, DecoderContexts):
            raise TypeError(f"contexts must come from this generator's encode_contexts, got {type(contexts).__name__}")
        batch, n_docs = contexts.key_padding.shape[:2]
        tensors, row_masks, per_query = rows_for_masks(tensors, doc_log_mask, batch, n_docs, contexts.key_padding.device)
        # A log-mask means the same up to a constant per row (as in CEPE and FiD, whose documents
        # are the only cross-attention keys): here the prefix and the prompt are keys too, so
        # each row is shifted to give its strongest document weight 1 (log 0), like them. log S
        # comes after the shift (before it, the shift would cancel it): the strongest document
        # then weighs S, whatever the mask's constant.
        row_max = row_masks.amax(dim=-1, keepdim=True)
        row_masks = row_masks - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        if self.doc_attention_scale != 1.0:
            row_masks = row_masks + math.log(self.doc_attention_scale)
        doc_bias = expand_doc_bias(row_masks, contexts.key_padding)
        check_key_bias(doc_bias)
        prefix_bias = doc_bias.new_zeros(doc_bias.shape[0], contexts.prefix_len)  # the prefix is no document: never masked
        keys = _ParallelKeys(
            contexts, torch.cat([prefix_bias, doc_bias], dim=1), temperature=self.doc_key_temperature,
            group_offset=self._group_offset, log_scale=math.log(self.doc_attention_scale),
        )
        keys.backend = self._backend(doc_bias)
        return tensors, keys, per_query

    def _backend(self, doc_bias: torch.Tensor) -> str:
        """The prompt/answer pass's backend, ``config.cross_attn_backend`` ("auto": eager, module
        docstring); the fused ones take a per-key bias only, so not the group form at T != 1."""
        requested = self.config.cross_attn_backend
        if requested == "auto":
            return "eager"
        requires_grad = torch.is_grad_enabled() and doc_bias.requires_grad
        dtype = self.lm.get_input_embeddings().weight.dtype
        try:
            backend = resolve_backend(requested, doc_bias.device, dtype, requires_grad, query_mask=True)
        except ValueError as exc:
            raise ValueError(f"generator.attention_backend: {exc}") from exc
        if backend != "eager" and self._group_offset:
            raise ValueError(
                f"generator.attention_backend={backend!r} takes a per-key bias only, but generator.doc_temperature_form="
                f"'group' at generator.doc_key_temperature={self.doc_key_temperature:g} adds a per-query offset: set "
                f"generator.attention_backend to 'eager' or 'auto', or generator.doc_temperature_form to 'per_key'"
            )
        return backend

    def _hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keys: _ParallelKeys,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states of the newest tokens; ``attention_mask`` [R, K] covers the
        cached and new own tokens, positions continue from the documents' width."""
        if self.config._attn_implementation != ATTENTION_NAME:
            raise RuntimeError(
                f"the generator's attn_implementation was changed to {self.config._attn_implementation!r}; "
                f"parallel-context mode needs {ATTENTION_NAME!r} (a model built from its config shares it: deep-copy it)"
            )
        query_len = input_ids.shape[1]
        dtype = self.lm.get_input_embeddings().weight.dtype
        positions = keys.contexts.prompt_start + (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -query_len:]
        layers = self._layers()
        checkpointing = self.checkpoint_layers and torch.is_grad_enabled() and cache is None
        # transformers checkpoints a layer only in training mode; flip the layers' own flag (not
        # their submodules', so nothing else changes behaviour) for this pass.
        for layer in layers:
            layer.training = checkpointing
        try:
            out = self.lm.model(
                input_ids=input_ids, attention_mask=_causal_padding_mask(attention_mask, query_len, dtype),
                position_ids=positions, use_cache=cache is not None, parallel_keys=keys, **{self._cache_keyword: cache},
            )
        finally:
            for layer in layers:
                layer.training = False
        return out.last_hidden_state

    def answer_logprobs(
        self,
        contexts: DecoderContexts,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        doc_log_mask: torch.Tensor | None,
    ) -> AnswerLogProbs:
        """log p(labels[:, t] | tokens < t) in fp32, aligned with ``labels`` ([R, S]; [B, m, S] for 3-D masks)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows, keys, per_query = self._rows(
            contexts, doc_log_mask, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        )
        labels = rows["labels"]
        if labels is None:
            raise ValueError("answer_logprobs needs labels (-100 where no answer token)")
        hidden = self._hidden(rows["input_ids"], rows["attention_mask"], keys)
        return answer_logprobs_from_hidden(
            hidden, labels, self.lm.get_output_embeddings(),
            per_query, causal=True,
        )

    @torch.no_grad()
    def document_attention_mass(
        self,
        contexts: DecoderContexts,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        doc_log_mask: torch.Tensor | None,
        value_norm: bool = False,
    ) -> torch.Tensor:
        """Attention mass on each candidate, [B, n] (or [B, m, n] for 3-D masks): the softmax
        weight of the candidate's keys, averaged over heads, layers and the positions that
        predict answer tokens (``value_norm``: each weight times its key's value norm). The
        prefix's share is left out, so a row sums to at most 1 without ``value_norm``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows, keys, per_query = self._rows(
            contexts, doc_log_mask, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        )
        predicting = torch.zeros_like(rows["labels"], dtype=torch.bool)
        predicting[:, :-1] = rows["labels"][:, 1:] != -100
        counts = predicting.sum(-1, keepdim=True).clamp_min(1)
        keys.mass_queries = predicting.to(torch.float32) / counts
        keys.value_norm, keys.masses = value_norm, []
        self._hidden(rows["input_ids"], rows["attention_mask"], keys)
        heads = self.config.num_attention_heads
        mass = torch.stack(keys.masses).mean(0) / heads  # [R, P + n*L]
        batch, n_docs, doc_len = contexts.key_padding.shape
        mass = mass[:, contexts.prefix_len :].reshape(-1, n_docs, doc_len).sum(-1)
        return split_per_query(mass, per_query)

    @torch.no_grad()
    def generate(
        self,
        contexts: DecoderContexts,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        doc_log_mask: torch.Tensor | None,
        max_new_tokens: int,
        stop_token_ids: list[int] | None = None,
        *,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        before_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Greedy continuation of LEFT-padded prompts: [R, T] (or [B, m, T]), T <= max_new_tokens.

        Stops at EOS or ``stop_token_ids`` (kept, then ``pad_token_id``); own keys/values are
        cached (``use_cache=False`` recomputes the whole prompt each step). Under
        torch.distributed every rank steps until all ranks are done (ZeRO-3 lock step).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts: attention_mask[:, -1] must be 1 for every row")
        rows, keys, per_query = self._rows(contexts, doc_log_mask, {"input_ids": input_ids, "attention_mask": attention_mask})
        stop_ids = stop_token_tensor(self.config.eos_token_id, stop_token_ids, input_ids.device)
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else int(stop_ids[0])
        cache = DynamicCache() if use_cache else None
        head = self.lm.get_output_embeddings()

        def next_logits(step_input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return head(self._hidden(step_input, mask, keys, cache)[:, -1])

        output = greedy_decode(
            next_logits, rows["input_ids"], rows["attention_mask"], stop_ids, pad_token_id, max_new_tokens, use_cache, before_step
        )
        return split_per_query(output, per_query)


# ----------------------------------------------------------------------------------------------
# the family: loading, random tiny models


_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": 3, "tie_word_embeddings": False}
_TINY_EXTRA = {"llama": {}, "qwen2": {"use_sliding_window": False}, "qwen3": {"head_dim": 16},
               "mistral": {"sliding_window": None}, "gemma": {"head_dim": 16}}
RANDOM_SIZES = tuple(f"tiny-{model_type}" for model_type in _TINY_EXTRA)


def tiny_config(model_type: str, vocab_size: int, **overrides: Any) -> Any:
    """A small random-init config of a supported architecture (2 layers, hidden 64, GQA 4/2 heads)."""
    if model_type not in _TINY_EXTRA:
        raise ValueError(f"no tiny config for model_type {model_type!r} (choose from {', '.join(_TINY_EXTRA)})")
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**_TINY, **_TINY_EXTRA[model_type], **overrides})


def wrap_causal_lm(lm: nn.Module, tokenizer: Any, data: Any) -> DecoderOnlyGenerator:
    """A causal LM (random or loaded) as a parallel-context generator with the run's templates."""
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"{type(lm).__name__}: output embeddings are a {type(head).__name__}, not a plain Linear")
    # Logits in fp32 whatever the weights' dtype (answer log-probabilities are the training
    # signal); same module, same parameters (tied ones stay tied), ZeRO-3 gathers it as before.
    head.__class__ = Fp32LMHead
    fmt, prefix = decoder_input_format(tokenizer, data)
    return DecoderOnlyGenerator(lm, prefix, fmt)


def build_random(size: str, vocab_texts: Any, seed: int, dtype: torch.dtype, data: Any) -> tuple[DecoderOnlyGenerator, Any]:
    """``random:tiny-<model_type>``: a random-init tiny LM with a word-level tokenizer over ``vocab_texts``."""
    from grerank_dist.models.tokenization import build_word_tokenizer

    tokenizer = build_word_tokenizer([*vocab_texts, getattr(data, "instruction", "")], "decoder")
    torch.manual_seed(seed)
    config = tiny_config(size.removeprefix("tiny-"), len(tokenizer))
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME, dtype=dtype)
    return wrap_causal_lm(lm, tokenizer, data), tokenizer


def load(path: str, dtype: torch.dtype, data: Any) -> tuple[DecoderOnlyGenerator, Any]:
    """A local HF causal-LM directory (safetensors or weights-only .bin, no remote code)."""
    lm = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=ATTENTION_NAME, local_files_only=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return wrap_causal_lm(lm, tokenizer, data), tokenizer


def accepts(raw_config: dict[str, Any]) -> bool:
    """A plain causal LM of a supported architecture (not CEPE, whose config has cross-attention keys)."""
    return raw_config.get("model_type") in SUPPORTED_MODEL_TYPES and "num_cross_attn_layers" not in raw_config


FAMILY = GeneratorFamily(name="decoder-only", random_sizes=RANDOM_SIZES, accepts=accepts, load=load, build_random=build_random)

