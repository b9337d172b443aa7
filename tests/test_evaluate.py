"""`grerank eval`: the hard top-k generation path, the written outputs against hand-computed and
independently computed values, the mining default, and 2-process ZeRO-3 evaluation equal to
1-process evaluation (one torchrun launch runs both test-time settings)."""

from __future__ import annotations

import json
import math
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grerank_dist.cli import main as cli_main
from grerank_dist.config import load_config
from grerank_dist.data.collate import Collator
from grerank_dist.evaluation.evaluate import ORACLE, RETRIEVER, evaluate, generate_topk, method_rankings, shard_batches
from grerank_dist.evaluation.evaluate import stop_token_ids, topk_log_mask
from grerank_dist.models import load_generator
from grerank_dist.models.cepe import CepeForCausalContextLM, tiny_cepe_config
from grerank_dist.method.relax import hard_topk_log_mask
from grerank_dist.models.reranker import export_reranker, load_reranker, tiny_reranker
from grerank_dist.models.tokenization import build_word_tokenizer
from grerank_dist.training.train import record_texts
from toy import toy_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
KS = (1, 3)
BATCH_SIZE = 2  # 9 queries on 2 ranks: 5 and 4 real ones, rank 1's last batch all filler
N_QUERIES = 9
MAX_NEW_TOKENS = 5
TOP_K = 2  # documents the generator sees


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    """In-process evaluation sets RANK, WORLD_SIZE and MASTER_PORT (single-process DeepSpeed);
    later tests' subprocesses must not inherit a port this process already listens on."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Toy test queries (three with padded candidate lists), a saved random tiny generator whose
    EOS logit is boosted so that answers stop at different steps, and a saved tiny reranker."""
    root = tmp_path_factory.mktemp("eval")
    records = toy_records(N_QUERIES, seed=3)
    for index, keep in ((1, 3), (4, 2), (7, 3)):
        ctxs = records[index]["ctxs"]
        gold = next(c for c in ctxs if c["has_answer"])
        records[index]["ctxs"] = [gold] + [c for c in ctxs if c is not gold][: keep - 1]
    data = write_jsonl(root / "test.jsonl", records)
    overrides = [
        f"generator.path={root / 'generator'}", f"generator.max_new_tokens={MAX_NEW_TOKENS}", f"relax.k={TOP_K}",
        f"data.eval_file={data}", f"output_dir={root / 'runs'}", f"train.micro_batch_size={BATCH_SIZE}",
    ]
    config = load_config(TINY, overrides)

    tokenizer = build_word_tokenizer(record_texts(records, config), "decoder")
    torch.manual_seed(0)
    generator = CepeForCausalContextLM(tiny_cepe_config(vocab_size=len(tokenizer)))
    with torch.no_grad():
        generator.lm_head.weight[tokenizer.eos_token_id] *= 3.0
    generator.save_pretrained(root / "generator")
    tokenizer.save_pretrained(root / "generator")

    passages = [config.data.passage_template.format(**c) for r in records for c in r["ctxs"]]
    reranker, reranker_tokenizer = tiny_reranker([r["question"] for r in records] + passages, seed=1)
    with torch.no_grad():
        reranker.classifier.weight *= 100.0  # spread the scores so rankings are far from ties
    export_reranker(reranker, reranker_tokenizer, root / "reranker")
    return {"root": root, "records": records, "data": data, "config": config, "overrides": overrides}


@pytest.fixture(scope="module")
def single_process(assets):
    """The reranker and generator settings in this process (world size 1, ZeRO-3 generator)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-process run uses one thread per rank
    try:
        for setting in ("reranker", "generator"):
            evaluate(
                assets["config"], {"tiny": str(assets["root"] / "reranker")}, assets["data"], setting, KS,
                assets["root"] / "single" / setting, batch_size=BATCH_SIZE,
            )
    finally:
        torch.set_num_threads(threads)
    return assets["root"] / "single"


def read_outputs(out_dir: Path) -> tuple[dict, list[dict], str]:
    metrics = json.loads((out_dir / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    return metrics, sorted(predictions, key=lambda q: q["index"]), (out_dir / "metrics.md").read_text()


# --------------------------------------------------------------------------- independent references


def reference_retrieval(ranking: list[int], relevant: set[int], k: int) -> dict[str, float]:
    hits = [i in relevant for i in ranking[:k]]
    ideal = sum(1 / math.log2(r + 2) for r in range(min(k, len(relevant))))
    return {
        f"recall@{k}": sum(hits) / len(relevant),
        f"ndcg@{k}": sum(h / math.log2(r + 2) for r, h in enumerate(hits)) / ideal,
        "mrr": next((1 / (r + 1) for r, i in enumerate(ranking) if i in relevant), 0.0),
    }


def answer_words(text: str) -> list[str]:
    kept = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return [w for w in kept.split() if w not in ("a", "an", "the")]


def reference_answer_metrics(prediction: str, answers: list[str]) -> dict[str, float]:
    predicted = answer_words(prediction)

    def f1(gold: list[str]) -> float:
        if {" ".join(predicted), " ".join(gold)} & {"yes", "no", "noanswer"} and predicted != gold:
            return 0.0  # HotpotQA: yes / no / noanswer score all or nothing
        common = sum(min(predicted.count(w), gold.count(w)) for w in set(gold))
        return 0.0 if common == 0 else 2 * common / (len(predicted) + len(gold))

    golds = [answer_words(a) for a in answers]
    return {
        "em": float(any(predicted == g for g in golds)),
        "subem": float(any(g and " ".join(g) in " ".join(predicted) for g in golds)),
        "f1": max(f1(g) for g in golds),
    }


def generate_from_kept_documents(model, batch, row: int, kept: list[int], stops: list[int]) -> torch.Tensor:
    """The generator given only the ``kept`` documents of query ``row`` (encoder inputs sliced, no mask)."""
    contexts = model.encode_contexts(
        batch.encoder_input_ids[row : row + 1, kept], batch.encoder_attention_mask[row : row + 1, kept]
    )
    return model.generate(
        contexts, batch.prompt_ids[row : row + 1], batch.prompt_attention_mask[row : row + 1], None,
        max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=stops,
    )[0]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("num_records,world_size,batch_size", [(9, 2, 2), (7, 3, 2), (2, 4, 3), (8, 2, 4)])
def test_shards_cover_every_query_once_in_equal_batch_counts(num_records, world_size, batch_size):
    shards = [shard_batches(num_records, rank, world_size, batch_size) for rank in range(world_size)]
    real = sorted(i for shard in shards for ids, n_real in shard for i in ids[:n_real])
    assert real == list(range(num_records))
    assert len({len(shard) for shard in shards}) == 1  # the same number of generator calls everywhere
    assert all(len(ids) == batch_size and 0 <= n_real <= batch_size for shard in shards for ids, n_real in shard)
    assert all(0 <= i < num_records for shard in shards for ids, _ in shard for i in ids)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_generation_equals_generation_from_the_kept_documents_alone(assets, k):
    """Three methods whose top-k sets agree on some queries and differ on others are answered in
    one deduplicated batched call; each answer equals the generator's with the k documents alone."""
    config, records = assets["config"], assets["records"]
    model, tokenizer = load_generator(str(assets["root"] / "generator"))
    batch = Collator(config.data, tokenizer, None, config.reranker.max_length)(records, list(range(len(records))))
    shuffle = torch.Generator().manual_seed(k)
    shuffled = [torch.randperm(len(r["ctxs"]), generator=shuffle).tolist() for r in records]
    rankings = {
        "shuffled": shuffled,
        "reversed": [ranking[::-1] for ranking in shuffled],
        "half-agrees": [ranking if row % 2 else list(range(len(ranking))) for row, ranking in enumerate(shuffled)],
    }
    stops = stop_token_ids(tokenizer)
    calls = []
    with torch.no_grad():
        contexts = model.encode_contexts(batch.encoder_input_ids, batch.encoder_attention_mask)
        tokens = generate_topk(model, contexts, batch, rankings, k, MAX_NEW_TOKENS, stops, lambda: calls.append(1))
        lengths = []
        for method, ranked in rankings.items():
            for row, ranking in enumerate(ranked):
                expected = generate_from_kept_documents(model, batch, row, ranking[:k], stops)
                got = tokens[method][row]
                assert got[: len(expected)].tolist() == expected.tolist(), f"{method}, query {row}, kept {ranking[:k]}"
                assert (got[len(expected) :] == model.config.pad_token_id).all()
                lengths.append(len(expected))
    # One decoder pass per generated token for all methods together (the hook runs before each).
    assert len(calls) == tokens["shuffled"].shape[1]
    # The data exercises early stops and padded candidates (record 4 has fewer than 3 documents).
    assert min(lengths) < MAX_NEW_TOKENS and len(records[4]["ctxs"]) == 2


def test_evaluation_and_training_hard_masks_share_one_stable_top_k_rule():
    """Ties (a reranker scoring candidates alike) are broken by candidate order everywhere: the
    evaluation rankings, the generator's hard log-mask built from them, and relax's hard mask."""
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    rankings = method_rankings("tiny", [{"ctxs": [{}] * 8}] * 2, [[False] * 8] * 2, scores)
    assert rankings == [list(range(8)), [0, 1, 2, 3, 4, 5, 6, 7]]
    for k in (1, 3, 5):
        assert torch.equal(topk_log_mask(rankings, k, 8), hard_topk_log_mask(scores, k, valid))


def test_hand_computed_metrics_for_two_queries(tmp_path):
    """Two multi-hop queries with known gold labels; retriever order and oracle checked by hand."""
    records = [
        {"id": "a", "type": "bridge", "question": "q one", "answers": ["x"], "ctxs": [
            {"id": "a0", "title": "", "text": "t", "is_supporting": False, "has_answer": False},
            {"id": "a1", "title": "", "text": "t", "is_supporting": True, "has_answer": False},
            {"id": "a2", "title": "", "text": "t", "is_supporting": False, "has_answer": False},
            {"id": "a3", "title": "", "text": "t", "is_supporting": True, "has_answer": True}]},
        {"id": "b", "type": "comparison", "question": "q two", "answers": ["y"], "ctxs": [
            {"id": "b0", "title": "", "text": "t", "is_supporting": False, "has_answer": False},
            {"id": "b1", "title": "", "text": "t", "is_supporting": False, "has_answer": False},
            {"id": "b2", "title": "", "text": "t", "is_supporting": True, "has_answer": True}]},  # 3 of 4: padded
    ]
    data = write_jsonl(tmp_path / "hand.jsonl", records)
    config = load_config(TINY, ["data.n_candidates=4"])
    result = evaluate(config, {}, data, "reranker", KS, tmp_path / "out", batch_size=2)
    metrics, predictions, table = read_outputs(tmp_path / "out")

    # a: relevant {1, 3}, indirect {1}; b: relevant {2}, no indirect document.
    third = 1 / math.log2(3)  # gain at rank 2
    retriever = metrics["methods"][RETRIEVER]
    assert [q["methods"][RETRIEVER]["ranking"] for q in predictions] == [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2"]]
    assert retriever["recall@1"] == 0.0 and retriever["ndcg@1"] == 0.0
    assert retriever["recall@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert retriever["ndcg@3"] == pytest.approx((third / (1 + third) + 1 / 2) / 2)
    assert retriever["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert retriever["indirect_recall@1"] == 0.0 and retriever["indirect_recall@3"] == 1.0
    assert retriever["indirect_mrr"] == pytest.approx(1 / 2)
    assert retriever["indirect_ndcg@3"] == pytest.approx(third)
    assert retriever["n_queries"] == 2 and retriever["n_queries_with_indirect"] == 1
    assert retriever["bridge/recall@3"] == pytest.approx(1 / 2) and retriever["comparison/recall@3"] == 1.0

    oracle = metrics["methods"][ORACLE]
    assert [q["methods"][ORACLE]["ranking"] for q in predictions] == [["a1", "a3", "a0", "a2"], ["b2", "b0", "b1"]]
    assert oracle["recall@1"] == pytest.approx((1 / 2 + 1) / 2)
    assert oracle["recall@3"] == oracle["ndcg@3"] == oracle["mrr"] == oracle["indirect_recall@1"] == 1.0

    assert metrics["n_queries"] == 2 and "queries_per_s" not in retriever
    assert metrics["queries_per_s"] == pytest.approx(result.queries_per_s) and metrics["queries_per_s"] > 0
    header, rule, *rows = table.strip().splitlines()
    assert header == ("| Method | Recall@1 | Recall@3 | NDCG@1 | NDCG@3 | MRR | Indirect Recall@1 | "
                      "Indirect Recall@3 | Indirect MRR | Indirect NDCG@1 | Indirect NDCG@3 | N Queries Without Relevant |")
    assert rows[0].startswith("| retriever | 0.0 | 75.0 | 0.0 |") and rows[1].startswith("| oracle | 75.0 | 100.0 |")


def test_generator_setting_writes_outputs_that_match_independent_references(assets, single_process):
    metrics, predictions, table = read_outputs(single_process / "generator")
    records = assets["records"]
    assert [q["index"] for q in predictions] == list(range(N_QUERIES))
    assert metrics["setting"] == "generator" and metrics["n_queries"] == N_QUERIES and metrics["queries_per_s"] > 0
    assert list(metrics["methods"]) == ["tiny", RETRIEVER, ORACLE]
    assert table.splitlines()[0] == (
        "| Method | Recall@1 | Recall@3 | NDCG@1 | NDCG@3 | MRR | EM | SubEM | F1 | N Queries Without Relevant |"
    )

    reranker, reranker_tokenizer = load_reranker(assets["root"] / "reranker")
    model, tokenizer = load_generator(str(assets["root"] / "generator"))
    collate = Collator(assets["config"].data, tokenizer, None, assets["config"].reranker.max_length)
    stops = stop_token_ids(tokenizer)
    template = assets["config"].data.passage_template
    for query, record in zip(predictions, records):
        ids = [c["id"] for c in record["ctxs"]]
        relevant = {i for i, c in enumerate(record["ctxs"]) if c["has_answer"]}
        with torch.no_grad():  # each (question, passage) pair alone: no batching, no padding
            pair_scores = [
                reranker(**reranker_tokenizer(record["question"], template.format(**c), return_tensors="pt")).logits.item()
                for c in record["ctxs"]
            ]
        tiny = query["methods"]["tiny"]
        assert tiny["scores"] == pytest.approx(pair_scores, abs=1e-5)
        assert tiny["ranking"] == [ids[i] for i in sorted(range(len(ids)), key=lambda i: -pair_scores[i])]
        assert query["methods"][RETRIEVER]["ranking"] == ids
        assert query["methods"][ORACLE]["metrics"]["recall@1"] == 1.0

        batch = collate([record], [query["index"]])
        for result in query["methods"].values():
            ranking = [ids.index(i) for i in result["ranking"]]
            expected = generate_from_kept_documents(model, batch, 0, ranking[:TOP_K], stops)
            answer = tokenizer.decode(expected, skip_special_tokens=True).split("\n")[0].strip()
            assert result["prediction"] == answer
            for k in KS:
                assert result["metrics"] == pytest.approx(
                    {**result["metrics"], **reference_retrieval(ranking, relevant, k)}
                )
            assert result["metrics"] == pytest.approx(
                {**result["metrics"], **reference_answer_metrics(answer, record["answers"])}
            )

    for method, averaged in metrics["methods"].items():
        for key in ("recall@1", "recall@3", "ndcg@3", "mrr", "em", "subem", "f1"):
            values = [q["methods"][method]["metrics"][key] for q in predictions]
            assert averaged[key] == pytest.approx(sum(values) / len(values)), (method, key)
        assert averaged["n_queries"] == N_QUERIES and "queries_per_s" not in averaged
    assert metrics["methods"][ORACLE]["recall@1"] == 1.0  # every query has an answer-bearing document
    lengths = {len(q["methods"][m]["prediction"].split()) for q in predictions for m in q["methods"]}
    assert min(lengths) < MAX_NEW_TOKENS  # some answers stopped early, at different steps


@pytest.mark.distributed
def test_two_process_zero3_evaluation_equals_one_process(assets, single_process, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "eval_worker.py"), str(tmp_path), str(assets["root"] / "reranker"), TINY,
        *assets["overrides"],
    ]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["partitioned"] and r["local_fraction"] == pytest.approx(0.5, abs=0.01) for r in ranks)
    for setting in ("reranker", "generator"):
        one, one_predictions, one_table = read_outputs(single_process / setting)
        two, two_predictions, two_table = read_outputs(tmp_path / setting)
        assert two["world_size"] == 2 and one["world_size"] == 1
        assert two["methods"] == one["methods"], setting
        assert two_predictions == one_predictions, setting
        assert two_table == one_table


def test_mining_setting_reads_the_training_file_by_default(assets, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", assets["records"][:3])
    out = tmp_path / "mining"
    code = cli_main([
        "eval", "--config", TINY, "--setting", "mining", "--reranker", str(assets["root"] / "reranker"),
        "--k", "1", "--out", str(out), f"data.train_file={train}", f"data.eval_file={assets['data']}",
    ])
    metrics, predictions, _ = read_outputs(out)
    assert code == 0 and metrics["setting"] == "mining" and metrics["data"] == train
    assert metrics["n_queries"] == 3 and [q["id"] for q in predictions] == [r["id"] for r in assets["records"][:3]]
    assert list(metrics["methods"]) == ["reranker", RETRIEVER, ORACLE]  # a bare DIR is named after its folder
    assert "em" not in metrics["methods"]["reranker"]  # no generation outside the generator setting


def test_generator_setting_needs_a_generator_checkpoint(assets, tmp_path):
    config = load_config(TINY, [f"data.eval_file={assets['data']}"])  # generator.path: random:tiny
    with pytest.raises(ValueError, match="generator checkpoint directory"):
        evaluate(config, {}, assets["data"], "generator", KS, tmp_path)


@pytest.mark.parametrize("order", ["score", "file"])
def test_retriever_row_is_the_score_order_of_a_shuffled_file(tmp_path, order):
    """Candidates written out of score order: the retriever baseline ranks them by score
    (data.candidate_order=score, the default); file order only on request."""
    scored = [("a0", 0.1, False), ("a1", 0.9, True), ("a2", 0.5, False), ("a3", 0.7, True), ("a4", 0.3, False)]
    records = [{"id": "a", "question": "q", "answers": ["x"], "ctxs": [
        {"id": cid, "title": "", "text": "t", "score": score, "has_answer": gold} for cid, score, gold in scored]}]
    data = write_jsonl(tmp_path / "shuffled.jsonl", records)
    config = load_config(TINY, ["data.n_candidates=4", f"data.candidate_order={order}"])
    evaluate(config, {}, data, "reranker", KS, tmp_path / "out", batch_size=1)
    metrics, predictions, _ = read_outputs(tmp_path / "out")
    retriever = metrics["methods"][RETRIEVER]
    if order == "score":
        # kept: the four best scores, a1 (0.9), a3 (0.7), a2 (0.5), a4 (0.3); relevant {a1, a3}
        assert predictions[0]["methods"][RETRIEVER]["ranking"] == ["a1", "a3", "a2", "a4"]
        assert (retriever["recall@1"], retriever["recall@3"], retriever["mrr"]) == (0.5, 1.0, 1.0)
    else:
        # kept: the first four, a0, a1, a2, a3; relevant {a1, a3} at ranks 2 and 4
        assert predictions[0]["methods"][RETRIEVER]["ranking"] == ["a0", "a1", "a2", "a3"]
        assert (retriever["recall@1"], retriever["recall@3"], retriever["mrr"]) == (0.0, 0.5, 0.5)


def test_queries_without_relevant_candidate_count_as_misses_unless_skipped(tmp_path):
    """DPR's top-k convention by default: a query with no relevant candidate scores 0; the
    ``--skip-no-relevant`` flag averages over the others. Either way the count is reported."""
    records = [
        {"id": "a", "question": "q one", "answers": ["x"], "ctxs": [
            {"id": "a0", "title": "", "text": "t", "has_answer": False},
            {"id": "a1", "title": "", "text": "t", "has_answer": True},
            {"id": "a2", "title": "", "text": "t", "has_answer": False}]},
        {"id": "b", "question": "q two", "answers": ["y"], "ctxs": [
            {"id": "b0", "title": "", "text": "t", "has_answer": False},
            {"id": "b1", "title": "", "text": "t", "has_answer": False},
            {"id": "b2", "title": "", "text": "t", "has_answer": False}]},
    ]
    data = write_jsonl(tmp_path / "nq.jsonl", records)
    config = load_config(TINY, ["data.n_candidates=3"])
    evaluate(config, {}, data, "reranker", KS, tmp_path / "counted", batch_size=2)
    code = cli_main(["eval", "--config", TINY, "--data", data, "--k", "1", "--k", "3", "--batch-size", "2",
                     "--out", str(tmp_path / "skipped"), "--skip-no-relevant", "data.n_candidates=3"])
    assert code == 0
    counted, _, counted_table = read_outputs(tmp_path / "counted")
    skipped, _, skipped_table = read_outputs(tmp_path / "skipped")

    # retriever on "a": relevant {1} at rank 2 -> recall@1 0, recall@3 1, ndcg@3 1/log2(3), MRR 1/2
    retriever = counted["methods"][RETRIEVER]
    assert retriever["recall@3"] == pytest.approx((1 + 0) / 2)
    assert retriever["ndcg@3"] == pytest.approx((1 / math.log2(3) + 0) / 2)
    assert retriever["mrr"] == pytest.approx((1 / 2 + 0) / 2)
    assert counted["methods"][ORACLE]["recall@1"] == pytest.approx((1 + 0) / 2)
    retriever = skipped["methods"][RETRIEVER]
    assert retriever["recall@3"] == 1.0 and retriever["mrr"] == pytest.approx(1 / 2)
    assert skipped["methods"][ORACLE]["recall@1"] == 1.0

    for metrics, table, policy in ((counted, counted_table, "scored 0"), (skipped, skipped_table, "skipped")):
        assert metrics["n_queries_without_relevant"] == 1 and metrics["queries_without_relevant"] == policy
        assert all(m["n_queries_without_relevant"] == 1 for m in metrics["methods"].values())
        header, _, *rows = table.strip().splitlines()
        assert header.endswith("| MRR | N Queries Without Relevant |")
        assert all(row.endswith("| 1 |") for row in rows)
