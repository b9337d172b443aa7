"""CEPE-Llama: a frozen parallel-context generator whose cross-attention takes a per-document log-mask.

The architecture and the state-dict names are those of the released CEPE-LLaMA-2-7B checkpoint
(a Llama-2 decoder whose last ``num_cross_attn_layers`` layers cross-attend to the states of a
small bidirectional Llama encoder that reads every context document independently), so that
checkpoint loads unchanged. What differs is the cross-attention: it is ours, and adds the
G-Rerank log-mask ``log M_i`` to every score of document ``i``'s keys through
:func:`grerank_dist.method.attention.masked_attention`; with ``log M in {0, -inf}`` it is exactly
reranking (the model sees only the kept documents).

Layout of one decoder layer with cross-attention (the release's order)::

    h = h + self_attn(input_layernorm(h))          # causal, RoPE
    h = h + cross_attn(cross_attn.layernorm(h))    # no RoPE, keys/values from the encoder
    h = h + mlp(post_attention_layernorm(h))

Only standard ``nn.Linear`` / ``nn.Embedding`` / RMSNorm modules hold parameters and every
submodule is called through ``__call__``, so the model can be built and run partitioned under
DeepSpeed ZeRO-3 (``HfDeepSpeedConfig`` + ``from_pretrained`` / ``from_config``).
"""
# No ``from __future__ import annotations`` here: @strict validates CepeConfig's fields from their
# annotations, which must stay real types rather than strings.

import inspect
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import transformers
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, LlamaConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import ModelOutput

from grerank_dist.method.attention import BACKENDS, check_key_bias, expand_doc_bias, masked_attention
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

__all__ = [
    "CepeCausalLMOutput",
    "CepeConfig",
    "CepeForCausalContextLM",
    "cepe_7b_config",
    "check_checkpoint_weights",
    "convert_bin_to_safetensors",
    "decoder_rows",
    "expected_weight_shapes",
    "load_cepe_config",
    "tiny_cepe_config",
]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# model_type of the released config.json ("llama") and of the configs this module writes.
_ACCEPTED_MODEL_TYPES = ("llama", "cepe_llama")
_MAX_KEYS_IN_ERROR = 12


@strict
class CepeConfig(LlamaConfig):
    """Config of :class:`CepeForCausalContextLM`: the decoder's Llama fields plus CEPE's keys.

    The CEPE keys keep the names (and the meaning) of the released ``config.json`` so that it
    loads as is; field types are enforced (``@strict``), errors name the field. Keys that only mattered for training CEPE itself (``train_encoder``,
    ``train_batch_mode``, ``offload_hidden_states``, ``lm_loss_cof``, ``kl_loss_*``) are kept
    for round-trip and otherwise ignored. ``is_decoder`` is never read: the decoder is always
    causal (the public code silently turns a decoder with ``is_decoder: false`` bidirectional).

    ``cross_attn_backend`` (ours) picks the kernel of the masked cross-attention: "auto" or one
    of :data:`grerank_dist.method.attention.BACKENDS`; it is read at every call, so it can be changed
    on a built model.
    """

    model_type = "cepe_llama"

    do_cross_attention: bool = True
    num_cross_attn_layers: int | None = None  # None: every decoder layer
    num_cross_attn_hidden_states: int = 1
    is_decoder: bool = True
    encoder_hidden_size: int | None = None  # None: encoder_config["hidden_size"]
    encoder_is_model: bool = False
    encoder_config: dict | None = None
    train_encoder: bool = False
    encode_mode: str = "context_only"
    train_batch_mode: str = "none"
    offload_hidden_states: bool = False
    lm_loss_cof: int | float = 1.0
    kl_loss_cof: int | float = 1.0
    kl_loss_mode: str = "smooth"
    cross_attn_backend: str = "auto"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.num_cross_attn_layers is None:
            self.num_cross_attn_layers = self.num_hidden_layers
        if self.encoder_hidden_size is None and isinstance(self.encoder_config, dict):
            self.encoder_hidden_size = self.encoder_config.get("hidden_size")

    def validate_cepe_fields(self) -> None:
        """Reject settings this implementation would otherwise silently get wrong (run by ``@strict``
        after the field types are checked)."""

        def fail(field: str, message: str) -> None:
            raise ValueError(f"CepeConfig field '{field}': {message}")

        if not 0 <= self.num_cross_attn_layers <= self.num_hidden_layers:
            fail("num_cross_attn_layers", f"must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                 f"got {self.num_cross_attn_layers}")
        if self.num_cross_attn_hidden_states < 1:
            fail("num_cross_attn_hidden_states", f"must be >= 1, got {self.num_cross_attn_hidden_states}")
        if self.encoder_is_model:
            fail("encoder_is_model", "true (the decoder encoding its own contexts) is not supported; "
                 "the released CEPE checkpoints use a separate encoder")
        if self.encode_mode != "context_only":
            fail("encode_mode", f"only 'context_only' is supported, got {self.encode_mode!r}")
        if self.cross_attn_backend not in ("auto", *BACKENDS):
            fail("cross_attn_backend", f"must be 'auto' or one of {', '.join(BACKENDS)}, got {self.cross_attn_backend!r}")
        if self.attention_dropout:
            fail("attention_dropout", f"must be 0 (the generator must be deterministic in train mode), "
                 f"got {self.attention_dropout}")
        if self.attention_bias or self.mlp_bias:
            fail("attention_bias" if self.attention_bias else "mlp_bias",
                 "must be false: the released layout has no bias tensors")
        if self.encoder_config is None:
            return
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(self.encoder_config.get(key), int) or isinstance(self.encoder_config.get(key), bool):
                fail(f"encoder_config.{key}", f"must be an integer, got {self.encoder_config.get(key)!r}")
        if self.encoder_hidden_size != self.encoder_config["hidden_size"]:
            fail("encoder_hidden_size", f"{self.encoder_hidden_size} differs from "
                 f"encoder_config.hidden_size={self.encoder_config['hidden_size']}")
        cross_layers = self.num_cross_attn_layers if self.do_cross_attention else 0
        encoder_states = self.encoder_config["num_hidden_layers"] + 1
        if self.num_cross_attn_hidden_states > 1 and cross_layers > encoder_states:
            fail("num_cross_attn_layers", f"{cross_layers} cross-attention layers each need their own encoder "
                 f"hidden state (num_cross_attn_hidden_states > 1) but the encoder has {encoder_states}")

    def encoder_llama_config(self) -> LlamaConfig:
        """The bidirectional encoder's Llama config, built from the nested ``encoder_config``."""
        if self.encoder_config is None:
            raise ValueError("CepeConfig field 'encoder_config' is missing: CEPE needs its encoder's Llama config")
        if self._attn_implementation not in (None, "eager", "sdpa"):
            # Other kernels drop the 4-D masks this model relies on (a flash encoder would run causal).
            raise ValueError(
                f"CepeConfig attn_implementation {self._attn_implementation!r} is not supported for the "
                "self-attention of CEPE's encoder and decoder: use 'sdpa' or 'eager' (the cross-attention "
                "backend is chosen separately by cross_attn_backend)"
            )
        encoder_config = LlamaConfig.from_dict(dict(self.encoder_config))
        encoder_config._attn_implementation = self._attn_implementation
        return encoder_config

    def cross_attention_layer_ids(self) -> list[int]:
        """Decoder layers with cross-attention: the last ``num_cross_attn_layers``."""
        if not self.do_cross_attention:
            return []
        return list(range(self.num_hidden_layers - self.num_cross_attn_layers, self.num_hidden_layers))


# Known to AutoConfig, so that whatever reads a saved model's config.json by its model_type
# (AutoTokenizer.from_pretrained does, on every generator load) gets a CepeConfig, instead of
# falling back to a bare PreTrainedConfig with a "model of type `cepe_llama`" warning.
AutoConfig.register(CepeConfig.model_type, CepeConfig, exist_ok=True)


def load_cepe_config(config_file: str | os.PathLike) -> CepeConfig:
    """Read a CEPE ``config.json`` (released or written by :meth:`CepeConfig.save_pretrained`).

    Every problem is reported as a ValueError naming the file and the field.
    """
    config_file = Path(config_file)
    try:
        raw = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_file}: no config.json; a CEPE model directory needs one") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: must hold a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in _ACCEPTED_MODEL_TYPES:
        raise ValueError(f"{config_file}: field 'model_type' must be one of {_ACCEPTED_MODEL_TYPES}, got {model_type!r}")
    if "encoder_config" not in raw:
        raise ValueError(f"{config_file}: field 'encoder_config' is missing (the encoder's Llama config)")
    raw = {key: value for key, value in raw.items() if key != "model_type"}
    try:
        return CepeConfig.from_dict(raw)
    except (ValueError, TypeError, StrictDataclassError) as err:  # StrictDataclassError names the field
        raise ValueError(f"{config_file}: {err}") from None


def _make_config(decoder: dict[str, Any], encoder: dict[str, Any], overrides: dict[str, Any]) -> CepeConfig:
    """Decoder fields + nested encoder config, each updated by ``overrides`` (``encoder_config`` merges)."""
    encoder = {"model_type": "llama", **encoder, **overrides.pop("encoder_config", {})}
    return CepeConfig(**{"do_cross_attention": True, **decoder, "encoder_config": encoder, **overrides})


def tiny_cepe_config(vocab_size: int = 64, **overrides: Any) -> CepeConfig:
    """A small random-init CEPE for tests and demos: 2+2 layers, hidden 64 (encoder 48), GQA 4/2 heads.

    The encoder has a different width and one more token than the decoder, as in the release,
    so shape bugs between the two cannot hide.
    """
    decoder = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "num_cross_attn_layers": 2,
    }
    encoder = {
        "vocab_size": vocab_size + 1, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
    }
    return _make_config(decoder, encoder, overrides)


def cepe_7b_config(**overrides: Any) -> CepeConfig:
    """The released CEPE-LLaMA-2-7B shapes (Llama-2-7B decoder, 24-layer 1024-wide encoder).

    For random-weight benchmarks of the real size, e.g. built on the meta device.
    """
    decoder = {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "num_cross_attn_layers": 32,
    }
    encoder = {
        "vocab_size": 32001, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }
    return _make_config(decoder, encoder, overrides)


# ----------------------------------------------------------------------------------------------
# modules


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's lowest finite value elsewhere.

    A finite fill (not -inf) keeps rows with no allowed key (padding queries, all-padding
    documents) finite instead of NaN; allowed keys still get exactly all the weight.
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _causal_padding_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, Q, K] additive mask: the last Q tokens attend causally to the non-padding tokens.

    Every token also sees itself, so a padding position (no real key before it) reads only
    itself and stays causal, instead of spreading over all keys, future ones included.
    """
    key_len = attention_mask.shape[1]
    query_pos = torch.arange(key_len - query_len, key_len, device=attention_mask.device)
    key_pos = torch.arange(key_len, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]
    itself = key_pos[None, :] == query_pos[:, None]
    allowed = causal[None, None] & (attention_mask.bool()[:, None, None, :] | itself[None, None])
    return _additive_mask(allowed, dtype)


class CepeCrossAttention(nn.Module):
    """Decoder-to-documents attention with the per-document log-mask bias.

    The query stream is RMS-normed here (``layernorm``, as in the release); keys and values are
    plain projections of the encoder states (no norm, no RoPE); grouped-query heads as the
    decoder's self-attention; softmax in fp32 (every backend of ``masked_attention``).
    """

    def __init__(self, config: CepeConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.encoder_hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.encoder_hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # Set by CepeForCausalContextLM.document_attention_mass for one forward; None otherwise.
        self.mass_recorder: "_AttentionMassRecorder | None" = None

    def project_keys_values(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, Hkv, N, D] from encoder states [B, N, H_enc].

        Projected once for the B queries and never repeated for their m masks: the m decoder
        rows of one query (consecutive) share them inside ``masked_attention``, so a baseline's
        n single-document masks cost neither n projections nor n copies of the documents' keys.
        """
        batch, n_keys, _ = encoder_states.shape
        shape = (batch, n_keys, self.num_kv_heads, self.head_dim)
        keys = self.k_proj(encoder_states).view(shape).transpose(1, 2)
        values = self.v_proj(encoder_states).view(shape).transpose(1, 2)
        return keys, values

    def forward(
        self, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_bias: torch.Tensor
    ) -> torch.Tensor:
        rows, seq_len, _ = hidden_states.shape
        queries = self.q_proj(self.layernorm(hidden_states))
        queries = queries.view(rows, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        if self.mass_recorder is not None:  # ADist's target pass only (no_grad, eager)
            attended = self._attend_recording_mass(queries, keys, values, key_bias)
        else:
            attended = masked_attention(
                queries, keys, values, key_bias, backend=self.config.cross_attn_backend, scale=self.head_dim**-0.5,
                check_bias=False,  # checked once per forward in decoder_rows
            )
        return self.o_proj(attended.transpose(1, 2).reshape(rows, seq_len, self.num_heads * self.head_dim))

    def _attend_recording_mass(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_bias: torch.Tensor
    ) -> torch.Tensor:
        """Eager attention that hands its probabilities to the recorder (fused kernels return none)."""
        rows = queries.shape[0]
        per_head = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(rows // keys.shape[0], dim=0).repeat_interleave(per_head, dim=1).float()
        values = values.repeat_interleave(rows // values.shape[0], dim=0).repeat_interleave(per_head, dim=1).float()
        logits = torch.matmul(queries.float(), keys.transpose(-1, -2)) * self.head_dim**-0.5
        probs = torch.softmax(logits + key_bias.float()[:, None, None, :], dim=-1)  # [R, H, S, n*L]
        self.mass_recorder.add(probs, values)
        return torch.matmul(probs, values).to(queries.dtype)


class _AttentionMassRecorder:
    """Collects, per cross-attention layer, the attention probability mass on each document
    [R, S, n], averaged over heads; with ``value_norm`` each key's probability is weighted by
    its value vector's norm (how much the key can move the output, not only how much it is read)."""

    def __init__(self, n_docs: int, value_norm: bool) -> None:
        self.n_docs, self.value_norm = n_docs, value_norm
        self.per_layer: list[torch.Tensor] = []

    def add(self, probs: torch.Tensor, values: torch.Tensor) -> None:
        if self.value_norm:
            probs = probs * values.norm(dim=-1)[:, :, None, :]
        rows, heads, seq_len, n_keys = probs.shape
        per_doc = probs.view(rows, heads, seq_len, self.n_docs, n_keys // self.n_docs).sum(-1)
        self.per_layer.append(per_doc.mean(1))


def cache_keyword(forward: Any) -> str:
    """The keyword that hands a transformers module's ``forward`` its KV cache in this version.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and is removed
    in 5.40: passed then, it would be swallowed by ``**kwargs`` and the cache would stop updating).
    """
    parameters = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise ImportError(
        f"transformers {transformers.__version__}: {forward.__qualname__} takes neither 'cache' nor "
        f"'past_key_values' (parameters: {', '.join(parameters)}); the generation cache needs one"
    )


_ATTENTION_CACHE_KEYWORD = cache_keyword(LlamaAttention.forward)


class CepeDecoderLayer(nn.Module):
    """Llama decoder layer with an optional cross-attention block between self-attention and MLP."""

    def __init__(self, config: CepeConfig, layer_idx: int, has_cross_attention: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.cross_attn = CepeCrossAttention(config) if has_cross_attention else None
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_attn_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_bias: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
        cross_keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Tensors are positional so that reentrant checkpointing sees (and differentiates) them all.

        Cross-attention reads either ``encoder_states`` (projected here, inside any checkpoint, so
        the keys/values are recomputed rather than stored) or precomputed ``cross_keys_values``.
        """
        attended, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=(cos, sin),
            attention_mask=self_attn_mask,
            **{_ATTENTION_CACHE_KEYWORD: cache},
        )
        hidden_states = hidden_states + attended
        if self.cross_attn is not None and key_bias is not None:
            if cross_keys_values is None:
                cross_keys_values = self.cross_attn.project_keys_values(encoder_states)
            hidden_states = hidden_states + self.cross_attn(hidden_states, *cross_keys_values, key_bias)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class CepeDecoder(nn.Module):
    """The Llama-2 decoder stack (state-dict prefix ``model.``)."""

    def __init__(self, config: CepeConfig) -> None:
        super().__init__()
        cross_layers = set(config.cross_attention_layer_ids())
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            CepeDecoderLayer(config, idx, idx in cross_layers) for idx in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        # which entry of the encoder-state tuple each cross-attention layer reads
        n_sources = len(cross_layers) if config.num_cross_attn_hidden_states > 1 else 1
        self.source_of_layer = {idx: min(j, n_sources - 1) for j, idx in enumerate(sorted(cross_layers))}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        key_bias: torch.Tensor | None,
        encoder_states: tuple[torch.Tensor, ...] | None,
        cross_keys_values: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [R, Q, H] of the Q = input_ids.shape[1] newest tokens.

        ``attention_mask`` [R, K] covers the cached and the new tokens (K >= Q); position ids
        come from it (cumsum - 1), so left and right padding both work.
        """
        query_len = input_ids.shape[1]
        hidden_states = self.embed_tokens(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -query_len:]
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        self_attn_mask = _causal_padding_mask(attention_mask, query_len, hidden_states.dtype)
        for idx, layer in enumerate(self.layers):
            source = None
            if encoder_states is not None and idx in self.source_of_layer:
                source = encoder_states[self.source_of_layer[idx]]
            layer_kv = cross_keys_values[idx] if cross_keys_values is not None else None
            # A layer without cross-attention does not read the mask: handing it key_bias would make
            # a reentrant checkpoint of it (before the first cross-attention layer, where nothing
            # else needs a gradient) return an output with no graph, which fails in backward.
            layer_bias = key_bias if layer.cross_attn is not None else None
            inputs = (hidden_states, self_attn_mask, cos, sin, layer_bias, source)
            if self._checkpoint_this_call(inputs, cache, layer_kv):
                hidden_states = checkpoint(layer, *inputs, use_reentrant=True)
            else:
                hidden_states = layer(*inputs, layer_kv, cache)
        return self.norm(hidden_states)

    def _checkpoint_this_call(self, inputs: tuple, cache: Any, layer_kv: Any) -> bool:
        """Reentrant checkpointing only helps (and only works) when some input the layer uses
        needs a gradient (``inputs`` must hold only those)."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return False
        if cache is not None or layer_kv is not None:
            return False
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


class CepeEncoder(nn.Module):
    """The bidirectional Llama context encoder (state-dict prefix ``encoder.``).

    Each document is encoded alone with position ids 0..L-1 whatever its padding (as CEPE was
    trained); padding keys are masked out.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, idx) for idx in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_states: int) -> tuple[torch.Tensor, ...]:
        """The last ``num_states`` of (embeddings, layer 1..L-1 outputs, norm(layer L output)).

        ``num_states`` = 1 gives the normed last hidden state, which is all the release uses.
        """
        n_docs, doc_len = input_ids.shape
        hidden_states = self.embed_tokens(input_ids)
        position_ids = torch.arange(doc_len, device=input_ids.device).expand(n_docs, doc_len)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        key_mask = _additive_mask(attention_mask.bool()[:, None, None, :], hidden_states.dtype)
        all_states = [hidden_states]
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=key_mask, position_embeddings=position_embeddings)
            all_states.append(hidden_states)
        all_states[-1] = self.norm(hidden_states)
        return tuple(all_states[-num_states:])


def _upcast_blocks(weight: torch.Tensor, block: int, dtype: torch.dtype) -> Iterable[tuple[slice, torch.Tensor]]:
    """(rows, those rows of ``weight`` in ``dtype``) block after block, each cast into the same
    buffer: a fresh 4 MiB tensor per block costs a page-faulting allocation on CPU (the casts
    alone took 182 ms fresh against 84 ms into one buffer, 32000 x 4096 on one thread)."""
    buffer = weight.new_empty(min(block, weight.shape[0]), weight.shape[1], dtype=dtype)
    for start in range(0, weight.shape[0], block):
        rows = slice(start, min(start + block, weight.shape[0]))
        block_weight = buffer[: rows.stop - start]
        block_weight.copy_(weight[rows])
        yield rows, block_weight


class _BlockUpcastLinear(torch.autograd.Function):
    """``hidden @ weight.T (+ bias)`` in fp32 for a bf16/fp16 ``weight``, cast one block of
    vocabulary rows at a time into one reused buffer (forward and backward alike).

    Casting the whole [V, H] weight makes a new fp32 tensor per call (0.5 GB for a 32k x 4096
    head, 2 GB for Llama-3's), written once, read once and kept for backward: on this project's
    2-thread CPU a forward and backward of 4 answer rows took 215 ms that way, 100 ms in 4 MiB
    blocks, which stay in cache between the cast and the product. The products are the same
    fp32 products, so the logits equal the whole-weight cast's.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.block, ctx.has_bias = block, bias is not None
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = flat.new_empty(flat.shape[0], weight.shape[0])
        for rows, block_weight in _upcast_blocks(weight, block, flat.dtype):
            torch.mm(flat, block_weight.t(), out=out[:, rows])
        if bias is not None:
            out += bias.to(out.dtype)
        return out.reshape(*hidden.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable  # the backward reuses one cast buffer: not itself differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, weight.shape[0])
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = flat_hidden.new_zeros(flat_hidden.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
        for rows, block_weight in _upcast_blocks(weight, ctx.block, flat_grad.dtype):
            if grad_hidden is not None:
                grad_hidden.addmm_(flat_grad[:, rows], block_weight)
            if grad_weight is not None:
                grad_weight[rows] = (flat_grad[:, rows].t() @ flat_hidden).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.reshape(hidden.shape)
        return grad_hidden, grad_weight, grad_bias, None


def upcast_block_bytes(device: torch.device) -> int:
    """fp32 bytes of weight rows Fp32LMHead casts at a time: 4 MiB on CPU (an L2 cache's worth),
    256 MiB on a GPU (few launches; still a fraction of a whole-vocabulary copy)."""
    return 4 * 2**20 if device.type == "cpu" else 256 * 2**20


class Fp32LMHead(nn.Linear):
    """The vocabulary projection, computed in (at least) fp32 whatever the weights' dtype.

    bf16 logits keep ~3 significant digits (a rounding step of 1/64 at magnitude 2-4), which
    shifts an answer's log-probability, the reranker's training signal, by up to ~1e-2. A
    narrower weight is cast for the product in blocks of rows (:class:`_BlockUpcastLinear`), so
    no whole fp32 copy of it is made or kept for backward; fp32 and fp64 weights take F.linear
    (fp64 stays fp64 for gradient checks). Still an ``nn.Linear`` called through ``__call__``:
    same state-dict name, gathered by ZeRO-3 like any other module.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        hidden_states = hidden_states.to(dtype)
        if self.weight.dtype == dtype:
            return F.linear(hidden_states, self.weight, self.bias)
        block = max(1, upcast_block_bytes(self.weight.device) // (hidden_states.shape[-1] * hidden_states.element_size()))
        return _BlockUpcastLinear.apply(hidden_states, self.weight, self.bias, block)


def _build_modules(config: CepeConfig) -> dict[str, nn.Module]:
    """The three top-level parts, shared by the model and the checkpoint's expected-shape list."""
    if config.encoder_config is None:
        raise ValueError("CepeConfig field 'encoder_config' is missing: CEPE needs its encoder's Llama config")
    return {
        "model": CepeDecoder(config),
        "lm_head": Fp32LMHead(config.hidden_size, config.vocab_size, bias=False),
        "encoder": CepeEncoder(config.encoder_llama_config()),
    }


def expected_weight_shapes(config: CepeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a checkpoint for ``config`` with its shape (built on the meta device)."""
    with torch.device("meta"):
        parts = _build_modules(config)
    return {
        f"{prefix}.{name}": tuple(tensor.shape)
        for prefix, module in parts.items()
        for name, tensor in module.state_dict().items()
    }


# ----------------------------------------------------------------------------------------------
# checkpoint files


def _format_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
    return shown + (f", ... ({len(keys) - _MAX_KEYS_IN_ERROR} more)" if len(keys) > _MAX_KEYS_IN_ERROR else "")


def _read_weight_map(index_file: Path) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_file}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_file}: field 'weight_map' must map tensor names to shard file names")
    return weight_map


def _checkpoint_files(model_dir: Path) -> tuple[list[Path], Path]:
    """The weight files of a model directory and the file that lists them (index or single file)."""
    for index_name, single_name in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (BIN_WEIGHTS_INDEX_NAME, BIN_WEIGHTS_NAME)):
        index_file = model_dir / index_name
        if index_file.is_file():
            shard_names = sorted(set(_read_weight_map(index_file).values()))
            missing = [name for name in shard_names if not (model_dir / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{index_file}: shard file(s) {missing} listed in 'weight_map' do not exist")
            return [model_dir / name for name in shard_names], index_file
        if (model_dir / single_name).is_file():
            return [model_dir / single_name], model_dir / single_name
    raise FileNotFoundError(
        f"{model_dir}: no weights found (expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
        f"{BIN_WEIGHTS_NAME} or {BIN_WEIGHTS_INDEX_NAME})"
    )


def _load_bin(shard: Path) -> dict[str, torch.Tensor]:
    """A pickle shard, read safely: tensors only (weights_only) and memory-mapped, not copied into RAM."""
    state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{shard}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _shard_shapes(shard: Path) -> dict[str, tuple[int, ...]]:
    if shard.suffix == ".safetensors":
        with safe_open(shard, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return {key: tuple(tensor.shape) for key, tensor in _load_bin(shard).items()}


def check_checkpoint_weights(model_dir: str | os.PathLike, config: CepeConfig) -> None:
    """Fail unless the directory's weights are exactly the tensors (names and shapes) of ``config``.

    transformers only warns about missing or unexpected weights and leaves missing ones
    randomly initialised; a generator silently half-loaded would train a reranker on noise.
    """
    model_dir = Path(model_dir)
    shards, listing = _checkpoint_files(model_dir)
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for shard in shards:
        for key, shape in _shard_shapes(shard).items():
            found[key] = (shape, shard)
    expected = expected_weight_shapes(config)
    missing = expected.keys() - found.keys()
    if missing:
        raise ValueError(f"{listing}: missing weight(s) {_format_keys(missing)}")
    unexpected = found.keys() - expected.keys()
    if unexpected:
        raise ValueError(f"{listing}: unexpected weight(s) {_format_keys(unexpected)} (not part of this config's model)")
    wrong = [
        f"{key} in {found[key][1].name} has shape {list(found[key][0])}, config expects {list(shape)}"
        for key, shape in sorted(expected.items())
        if found[key][0] != shape
    ]
    if wrong:
        raise ValueError(f"{listing}: wrong shape(s): " + "; ".join(wrong[:_MAX_KEYS_IN_ERROR]))


def convert_bin_to_safetensors(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """One-time conversion of a pickle ``.bin`` checkpoint (the 34 GB release) to safetensors.

    Shards are converted one at a time (memory-mapped reads), keeping their split; the index is
    rewritten for the new names, and every other file (config, tokenizer) is copied. ``dtype``
    (e.g. ``torch.bfloat16``) also casts the floating-point tensors, halving the fp32 release.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    shards, _ = _checkpoint_files(src_dir)
    if any(shard.suffix == ".safetensors" for shard in shards):
        raise ValueError(f"{src_dir}: already holds safetensors weights, nothing to convert")
    dst_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, shard in enumerate(shards, start=1):
        out_name = SAFE_WEIGHTS_NAME if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        seen_storages: set[int] = set()
        for key, tensor in _load_bin(shard).items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            storage = tensor.untyped_storage().data_ptr()
            # safetensors refuses tensors that share memory; copy those (tied or viewed weights)
            tensor = tensor.clone() if storage in seen_storages else tensor.contiguous()
            seen_storages.add(storage)
            tensors[key] = tensor
            weight_map[key] = out_name
            total_size += tensor.numel() * tensor.element_size()
        save_file(tensors, str(dst_dir / out_name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (dst_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    weight_files = {shard.name for shard in shards} | {BIN_WEIGHTS_INDEX_NAME}
    for item in src_dir.iterdir():
        if item.is_file() and item.name not in weight_files:
            (dst_dir / item.name).write_bytes(item.read_bytes())
    return dst_dir


# ----------------------------------------------------------------------------------------------
# the model


@dataclass
class CepeCausalLMOutput(ModelOutput):
    """``logits`` [R, S, V] in fp32 (R = B, or B*m with m masks per query); ``loss`` the token-mean
    cross-entropy over ``labels != -100``; ``contexts`` the encoder output (reusable)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    contexts: EncodedContexts | None = None


class CepeForCausalContextLM(PreTrainedModel):
    """CEPE-Llama with a per-document log-mask in every cross-attention; implements
    :class:`grerank_dist.interface.ParallelContextGenerator`.

    All parameters are frozen after construction and loading (``requires_grad`` False); the
    gradient of the answer loss reaches only ``doc_log_mask``. Unfreezing (``requires_grad_(True)``,
    e.g. to train a reader) is supported: the encoder then runs with autograd too.

    Several masks per query: ``doc_log_mask`` [B, m, n] runs B*m decoder rows (row b*m + j is
    query b under mask j) over one encoding of the documents. The decoder inputs may be given
    per query ([B, S], repeated for its m masks) or per row ([B*m, S]); outputs are per row.
    """

    config_class = CepeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CepeDecoderLayer", "LlamaDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: CepeConfig) -> None:
        super().__init__(config)
        parts = _build_modules(config)
        self.model = parts["model"]
        self.lm_head = parts["lm_head"]
        self.encoder = parts["encoder"]
        self.post_init()
        self.requires_grad_(False)

    # --- HF plumbing ------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Reentrant checkpointing of every decoder layer (also reached by ``gradient_checkpointing_enable``).

        Unlike transformers' default, no hook makes the embeddings require grad (that hook
        keeps ZeRO-3 parameters gathered after backward); the log-mask already requires grad.
        Reentrant checkpointing needs ``loss.backward()``: ``torch.autograd.grad`` is refused.
        """
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", True) is not True or kwargs or every_n_layers != 1 or offload:
            raise ValueError(
                "CepeForCausalContextLM supports only reentrant checkpointing of every decoder layer "
                f"(got kwargs={activation_checkpointing_kwargs}, every_n_layers={every_n_layers}, offload={offload})"
            )
        self.model.gradient_checkpointing = True

    def activation_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ) -> "CepeForCausalContextLM":
        """Load a LOCAL model directory (released or saved by :meth:`save_pretrained`), strictly.

        The config and every weight's name and shape are checked first (ValueError naming the
        file and the field or keys); the weights are then loaded by transformers, which honours
        ``dtype``, ``device_map`` and an active ``HfDeepSpeedConfig`` (ZeRO-3 partitioned loading).
        ``.bin`` shards are read with ``torch.load(weights_only=True, mmap=True)``.
        """
        model_dir = Path(pretrained_model_name_or_path)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: not a local model directory (loading from a hub is disabled)")
        config = kwargs.pop("config", None) or load_cepe_config(model_dir / CONFIG_NAME)
        check_checkpoint_weights(model_dir, config)
        kwargs.setdefault("local_files_only", True)
        model = super().from_pretrained(model_dir, *model_args, config=config, **kwargs)
        model.requires_grad_(False)
        return model

    # --- encoder ------------------------------------------------------------------------------

    def encode_contexts(
        self, encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> EncodedContexts:
        """Encode B*n documents [B, n, L] independently (same position ids per document).

        Runs without autograd unless some encoder parameter requires grad (reader training):
        the frozen encoder does not depend on the mask, so a graph would only cost memory.
        """
        encoder_attention_mask = checked_document_mask(encoder_input_ids, encoder_attention_mask)
        batch, n_docs, doc_len = encoder_input_ids.shape
        n_states = len(self.config.cross_attention_layer_ids()) if self.config.num_cross_attn_hidden_states > 1 else 1
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            states = self.encoder(
                encoder_input_ids.reshape(batch * n_docs, doc_len),
                encoder_attention_mask.reshape(batch * n_docs, doc_len),
                num_states=max(n_states, 1),
            )
        states = tuple(s.reshape(batch, n_docs * doc_len, s.shape[-1]) for s in states)
        return EncodedContexts(states=states, key_padding=encoder_attention_mask.bool())

    # --- decoder ------------------------------------------------------------------------------

    def _final_hidden(
        self,
        contexts: EncodedContexts | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        doc_log_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows, key_bias, per_query = decoder_rows(
            contexts, doc_log_mask, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        )
        if rows["attention_mask"].shape != rows["input_ids"].shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
            )
        hidden = self.model(
            rows["input_ids"], rows["attention_mask"], key_bias, None if contexts is None else contexts.states
        )
        return hidden, rows["labels"], per_query

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_input_ids: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        doc_log_mask: torch.Tensor | None = None,
        contexts: EncodedContexts | None = None,
    ) -> CepeCausalLMOutput:
        """Logits (fp32) and loss of the prompt+answer tokens given the (masked) documents.

        Documents come either as ``encoder_input_ids``/``encoder_attention_mask`` [B, n, L]
        (encoded here) or as already encoded ``contexts``; with neither, the decoder runs alone.
        ``doc_log_mask``: None (every document with weight 1), [B, n] or [B, m, n].
        """
        if contexts is not None and encoder_input_ids is not None:
            raise ValueError("pass either contexts or encoder_input_ids, not both")
        if encoder_input_ids is not None:
            contexts = self.encode_contexts(encoder_input_ids, encoder_attention_mask)
        hidden, labels, _ = self._final_hidden(contexts, input_ids, attention_mask, labels, doc_log_mask)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            ) / (targets != -100).sum().clamp_min(1)
        return CepeCausalLMOutput(loss=loss, logits=logits, contexts=contexts)

    def answer_logprobs(
        self,
        contexts: EncodedContexts,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        doc_log_mask: torch.Tensor | None,
    ) -> AnswerLogProbs:
        """log p(labels[:, t] | tokens < t), aligned with ``labels`` ([R, S]; [B, m, S] for 3-D masks).

        Only the positions that predict a label go through ``lm_head`` (the vocabulary
        projection dominates the cost when answers are short), in fp32 for a bf16 model.
        """
        hidden, labels, per_query = self._final_hidden(contexts, input_ids, attention_mask, labels, doc_log_mask)
        if labels is None:
            raise ValueError("answer_logprobs needs labels (-100 where no answer token)")
        return answer_logprobs_from_hidden(hidden, labels, self.lm_head, per_query, causal=True)

    @torch.no_grad()
    def document_attention_mass(
        self,
        contexts: EncodedContexts,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        doc_log_mask: torch.Tensor | None,
        value_norm: bool = False,
    ) -> torch.Tensor:
        """ADist's target: the cross-attention probability mass on each document, [B, n] (or
        [B, m, n] for 3-D masks), averaged over heads, cross-attention layers and the positions
        that predict answer tokens (those ``answer_logprobs`` reads). Without ``value_norm`` a
        row sums to 1 over the documents. One eager decoder pass without autograd: the fused
        kernels return no probabilities, and the G-Rerank path never pays for this one."""
        recorder = _AttentionMassRecorder(contexts.num_docs, value_norm)
        cross_layers = [layer.cross_attn for layer in self.model.layers if layer.cross_attn is not None]
        for layer in cross_layers:
            layer.mass_recorder = recorder
        try:
            _, labels, per_query = self._final_hidden(contexts, input_ids, attention_mask, labels, doc_log_mask)
        finally:
            for layer in cross_layers:
                layer.mass_recorder = None
        if labels is None:
            raise ValueError("document_attention_mass needs labels (-100 where no answer token)")
        predicting = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        predicting[:, :-1] = labels[:, 1:] != -100  # position t predicts label t + 1
        per_position = torch.stack(recorder.per_layer).mean(0)  # [R, S, n]
        weights = predicting.to(per_position.dtype)[:, :, None]
        return split_per_query((per_position * weights).sum(1) / weights.sum(1).clamp_min(1), per_query)

    # --- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        contexts: EncodedContexts | None,
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
        """Greedy continuation of LEFT-padded prompts: [R, T] (or [B, m, T] for 3-D masks), T <= max_new_tokens.

        Generation stops at EOS or any of ``stop_token_ids`` (kept in the output, followed by
        ``pad_token_id``, default config.pad_token_id, else EOS). The self-attention keys and
        values are cached and the cross-attention ones projected once (``use_cache=False``
        recomputes everything at every step). Under torch.distributed every rank keeps stepping
        until all ranks are done, so ZeRO-3 parameter gathers stay in lock step.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts: attention_mask[:, -1] must be 1 for every row")
        rows, key_bias, per_query = decoder_rows(
            contexts, doc_log_mask, {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        stop_ids = stop_token_tensor(self.config.eos_token_id, stop_token_ids, input_ids.device)
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else int(stop_ids[0])
        states = None if contexts is None else contexts.states
        cache = DynamicCache() if use_cache else None
        cross_kv = self._project_cross_keys_values(states) if use_cache else None

        def next_logits(step_input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self.model(step_input, mask, key_bias, states, cross_kv, cache)[:, -1])

        output = greedy_decode(
            next_logits, rows["input_ids"], rows["attention_mask"], stop_ids, pad_token_id, max_new_tokens, use_cache, before_step
        )
        return split_per_query(output, per_query)

    def _project_cross_keys_values(
        self, states: tuple[torch.Tensor, ...] | None
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Cross-attention keys/values of every layer, computed once for a whole generation."""
        projected: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for idx, layer in enumerate(self.model.layers):
            if states is None or layer.cross_attn is None:
                projected.append(None)
            else:
                source = states[self.model.source_of_layer[idx]]
                projected.append(layer.cross_attn.project_keys_values(source))
        return projected


def decoder_rows(
    contexts: EncodedContexts | None,
    doc_log_mask: torch.Tensor | None,
    tensors: dict[str, torch.Tensor | None],
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor | None, int | None]:
    """Check shapes; return the per-row decoder inputs, the per-key bias [R, n*L] and m (None for
    one mask a query; see :func:`grerank_dist.interface.rows_for_masks`).

    Shared by every generator whose documents are its only cross-attention keys (CEPE, FiD).
    """
    if contexts is None:
        if doc_log_mask is not None:
            raise ValueError("doc_log_mask was given without documents (contexts or encoder_input_ids)")
        input_ids = tensors["input_ids"]
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {None if input_ids is None else tuple(input_ids.shape)}")
        return tensors, None, None
    batch, n_docs = contexts.key_padding.shape[:2]
    tensors, row_masks, per_query = rows_for_masks(tensors, doc_log_mask, batch, n_docs, contexts.key_padding.device)
    key_bias = expand_doc_bias(row_masks, contexts.key_padding)
    check_key_bias(key_bias)
    return tensors, key_bias, per_query


# ----------------------------------------------------------------------------------------------
# the family (grerank_dist.models dispatches to it)


def _cepe_format(data: Any) -> InputFormat:
    """The public CEPE evaluation's layout: documents without BOS, BOS + prompt in the decoder."""
    return InputFormat(
        doc_template=data.doc_template, prompt_template=data.prompt_template, prompt_bos=True, docs_pad_to_batch=True
    )


def _build_random_cepe(size: str, vocab_texts: Iterable[str], seed: int, dtype: torch.dtype, data: Any) -> tuple["CepeForCausalContextLM", Any]:
    from grerank_dist.models.tokenization import build_word_tokenizer

    tokenizer = build_word_tokenizer(vocab_texts, "decoder")
    torch.manual_seed(seed)
    model = CepeForCausalContextLM(tiny_cepe_config(vocab_size=len(tokenizer))).to(dtype)
    model.input_format = _cepe_format(data)
    return model, tokenizer


def _load_cepe(path: str, dtype: torch.dtype, data: Any) -> tuple["CepeForCausalContextLM", Any]:
    from transformers import AutoTokenizer

    model = CepeForCausalContextLM.from_pretrained(path, dtype=dtype)
    model.input_format = _cepe_format(data)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=False)


FAMILY = GeneratorFamily(
    name="CEPE",
    random_sizes=("tiny",),
    # The public CEPE release says model_type "llama"; its cross-attention keys identify it.
    accepts=lambda raw: raw.get("model_type") == CepeConfig.model_type or "num_cross_attn_layers" in raw,
    load=_load_cepe,
    build_random=_build_random_cepe,
)
