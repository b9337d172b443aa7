"""Training objectives: small functions of the generator's masked answer likelihood and the
reranker's scores.

Each objective takes the frozen generator (behind :class:`ParallelContextGenerator`), the
already-encoded candidates, the batch, the reranker's scores [B, n], the relaxation and the
``objective`` config section, and returns the loss to back-propagate into the reranker plus a
few detached statistics for the logs. The objectives in ``GENERATOR_FREE_OBJECTIVES`` never
consult the generator: the trainer passes them ``None`` for the encoded candidates and skips the
encoder.

The LLM-supervised baselines (EMDR, PDist, LOOP, ADist, DRO) read the generator under
``no_grad`` through hard masks, all of one query's masks in ONE batched decoder call [B, m, n]
over one encoding, so every step calls the generator's modules in the same order (ZeRO-3's
prefetch trace, DESIGN section 4); the gradient reaches the reranker through its scores alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from grerank_dist.config import ADIST_TARGETS, ObjectiveConfig, RelaxConfig
from grerank_dist.interface import Batch
from grerank_dist.interface import AnswerLogProbs, EncodedContexts, ParallelContextGenerator
from grerank_dist.method.relax import gumbel_attention_mask


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    # Mean over queries of the largest normalised reranker weight max_i softmax(kappa*w/tau)_i,
    # the noise-free statistic of the paper's Fig. 5 (1/n when the reranker cannot tell
    # candidates apart).
    mean_max_weight: torch.Tensor
    # Mean over queries of the largest weight of the sampled (noisy) mask, max_i M_i.
    mean_max_mask: torch.Tensor
    # The objective's own detached scalars, logged as train/<name> (averaged over micro-steps
    # and ranks): what its target looks like, e.g. how peaked or how often it agrees with the
    # reranker's top candidate.
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def grerank_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
    settings: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """G-Rerank (paper Eq. 5-7): a relaxed top-k Gumbel mask over the candidates, applied as a
    log-mask bias in every cross-attention; the loss is the answer's token-level cross-entropy.
    With ``relax.noise`` off this is the no-Gumbel ablation (Sec. 4.4)."""
    log_mask = gumbel_attention_mask(
        scores, relax.k, relax.tau, relax.kappa, generator=noise, valid=batch.valid, noise=relax.noise,
        straight_through=relax.straight_through,
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
    settings: ObjectiveConfig | None = None,
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
    settings: ObjectiveConfig | None = None,
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


def no_gumbel_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
    settings: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """The paper's Sec. 4.4 ablation by name: G-Rerank's relaxed top-k mask without the Gumbel
    noise (the same as ``relax.noise=false`` with ``grerank``)."""
    return grerank_loss(generator, contexts, batch, scores, dataclasses.replace(relax, noise=False), noise)


def emdr_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
    settings: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """EMDR at sequence level (paper App. B): maximise log sum_i p_R(d_i|q) p_G(a|q,d_i), with
    p_R = softmax(scores / T_s) over the real candidates and p_G the answer's sequence
    likelihood with d_i alone. Its gradient w.r.t. the scores is (p_R - posterior) / T_s."""
    settings = settings or ObjectiveConfig()
    answer = answer_under_masks(generator, contexts, batch, single_document_masks(batch.valid))
    log_prior = _log_softmax_valid(scores / settings.score_temperature, batch.valid)
    joint = (log_prior + answer.sum()).masked_fill(~batch.valid, -torch.inf)
    log_marginal = joint.logsumexp(-1)
    posterior = (joint - log_marginal[:, None]).exp().detach()
    return _output(
        -log_marginal.mean(),
        scores,
        batch,
        relax,
        {"posterior_max": posterior.max(-1).values.mean(), "answer_logp": log_marginal.detach().mean()},
    )


def pdist_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
    settings: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """PDist (Atlas's convention): KL between softmax(target / T_g) and softmax(scores / T_s),
    the target the mean per-token answer log-likelihood with each candidate alone."""
    settings = settings or ObjectiveConfig()
    answer = answer_under_masks(generator, contexts, batch, single_document_masks(batch.valid))
    return _distillation(answer.mean() / settings.target_temperature, scores, batch, relax, settings)


def grerank_pdist_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
    settings: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """G-Rerank plus ``objective.pdist_weight`` times PDist on the same scores: the relaxed
    mixture's answer loss rewards any document holding the answer string, whatever its role,
    where PDist compares the documents one at a time (docs/REAL_MODELS.md, the decoy records)."""
    settings = settings or ObjectiveConfig()
    mixture = grerank_loss(generator, contexts, batch, scores, relax, noise, settings)
    single = pdist_loss(generator, contexts, batch, scores, relax, noise, settings)
    stats = {"grerank_loss": mixture.loss.detach(), "pdist_loss": single.loss.detach(), **single.stats}
    return dataclasses.replace(mixture, loss=mixture.loss + settings.pdist_weight * single.loss, stats=stats)


def loop_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
    settings: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """LOOP: leave-one-out over the candidate set; the target of d_i is how much the mean
    per-token answer NLL rises when d_i is removed (the full set is the batch's last mask)."""
    settings = settings or ObjectiveConfig()
    answer = answer_under_masks(generator, contexts, batch, leave_one_out_masks(batch.valid))
    nll = -answer.mean()  # [B, n + 1]
    rise = nll[:, :-1] - nll[:, -1:]
    out = _distillation(rise / settings.target_temperature, scores, batch, relax, settings)
    out.stats["nll_rise_max"] = rise.masked_fill(~batch.valid, -torch.inf).max(-1).values.mean()
    return out


def adist_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
    settings: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """ADist: the target is read from the generator's cross-attention on each candidate (averaged
    over heads, layers and answer tokens, by default weighted by the value norms) with every real
    candidate present, through the generator's ``document_attention_mass`` under no_grad; see
    :func:`adist_target_logits` for how it becomes the target distribution."""
    settings = settings or ObjectiveConfig()
    mass_of = getattr(generator, "document_attention_mass", None)
    if mass_of is None:
        raise ValueError(
            f"train.objective=adist needs a generator with document_attention_mass; "
            f"{type(generator).__name__} has none"
        )
    full_set = torch.zeros(batch.valid.shape, device=scores.device).masked_fill(~batch.valid, -torch.inf)
    with torch.no_grad():
        mass = mass_of(contexts, batch.input_ids, batch.attention_mask, batch.labels, full_set, settings.adist_value_norm)
    return _distillation(adist_target_logits(mass.to(scores.dtype), settings), scores, batch, relax, settings)


def adist_target_logits(mass: torch.Tensor, settings: ObjectiveConfig) -> torch.Tensor:
    """The logits of ADist's target distribution from the pooled attention scores [B, n].

    ``atlas`` (Izacard et al. 2022, Sec. 2.2): the scores themselves, alpha * ||v|| averaged over
    heads, layers and answer tokens, so p_ATTN = softmax(scores) with no temperature. ``log_mass``
    (this project's earlier target, kept by name): log(mass) / target_temperature, i.e. the mass
    raised to 1 / T_g and renormalised (T_g = 1: the attention fraction itself)."""
    if settings.adist_target == "atlas":
        return mass
    if settings.adist_target == "log_mass":
        return mass.clamp_min(torch.finfo(mass.dtype).tiny).log() / settings.target_temperature
    raise ValueError(f"objective.adist_target must be one of {ADIST_TARGETS}, got {settings.adist_target!r}")


def dro_loss(
    generator: ParallelContextGenerator,
    contexts: EncodedContexts,
    batch: Batch,
    scores: torch.Tensor,
    relax: RelaxConfig,
    noise: torch.Generator | None,
    settings: ObjectiveConfig | None = None,
) -> ObjectiveOutput:
    """DRO (importance-weighted selection): draw m ordered top-k subsets from the reranker's
    Plackett-Luce distribution over softmax(scores / T_s) (Gumbel top-k without replacement),
    weight each by the generator's answer likelihood with that hard subset, self-normalised over
    the m samples, and maximise the weighted log-probability of the sampled subsets."""
    settings = settings or ObjectiveConfig()
    # Padding gets a finite floor, not -inf: it is never drawn before a real candidate, and a
    # query with fewer than k real ones keeps finite (and NaN-free) log-probabilities.
    logits = (scores / settings.score_temperature).masked_fill(~batch.valid, _PADDING_LOGIT)
    order = plackett_luce_sample(logits.detach(), relax.k, settings.dro_samples, noise)  # [B, m, k]
    picked_valid = batch.valid.gather(1, order.flatten(1)).view(order.shape)
    chosen = torch.zeros(*order.shape[:2], scores.shape[1], dtype=torch.bool, device=scores.device)
    chosen.scatter_(2, order, picked_valid)
    masks = torch.zeros(chosen.shape, device=scores.device).masked_fill(~chosen, -torch.inf)
    answer = answer_under_masks(generator, contexts, batch, masks)
    weights = torch.softmax(answer.sum(), dim=-1)  # [B, m]
    subset_logp = plackett_luce_logprob(logits, order, picked_valid)
    loss = -(weights * subset_logp).sum(-1).mean()
    stats = {"weight_max": weights.max(-1).values.mean(), "subset_logp": subset_logp.detach().mean()}
    return _output(loss, scores, batch, relax, stats)


_PADDING_LOGIT = -1.0e9


def plackett_luce_sample(logits: torch.Tensor, k: int, m: int, noise: torch.Generator | None) -> torch.Tensor:
    """m ordered samples [B, m, k] of k distinct candidates each from the Plackett-Luce model
    with these logits (Gumbel top-k: the k largest of logits + Gumbel noise, in order)."""
    gumbel = -torch.log(-torch.log(_uniform((logits.shape[0], m, logits.shape[1]), logits, noise)))
    return (logits[:, None, :] + gumbel).topk(min(k, logits.shape[1]), dim=-1).indices


def plackett_luce_logprob(logits: torch.Tensor, order: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log P(order) [B, m] of ordered samples [B, m, k] under Plackett-Luce: the sum over steps
    j of logit_{i_j} - logsumexp of the logits not yet drawn; steps with ``keep`` False (an
    invalid candidate, drawn only when a query has fewer than k) are left out."""
    batch, m, k = order.shape
    expanded = logits[:, None, :].expand(batch, m, -1)
    drawn = torch.nn.functional.one_hot(order, logits.shape[1]).bool()  # [B, m, k, n]
    before = drawn.cumsum(2).bool() & ~drawn  # drawn at an earlier step
    remaining = expanded[:, :, None, :].masked_fill(before, -torch.inf).logsumexp(-1)
    steps = expanded.gather(2, order) - remaining
    return steps.masked_fill(~keep, 0.0).sum(-1)


def _uniform(shape: tuple[int, ...], like: torch.Tensor, noise: torch.Generator | None) -> torch.Tensor:
    finfo = torch.finfo(like.dtype)
    uniform = torch.rand(shape, generator=noise, dtype=like.dtype, device=like.device)
    return uniform.clamp(min=finfo.tiny, max=1.0 - finfo.eps / 2)


def single_document_masks(valid: torch.Tensor) -> torch.Tensor:
    """[B, n, n] hard log-masks, row i keeping d_i alone; a padding candidate's row keeps the
    real ones (a well-formed row whose result is never read)."""
    n = valid.shape[1]
    alone = torch.eye(n, dtype=torch.bool, device=valid.device).expand(valid.shape[0], n, n)
    keep = torch.where(valid[:, :, None], alone, valid[:, None, :])
    return _log_mask(keep)


def leave_one_out_masks(valid: torch.Tensor) -> torch.Tensor:
    """[B, n + 1, n] hard log-masks: row i removes d_i from the real candidates, row n keeps
    them all. A row left empty (a query with one real candidate) keeps them all too."""
    n = valid.shape[1]
    without = valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=valid.device)
    without = torch.where(without.any(-1, keepdim=True), without, valid[:, None, :])
    return _log_mask(torch.cat([without, valid[:, None, :]], dim=1))


def _log_mask(keep: torch.Tensor) -> torch.Tensor:
    return torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, -torch.inf)


def answer_under_masks(
    generator: ParallelContextGenerator, contexts: EncodedContexts, batch: Batch, masks: torch.Tensor
) -> AnswerLogProbs:
    """The answer's log-probabilities under m hard masks per query [B, m, n]: one batched
    decoder call over the one encoding, without autograd (the masks are constants)."""
    with torch.no_grad():
        return generator.answer_logprobs(contexts, batch.input_ids, batch.attention_mask, batch.labels, masks)


def _log_softmax_valid(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.masked_fill(~valid, -torch.inf), dim=-1)


def _distillation(
    target_logits: torch.Tensor,
    scores: torch.Tensor,
    batch: Batch,
    relax: RelaxConfig,
    settings: ObjectiveConfig,
) -> ObjectiveOutput:
    """KL between the target distribution softmax(target_logits) (no gradient; each objective
    applies its own temperature) and the reranker's softmax(scores / T_s) over the real
    candidates, in ``settings.kl_direction``: ``target_to_scores`` is KL(target || scores)
    (Atlas), ``scores_to_target`` the reverse."""
    valid = batch.valid
    log_target = _log_softmax_valid(target_logits.detach().to(scores.dtype), valid)
    log_student = _log_softmax_valid(scores / settings.score_temperature, valid)
    if settings.kl_direction == "target_to_scores":
        per_query = (log_target.exp() * (log_target - log_student)).masked_fill(~valid, 0.0).sum(-1)
    else:
        per_query = (log_student.exp() * (log_student - log_target)).masked_fill(~valid, 0.0).sum(-1)
    agree = log_target.argmax(-1) == log_student.detach().argmax(-1)
    stats = {"target_max": log_target.exp().max(-1).values.mean(), "target_agreement": agree.float().mean()}
    return _output(per_query.mean(), scores, batch, relax, stats)


def _output(
    loss: torch.Tensor, scores: torch.Tensor, batch: Batch, relax: RelaxConfig, stats: dict[str, torch.Tensor]
) -> ObjectiveOutput:
    """A mask-free objective's output: no relaxed mask, so both mask statistics read the
    reranker's normalised weights."""
    weights_max = _mean_max_weight(scores, batch.valid, relax)
    return ObjectiveOutput(loss=loss, mean_max_weight=weights_max, mean_max_mask=weights_max, stats=stats)


def _mean_max_weight(scores: torch.Tensor, valid: torch.Tensor, relax: RelaxConfig) -> torch.Tensor:
    weights = torch.softmax((relax.kappa * scores.detach() / relax.tau).masked_fill(~valid, -torch.inf), dim=-1)
    return weights.max(dim=-1).values.mean()


OBJECTIVES = {
    "grerank": grerank_loss,
    "nogumbel": no_gumbel_loss,
    "emdr": emdr_loss,
    "pdist": pdist_loss,
    "grerank_pdist": grerank_pdist_loss,
    "loop": loop_loss,
    "adist": adist_loss,
    "dro": dro_loss,
    "gold_labels": gold_label_loss,
    "retriever_distillation": retriever_distillation_loss,
}
# Reference objectives that read only the batch's labels or retriever scores.
GENERATOR_FREE_OBJECTIVES = frozenset({"gold_labels", "retriever_distillation"})
