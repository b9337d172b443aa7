"""Tiny CEPE models, batches and checkpoints for tests, and an independent plain-torch reference.

``reference_logits`` recomputes the whole CEPE forward from the raw state dict with its own
RMSNorm, RoPE and attention, and applies the document mask the way the paper writes it
(``M_i * exp(s) / sum_j M_j * exp(s)``, with ``M = exp(log_mask)``), not as an additive bias:
it shares no code with :mod:`grerank_dist.models.cepe` or :mod:`grerank_dist.method.attention`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from grerank_dist.models.cepe import CepeConfig, CepeForCausalContextLM, tiny_cepe_config
from grerank_dist.models.tokenization import build_word_tokenizer

FIRST_WORD_ID = 4  # ids 0..3 are <unk>, <s>, </s>, <pad> (pad = 3 in tiny_cepe_config)
_MASKED = -1.0e30  # finite "minus infinity" of the reference: weight exactly 0, never NaN


def build_tiny_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, weight_std: float = 0.15, **config_overrides
) -> CepeForCausalContextLM:
    """A random tiny CEPE with weights large enough that every block visibly changes the logits.

    (The default 0.02 init makes attention nearly uniform and logits nearly flat, which would let
    a wrong mask or a skipped block hide inside the test tolerances.)
    """
    torch.manual_seed(seed)
    model = CepeForCausalContextLM(tiny_cepe_config(**config_overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(weight_std * noise)
    return model.to(dtype).eval()


@dataclass
class TinyBatch:
    encoder_input_ids: torch.Tensor  # [B, n, L], left-padded documents
    encoder_attention_mask: torch.Tensor
    input_ids: torch.Tensor  # [B, S], left-padded prompt + answer
    attention_mask: torch.Tensor
    labels: torch.Tensor  # answer tokens, -100 elsewhere


def make_batch(
    batch: int, n_docs: int, doc_len: int = 6, seq_len: int = 7, answer_len: int = 3,
    vocab_size: int = 64, seed: int = 0,
) -> TinyBatch:
    """Random documents of varying lengths and prompts of varying lengths (left padding)."""
    gen = torch.Generator().manual_seed(seed)
    enc_ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch, n_docs, doc_len), generator=gen)
    doc_lengths = torch.randint(1, doc_len + 1, (batch, n_docs), generator=gen)
    enc_mask = (torch.arange(doc_len) >= doc_len - doc_lengths[..., None]).long()
    enc_ids = enc_ids.masked_fill(enc_mask == 0, 0)
    ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch, seq_len), generator=gen)
    prompt_pad = torch.randint(0, seq_len - answer_len - 1, (batch,), generator=gen)
    mask = (torch.arange(seq_len) >= prompt_pad[:, None]).long()
    ids = ids.masked_fill(mask == 0, 3)
    labels = ids.clone()
    labels[:, : seq_len - answer_len] = -100
    return TinyBatch(enc_ids, enc_mask, ids, mask, labels)


# ----------------------------------------------------------------------------------------------
# independent reference


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [rows, heads, T, D] rotated by positions [rows, T] (Llama's half-split convention)."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None, :, None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-second, first], -1) * sin


def _attend(q, k, v, weights_mask: torch.Tensor) -> torch.Tensor:
    """softmax attention where each key's exp-score is multiplied by weights_mask (>= 0)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    log_weights = torch.where(weights_mask > 0, weights_mask.clamp_min(1e-300).log(), torch.full_like(scores, _MASKED))
    scores = scores + log_weights
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    return (probs / probs.sum(-1, keepdim=True)) @ v


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    rows, length, width = x.shape
    return x.view(rows, length, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    rows, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(rows, length, heads * dim)


def _self_attention_block(w, prefix, x, positions, key_weights, heads, kv_heads, eps, theta):
    normed = _rms_norm(x, w[f"{prefix}.input_layernorm.weight"], eps)
    q = _rope(_split_heads(normed @ w[f"{prefix}.self_attn.q_proj.weight"].T, heads), positions, theta)
    k = _rope(_split_heads(normed @ w[f"{prefix}.self_attn.k_proj.weight"].T, kv_heads), positions, theta)
    v = _split_heads(normed @ w[f"{prefix}.self_attn.v_proj.weight"].T, kv_heads)
    return x + _merge_heads(_attend(q, k, v, key_weights)) @ w[f"{prefix}.self_attn.o_proj.weight"].T


def _mlp_block(w, prefix, x, eps):
    normed = _rms_norm(x, w[f"{prefix}.post_attention_layernorm.weight"], eps)
    gate = torch.nn.functional.silu(normed @ w[f"{prefix}.mlp.gate_proj.weight"].T)
    return x + (gate * (normed @ w[f"{prefix}.mlp.up_proj.weight"].T)) @ w[f"{prefix}.mlp.down_proj.weight"].T


def reference_logits(
    model: CepeForCausalContextLM, batch: TinyBatch, doc_log_mask: torch.Tensor | None
) -> torch.Tensor:
    """[B, S, V] float64 logits of CEPE as specified, from the model's raw weights."""
    config = model.config
    enc = config.encoder_config
    w = {name: tensor.detach().double() for name, tensor in model.state_dict().items()}
    batch_size, n_docs, doc_len = batch.encoder_input_ids.shape
    theta = config.rope_parameters["rope_theta"]

    # encoder: every document alone, positions 0..L-1, bidirectional over its real tokens
    doc_ids = batch.encoder_input_ids.reshape(-1, doc_len)
    doc_real = batch.encoder_attention_mask.reshape(-1, doc_len).double()
    h = w["encoder.embed_tokens.weight"][doc_ids]
    positions = torch.arange(doc_len).expand(doc_ids.shape[0], doc_len)
    key_weights = doc_real[:, None, None, :].expand(-1, 1, doc_len, doc_len)
    enc_states = [h]
    for j in range(enc["num_hidden_layers"]):
        h = _self_attention_block(w, f"encoder.layers.{j}", h, positions, key_weights, enc["num_attention_heads"],
                                  enc.get("num_key_value_heads", enc["num_attention_heads"]), enc["rms_norm_eps"], theta)
        h = _mlp_block(w, f"encoder.layers.{j}", h, enc["rms_norm_eps"])
        enc_states.append(h)
    enc_states[-1] = _rms_norm(h, w["encoder.norm.weight"], enc["rms_norm_eps"])
    enc_states = [s.reshape(batch_size, n_docs * doc_len, -1) for s in enc_states]

    # the paper's document weights M_i, zero on padding tokens
    mask = torch.ones(batch_size, n_docs, dtype=torch.float64) if doc_log_mask is None else doc_log_mask.double().exp()
    doc_weights = (mask[:, :, None] * batch.encoder_attention_mask.double()).reshape(batch_size, 1, 1, -1)

    # decoder
    seq_len = batch.input_ids.shape[1]
    real = batch.attention_mask.bool()
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
    self_weights = (causal[None, None] & real[:, None, None, :]).double()
    heads, kv_heads, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
    first_cross = config.num_hidden_layers - config.num_cross_attn_layers
    x = w["model.embed_tokens.weight"][batch.input_ids]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        x = _self_attention_block(w, prefix, x, positions, self_weights, heads, kv_heads, eps, theta)
        if i >= first_cross:
            source = enc_states[-1] if config.num_cross_attn_hidden_states == 1 else enc_states[i - config.num_hidden_layers]
            normed = _rms_norm(x, w[f"{prefix}.cross_attn.layernorm.weight"], eps)
            q = _split_heads(normed @ w[f"{prefix}.cross_attn.q_proj.weight"].T, heads)
            k = _split_heads(source @ w[f"{prefix}.cross_attn.k_proj.weight"].T, kv_heads)
            v = _split_heads(source @ w[f"{prefix}.cross_attn.v_proj.weight"].T, kv_heads)
            attended = _attend(q, k, v, doc_weights.expand(-1, 1, seq_len, -1))
            x = x + _merge_heads(attended) @ w[f"{prefix}.cross_attn.o_proj.weight"].T
        x = _mlp_block(w, prefix, x, eps)
    return _rms_norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------
# checkpoints in the released layout


def released_config_dict(config: CepeConfig) -> dict:
    """config.json as the public release writes it: model_type "llama", legacy rope keys."""
    return {
        "architectures": ["LlamaForCausalContextLM"],
        "model_type": "llama",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": config.rope_parameters["rope_theta"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.34.0",
        "use_cache": True,
        "vocab_size": config.vocab_size,
        "do_cross_attention": config.do_cross_attention,
        "num_cross_attn_layers": config.num_cross_attn_layers,
        "num_cross_attn_hidden_states": config.num_cross_attn_hidden_states,
        "is_decoder": True,
        "encoder_hidden_size": config.encoder_hidden_size,
        "encoder_is_model": False,
        "encoder_config": {**config.encoder_config, "architectures": ["LlamaForMLM"], "is_encoder": True},
        "train_encoder": False,
        "encode_mode": "context_only",
        "train_batch_mode": "none",
        "offload_hidden_states": False,
        "lm_loss_cof": 1.0,
        "kl_loss_cof": 2.0,
        "kl_loss_mode": "smooth_0.001",
    }


def write_released_checkpoint(
    model: CepeForCausalContextLM, directory: Path, weights: Literal["safetensors", "bin"], n_shards: int = 3
) -> Path:
    """Sharded weights with an index, as the release ships them (``bin``: torch.save pickles)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(released_config_dict(model.config), indent=2))
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    names = list(state)
    weight_map = {}
    for shard in range(n_shards):
        if weights == "safetensors":
            file_name = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        else:
            file_name = f"pytorch_model-{shard + 1:05d}-of-{n_shards:05d}.bin"
        part = {name: state[name] for name in names[shard::n_shards]}
        if weights == "safetensors":
            save_file(part, str(directory / file_name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    index_name = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


def save_tiny_tokenizer(directory: Path, words: list[str]) -> None:
    """A word-level Llama-style tokenizer saved next to the weights, as a real model dir carries one."""
    build_word_tokenizer([" ".join(words)], "decoder").save_pretrained(directory)
