"""The small interface between training/evaluation and any frozen parallel-context generator.

CEPE, FiD and decoder-only LLMs in parallel-context mode all look the same to the trainer,
the objectives and evaluation: encode the candidate documents once (no autograd: the encoder
does not depend on the mask), then score an answer, or generate one, under a per-document
log-mask that is added to every cross-attention score of that document's keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.distributed as dist


@dataclass
class EncodedContexts:
    """Encoder output for B queries with n candidate documents of L tokens each.

    ``states`` holds one tensor per cross-attention source (usually one: the encoder's last
    normed hidden state), each [B, n*L, H_enc]; ``key_padding`` is [B, n, L] (True = real
    token). Both carry no autograd graph.
    """

    states: tuple[torch.Tensor, ...]
    key_padding: torch.Tensor

    @property
    def num_docs(self) -> int:
        return self.key_padding.shape[1]

    @property
    def doc_len(self) -> int:
        return self.key_padding.shape[2]


@dataclass
class AnswerLogProbs:
    """Per-token log-probabilities of the answer tokens, [B, T] (or [B, m, T] for m masks)."""

    token_logprobs: torch.Tensor
    token_mask: torch.Tensor  # same shape, True where the token is part of the answer

    def sum(self) -> torch.Tensor:
        """Sequence log-likelihood log p(a | q, D, mask)."""
        return (self.token_logprobs * self.token_mask).sum(-1)

    def mean(self) -> torch.Tensor:
        """Mean per-token log-likelihood (the quantity Atlas-style PDist/LOOP targets use)."""
        return self.sum() / self.token_mask.sum(-1).clamp(min=1)

    def token_mean_nll(self) -> torch.Tensor:
        """The usual language-model loss: token-level cross-entropy averaged over all answer
        tokens of the batch (the G-Rerank training loss)."""
        return -(self.token_logprobs * self.token_mask).sum() / self.token_mask.sum().clamp(min=1)


@runtime_checkable
class ParallelContextGenerator(Protocol):
    """What every frozen generator offers to the trainer, the objectives and evaluation.

    Shapes: B queries, n candidates, L document tokens, S prompt+answer tokens.
    ``doc_log_mask`` is [B, n] (one mask per query) or [B, m, n] (m masks per query, run as
    one batched decoder call over B*m rows that share the encoder states); ``-inf`` removes a
    document exactly, 0 keeps it with full weight.
    """

    def encode_contexts(
        self, encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor
    ) -> EncodedContexts:
        """Encode the B*n documents independently (same position ids), without autograd."""
        ...

    def answer_logprobs(
        self,
        contexts: EncodedContexts,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        doc_log_mask: torch.Tensor | None,
    ) -> AnswerLogProbs:
        """Log-probabilities of the label tokens (labels == -100 are ignored) given the prompt
        and the documents weighted by ``doc_log_mask``. Differentiable w.r.t. the mask."""
        ...

    def generate(
        self,
        contexts: EncodedContexts,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        doc_log_mask: torch.Tensor | None,
        max_new_tokens: int,
        stop_token_ids: list[int] | None = None,
        *,
        before_step: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Greedy continuation [B, <=max_new_tokens] of left-padded prompts (pad after a stop
        token with the tokenizer's pad id). Under ZeRO-3 every rank runs the same number of
        decoder steps, so ranks must call it in lock step. ``before_step`` runs before each
        decoder pass (the strategy's ZeRO-3 trace reset: see :func:`greedy_decode`)."""
        ...


@dataclass(frozen=True)
class InputFormat:
    """How a record becomes a generator's inputs (read by :class:`grerank_dist.data.collate.Collator`).

    Documents are tokenised without special tokens, truncated to ``data.doc_max_tokens`` and
    left-padded (to the batch's longest document when ``docs_pad_to_batch``, else to
    ``doc_max_tokens``); the prompt is ``prompt_template`` (with ``{question}``), followed by the
    answer tokens.
    """

    doc_template: str
    prompt_template: str
    # True: the prompt starts with BOS (CEPE: the decoder reads no documents in its own stream);
    # False: BOS lives in the generator's shared prefix, before the documents (decoder-only).
    prompt_bos: bool
    # True when the document encoder sees relative positions only (RoPE in a bidirectional
    # encoder, T5's relative buckets) and masks padding keys: a narrower left padding then shifts
    # no score, so documents are padded to the batch's longest (less encoder and cross-attention
    # work). False where documents sit at absolute positions after a shared prefix (decoder-only).
    docs_pad_to_batch: bool = False


@dataclass(frozen=True)
class GeneratorFamily:
    """One kind of parallel-context generator: which checkpoints it reads and how to build it.

    ``load(path, dtype, data)`` and ``build_random(size, vocab_texts, seed, dtype, data)`` return
    a frozen model (which carries its :class:`InputFormat` as ``model.input_format``) and its
    tokenizer; ``data`` is the run's :class:`grerank_dist.config.DataConfig` (templates).
    """

    name: str
    random_sizes: tuple[str, ...]  # accepted after "random:" in generator.path
    accepts: Callable[[dict[str, Any]], bool]  # a checkpoint's parsed config.json
    load: Callable[..., tuple[torch.nn.Module, Any]]
    build_random: Callable[..., tuple[torch.nn.Module, Any]]


def rows_for_masks(
    tensors: dict[str, torch.Tensor | None], doc_log_mask: torch.Tensor | None, batch: int, n_docs: int, device: torch.device
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, int | None]:
    """Check shapes and give every mask its decoder row.

    Returns the per-row decoder inputs (per-query tensors [B, S] repeated to the B*m rows of
    [B, m, n] masks, query b's rows consecutive; [B*m, S] inputs are taken as they are), the row
    masks [B*m, n] (zeros when ``doc_log_mask`` is None) and m, None for a [B, n] mask (one row
    per query): what :func:`split_per_query` needs to give results back per query.
    """
    input_ids = tensors["input_ids"]
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S] or [B*m, S], got {None if input_ids is None else tuple(input_ids.shape)}")
    if doc_log_mask is None:
        doc_log_mask = torch.zeros(batch, n_docs, device=device)
    per_query = doc_log_mask.shape[1] if doc_log_mask.dim() == 3 else None
    expected = (batch, n_docs) if per_query is None else (batch, per_query, n_docs)
    if tuple(doc_log_mask.shape) != expected:
        raise ValueError(
            f"doc_log_mask must be [B, n] = {[batch, n_docs]} or [B, m, n] = {[batch, 'm', n_docs]}, "
            f"got {list(doc_log_mask.shape)}"
        )
    rows = batch * (per_query or 1)
    if input_ids.shape[0] == batch and rows > batch:
        tensors = {k: None if v is None else v.repeat_interleave(per_query, dim=0) for k, v in tensors.items()}
    elif input_ids.shape[0] != rows:
        raise ValueError(
            f"input_ids has {input_ids.shape[0]} rows; with {batch} queries and {per_query or 1} mask(s) "
            f"each it must have {batch} or {rows}"
        )
    return tensors, doc_log_mask.reshape(rows, n_docs), per_query


def split_per_query(tensor: torch.Tensor, per_query: int | None) -> torch.Tensor:
    """A per-row result [B*m, ...] as [B, m, ...] for [B, m, n] masks; as it is for one mask a query."""
    return tensor if per_query is None else tensor.reshape(-1, per_query, *tensor.shape[1:])


def stop_token_tensor(eos_token_id: int | list[int] | None, stop_token_ids: list[int] | None, device: torch.device) -> torch.Tensor:
    """The ids that end a generated answer: the model's EOS id(s), then ``stop_token_ids``."""
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    ids = eos + [i for i in (stop_token_ids or []) if i not in eos]
    if not ids:
        raise ValueError("no stop token: config.eos_token_id is None and stop_token_ids is empty")
    return torch.tensor(ids, dtype=torch.long, device=device)


def greedy_decode(
    next_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    mask: torch.Tensor,
    stop_ids: torch.Tensor,
    pad_token_id: int,
    max_new_tokens: int,
    use_cache: bool,
    before_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The greedy loop every generator shares: ``next_logits(step_input, mask)`` gives the logits
    [R, V] of the next token (a model with a cache is handed only the newest token). A row that
    has stopped emits ``pad_token_id``. Under torch.distributed every rank steps until all ranks
    are done, so that ZeRO-3's gathers stay in lock step. Returns [R, T], T <= max_new_tokens.

    ``before_step()`` runs before every decoder pass. Under ZeRO-3 it restarts the parameter
    trace: one trace over a whole generation (n passes) makes each module's release scan up to
    ``stage3_max_reuse_distance`` parameters ahead in it, a cost quadratic in n (measured: one
    20-token batch of SmolLM2 took 355 s instead of 22 s)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    step_input = tokens
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    generated: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        if before_step is not None:
            before_step()
        next_token = next_logits(step_input, mask).argmax(-1).masked_fill(finished, pad_token_id)
        generated.append(next_token)
        finished |= torch.isin(next_token, stop_ids)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_input = next_token[:, None] if use_cache else tokens
        if _all_ranks_done(finished):
            break
    return torch.stack(generated, dim=1)


def _all_ranks_done(finished: torch.Tensor) -> bool:
    """True once every row of every rank has stopped (one all-reduce per step when distributed)."""
    local_done = finished.all()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bool(local_done)
    flag = local_done.to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def answer_logprobs_from_hidden(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor],
    per_query: int | None, causal: bool,
) -> AnswerLogProbs:
    """The answer's per-token log-probabilities from the decoder's last hidden states: only the
    positions that predict a label go through ``lm_head`` (the vocabulary projection dominates
    when answers are short). ``causal``: column t of ``hidden`` [R, S, H] predicts label t + 1;
    otherwise (a seq2seq decoder fed a start token first) column t predicts label t."""
    is_target = labels != -100
    if causal:
        is_target[:, 0] = False  # nothing predicts the first token
        predictors = hidden[:, :-1][is_target[:, 1:]]
    else:
        predictors = hidden[:, : labels.shape[1]][is_target]
    return answer_logprobs_from_logits(lm_head(predictors), labels, is_target, per_query)


def answer_logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, is_target: torch.Tensor, per_query: int | None
) -> AnswerLogProbs:
    """Per-token log-probabilities of the answer: ``logits`` [N, V] predict the N tokens where
    ``is_target`` [R, S] is True (in row-major order), ``labels`` [R, S] holds them. With
    ``per_query`` m (3-D log-masks) the R = B*m rows come back as [B, m, S]."""
    picked = logits.gather(-1, labels[is_target][:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logprobs = torch.zeros(labels.shape, dtype=logits.dtype, device=logits.device).masked_scatter(is_target, picked)
    return AnswerLogProbs(
        token_logprobs=split_per_query(token_logprobs, per_query), token_mask=split_per_query(is_target, per_query)
    )


def checked_document_mask(encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The documents' attention mask [B, n, L] (all ones when None), after checking both shapes."""
    if encoder_input_ids.dim() != 3:
        raise ValueError(f"encoder_input_ids must be [B, n, L], got shape {tuple(encoder_input_ids.shape)}")
    if encoder_attention_mask is None:
        return torch.ones_like(encoder_input_ids)
    if encoder_attention_mask.shape != encoder_input_ids.shape:
        raise ValueError(
            f"encoder_attention_mask shape {tuple(encoder_attention_mask.shape)} differs from "
            f"encoder_input_ids shape {tuple(encoder_input_ids.shape)}"
        )
    return encoder_attention_mask


@dataclass
class Batch:
    """One micro-batch of B queries with n candidates, ready for the reranker and the generator."""

    reranker_inputs: dict[str, torch.Tensor]  # each [B*n, Lr]
    valid: torch.Tensor  # [B, n] bool: real candidates
    relevant: torch.Tensor  # [B, n] bool: gold labels (metrics.gold_labels); only the gold-label reference trains on them
    retriever_scores: torch.Tensor  # [B, n] float: the first-stage retriever's scores, NaN where a candidate has none
    encoder_input_ids: torch.Tensor  # [B, n, L], left-padded
    encoder_attention_mask: torch.Tensor  # [B, n, L]
    input_ids: torch.Tensor  # [B, S] prompt + answer, right-padded
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], -100 outside the answer
    prompt_ids: torch.Tensor  # [B, P] prompt only, left-padded (for generation)
    prompt_attention_mask: torch.Tensor  # [B, P]
    record_ids: list[int]  # positions in the dataset

    def to(self, device: torch.device | str) -> "Batch":
        return self._apply(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """Page-locked copies (a DataLoader with ``pin_memory`` calls it), for asynchronous copies to the GPU."""
        return self._apply(torch.Tensor.pin_memory)

    def _apply(self, fn: Any) -> "Batch":
        tensors = {
            f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return Batch(reranker_inputs={k: fn(v) for k, v in self.reranker_inputs.items()}, record_ids=self.record_ids, **tensors)

    @property
    def size(self) -> int:
        return self.valid.shape[0]
