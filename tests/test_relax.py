"""Gumbel relaxed top-k masks: distribution properties, log-space stability, errors, hard top-k."""

from __future__ import annotations

import math

import pytest
import torch

from grerank_dist.method.relax import (
    gumbel_attention_mask,
    gumbel_softmax,
    gumbel_softmax_samples,
    hard_topk_log_mask,
    hard_topk_mask,
    noise_generator,
    rank_candidates,
    relaxed_topk_gumbel,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_scores(batch: int = 4, n: int = 7, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, n, generator=seeded(seed), dtype=dtype)


def test_gumbel_softmax_matches_hand_computed_sample():
    scores = torch.tensor([[0.3, -1.2, 2.0, 0.5]], dtype=torch.float64)
    tau, kappa = 0.7, 1.5
    uniform = torch.rand(scores.shape, generator=seeded(5), dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform))
    logits = ((gumbel + kappa * scores) / tau).flatten().tolist()
    exps = [math.exp(x - max(logits)) for x in logits]
    expected = torch.tensor([[e / sum(exps) for e in exps]], dtype=torch.float64)
    sample = gumbel_softmax(scores, tau, kappa, generator=seeded(5))
    torch.testing.assert_close(sample, expected, rtol=1e-12, atol=1e-12)


def test_each_sample_sums_to_one_and_the_max_dominates_every_sample():
    scores = random_scores()
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[1, 5:] = False
    samples = gumbel_softmax_samples(scores, 3, 0.5, generator=seeded(3), valid=valid)
    torch.testing.assert_close(samples.sum(-1), torch.ones(3, 4, dtype=torch.float64), rtol=0, atol=1e-12)
    mask = relaxed_topk_gumbel(scores, 3, 0.5, generator=seeded(3), valid=valid)
    assert torch.all(mask[None] >= samples)
    # the maximum is attained: every entry equals one of the samples
    assert torch.all((samples == mask[None]).any(dim=0))
    assert torch.all((mask >= 0) & (mask <= 1))


def test_mask_is_in_unit_interval_and_its_log_is_non_positive():
    scores = random_scores(batch=8, n=20) * 5
    mask = relaxed_topk_gumbel(scores, 5, 0.3, generator=seeded(0))
    log_mask = gumbel_attention_mask(scores, 5, 0.3, generator=seeded(0))
    assert torch.all((mask >= 0) & (mask <= 1))
    assert torch.all(log_mask <= 0)


def test_higher_score_gives_higher_mean_mask():
    scores = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5], dtype=torch.float64).expand(4000, 6)
    mean_mask = relaxed_topk_gumbel(scores, 2, 0.5, generator=seeded(11)).mean(0)
    assert torch.all(mean_mask[1:] > mean_mask[:-1] + 0.01), mean_mask


def test_low_temperature_gives_nearly_binary_masks_with_k_ones():
    scores = random_scores(batch=200, n=10, seed=4)
    near_binary_fraction = {}
    for tau in (5.0, 0.1, 1e-3):
        mask = relaxed_topk_gumbel(scores, 3, tau, generator=seeded(2))
        near_binary_fraction[tau] = ((mask < 1e-3) | (mask > 1 - 1e-3)).double().mean().item()
    assert near_binary_fraction[5.0] < 0.05 < near_binary_fraction[0.1] < near_binary_fraction[1e-3]
    assert near_binary_fraction[1e-3] > 0.99
    ones_per_row = (mask > 0.5).sum(-1)
    # k samples choose at most k distinct documents (fewer when two samples pick the same one)
    assert torch.all((ones_per_row >= 1) & (ones_per_row <= 3))


def test_log_space_equals_log_of_direct_mask_where_nothing_underflows():
    scores = random_scores()
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[2, :3] = False
    direct = relaxed_topk_gumbel(scores, 3, 0.8, kappa=1.3, generator=seeded(9), valid=valid)
    log_mask = gumbel_attention_mask(scores, 3, 0.8, kappa=1.3, generator=seeded(9), valid=valid)
    torch.testing.assert_close(log_mask[valid], direct[valid].log(), rtol=1e-12, atol=1e-12)
    assert torch.all(torch.isneginf(log_mask[~valid]))


def test_log_space_stays_finite_with_finite_gradients_where_direct_underflows():
    scores = torch.tensor([[1e4, -1e4, 3e3, -5e3, 0.0, 7e3]], dtype=torch.float32, requires_grad=True)
    weights = torch.linspace(-1, 1, 6)
    log_mask = gumbel_attention_mask(scores, 2, 0.05, generator=seeded(1))
    assert torch.all(torch.isfinite(log_mask))
    (grad_log,) = torch.autograd.grad((log_mask * weights).sum(), scores)
    assert torch.all(torch.isfinite(grad_log))
    assert grad_log.abs().sum() > 0

    direct_log = relaxed_topk_gumbel(scores, 2, 0.05, generator=seeded(1)).log()
    assert not torch.all(torch.isfinite(direct_log))
    (grad_direct,) = torch.autograd.grad((direct_log * weights).sum(), scores)
    assert not torch.all(torch.isfinite(grad_direct))


def test_log_mask_gradient_matches_finite_differences():
    scores = random_scores(batch=2, n=5, seed=8).requires_grad_(True)
    weights = torch.randn(2, 5, generator=seeded(4), dtype=torch.float64)

    def objective(s: torch.Tensor) -> torch.Tensor:
        return (gumbel_attention_mask(s, 2, 0.6, kappa=1.2, generator=seeded(6)) * weights).sum()

    (analytic,) = torch.autograd.grad(objective(scores), scores)
    numeric = torch.zeros_like(scores)
    step = 1e-6
    with torch.no_grad():
        for index in range(scores.numel()):
            delta = torch.zeros_like(scores).view(-1)
            delta[index] = step
            delta = delta.view_as(scores)
            numeric.view(-1)[index] = (objective(scores + delta) - objective(scores - delta)) / (2 * step)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-7)


def test_same_seed_reproduces_and_rank_or_step_changes_the_noise():
    scores = random_scores()
    first = gumbel_attention_mask(scores, 2, 0.5, generator=noise_generator(7, rank=0, step=3))
    again = gumbel_attention_mask(scores, 2, 0.5, generator=noise_generator(7, rank=0, step=3))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    for seed, rank, step in [(7, 1, 3), (7, 0, 4), (8, 0, 3)]:
        other = gumbel_attention_mask(scores, 2, 0.5, generator=noise_generator(seed, rank, step))
        assert (other - first).abs().max() > 1e-3, (seed, rank, step)


def test_noise_generator_seeds_are_distinct_over_a_grid():
    draws = {
        tuple(torch.rand(4, generator=noise_generator(seed, rank, step)).tolist())
        for seed in range(3)
        for rank in range(4)
        for step in range(20)
    }
    assert len(draws) == 3 * 4 * 20


def test_without_noise_every_sample_is_the_plain_softmax():
    scores = random_scores()
    expected = torch.softmax(1.7 * scores / 0.4, dim=-1)
    samples = gumbel_softmax_samples(scores, 3, 0.4, kappa=1.7, noise=False)
    for sample in samples:
        torch.testing.assert_close(sample, expected, rtol=1e-12, atol=1e-15)
    mask = relaxed_topk_gumbel(scores, 3, 0.4, kappa=1.7, noise=False)
    torch.testing.assert_close(mask, expected, rtol=1e-12, atol=1e-15)
    log_mask = gumbel_attention_mask(scores, 3, 0.4, kappa=1.7, noise=False)
    torch.testing.assert_close(log_mask, expected.log(), rtol=1e-12, atol=1e-12)


def test_invalid_candidates_get_zero_mask_and_never_affect_valid_ones():
    scores = random_scores(batch=3, n=6)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    poisoned = scores.masked_fill(~valid, float("nan"))
    mask = relaxed_topk_gumbel(poisoned, 2, 0.5, generator=seeded(2), valid=valid)
    assert torch.all(mask[~valid] == 0)
    log_mask = gumbel_attention_mask(poisoned, 2, 0.5, generator=seeded(2), valid=valid)
    assert torch.all(torch.isneginf(log_mask[~valid]))
    # Row 0 restricted to its 4 valid candidates equals the plain softmax over those 4 (no noise).
    no_noise = relaxed_topk_gumbel(poisoned, 2, 0.5, valid=valid, noise=False)
    torch.testing.assert_close(no_noise[0, :4], torch.softmax(scores[0, :4] / 0.5, dim=-1), rtol=1e-12, atol=1e-15)
    hard = hard_topk_mask(poisoned, 2, valid=valid)
    assert not torch.any(hard & ~valid)


def test_k_at_least_the_valid_count_keeps_every_valid_candidate():
    scores = random_scores(batch=2, n=5).requires_grad_(True)
    valid = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = relaxed_topk_gumbel(scores, 2, 0.5, generator=seeded(0), valid=valid)
    torch.testing.assert_close(mask[0], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.all(mask[1] < 1)  # row 1 has 5 valid candidates for k = 2: still relaxed
    log_mask = gumbel_attention_mask(scores, 2, 0.5, generator=seeded(0), valid=valid)
    assert log_mask[0, :2].tolist() == [0.0, 0.0] and torch.all(torch.isneginf(log_mask[0, 2:]))
    (grad,) = torch.autograd.grad(log_mask[0, :2].sum(), scores)
    assert torch.all(grad == 0)
    assert hard_topk_mask(scores, 7, valid=valid).tolist() == valid.tolist()
    assert torch.all(relaxed_topk_gumbel(scores, 5, 0.5, generator=seeded(0)) == 1)


def test_hard_topk_matches_a_sort():
    scores = torch.randn(30, 12, generator=seeded(21))
    valid = torch.rand(30, 12, generator=seeded(22)) > 0.3
    valid[:, 0] = True
    for k in (1, 3, 5):
        mask = hard_topk_mask(scores, k, valid=valid)
        for row in range(30):
            candidates = [i for i in range(12) if valid[row, i]]
            best = sorted(candidates, key=lambda i: -scores[row, i].item())[:k]
            assert sorted(torch.nonzero(mask[row]).flatten().tolist()) == sorted(best)
        log_mask = hard_topk_log_mask(scores, k, valid=valid)
        assert torch.all((log_mask == 0) == mask) and torch.all(torch.isneginf(log_mask) == ~mask)
    one_dim = torch.tensor([0.1, 0.9, -0.3, 0.5])
    assert hard_topk_mask(one_dim, 2).tolist() == [False, True, False, True]


def test_hard_topk_breaks_ties_by_candidate_order():
    # torch.topk picks among equal scores in no documented order (on CPU it returned
    # candidates 6, 5, 4 of eight zeros); the rule keeps the earlier candidates
    scores = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all tied -> 0, 1, 2
        [3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # 0, then the first two of the tied 1.0s
        [1.0, 2.0, 2.0, 2.0, 0.0, 2.0, 2.0, 2.0],  # candidate 1 invalid -> 2, 3, 5
    ], dtype=torch.float64)
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[2, 1] = False
    expected = [[0, 1, 2], [0, 1, 2], [2, 3, 5]]
    assert [torch.nonzero(row).flatten().tolist() for row in hard_topk_mask(scores, 3, valid)] == expected
    assert [row[:3] for row in rank_candidates(scores, valid).tolist()] == expected
    # the full order: valid candidates by score (ties in candidate order), then invalid ones
    assert rank_candidates(scores, valid)[2].tolist() == [2, 3, 5, 6, 7, 0, 4, 1]
    assert rank_candidates(torch.tensor([1.0, 2.0, 2.0])).tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: relaxed_topk_gumbel(s, 0, 0.5), "k must be"),
        (lambda s: relaxed_topk_gumbel(s, 2.0, 0.5), "k must be"),
        (lambda s: gumbel_attention_mask(s, 2, 0.0), "tau must be"),
        (lambda s: gumbel_softmax(s, -1.0), "tau must be"),
        (lambda s: relaxed_topk_gumbel(s, 2, 0.5, kappa=float("nan")), "kappa must be"),
        (lambda s: relaxed_topk_gumbel(s[:, :0], 2, 0.5), "n == 0"),
        (lambda s: gumbel_attention_mask(s, 2, 0.5, valid=torch.zeros(3, 4, dtype=torch.bool)), "empty"),
        (lambda s: relaxed_topk_gumbel(s, 2, 0.5, valid=torch.ones(3, 5, dtype=torch.bool)), "valid has shape"),
        (lambda s: hard_topk_mask(s, 2, valid=torch.ones(3, 4)), "bool"),
        (lambda s: relaxed_topk_gumbel(s.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("inf"))), 2, 0.5), "scores are NaN or infinite"),
        (lambda s: hard_topk_mask(s.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))), 2), "scores are NaN or infinite"),
        (lambda s: hard_topk_mask(s[None], 2), "scores must be"),
        (lambda s: hard_topk_mask(s.long(), 2), "scores must be"),
        (lambda s: noise_generator(-1, 0, 0), "seed must be"),
        (lambda s: noise_generator(0, 1 << 16, 0), "rank must be"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(3, 4))


@pytest.mark.parametrize("k", [1, 2])
def test_straight_through_reads_the_hard_samples_and_passes_the_relaxed_gradient_on_kept_documents(k):
    scores = random_scores(batch=3, n=6, seed=11).requires_grad_(True)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 4:] = False
    weights = torch.randn(3, 6, generator=seeded(5), dtype=torch.float64)
    samples = gumbel_softmax_samples(scores.detach(), k, 0.7, generator=seeded(3), valid=valid)
    # the hard mask by hand: the argmax of every sample is kept
    kept = torch.zeros(3, 6, dtype=torch.bool)
    for sample in samples:
        kept[torch.arange(3), sample.argmax(-1)] = True
    hard = gumbel_attention_mask(scores, k, 0.7, generator=seeded(3), valid=valid, straight_through=True)
    assert torch.equal(hard == 0, kept) and torch.all(hard[~kept] == -math.inf)

    soft = gumbel_attention_mask(scores, k, 0.7, generator=seeded(3), valid=valid)
    (grad_hard,) = torch.autograd.grad((hard.masked_fill(~kept, 0.0) * weights).sum(), scores)
    (grad_soft,) = torch.autograd.grad((soft * weights.masked_fill(~kept, 0.0)).sum(), scores)
    torch.testing.assert_close(grad_hard, grad_soft)
