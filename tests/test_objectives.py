"""Objectives against hand-computed values."""

import math

import torch

from grerank_dist.config import RelaxConfig
import pytest

from grerank_dist.data.collate import relevance_mask, retriever_score_matrix
from grerank_dist.method.objectives import OBJECTIVES


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
        # The first document's mask weight: a relaxed top-k mask's total is k whatever the
        # scores, so a loss of the whole mask's mass would have no gradient at all.
        nll = -log_mask[..., 0].mean()
        return type("Answer", (), {"token_mean_nll": lambda self: nll})()


@pytest.mark.parametrize("objective,encodes", [("grerank", 1), ("gold_labels", 0), ("retriever_distillation", 0)])
def test_training_step_runs_the_generator_only_for_objectives_that_read_it(objective: str, encodes: int) -> None:
    from types import SimpleNamespace

    from grerank_dist.config import DataConfig, TrainConfig
    from grerank_dist.training.train import training_step

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


# ----------------------------------------------------------------------------------------------
# LLM-supervised baselines against a stub generator: a fixed table of log p(a | q, subset)

from grerank_dist.config import ObjectiveConfig  # noqa: E402
from grerank_dist.interface import AnswerLogProbs  # noqa: E402
from grerank_dist.method.objectives import plackett_luce_logprob, plackett_luce_sample  # noqa: E402

# The answer has two tokens carrying 1/4 and 3/4 of log p(a | q, subset): sum = the table value,
# mean = half of it, so a sequence-level and a per-token objective read different numbers.
TOKEN_SHARES = (0.25, 0.75)


class _TableGenerator:
    """log p(a | q, subset) from ``table[b][subset]`` (subset = frozenset of kept candidates),
    NaN for a subset not in the table (a row whose result must not be read: a NaN reaching the
    loss fails the test); ``mass[b]`` is what document_attention_mass returns."""

    def __init__(self, table: list[dict[frozenset, float]], mass: list[list[float]] | None = None) -> None:
        self.table, self.mass, self.mass_calls = table, mass, []

    def answer_logprobs(self, contexts, input_ids, attention_mask, labels, log_mask) -> AnswerLogProbs:
        assert log_mask.dim() == 3 and not torch.is_grad_enabled()
        values = [[self.table[b].get(frozenset(torch.isfinite(row).nonzero().flatten().tolist()), math.nan) for row in rows]
                  for b, rows in enumerate(log_mask)]
        logp = torch.tensor(values)[..., None] * torch.tensor(TOKEN_SHARES)
        return AnswerLogProbs(token_logprobs=logp, token_mask=torch.ones(logp.shape, dtype=torch.bool))

    def document_attention_mass(self, contexts, input_ids, attention_mask, labels, doc_log_mask, value_norm=False):
        self.mass_calls.append((doc_log_mask.clone(), value_norm))
        return torch.tensor(self.mass)


def _stub_batch(valid: list[list[bool]]) -> "_Batch":
    batch = _Batch(valid, [[False] * len(valid[0])] * len(valid))
    batch.input_ids = batch.attention_mask = batch.labels = None
    return batch


def _softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    top = max(values)
    e = [math.exp((v - top) / temperature) for v in values]
    return [x / sum(e) for x in e]


def _single(logps: list[float]) -> dict[frozenset, float]:
    return {frozenset({i}): v for i, v in enumerate(logps)}


def _check_grad(grad: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(grad, torch.tensor(expected), atol=1e-6, rtol=0)


def test_emdr_is_minus_log_of_the_prior_weighted_sequence_likelihood() -> None:
    s0, s1 = [0.5, -0.2, 1.0], [0.3, 0.1, 0.0]
    table = [_single([-1.0, -3.0, -0.5]), _single([-2.0, -0.2, -9.0])]  # query 1: candidate 2 is padding
    scores = torch.tensor([s0, s1], requires_grad=True)
    settings = ObjectiveConfig(score_temperature=2.0)
    out = OBJECTIVES["emdr"](_TableGenerator(table), None, _stub_batch([[True] * 3, [True, True, False]]),
                             scores, RelaxConfig(k=1, tau=1.0), None, settings)
    expected, grads = 0.0, []
    for s, logps in ((s0, [-1.0, -3.0, -0.5]), (s1[:2], [-2.0, -0.2])):
        prior = _softmax(s, 2.0)
        joint = [p * math.exp(lp) for p, lp in zip(prior, logps)]
        expected += -math.log(sum(joint)) / 2
        posterior = [j / sum(joint) for j in joint]
        # d(-log sum_i p_i e^{l_i}) / ds_j = (p_j - posterior_j) / T_s, averaged over the 2 queries
        grads.append([(p - q) / 2.0 / 2 for p, q in zip(prior, posterior)] + [0.0] * (3 - len(s)))
    assert abs(out.loss.item() - expected) < 1e-6
    out.loss.backward()
    _check_grad(scores.grad, grads)
    assert 0 < out.stats["posterior_max"].item() <= 1


def _kl_reference(target: list[float], s: list[float], t_g: float, t_s: float, direction: str) -> tuple[float, list[float]]:
    """KL and its gradient w.r.t. the scores, by hand."""
    pt, ps = _softmax(target, t_g), _softmax(s, t_s)
    if direction == "target_to_scores":
        kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        return kl, [(b - a) / t_s for a, b in zip(pt, ps)]
    kl = sum(b * math.log(b / a) for a, b in zip(pt, ps))
    return kl, [b / t_s * (math.log(b / a) - kl) for a, b in zip(pt, ps)]


@pytest.mark.parametrize("direction", ["target_to_scores", "scores_to_target"])
def test_pdist_is_the_kl_to_the_per_token_single_document_likelihood(direction: str) -> None:
    s, logps = [0.4, -0.3, 0.9, 0.0], [-1.0, -0.4, -2.0, -0.6]
    scores = torch.tensor([s], requires_grad=True)
    settings = ObjectiveConfig(target_temperature=0.5, score_temperature=2.0, kl_direction=direction)
    out = OBJECTIVES["pdist"](_TableGenerator([_single(logps)]), None, _stub_batch([[True] * 4]), scores,
                              RelaxConfig(k=1, tau=1.0), None, settings)
    kl, grad = _kl_reference([lp / 2 for lp in logps], s, 0.5, 2.0, direction)  # target: the per-token mean
    assert abs(out.loss.item() - kl) < 1e-6
    out.loss.backward()
    _check_grad(scores.grad, [grad])
    assert out.stats["target_agreement"].item() == 0.0  # target peaks on d_1, the scores on d_2


def test_loop_target_is_the_rise_of_the_per_token_nll_without_each_candidate() -> None:
    s = [0.2, -0.1, 0.5]
    table = [{frozenset({0, 1, 2}): -0.4, frozenset({1, 2}): -2.0, frozenset({0, 2}): -0.6, frozenset({0, 1}): -1.0}]
    scores = torch.tensor([s], requires_grad=True)
    out = OBJECTIVES["loop"](_TableGenerator(table), None, _stub_batch([[True] * 3]), scores,
                             RelaxConfig(k=1, tau=1.0), None, ObjectiveConfig(target_temperature=0.3))
    rise = [(-table[0][frozenset({0, 1, 2}) - {i}] / 2) - (0.4 / 2) for i in range(3)]
    kl, grad = _kl_reference(rise, s, 0.3, 1.0, "target_to_scores")
    assert abs(out.loss.item() - kl) < 1e-6
    out.loss.backward()
    _check_grad(scores.grad, [grad])
    assert abs(out.stats["nll_rise_max"].item() - 0.8) < 1e-6


class _AttentionGenerator:
    """``document_attention_mass`` returns ``weighted[b]`` (the pooled alpha * ||v|| scores)
    when asked for value norms and ``attention[b]`` (the pooled alpha alone) otherwise."""

    def __init__(self, attention: list[list[float]], weighted: list[list[float]]) -> None:
        self.attention, self.weighted, self.value_norms_asked = attention, weighted, []

    def document_attention_mass(self, contexts, input_ids, attention_mask, labels, doc_log_mask, value_norm=False):
        self.value_norms_asked.append(value_norm)
        return torch.tensor(self.weighted if value_norm else self.attention)


def test_adist_by_default_is_atlas_kl_from_the_softmax_of_attention_times_value_norm() -> None:
    """Atlas (Izacard et al. 2022, Sec. 2.2): p_ATTN = softmax of the pooled alpha * ||v|| scores
    as they are (no log, no T_g), loss KL(p_ATTN || softmax(scores / T_s)); by hand with the
    default config (T_g = 0.1 must not touch it, T_s = 1)."""
    generator = _AttentionGenerator(attention=[[0.5, 0.3, 0.2]], weighted=[[math.log(3.0), 0.0, 0.0]])
    scores = torch.tensor([[0.0, 0.0, math.log(2.0)]], requires_grad=True)
    out = OBJECTIVES["adist"](generator, None, _stub_batch([[True] * 3]), scores, RelaxConfig(k=1, tau=1.0), None,
                              ObjectiveConfig())
    # target: e^{ln 3} : e^0 : e^0 = 3/5, 1/5, 1/5; reranker: 1 : 1 : 2 = 1/4, 1/4, 1/2
    kl = 0.6 * math.log(0.6 / 0.25) + 0.2 * math.log(0.2 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert abs(kl - 0.2973944) < 1e-6
    assert abs(out.loss.item() - kl) < 1e-6
    assert abs(out.stats["target_max"].item() - 0.6) < 1e-6
    assert generator.value_norms_asked == [True]
    out.loss.backward()
    _check_grad(scores.grad, [[0.25 - 0.6, 0.25 - 0.2, 0.5 - 0.2]])  # (p_R - p_ATTN) / T_s


@pytest.mark.parametrize("value_norm", [False, True])
def test_adist_log_mass_variant_distils_the_attention_fraction_of_every_real_candidate(value_norm: bool) -> None:
    s, mass = [0.1, 0.7, -0.4], [0.6, 0.1, 0.3]
    scores = torch.tensor([s], requires_grad=True)
    generator = _TableGenerator([{}], [mass])
    settings = ObjectiveConfig(target_temperature=1.0, adist_target="log_mass", adist_value_norm=value_norm)
    out = OBJECTIVES["adist"](generator, None, _stub_batch([[True] * 3]), scores, RelaxConfig(k=1, tau=1.0), None, settings)
    kl, grad = _kl_reference([math.log(m) for m in mass], s, 1.0, 1.0, "target_to_scores")  # target = mass itself
    assert abs(out.loss.item() - kl) < 1e-6
    out.loss.backward()
    _check_grad(scores.grad, [grad])
    (full_set, asked_value_norm), = generator.mass_calls
    assert full_set.tolist() == [[0.0, 0.0, 0.0]] and asked_value_norm is value_norm


def test_adist_names_a_generator_without_attention_mass() -> None:
    with pytest.raises(ValueError, match="document_attention_mass.*_EncodingGenerator"):
        OBJECTIVES["adist"](_EncodingGenerator(), None, _stub_batch([[True] * 2]), torch.zeros(1, 2),
                            RelaxConfig(k=1, tau=1.0), None)


def test_dro_weights_the_plackett_luce_log_probability_of_each_subset_by_its_likelihood() -> None:
    s = [0.3, -0.5, 0.8, 0.1]
    subsets = {frozenset({a, b}): -0.3 * a - 0.7 * b - 0.1 for a in range(4) for b in range(4) if a != b}
    scores = torch.tensor([s], requires_grad=True)
    settings = ObjectiveConfig(score_temperature=0.5, dro_samples=3)
    out = OBJECTIVES["dro"](_TableGenerator([subsets]), None, _stub_batch([[True] * 4]), scores,
                            RelaxConfig(k=2, tau=1.0), torch.Generator().manual_seed(5), settings)
    # the same draws, from the same seed
    orders = plackett_luce_sample(torch.tensor([s]) / 0.5, 2, 3, torch.Generator().manual_seed(5))[0].tolist()
    logits = [v / 0.5 for v in s]
    likelihood = [math.exp(subsets[frozenset(o)]) for o in orders]
    weights = [x / sum(likelihood) for x in likelihood]
    expected, grad = 0.0, [0.0] * 4
    for w, (a, b) in zip(weights, orders):
        first = _softmax(logits)
        second = _softmax([v if i != a else -1e9 for i, v in enumerate(logits)])
        expected -= w * (math.log(first[a]) + math.log(second[b]))
        for j in range(4):  # d log P(a, b) / d logit_j, then chain rule 1/T_s, minus sign of the loss
            d = (j == a) - first[j] + (j == b) - second[j]
            grad[j] -= w * d / 0.5
    assert abs(out.loss.item() - expected) < 1e-6
    out.loss.backward()
    _check_grad(scores.grad, [grad])
    assert abs(out.stats["weight_max"].item() - max(weights)) < 1e-6


def test_plackett_luce_sampling_matches_the_model_probabilities() -> None:
    """Monte-Carlo with a fixed seed: the frequency of each ordered pair (k=2 of 4) within 0.01
    (about 3.5 standard deviations at 20,000 draws) of its Plackett-Luce probability."""
    logits = [0.5, -1.0, 1.2, 0.0]
    draws = 20_000
    orders = plackett_luce_sample(torch.tensor([logits]), 2, draws, torch.Generator().manual_seed(0))[0]
    counts: dict[tuple[int, int], int] = {}
    for a, b in orders.tolist():
        counts[(a, b)] = counts.get((a, b), 0) + 1
    first = _softmax(logits)
    for a in range(4):
        second = _softmax([v if i != a else -1e9 for i, v in enumerate(logits)])
        for b in range(4):
            if a != b:
                assert abs(counts.get((a, b), 0) / draws - first[a] * second[b]) < 0.01, (a, b)
                logp = plackett_luce_logprob(torch.tensor([logits]), torch.tensor([[[a, b]]]), torch.ones(1, 1, 2, dtype=torch.bool))
                assert abs(logp.item() - math.log(first[a] * second[b])) < 1e-6


def test_nogumbel_is_grerank_without_noise() -> None:
    scores = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    batch = _stub_batch([[True] * 3])
    relax = RelaxConfig(k=2, tau=0.5)
    named = OBJECTIVES["nogumbel"](_EncodingGenerator(), "contexts", batch, scores, relax, torch.Generator().manual_seed(1))
    flag = OBJECTIVES["grerank"](_EncodingGenerator(), "contexts", batch, scores, RelaxConfig(k=2, tau=0.5, noise=False), None)
    noisy = OBJECTIVES["grerank"](_EncodingGenerator(), "contexts", batch, scores, relax, torch.Generator().manual_seed(1))
    assert named.loss.item() == flag.loss.item() != noisy.loss.item()


@pytest.mark.parametrize(
    "override,message",
    [
        ("objective.kl_direction=sideways", r"objective\.kl_direction: must be one of"),
        ("objective.target_temperature=0", r"objective\.target_temperature: must be > 0"),
        ("objective.score_temperature=-1", r"objective\.score_temperature: must be > 0"),
        ("objective.dro_samples=0", r"objective\.dro_samples: must be an integer >= 1"),
        ("objective.pdist_weight=-1", r"objective\.pdist_weight: must be a number >= 0"),
        ("objective.adist_target=softmax", r"objective\.adist_target: must be one of \('atlas', 'log_mass'\)"),
        ("objective.temperature=1", r"objective: unknown key\(s\) \['temperature'\]"),
    ],
)
def test_objective_section_is_checked_at_load(override: str, message: str) -> None:
    from grerank_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.n_candidates=4", "relax.k=2", override])
    assert load_config(None, ["data.n_candidates=4", "relax.k=2", "train.objective=dro", "objective.dro_samples=8"]).objective.dro_samples == 8


def test_dro_with_fewer_real_candidates_than_k_leaves_padding_out_and_stays_finite() -> None:
    subsets = {frozenset({0, 1}): -0.5}
    scores = torch.tensor([[0.2, -0.4, 5.0]], requires_grad=True)  # candidate 2 is padding, k = 3
    out = OBJECTIVES["dro"](_TableGenerator([subsets]), None, _stub_batch([[True, True, False]]), scores,
                            RelaxConfig(k=3, tau=1.0), torch.Generator().manual_seed(0), ObjectiveConfig(dro_samples=2))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(scores.grad).all() and scores.grad[0, 2].item() == 0.0
    # each sample is an order of {0, 1} (equal likelihoods: weights 1/2); once the first is drawn the
    # second is certain, so log P = log softmax(0.2, -0.4)[first]
    firsts = plackett_luce_sample(torch.tensor([[0.2, -0.4, -1.0e9]]), 3, 2, torch.Generator().manual_seed(0))[0, :, 0]
    prior = _softmax([0.2, -0.4])
    assert abs(out.loss.item() + sum(math.log(prior[i]) for i in firsts.tolist()) / 2) < 1e-6


def test_adist_defaults_to_atlas_with_value_norms_and_old_objective_sections_still_load(tmp_path) -> None:
    from grerank_dist.config import load_config

    default = load_config(None, ["data.n_candidates=4", "relax.k=2", "train.objective=adist"]).objective
    assert (default.adist_target, default.adist_value_norm) == ("atlas", True)
    old = tmp_path / "old.yaml"  # written before adist_target existed: the earlier target, named
    old.write_text("data: {n_candidates: 4}\nrelax: {k: 2}\ntrain: {objective: adist}\n"
                   "objective: {target_temperature: 1.0, adist_value_norm: false}\n")
    assert load_config(old).objective.adist_target == "atlas"  # loads as it is, with the new default
    loaded = load_config(old, ["objective.adist_target=log_mass"]).objective
    assert (loaded.adist_target, loaded.adist_value_norm, loaded.target_temperature) == ("log_mass", False, 1.0)


class _MixtureAndTableGenerator(_TableGenerator):
    """A soft mask (G-Rerank, 2-D) scores the answer as sum_i M_i * usefulness_i; hard masks
    (PDist, 3-D, no autograd) read the table."""

    usefulness = torch.tensor([[0.5, -1.0, 2.0, 0.1]])

    def answer_logprobs(self, contexts, input_ids, attention_mask, labels, log_mask) -> AnswerLogProbs:
        if log_mask.dim() == 3:
            return super().answer_logprobs(contexts, input_ids, attention_mask, labels, log_mask)
        logp = (log_mask.exp() * self.usefulness).sum(-1, keepdim=True) * torch.tensor(TOKEN_SHARES)
        return AnswerLogProbs(token_logprobs=logp, token_mask=torch.ones(logp.shape, dtype=torch.bool))


def test_grerank_pdist_is_grerank_plus_weighted_pdist_on_the_same_noise() -> None:
    s, logps = [0.4, -0.3, 0.9, 0.0], [-1.0, -0.4, -2.0, -0.6]
    generator, batch, relax = _MixtureAndTableGenerator([_single(logps)]), _stub_batch([[True] * 4]), RelaxConfig(k=2, tau=0.7)
    settings = ObjectiveConfig(pdist_weight=0.3)
    parts = []
    for name in ("grerank", "pdist"):
        scores = torch.tensor([s], requires_grad=True)
        loss = OBJECTIVES[name](generator, None, batch, scores, relax, torch.Generator().manual_seed(2), settings).loss
        loss.backward()
        parts.append((loss.item(), scores.grad))
    scores = torch.tensor([s], requires_grad=True)
    out = OBJECTIVES["grerank_pdist"](generator, None, batch, scores, relax, torch.Generator().manual_seed(2), settings)
    out.loss.backward()
    assert abs(out.loss.item() - (parts[0][0] + 0.3 * parts[1][0])) < 1e-6
    torch.testing.assert_close(scores.grad, parts[0][1] + 0.3 * parts[1][1])
    assert out.stats["pdist_loss"].item() == pytest.approx(parts[1][0])


def test_straight_through_with_one_kept_document_is_refused_at_load() -> None:
    from grerank_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"relax\.straight_through: passes no gradient with relax\.k=1"):
        load_config(None, ["data.n_candidates=4", "relax.k=1", "relax.straight_through=true"])
    assert load_config(None, ["data.n_candidates=4", "relax.k=2", "relax.straight_through=true"]).relax.straight_through
