"""Gumbel relaxed top-k document masks (G-Rerank, paper Eq. 5-6) and their hard counterparts.

For reranker scores ``w`` over n candidates, one Gumbel sample is

    p = softmax((G + kappa * w) / tau),   G_i = -log(-log u_i),  u_i ~ U(0, 1)

and the relaxed top-k mask is the element-wise maximum of k independent samples,
``M_i = max_j p_i^(j)``, in [0, 1]. The generator uses ``log M`` as an additive attention bias,
so :func:`gumbel_attention_mask` computes it in log space as ``max_j log_softmax(...)``: at low
temperature or with large scores the direct ``log(max(softmax))`` underflows to -inf and its
gradient becomes NaN, while the log-space value stays finite.

At inference the reranker keeps its top k documents: :func:`hard_topk_mask` and
:func:`hard_topk_log_mask` (0 / -inf, the bias that reproduces reranking exactly). Every hard
top-k of the project, here and in evaluation (:func:`grerank_dist.method.metrics.rank_by_scores`),
follows the one order of :func:`rank_candidates`: ties are broken by candidate order, which is
the retriever's order after loading (see ``data.candidate_order``).

Conventions shared by every function here:

- ``scores`` is [B, n] or [n]; the candidates are on the last dimension.
- ``valid`` (bool, shape of ``scores``) marks real candidates; the others get mask 0 (log -inf)
  and are never selected, whatever their score (padding scores may be NaN).
- when ``k`` >= the number of valid candidates of a row, top-k keeps them all: every valid
  candidate gets mask 1 (log 0), with no gradient, in the soft and in the hard versions.
- ``noise=False`` is the paper's no-Gumbel ablation (section 4.4): the k "samples" are then
  identical, ``softmax(kappa * w / tau)``, and the max over them is that one softmax.
- computations run in at least float32; results have the dtype of ``scores``.
"""

from __future__ import annotations

import torch

from grerank_dist.method.checks import require

__all__ = [
    "gumbel_attention_mask",
    "gumbel_softmax",
    "gumbel_softmax_samples",
    "hard_topk_log_mask",
    "hard_topk_mask",
    "noise_generator",
    "rank_candidates",
    "relaxed_topk_gumbel",
]

# Bit widths of the fields packed into one 64-bit generator seed by noise_generator.
_SEED_BITS, _RANK_BITS, _STEP_BITS = 20, 16, 28
_UINT64_MASK = (1 << 64) - 1


def _splitmix64_finalize(value: int) -> int:
    """A bijection on 64-bit integers that scatters neighbouring inputs over the whole range."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _UINT64_MASK
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _UINT64_MASK
    return value ^ (value >> 31)


def noise_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator whose Gumbel noise is fixed by (seed, rank, step) and differs across them.

    Derivation: the three integers are packed into disjoint bit fields of one 64-bit integer
    (seed: 20 bits, rank: 16 bits, step: 28 bits), which is injective, then passed through the
    splitmix64 finaliser, a bijection. Distinct (seed, rank, step) therefore give distinct
    generator seeds by construction, and neighbouring steps or ranks get unrelated seeds.
    """
    fields = {"seed": (seed, _SEED_BITS), "rank": (rank, _RANK_BITS), "step": (step, _STEP_BITS)}
    for name, (value, bits) in fields.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
            raise ValueError(f"noise_generator: {name} must be an int in [0, 2**{bits}), got {value!r}")
    packed = (seed << (_RANK_BITS + _STEP_BITS)) | (rank << _STEP_BITS) | step
    generator = torch.Generator(device=device)
    generator.manual_seed(_splitmix64_finalize(packed))
    return generator


def _validate(
    scores: torch.Tensor, k: int | None, tau: float | None, kappa: float | None, valid: torch.Tensor | None
) -> torch.Tensor:
    """Check the arguments and return the boolean ``valid`` mask (all True when not given). The
    value checks read the scores: deferred under :func:`grerank_dist.method.checks.deferred_checks`."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor, got {getattr(scores, 'dtype', type(scores))}")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [B, n] or [n], got shape {tuple(scores.shape)}")
    if scores.shape[-1] == 0:
        raise ValueError(f"scores has an empty candidate set (n == 0), shape {tuple(scores.shape)}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if tau is not None and not (isinstance(tau, (int, float)) and 0 < tau < float("inf")):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if kappa is not None and not (isinstance(kappa, (int, float)) and 0 <= kappa < float("inf")):
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa!r}")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    else:
        if valid.shape != scores.shape:
            raise ValueError(f"valid has shape {tuple(valid.shape)} but scores has {tuple(scores.shape)}")
        if valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
        valid = valid.to(scores.device)
    with torch.no_grad():
        empty_rows = ~valid.any(dim=-1)
        valid_nonfinite = valid & ~torch.isfinite(scores)
        require(empty_rows.any(), "valid marks no candidate in a row: empty candidate set",
                lambda: f"(rows {torch.nonzero(empty_rows.reshape(-1)).flatten().tolist()})")
        require(valid_nonfinite.any(), "scores are NaN or infinite for valid candidates",
                lambda: f"(at {torch.nonzero(valid_nonfinite).tolist()[:10]})")
    return valid


def _gumbel_noise(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise, -log(-log u).

    u is clamped to [tiny, 1 - eps/2] of its dtype (the smallest normal number and the largest
    number below 1), so both logarithms stay finite: G lies in about [-4.5, 16.6] in float32.
    """
    finfo = torch.finfo(like.dtype)
    uniform = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    uniform = uniform.clamp(min=finfo.tiny, max=1.0 - finfo.eps / 2)
    return -torch.log(-torch.log(uniform))


def _perturbed_logits(
    scores: torch.Tensor,
    k: int,
    tau: float,
    kappa: float,
    generator: torch.Generator | None,
    valid: torch.Tensor,
    noise: bool,
) -> torch.Tensor:
    """[k, *scores.shape] logits (G + kappa * w) / tau, -inf on invalid candidates."""
    compute_dtype = torch.promote_types(scores.dtype, torch.float32)
    safe_scores = torch.where(valid, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    logits = kappa * safe_scores.to(compute_dtype)
    logits = logits.unsqueeze(0).expand(k, *scores.shape)
    if noise:
        logits = logits + _gumbel_noise(logits.shape, logits, generator)
    return (logits / tau).masked_fill(~valid, float("-inf"))


def _keep_all_when_k_covers(
    mask: torch.Tensor, k: int, valid: torch.Tensor, kept_value: float
) -> torch.Tensor:
    """Rows with at most k valid candidates keep them all: their valid entries become ``kept_value``."""
    covered_rows = (valid.sum(dim=-1, keepdim=True) <= k) & valid
    return mask.masked_fill(covered_rows, kept_value)


def gumbel_softmax_samples(
    scores: torch.Tensor,
    k: int,
    tau: float,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
    noise: bool = True,
) -> torch.Tensor:
    """The k independent Gumbel-softmax samples behind the relaxed top-k mask, [k, *scores.shape].

    Exposed for diagnostics (how peaked the samples are) and for tests. With the same generator
    state, :func:`relaxed_topk_gumbel` is the element-wise max of these samples.
    """
    valid = _validate(scores, k, tau, kappa, valid)
    logits = _perturbed_logits(scores, k, tau, kappa, generator, valid, noise)
    return torch.softmax(logits, dim=-1).to(scores.dtype)


def gumbel_softmax(
    scores: torch.Tensor,
    tau: float,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Gumbel-softmax sample softmax((G + kappa * w) / tau) over the candidates (paper Eq. 5)."""
    return gumbel_softmax_samples(scores, 1, tau, kappa, generator, valid)[0]


def relaxed_topk_gumbel(
    scores: torch.Tensor,
    k: int,
    tau: float,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
    noise: bool = True,
) -> torch.Tensor:
    """Relaxed top-k mask M in [0, 1]: element-wise max of k Gumbel-softmax samples (paper Eq. 6).

    Computed directly in probability space: use :func:`gumbel_attention_mask` for the attention
    bias, which stays finite where this one underflows to 0.
    """
    valid = _validate(scores, k, tau, kappa, valid)
    logits = _perturbed_logits(scores, k, tau, kappa, generator, valid, noise)
    mask = torch.softmax(logits, dim=-1).amax(dim=0)
    return _keep_all_when_k_covers(mask, k, valid, 1.0).to(scores.dtype)


def gumbel_attention_mask(
    scores: torch.Tensor,
    k: int,
    tau: float,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
    noise: bool = True,
    straight_through: bool = False,
) -> torch.Tensor:
    """log M of :func:`relaxed_topk_gumbel`, computed in log space: max_j log_softmax(...).

    Same noise as :func:`relaxed_topk_gumbel` for the same generator state. Values are <= 0,
    -inf exactly on invalid candidates; ready to be added to attention logits (see
    :func:`grerank_dist.method.attention.expand_doc_bias`).

    ``straight_through``: the forward value is the hard mask of the same samples (0 on the
    argmax of each of the k samples, -inf elsewhere), so the generator reads exactly the sampled
    documents as at inference, and the gradient is the relaxed mask's on the kept documents
    (log M - stop_gradient(log M)); a dropped document is unseen and passes no gradient.
    """
    valid = _validate(scores, k, tau, kappa, valid)
    logits = _perturbed_logits(scores, k, tau, kappa, generator, valid, noise)
    samples = torch.log_softmax(logits, dim=-1)
    log_mask = _keep_all_when_k_covers(samples.amax(dim=0), k, valid, 0.0)
    if straight_through:
        kept = torch.zeros_like(valid).scatter(-1, samples.argmax(dim=-1).movedim(0, -1), True)
        kept = _keep_all_when_k_covers(kept, k, valid, True) & valid
        log_mask = torch.where(kept, log_mask - log_mask.detach(), torch.full_like(log_mask, float("-inf")))
    return log_mask.to(scores.dtype)


def rank_candidates(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Candidate indices along the last dimension, best first: the project's one ranking rule.

    Valid candidates come by descending score, equal scores in candidate order (a stable sort,
    so a reranker that scores candidates alike keeps the retriever's order, where
    :func:`torch.topk` picks among ties arbitrarily); invalid candidates follow, in candidate
    order, whatever their score (NaN included). Valid scores must not be NaN.
    """
    scores = scores.detach()
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    safe_scores = torch.where(valid, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    by_score = torch.sort(safe_scores, dim=-1, descending=True, stable=True).indices
    invalid_in_order = (~valid).gather(-1, by_score).to(torch.uint8)
    return by_score.gather(-1, torch.sort(invalid_in_order, dim=-1, stable=True).indices)


def hard_topk_mask(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k highest-scoring valid candidates per row (all valid ones if fewer than k).

    Ties are broken by candidate order (:func:`rank_candidates`), as in evaluation.
    """
    valid = _validate(scores, k, None, None, valid)
    top_indices = rank_candidates(scores, valid)[..., :k]
    selected = torch.zeros_like(valid).scatter(-1, top_indices, True)
    return selected & valid


def hard_topk_log_mask(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """0 for the hard top-k candidates, -inf elsewhere, in the dtype of ``scores``: reranking as a bias."""
    selected = hard_topk_mask(scores, k, valid)
    zeros = torch.zeros_like(scores, dtype=scores.dtype).detach()
    return zeros.masked_fill(~selected, float("-inf"))
