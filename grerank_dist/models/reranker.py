"""The trained cross-encoder reranker: loading, scoring, tiny random-init models, export.

Any local directory that ``AutoModelForSequenceClassification`` loads with one label is a
reranker (BGE-reranker-base is the reference). The export writes exactly such a directory
(safetensors weights, tokenizer, config), so sentence-transformers' ``CrossEncoder`` and
FlagEmbedding's ``FlagReranker`` load it as they load any public reranker.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from grerank_dist.atomic import build_directory
from grerank_dist.config import LoraConfig
from grerank_dist.models.tokenization import build_word_tokenizer


def load_reranker(path: str | Path, lora: LoraConfig | None = None) -> tuple[torch.nn.Module, Any]:
    """Load a local cross-encoder (num_labels=1) and its tokenizer; wrap it in LoRA if asked."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a reranker directory (no config.json)")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft_config = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, peft_config)
    return model, tokenizer


def tiny_reranker(
    texts: Iterable[str], seed: int = 0, hidden_size: int = 64, layers: int = 2, **config_overrides: Any
) -> tuple[torch.nn.Module, Any]:
    """A random-init BERT cross-encoder with a word-level vocabulary over ``texts``.

    ``config_overrides`` replace :class:`BertConfig` fields, e.g. ``vocab_size=250002,
    num_attention_heads=12`` for a random model of BGE-reranker-base's (XLM-R base's) size,
    whose extra vocabulary rows the word-level tokenizer never reads."""
    tokenizer = build_word_tokenizer(texts, "cross-encoder")
    config = BertConfig(**{
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden_size // 32),
        "intermediate_size": hidden_size * 4,
        "max_position_embeddings": 512,
        "num_labels": 1,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **config_overrides,
    })
    torch.manual_seed(seed)
    return BertForSequenceClassification(config), tokenizer


def reranker_scores(model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_candidates: int) -> torch.Tensor:
    """Cross-encoder logits for flattened (query, passage) pairs, reshaped to [B, n] in fp32."""
    logits = model(**inputs).logits
    if logits.shape[-1] != 1:
        raise ValueError(f"a reranker must have one output label, got {logits.shape[-1]}")
    return logits.view(-1, num_candidates).float()


def _unwrapped_for_export(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The plain transformers model to save: a copy in fp32 holding ``weights`` (the fp32
    masters of a lower-precision engine) where given; LoRA adapters merged into a copy."""
    if weights is None and not hasattr(model, "merge_and_unload"):
        return model
    plain = copy.deepcopy(model)
    if weights is not None:
        plain = plain.float()
        _, unexpected = plain.load_state_dict(weights, strict=False)
        if unexpected:
            raise ValueError(f"export weights name no parameter of the reranker: {sorted(unexpected)[:5]}")
    return plain.merge_and_unload() if hasattr(plain, "merge_and_unload") else plain


def export_reranker(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    training_config: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a loadable reranker directory atomically (built in a temp dir, then renamed).

    ``weights`` (by parameter name) replace the model's own in the export, which is then fp32:
    a bf16 engine passes its fp32 master weights, so the export is not the bf16-rounded copy.

    The result holds ``model.safetensors``, ``config.json`` (num_labels=1), the tokenizer and
    ``grerank_training_config.json``; an existing directory is replaced only once the new one is
    complete, so a crash never leaves a half-written reranker behind.
    """
    plain = _unwrapped_for_export(model, weights)

    def build(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if training_config is not None:
            (tmp / "grerank_training_config.json").write_text(json.dumps(training_config, indent=2, default=str))

    return build_directory(Path(out_dir), build, replace=True)
