"""Objectives against hand-computed values."""

import math

import torch

from grerank_dist.config import RelaxConfig
from grerank_dist.data import relevance_mask
from grerank_dist.objectives import OBJECTIVES


class _Batch:
    def __init__(self, valid: list[list[bool]], relevant: list[list[bool]]) -> None:
        self.valid = torch.tensor(valid)
        self.relevant = torch.tensor(relevant)


def test_gold_label_loss_matches_hand_computed_listwise_cross_entropy() -> None:
    scores = torch.tensor([[1.0, 0.0, 2.0], [0.5, -0.5, 9.0]], requires_grad=True)
    # query 0: gold {0, 2} among 3; query 1: gold {1}, candidate 2 is padding (its 9.0 must not count)
    batch = _Batch([[True, True, True], [True, True, False]], [[True, False, True], [False, True, False]])
    out = OBJECTIVES["gold_labels"](None, None, batch, scores, RelaxConfig(k=1, tau=1.0), None)
    z0 = math.log(math.exp(1.0) + math.exp(0.0) + math.exp(2.0))
    query0 = -((1.0 - z0) + (2.0 - z0)) / 2
    z1 = math.log(math.exp(0.5) + math.exp(-0.5))
    query1 = -(-0.5 - z1)
    assert abs(out.loss.item() - (query0 + query1) / 2) < 1e-6
    out.loss.backward()
    assert scores.grad[1, 2].item() == 0.0  # padding gets no gradient
    expected_max = (math.exp(2.0 - z0) + math.exp(0.5 - z1)) / 2  # tau=1, kappa=1
    assert abs(out.mean_max_weight.item() - expected_max) < 1e-6


def test_gold_label_loss_ignores_queries_without_gold() -> None:
    scores = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    batch = _Batch([[True, True], [True, True]], [[False, False], [True, False]])
    out = OBJECTIVES["gold_labels"](None, None, batch, scores, RelaxConfig(k=1, tau=1.0), None)
    assert abs(out.loss.item() - math.log(2.0) / 2) < 1e-6


def test_relevance_mask_uses_supporting_flags_for_multi_hop_and_answers_otherwise() -> None:
    multi_hop = {"answers": ["oslo"], "ctxs": [
        {"text": "a wrote b", "has_answer": False, "is_supporting": True},
        {"text": "a born in oslo", "has_answer": True, "is_supporting": True},
        {"text": "c born in oslo", "has_answer": True, "is_supporting": False},
    ]}
    single_hop = {"answers": ["lima"], "ctxs": [{"text": "x lima"}, {"text": "y"}]}
    mask = relevance_mask([multi_hop, single_hop], 3)
    assert mask.tolist() == [[True, True, False], [True, False, False]]
