"""The small interface between training/evaluation and any frozen parallel-context generator.

CEPE, FiD and decoder-only LLMs in parallel-context mode all look the same to the trainer,
the objectives and evaluation: encode the candidate documents once (no autograd: the encoder
does not depend on the mask), then score an answer, or generate one, under a per-document
log-mask that is added to every cross-attention score of that document's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch


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
    ) -> torch.Tensor:
        """Greedy continuation [B, <=max_new_tokens] of left-padded prompts (pad after a stop
        token with the tokenizer's pad id). Under ZeRO-3 every rank runs the same number of
        decoder steps, so ranks must call it in lock step."""
        ...


@dataclass(frozen=True)
class InputFormat:
    """How a record becomes a generator's inputs (read by :class:`grerank_dist.data.Collator`).

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
