"""Value checks: immediate for library calls, deferred (no host read per step) inside the trainer."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from grerank_dist.method.checks import deferred_checks, require
from grerank_dist.config import DataConfig, ObjectiveConfig, RelaxConfig
from grerank_dist.data.collate import Collator
from grerank_dist.method.relax import noise_generator, relaxed_topk_gumbel
from grerank_dist.models.reranker import reranker_scores, tiny_reranker

PACKAGE = str(Path(__file__).resolve().parents[1] / "grerank_dist")
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")


def test_immediate_check_raises_with_detail_and_deferred_check_raises_at_the_read():
    with pytest.raises(ValueError, match=r"bad thing \(row 3\)"):
        require(torch.tensor(True), "bad thing", lambda: "(row 3)")
    require(torch.tensor(False), "bad thing", lambda: 1 / 0)  # detail is only built on failure

    with deferred_checks() as checks:
        require(torch.tensor(False), "first")
        require(torch.tensor(True), "second")  # recorded, not raised
        require(torch.tensor(False), "second")  # OR-ed with the earlier flag
        with pytest.raises(ValueError, match=r"^steps 1-5: second$"):
            checks.raise_failed("steps 1-5")
        checks.raise_failed("steps 6-10")  # flags were cleared by the read
    with pytest.raises(ValueError, match="scores are NaN or infinite for valid candidates"):
        relaxed_topk_gumbel(torch.tensor([[0.0, float("nan"), 1.0]]), 1, 0.5)  # immediate again


def test_deferred_checks_are_per_thread():
    """A thread beside the trainer's deferred block (a DataLoader thread, say) checks at once."""
    raised = []

    def other_thread():
        try:
            require(torch.tensor(True), "from the other thread")
        except ValueError as error:
            raised.append(str(error))

    with deferred_checks() as checks:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        checks.raise_failed("steps 1-2")  # nothing was recorded in this thread's block
    assert raised == ["from the other thread"]


def test_deferred_relaxation_check_reports_nan_scores_at_the_next_read():
    scores = torch.tensor([[0.0, float("nan"), 1.0]])
    with deferred_checks() as checks:
        relaxed_topk_gumbel(scores, 1, 0.5, noise=noise_generator(0, 0, 0))
        with pytest.raises(ValueError, match="up to step 5: scores are NaN or infinite for valid candidates"):
            checks.raise_failed("up to step 5")


@pytest.fixture
def host_reads(monkeypatch):
    """Records every Python-level read of a tensor's values made from the package's own code."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE):
                calls.append(f"{_name} in {Path(caller.co_filename).name}:{caller.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


@pytest.mark.parametrize("family", ["random:tiny", "random:tiny-fid", "random:tiny-llama"])
@pytest.mark.parametrize("objective", ["grerank", "pdist"])
def test_a_training_step_reads_no_tensor_values_on_the_host(family, objective, host_reads):
    """Scores -> relaxed mask -> masked generator -> loss -> backward, inside the trainer's
    deferred checks: the package's code never reads a tensor's values on the host (on a GPU each
    such read waits for every queued kernel). Boolean indexing inside torch is not seen here."""
    from grerank_dist.models import load_generator
    from grerank_dist.method.objectives import OBJECTIVES

    data = DataConfig(n_candidates=4, doc_max_tokens=8)
    records = [
        {"id": str(q), "question": f"w{q} w{q + 1} ?", "answers": [f"w{q + 2}"],
         "ctxs": [{"title": f"t{i}", "text": f"w{q + i} w{i} w{q}"} for i in range(4)], "type": ""}
        for q in range(2)
    ]
    texts = [f"w{i}" for i in range(12)] + [f"t{i}" for i in range(4)] + ["?", "Question:", "Answer:", "Document", "(Title:", "):"]
    generator, gen_tok = load_generator(family, texts, seed=0, data=data)
    reranker, rr_tok = tiny_reranker(texts, seed=0)
    batch = Collator(data, gen_tok, rr_tok, 32, input_format=generator.input_format)(records, [0, 1])

    def step():
        scores = reranker_scores(reranker, batch.reranker_inputs, data.n_candidates)
        contexts = generator.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        out = OBJECTIVES[objective](generator, contexts, batch, scores, RelaxConfig(k=2), noise_generator(0, 0, 0),
                                    ObjectiveConfig())
        out.loss.backward()
        return out

    host_reads.clear()
    step()
    assert "__bool__ in checks.py:require" in host_reads  # checked at once: the spy sees the reads
    host_reads.clear()
    with deferred_checks() as checks:
        out = step()
        assert host_reads == []
        checks.raise_failed("this step")
    assert torch.isfinite(out.loss)
    assert any(p.grad is not None for p in reranker.parameters())
