"""Objectives against hand-computed values."""

import math

import torch

from grerank_dist.config import RelaxConfig
import pytest

from grerank_dist.data import relevance_mask, retriever_score_matrix
from grerank_dist.objectives import OBJECTIVES


class _Batch:
    def __init__(self, valid: list[list[bool]], relevant: list[list[bool]], retriever: list[list[float]] | None = None) -> None:
        self.valid = torch.tensor(valid)
        self.relevant = torch.tensor(relevant)
        self.retriever_scores = torch.tensor(retriever) if retriever is not None else None
        self.record_ids = [7, 8]


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


def test_retriever_distillation_matches_hand_computed_cross_entropy_to_the_retriever_softmax() -> None:
    scores = torch.tensor([[1.0, 0.0, 2.0], [0.5, -0.5, 9.0]], requires_grad=True)
    retriever = [[2.0, 1.0, 0.0], [0.0, math.log(3.0), float("nan")]]  # query 1: candidate 2 is padding
    batch = _Batch([[True, True, True], [True, True, False]], [[False] * 3] * 2, retriever)
    out = OBJECTIVES["retriever_distillation"](None, None, batch, scores, RelaxConfig(k=1, tau=1.0), None)
    e = [math.exp(2.0), math.exp(1.0), 1.0]
    target0 = [v / sum(e) for v in e]
    z0 = math.log(math.exp(1.0) + 1.0 + math.exp(2.0))
    query0 = -sum(t * (s - z0) for t, s in zip(target0, [1.0, 0.0, 2.0]))
    z1 = math.log(math.exp(0.5) + math.exp(-0.5))
    query1 = -(0.25 * (0.5 - z1) + 0.75 * (-0.5 - z1))  # softmax(0, log 3) = (1/4, 3/4)
    assert abs(out.loss.item() - (query0 + query1) / 2) < 1e-6
    out.loss.backward()
    assert scores.grad[1, 2].item() == 0.0


def test_retriever_distillation_names_the_record_and_candidate_without_a_score() -> None:
    batch = _Batch([[True, True], [True, True]], [[False] * 2] * 2, [[1.0, 0.0], [0.5, float("nan")]])
    with pytest.raises(ValueError, match=r"record 8 .* ctxs\[1\]"):
        OBJECTIVES["retriever_distillation"](None, None, batch, torch.zeros(2, 2), RelaxConfig(k=1, tau=1.0), None)


def test_retriever_score_matrix_reads_scores_and_marks_missing_and_padding_as_nan() -> None:
    records = [{"ctxs": [{"score": 2.5}, {"score": None}]}, {"ctxs": [{"score": -1.0}]}]
    matrix = retriever_score_matrix(records, 2)
    assert matrix[0, 0].item() == 2.5 and matrix[1, 0].item() == -1.0
    assert torch.isnan(matrix[0, 1]) and torch.isnan(matrix[1, 1])


def test_retriever_distillation_reads_both_score_lists_on_the_mask_scale() -> None:
    """With kappa/tau = 2 the target is softmax(2r) and the prediction log softmax(2w)."""
    scores, retriever = torch.tensor([[0.0, 0.5]]), [[0.0, math.log(3.0) / 2]]
    batch = _Batch([[True, True]], [[False, False]], retriever)
    out = OBJECTIVES["retriever_distillation"](None, None, batch, scores, RelaxConfig(k=1, tau=0.5, kappa=1.0), None)
    z = math.log(1.0 + math.exp(1.0))
    expected = -(0.25 * (0.0 - z) + 0.75 * (1.0 - z))  # softmax(0, log 3) = (1/4, 3/4)
    assert abs(out.loss.item() - expected) < 1e-6


class _RecordingStrategy:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin_generator_step(self) -> None:
        self.calls.append("begin_generator_step")

    def backward(self, loss: torch.Tensor) -> None:
        self.calls.append("backward")
        loss.backward()

    def step(self) -> None:
        self.calls.append("step")


class _EncodingGenerator:
    """Records encoder calls; its answer likelihood depends on the mask so G-Rerank can run."""

    def __init__(self) -> None:
        self.encoded = 0

    def encode_contexts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
        self.encoded += 1
        return "contexts"

    def answer_logprobs(self, contexts, input_ids, attention_mask, labels, log_mask):
        assert contexts == "contexts"
        nll = -log_mask.logsumexp(-1).mean()
        return type("Answer", (), {"token_mean_nll": lambda self: nll})()


@pytest.mark.parametrize("objective,encodes", [("grerank", 1), ("gold_labels", 0), ("retriever_distillation", 0)])
def test_training_step_runs_the_generator_only_for_objectives_that_read_it(objective: str, encodes: int) -> None:
    from types import SimpleNamespace

    from grerank_dist.config import DataConfig, TrainConfig
    from grerank_dist.train import training_step

    scores = torch.nn.Parameter(torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.1]]))
    reranker = lambda **inputs: SimpleNamespace(logits=scores.view(-1, 1))  # noqa: E731
    batch = _Batch([[True] * 3] * 2, [[True, False, False], [False, True, False]], [[1.0, 0.0, 0.5]] * 2)
    batch.reranker_inputs, batch.encoder_input_ids, batch.encoder_attention_mask = {}, None, None
    batch.input_ids = batch.attention_mask = batch.labels = None
    config = TrainConfig(data=DataConfig(n_candidates=3), relax=RelaxConfig(k=1, tau=1.0))
    config.train.objective = objective
    strategy, generator = _RecordingStrategy(), _EncodingGenerator()
    training_step(strategy, reranker, generator, batch, config, torch.Generator().manual_seed(0))
    assert generator.encoded == encodes
    assert strategy.calls == ["begin_generator_step"] * encodes + ["backward", "step"]
    assert scores.grad is not None and scores.grad.abs().sum() > 0
