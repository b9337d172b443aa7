"""Training objectives: small functions of the generator's masked answer likelihood and the
reranker's scores.

Each objective takes the frozen generator (behind :class:`ParallelContextGenerator`), the
already-encoded candidates, the batch and the reranker's scores [B, n], and returns the loss to
back-propagate into the reranker plus a few detached statistics for the logs. The objectives in
``GENERATOR_FREE_OBJECTIVES`` never consult the generator: the trainer passes them ``None`` for
the encoded candidates and skips the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grerank_dist.config import RelaxConfig
from grerank_dist.data import Batch
from grerank_dist.generator import EncodedContexts, ParallelContextGenerator
from grerank_dist.relax import gumbel_attention_mask


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    # Mean over queries of the largest normalised reranker weight max_i softmax(kappa*w/tau)_i,
    # the noise-free statistic of the paper's Fig. 5 (1/n when the reranker cannot tell
    # candidates apart).
    mean_max_weight: torch.Tensor
    # Mean over queries of the largest weight of the sampled (noisy) mask, max_i M_i.
    mean_max_mask: torch.Tensor


def grerank_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
) -> ObjectiveOutput:
    """G-Rerank (paper Eq. 5-7): a relaxed top-k Gumbel mask over the candidates, applied as a
    log-mask bias in every cross-attention; the loss is the answer's token-level cross-entropy.
    With ``relax.noise`` off this is the no-Gumbel ablation (Sec. 4.4)."""
    log_mask = gumbel_attention_mask(
        scores, relax.k, relax.tau, relax.kappa, generator=noise, valid=batch.valid, noise=relax.noise
    )
    answer = generator.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, log_mask)
    return ObjectiveOutput(
        loss=answer.token_mean_nll(),
        mean_max_weight=_mean_max_weight(scores, batch.valid, relax),
        mean_max_mask=log_mask.detach().exp().max(dim=-1).values.mean(),
    )


def gold_label_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts | None,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
) -> ObjectiveOutput:
    """Supervised reference (not a G-Rerank variant): the reranker learns the gold labels
    directly, -mean over gold candidates of log softmax(scores) over the real candidates; the
    generator is not consulted. Queries without a gold candidate add nothing. It bounds what
    the answer signal could teach, as the paper's labelled-retrieval reference does."""
    log_probs = torch.log_softmax(scores.masked_fill(~batch.valid, -torch.inf), dim=-1)
    gold = batch.relevant & batch.valid
    per_query = -(log_probs.masked_fill(~gold, 0.0).sum(-1)) / gold.sum(-1).clamp(min=1)
    weights_max = _mean_max_weight(scores, batch.valid, relax)
    return ObjectiveOutput(loss=per_query.mean(), mean_max_weight=weights_max, mean_max_mask=weights_max)


def retriever_distillation_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts | None,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
) -> ObjectiveOutput:
    """Weak start (not a G-Rerank variant): the reranker learns the retriever's ranking, the
    listwise cross-entropy -sum_i softmax(kappa*r/tau)_i log softmax(kappa*w/tau)_i over the real
    candidates, r the candidates' ``score`` fields and w the reranker's scores: the retriever's
    scores are read on the scale of G-Rerank's mask (``relax.kappa``, ``relax.tau``). It gives a
    random cross-encoder the lexical matching a pretrained reranker starts with, so that
    G-Rerank's top-k masks hold the gold documents often enough for the answer loss to tell them
    apart; the generator is not consulted."""
    retriever = batch.retriever_scores
    missing = batch.valid & torch.isnan(retriever)
    if missing.any():
        b, i = (int(x) for x in missing.nonzero()[0])
        raise ValueError(
            f"train.objective=retriever_distillation needs a 'score' on every candidate; record "
            f"{batch.record_ids[b]} of the training file has none on ctxs[{i}]"
        )
    scale = relax.kappa / relax.tau
    target = torch.softmax((scale * retriever).masked_fill(~batch.valid, -torch.inf), dim=-1)
    log_probs = torch.log_softmax((scale * scores).masked_fill(~batch.valid, -torch.inf), dim=-1)
    loss = -(target * log_probs.masked_fill(~batch.valid, 0.0)).sum(-1).mean()
    weights_max = _mean_max_weight(scores, batch.valid, relax)
    return ObjectiveOutput(loss=loss, mean_max_weight=weights_max, mean_max_mask=weights_max)


def _mean_max_weight(scores: torch.Tensor, valid: torch.Tensor, relax: RelaxConfig) -> torch.Tensor:
    weights = torch.softmax((relax.kappa * scores.detach() / relax.tau).masked_fill(~valid, -torch.inf), dim=-1)
    return weights.max(dim=-1).values.mean()


OBJECTIVES = {
    "grerank": grerank_loss,
    "gold_labels": gold_label_loss,
    "retriever_distillation": retriever_distillation_loss,
}
# Reference objectives that read only the batch's labels or retriever scores.
GENERATOR_FREE_OBJECTIVES = frozenset({"gold_labels", "retriever_distillation"})
