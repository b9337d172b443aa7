"""FiD (T5 Fusion-in-Decoder) as a frozen parallel-context generator with a per-document log-mask.

Each candidate is encoded alone together with the question (FiD's ``question: {question} title:
{title} context: {text}``), the B*n encoder outputs are concatenated to [B, n*L, H], and the T5
decoder cross-attends to all of them. The G-Rerank log-mask ``log M_i`` is added to every
cross-attention score of document ``i``'s keys (T5 conventions kept: scores are not scaled by
1/sqrt(d), softmax as T5 computes it); padding keys get -inf.

The modules are transformers' own (:class:`T5ForConditionalGeneration`: same state-dict names, so
plain T5 directories load unchanged). Only the decoder loop is ours: it calls the T5 blocks with
the per-key bias as the (float, additive) cross-attention mask, which a registered attention
function (:func:`_fid_attention`) passes to :func:`grerank_dist.method.attention.masked_attention`
(any backend of that module) or, for :meth:`FidForConditionalGeneration.document_attention_mass`,
to an eager softmax that records the attention probabilities.

Decoder inputs follow the trainer's decoder-only layout (:class:`grerank_dist.interface.Batch`):
``input_ids`` are the decoder tokens *without* the start token (FiD's prompt is empty, so they
are the answer + EOS) and ``labels`` are aligned with them; the model puts
``decoder_start_token_id`` in front of each row's first real token, so position t of
``input_ids`` is predicted from everything before it, exactly T5's shift-right.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from grerank_dist.method.attention import BACKENDS, masked_attention
from grerank_dist.config import DataConfig
from grerank_dist.interface import (
    AnswerLogProbs,
    EncodedContexts,
    GeneratorFamily,
    InputFormat,
    answer_logprobs_from_hidden,
    checked_document_mask,
    greedy_decode,
    split_per_query,
    stop_token_tensor,
)
from grerank_dist.models.cepe import (
    Fp32LMHead,
    _causal_padding_mask,
    _checkpoint_files,
    _format_keys,
    _shard_shapes,
    decoder_rows,
)

__all__ = [
    "FID_FORMAT",
    "FidForConditionalGeneration",
    "FidInputFormat",
    "check_fid_weights",
    "load_fid",
    "load_t5_config",
    "random_tiny_fid",
    "tiny_fid_config",
]

_ATTENTION_NAME = "grerank_fid"
# Key renames from the public FiD code's layout (facebookresearch/FiD src/model.py: the encoder
# sits in an EncoderWrapper and each block in a CheckpointWrapper) to T5's.
_FID_KEY_MAPPING = {
    r"^encoder\.encoder\.block\.(\d+)\.module\.": r"encoder.block.\1.",
    r"^encoder\.encoder\.": "encoder.",
}
# Written by old transformers releases, never read by T5 (cross-attention has no position bias).
_IGNORED_KEYS = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
# A T5 tokenizer's vocabulary lives in one of these (tokenizer_config.json only configures it).
_VOCABULARY_FILES = ("spiece.model", "tokenizer.json")
# T5's tokenizer has 32100 tokens for vocab_size 32128 (mT5's 250100 for 250112): the rows past it
# are padding of the embedding. A tokenizer far smaller than the vocabulary is another model's.
_MIN_TOKENIZER_FRACTION = 0.9


@dataclass(frozen=True)
class FidInputFormat:
    """How FiD wants its inputs (facts for the data pipeline, independent of any checkpoint).

    Documents: question and passage together, one encoder input per candidate (padding side
    free: T5's relative positions do not move with padding). Decoder: no prompt, no BOS; the
    model prepends ``decoder_start_token_id`` itself; the answer ends with EOS, as FiD trains.
    """

    doc_template: str = "question: {question} title: {title} context: {text}"
    prompt_template: str = ""
    add_bos: bool = False
    answer_eos: bool = True


FID_FORMAT = FidInputFormat()


def _fid_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    cross_attn_backend: str = "auto",
    attention_record: list | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """T5 attention for the FiD decoder: self-attention is T5's SDPA path; cross-attention adds
    the per-key bias (``attention_mask`` [R, 1, 1, N], float) through ``masked_attention``, or,
    with ``attention_record``, through an eager softmax whose probabilities [R, H, Q, N] (and the
    value norms [R, H, N]) are appended to that list.

    Cross-attention keys and values may have B = R/m rows (one per query, projected once): the
    m consecutive query rows of a query's masks read that one copy, broadcast, never repeated."""
    if module.is_causal:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_bias=position_bias
        )
    # T5 cross-attention has no relative position bias: position_bias is all zeros here.
    key_bias = attention_mask.reshape(attention_mask.shape[0], attention_mask.shape[-1])
    if attention_record is None:
        out = masked_attention(query, key, value, key_bias, backend=cross_attn_backend, scale=scaling, check_bias=False)
        return out.transpose(1, 2), None
    compute = torch.promote_types(query.dtype, torch.float32)
    queries = query.to(compute).unflatten(0, (key.shape[0], -1))  # [B, m, H, Q, D]
    keys, values = key.to(compute)[:, None], value.to(compute)[:, None]  # [B, 1, H, N, D]
    logits = torch.matmul(queries, keys.transpose(-1, -2)).flatten(0, 1) * scaling
    probs = torch.softmax(logits + key_bias.to(compute)[:, None, None, :], dim=-1)
    norms = values.norm(dim=-1).expand(-1, queries.shape[1], -1, -1).flatten(0, 1)
    attention_record.append((probs, norms))
    out = torch.matmul(probs.unflatten(0, queries.shape[:2]), values).flatten(0, 1)
    return out.to(query.dtype).transpose(1, 2), None


AttentionInterface.register(_ATTENTION_NAME, _fid_attention)


class FidForConditionalGeneration(T5ForConditionalGeneration):
    """T5 read as Fusion-in-Decoder; implements :class:`grerank_dist.interface.ParallelContextGenerator`.

    Frozen after construction and loading. ``config.cross_attn_backend`` ("auto" or one of
    :data:`grerank_dist.method.attention.BACKENDS`) picks the kernel of the masked cross-attention at
    every call. Several masks per query ([B, m, n]) run B*m decoder rows over one encoding,
    whose cross-attention keys and values every layer projects once per query, not per row.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.lm_head.__class__ = Fp32LMHead  # answer log-probabilities from fp32 logits
        self.decoder.config._attn_implementation = _ATTENTION_NAME
        if not hasattr(self.config, "cross_attn_backend"):
            self.config.cross_attn_backend = "auto"
        self.gradient_checkpointing_layers = False
        self.requires_grad_(False)

    def activation_checkpointing_enable(self) -> None:
        """Reentrant checkpointing of every decoder block when the log-mask needs a gradient."""
        self.gradient_checkpointing_layers = True

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_layers = False

    # --- encoder ------------------------------------------------------------------------------

    def encode_contexts(
        self, encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> EncodedContexts:
        """Encode the B*n (question, passage) inputs [B, n, L] independently, without autograd
        unless an encoder parameter is trainable (reader training)."""
        encoder_attention_mask = checked_document_mask(encoder_input_ids, encoder_attention_mask)
        batch, n_docs, doc_len = encoder_input_ids.shape
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            states = self.encoder(
                input_ids=encoder_input_ids.reshape(batch * n_docs, doc_len),
                attention_mask=encoder_attention_mask.reshape(batch * n_docs, doc_len),
            ).last_hidden_state
        return EncodedContexts(
            states=(states.reshape(batch, n_docs * doc_len, states.shape[-1]),),
            key_padding=encoder_attention_mask.bool(),
        )

    # --- decoder ------------------------------------------------------------------------------

    def _with_start_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One column wider: ``decoder_start_token_id`` just before each row's first real token
        (left- or right-padded rows; an all-padding row gets it in the last column)."""
        start_id = self.config.decoder_start_token_id
        if start_id is None:
            raise ValueError("config.decoder_start_token_id is None: a T5 decoder needs its start token")
        rows, width = input_ids.shape
        ids = torch.cat([input_ids.new_full((rows, 1), start_id), input_ids], dim=1)
        mask = torch.cat([attention_mask.new_ones(rows, 1), attention_mask], dim=1)
        if width == 0:
            return ids, mask
        # left-padded (or empty) rows: move the start token from column 0 to just before the first real token
        shift = torch.where(attention_mask[:, :1] == 0, width - attention_mask.sum(dim=1, keepdim=True), 0)
        positions = torch.arange(width + 1, device=input_ids.device)[None]
        source = torch.where(positions < shift, positions + 1, torch.where(positions == shift, 0, positions))
        return ids.gather(1, source), mask.gather(1, source)

    def _decode(
        self,
        contexts: EncodedContexts,
        decoder_ids: torch.Tensor,
        decoder_mask: torch.Tensor,
        key_bias: torch.Tensor,
        cache: EncoderDecoderCache | None = None,
        attention_record: list | None = None,
    ) -> torch.Tensor:
        """Final decoder states [R, Q, H] of the Q newest tokens (``decoder_mask`` [R, K] covers
        the cached ones too), scaled as T5 scales them before ``lm_head``.

        The R = B*m rows cross-attend to the B queries' encoder states [B, N, H] as they are:
        T5's projections of them are per query, which the m rows of its masks share."""
        query_len = decoder_ids.shape[1]
        states = contexts.states[0]
        hidden = self.decoder.embed_tokens(decoder_ids)
        self_mask = _causal_padding_mask(decoder_mask, query_len, hidden.dtype)
        cross_mask = key_bias[:, None, None, :]
        extra = {"cross_attn_backend": self.config.cross_attn_backend, "attention_record": attention_record}
        position_bias = None
        for block in self.decoder.block:
            step = functools.partial(self._block, block, cache=cache, **extra)
            if self.gradient_checkpointing_layers and torch.is_grad_enabled() and cache is None and cross_mask.requires_grad:
                hidden, position_bias = checkpoint(step, hidden, self_mask, position_bias, states, cross_mask, use_reentrant=True)
            else:
                hidden, position_bias = step(hidden, self_mask, position_bias, states, cross_mask)
        hidden = self.decoder.final_layer_norm(hidden)
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.d_model**-0.5)
        return hidden

    @staticmethod
    def _block(
        block: torch.nn.Module,
        hidden: torch.Tensor,
        self_mask: torch.Tensor,
        position_bias: torch.Tensor | None,
        states: torch.Tensor,
        cross_mask: torch.Tensor,
        cache: EncoderDecoderCache | None = None,
        **extra: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One T5 decoder block (``T5Block.forward`` without its fp16 clamps) whose cross-attention
        receives the mask POSITIONALLY: ZeRO-3 releases a module's gathered parameters after
        backward only through its positional inputs that require grad, and in block 0 the
        log-mask bias is the only one. Returns the new states and the self-attention position bias."""
        hidden, position_bias, _ = block.layer[0](hidden, self_mask, position_bias, cache)
        cross = block.layer[1]
        attended, _, _ = cross.EncDecAttention(cross.layer_norm(hidden), cross_mask, states, None, cache, **extra)
        hidden = hidden + cross.dropout(attended)
        return block.layer[2](hidden), position_bias

    def _rows(
        self, contexts: EncodedContexts, doc_log_mask: torch.Tensor | None, tensors: dict[str, torch.Tensor | None]
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, int | None]:
        if contexts is None:
            raise ValueError("FiD needs documents: contexts is None")
        if self.config.cross_attn_backend not in ("auto", *BACKENDS):
            raise ValueError(
                f"config.cross_attn_backend must be 'auto' or one of {', '.join(BACKENDS)}, got {self.config.cross_attn_backend!r}"
            )
        if tensors.get("attention_mask") is None:
            tensors["attention_mask"] = torch.ones_like(tensors["input_ids"])
        rows, key_bias, per_query = decoder_rows(contexts, doc_log_mask, tensors)
        if rows["attention_mask"].shape != rows["input_ids"].shape:
            raise ValueError(
                f"attention_mask shape {tuple(rows['attention_mask'].shape)} differs from input_ids shape "
                f"{tuple(rows['input_ids'].shape)}"
            )
        return rows, key_bias, per_query

    def answer_logprobs(
        self,
        contexts: EncodedContexts,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        doc_log_mask: torch.Tensor | None,
    ) -> AnswerLogProbs:
        """log p(labels[:, t] | start token, input_ids[:, :t], documents), aligned with ``labels``
        ([R, S]; [B, m, S] for 3-D masks). Differentiable w.r.t. ``doc_log_mask`` only."""
        if labels is None:
            raise ValueError("answer_logprobs needs labels (-100 where no answer token)")
        rows, key_bias, per_query = self._rows(
            contexts, doc_log_mask, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        )
        labels = rows["labels"]
        ids, mask = self._with_start_token(rows["input_ids"], rows["attention_mask"])
        hidden = self._decode(contexts, ids, mask, key_bias)
        # right-padded rows: the start token is column 0, so column t predicts input_ids[:, t]
        return answer_logprobs_from_hidden(hidden, labels, self.lm_head, per_query, causal=False)

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
        """FiD's own relevance signal (Izacard & Grave, "Distilling Knowledge from Reader to
        Retriever"): the cross-attention probability each candidate receives, summed over its
        tokens and averaged over heads, layers and the positions that predict answer tokens.

        [B, n] (or [B, m, n] for 3-D masks); each row sums to 1 over the candidates. With
        ``value_norm`` every key's probability is first weighted by the norm of its value
        vector (the paper's alpha * ||v|| variant) and renormalised. Eager softmax, no autograd.
        """
        rows, key_bias, per_query = self._rows(
            contexts, doc_log_mask, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        )
        ids, mask = self._with_start_token(rows["input_ids"], rows["attention_mask"])
        record: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._decode(contexts, ids, mask, key_bias, attention_record=record)
        is_target = (rows["labels"] != -100).to(record[0][0].dtype)  # [R, S]: column t predicts label t
        n_docs, doc_len = contexts.num_docs, contexts.doc_len
        total = 0.0
        for probs, norms in record:  # probs [R, H, S+1, N], norms [R, H, N]
            weights = probs[:, :, :-1] * norms[:, :, None] if value_norm else probs[:, :, :-1]
            per_doc = weights.reshape(*weights.shape[:3], n_docs, doc_len).sum(-1)  # [R, H, S, n]
            per_doc = per_doc / per_doc.sum(-1, keepdim=True).clamp_min(torch.finfo(per_doc.dtype).tiny)
            total = total + (per_doc.mean(1) * is_target[..., None]).sum(1)  # [R, n]
        mass = total / (len(record) * is_target.sum(1, keepdim=True).clamp_min(1))
        return split_per_query(mass, per_query)

    @torch.no_grad()
    def generate(
        self,
        contexts: EncodedContexts,
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
        """Greedy answer [R, T] (or [B, m, T]), T <= max_new_tokens, after the start token and the
        LEFT-padded prompt (FiD's is empty: a [B, 1] all-padding prompt is fine).

        Stops at EOS or ``stop_token_ids`` (kept, then ``pad_token_id``, default config.pad_token_id).
        The self-attention keys/values are cached and the cross-attention ones projected once.
        Under torch.distributed every rank steps until all ranks are done (ZeRO-3 lock step).
        """
        rows, key_bias, per_query = self._rows(
            contexts, doc_log_mask, {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        tokens, mask = self._with_start_token(rows["input_ids"], rows["attention_mask"])
        stop_ids = stop_token_tensor(self.config.eos_token_id, stop_token_ids, tokens.device)
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else int(stop_ids[0])
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if use_cache else None

        def next_logits(step_input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self._decode(contexts, step_input, mask, key_bias, cache=cache)[:, -1])

        output = greedy_decode(next_logits, tokens, mask, stop_ids, pad_token_id, max_new_tokens, use_cache, before_step)
        return split_per_query(output, per_query)


# ----------------------------------------------------------------------------------------------
# configs, checkpoints, loading


def tiny_fid_config(vocab_size: int = 64, **overrides: Any) -> T5Config:
    """A small random-init T5 (2+2 layers, d_model 64, 4 heads of 16, tied embeddings as FiD's T5)."""
    fields = {
        "vocab_size": vocab_size, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2,
        "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
        "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }
    return T5Config(**{**fields, **overrides})


def load_t5_config(config_file: str | os.PathLike) -> T5Config:
    """Read a T5 ``config.json`` (plain T5 or the public FiD code's), errors naming the file and field."""
    config_file = Path(config_file)
    try:
        raw = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_file}: no config.json; a FiD/T5 model directory needs one") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "t5":
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        raise ValueError(f"{config_file}: field 'model_type' must be 't5' for a FiD generator, got {model_type!r}")
    if raw.get("is_encoder_decoder") is False:
        raise ValueError(f"{config_file}: field 'is_encoder_decoder' is false; FiD needs T5's decoder")
    raw = {key: value for key, value in raw.items() if key != "model_type"}
    try:
        config = T5Config.from_dict(raw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config_file}: {err}") from None
    if config.decoder_start_token_id is None:
        raise ValueError(f"{config_file}: field 'decoder_start_token_id' is missing (T5 uses the pad token id, 0)")
    return config


def _expected_weight_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_fid_weights(model_dir: str | os.PathLike, config: T5Config) -> str:
    """Check every weight's name and shape against ``config``; return the layout, "t5" or "fid".

    The public FiD code's checkpoints name encoder weights ``encoder.encoder.block.{i}.module.*``
    (its encoder and block wrappers); they are renamed to T5's on load. Tied copies of the shared
    embedding may be present or not; anything else missing or unexpected is an error naming the key.
    """
    model_dir = Path(model_dir)
    shards, listing = _checkpoint_files(model_dir)
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for shard in shards:
        for key, shape in _shard_shapes(shard).items():
            found[key] = (shape, shard)
    layout = "fid" if any(key.startswith("encoder.encoder.") for key in found) else "t5"
    if layout == "fid":
        renamed = {}
        for key, value in found.items():
            for pattern, replacement in _FID_KEY_MAPPING.items():
                key = re.sub(pattern, replacement, key)
            renamed[key] = value
        found = renamed
    expected = _expected_weight_shapes(config)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if config.tie_word_embeddings:
        tied.add("lm_head.weight")
    missing = expected.keys() - found.keys() - tied
    if missing:
        raise ValueError(f"{listing}: missing weight(s) {_format_keys(missing)} ({layout} layout)")
    unexpected = found.keys() - expected.keys() - _IGNORED_KEYS
    if unexpected:
        raise ValueError(f"{listing}: unexpected weight(s) {_format_keys(unexpected)} (not part of this T5 config, {layout} layout)")
    wrong = [
        f"{key} in {found[key][1].name} has shape {list(found[key][0])}, config expects {list(shape)}"
        for key, shape in sorted(expected.items())
        if key in found and found[key][0] != shape
    ]
    if wrong:
        raise ValueError(f"{listing}: wrong shape(s): " + "; ".join(wrong[:12]))
    return layout


def _checked_tokenizer(model_dir: Path, vocab_size: int) -> Any:
    """The tokenizer saved in ``model_dir``, refused when it is missing or much smaller than the
    model's vocabulary. The public FiD code saves none with its model, and transformers then
    returns a default T5Tokenizer of about 100 tokens that turns every word into ``<unk>``:
    training and evaluation would run on it without an error."""
    from transformers import AutoTokenizer

    present = [name for name in _VOCABULARY_FILES if (model_dir / name).is_file()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False) if present else None
    if tokenizer is None:
        problem = f"holds no tokenizer (no {' or '.join(_VOCABULARY_FILES)})"
    elif len(tokenizer) < _MIN_TOKENIZER_FRACTION * vocab_size:
        problem = f"its tokenizer has {len(tokenizer)} tokens for vocab_size {vocab_size} (from {', '.join(present)})"
    else:
        return tokenizer
    raise ValueError(
        f"{model_dir}: {problem}. The public FiD code saves no tokenizer with its model: copy the tokenizer "
        f"files (spiece.model and/or tokenizer.json, and tokenizer_config.json) of the T5 checkpoint it was "
        f"fine-tuned from (t5-base or t5-large) into {model_dir}"
    )


def load_fid(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[FidForConditionalGeneration, Any]:
    """A frozen FiD generator and its tokenizer from a LOCAL directory: a plain T5 /
    T5ForConditionalGeneration checkpoint or one saved by the public FiD code.

    Weights and the tokenizer are checked strictly first, then the weights loaded by
    transformers (safetensors, or ``.bin`` with ``weights_only``; ZeRO-3 partitioned loading
    under an active ``HfDeepSpeedConfig``).
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a local model directory (loading from a hub is disabled)")
    config = load_t5_config(model_dir / "config.json")
    layout = check_fid_weights(model_dir, config)
    tokenizer = _checked_tokenizer(model_dir, config.vocab_size)
    key_mapping = _FID_KEY_MAPPING if layout == "fid" else None
    model = FidForConditionalGeneration.from_pretrained(
        model_dir, config=config, dtype=dtype, key_mapping=key_mapping, local_files_only=True
    )
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def random_tiny_fid(
    vocab_texts: Iterable[str], seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[FidForConditionalGeneration, Any]:
    """A random-init tiny FiD whose word-level vocabulary covers ``vocab_texts`` (tests, smoke
    runs; every rank builds the same weights from ``seed``)."""
    from grerank_dist.models.tokenization import build_word_tokenizer

    tokenizer = build_word_tokenizer(vocab_texts, "seq2seq")
    torch.manual_seed(seed)
    config = tiny_fid_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = FidForConditionalGeneration(config).to(dtype)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# the family (grerank_dist.models dispatches to it)


def _holds_question(template: str) -> bool:
    """Whether ``template`` fills a ``{question}`` field (FiD's question reaches it only so)."""
    return any(name == "question" for _, name, _, _ in string.Formatter().parse(template))


def fid_input_format(data: Any) -> InputFormat:
    """FiD's templates (:data:`FID_FORMAT`) wherever ``data`` leaves its own at the data config's
    defaults: those are CEPE's layout, whose documents lack the question that FiD's encoder must
    read. A template set to anything else is an override on purpose and is used, with a warning
    when no template holds the question. No BOS: the decoder starts from
    ``decoder_start_token_id``, which the model prepends itself."""
    defaults = DataConfig()
    doc_template, prompt_template = (
        getattr(FID_FORMAT, name) if getattr(data, name) == getattr(defaults, name) else getattr(data, name)
        for name in ("doc_template", "prompt_template")
    )
    if not (_holds_question(doc_template) or _holds_question(prompt_template)):
        warnings.warn(
            f"FiD generator: data.doc_template {doc_template!r} and data.prompt_template {prompt_template!r} hold "
            f"no {{question}}: the generator never reads the question (FiD's own: {FID_FORMAT.doc_template!r})",
            stacklevel=2,
        )
    return InputFormat(
        doc_template=doc_template, prompt_template=prompt_template, prompt_bos=False, docs_pad_to_batch=True
    )


def _build_random(size: str, vocab_texts: Iterable[str], seed: int, dtype: torch.dtype, data: Any) -> tuple[FidForConditionalGeneration, Any]:
    fmt = fid_input_format(data)
    # the templates' own words ("question:", "context:") need not be in the run's vocab_texts
    template_words = [t.format(question="", title="", text="") for t in (fmt.doc_template, fmt.prompt_template)]
    model, tokenizer = random_tiny_fid([*vocab_texts, *template_words], seed=seed, dtype=dtype)
    model.input_format = fmt
    return model, tokenizer


def _load(path: str, dtype: torch.dtype, data: Any) -> tuple[FidForConditionalGeneration, Any]:
    model, tokenizer = load_fid(path, dtype)
    model.input_format = fid_input_format(data)
    return model, tokenizer


FAMILY = GeneratorFamily(
    name="FiD",
    random_sizes=("tiny-fid",),
    accepts=lambda raw: raw.get("model_type") == "t5",
    load=_load,
    build_random=_build_random,
)
