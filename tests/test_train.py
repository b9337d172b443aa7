"""The trainer end to end with real DeepSpeed on CPU: one and two processes, export, resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from grerank_dist.export import MODEL_STATES
from toy import toy_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
TIMEOUT = 300


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the rendezvous variables an in-process strategy may
    have set (a child would otherwise try to join that process group), plus ``extra``."""
    dist_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update({"OMP_NUM_THREADS": "1", **extra})
    return env


def run_cli(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = clean_env(PYTHONPATH=f"{ROOT / 'tests'}:{ROOT}")
    command = (launcher or [sys.executable]) + args
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    return result


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def read_metrics(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def losses(out_dir: Path) -> list[float]:
    return [record["train/loss"] for record in read_metrics(out_dir)]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return write_jsonl(root / "train.jsonl", toy_records(200, 6, seed=3))


def train_args(out_dir, data, *extra):
    return ["-m", "grerank_dist.train", "--config", str(CONFIG), f"output_dir={out_dir}", f"data.train_file={data}", *extra]


def assert_export_matches_checkpoint(export_dir: Path, step_dir: Path) -> None:
    exported = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    module = torch.load(step_dir / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
    reference = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    reference.load_state_dict(module)
    saved = load_file(export_dir / "model.safetensors")
    for name, tensor in module.items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name
    pairs = tokenizer(["what is the code of key1 ?"] * 2, ["key1 has code code7", "key2 has code code1"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(exported(**pairs).logits, reference(**pairs).logits)


def test_resume_ends_with_the_uninterrupted_weights(tmp_path, toy_data):
    """Stop after step 3 (a checkpoint is written), resume with --resume auto: the final reranker
    equals the one of an uninterrupted 6-step run."""
    steps = ["train.max_steps=6", "train.save_every=0"]
    check(run_cli(train_args(tmp_path / "whole", toy_data, *steps)))
    check(run_cli(train_args(tmp_path / "split", toy_data, *steps, "train.stop_at_step=3")))
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "step_3"
    resumed = check(run_cli(train_args(tmp_path / "split", toy_data, *steps, "--resume", "auto")))
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    whole = load_file(tmp_path / "whole" / "reranker" / "model.safetensors")
    split = load_file(tmp_path / "split" / "reranker" / "model.safetensors")
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=0), name
    assert len(losses(tmp_path / "split")) == 6 and losses(tmp_path / "split")[3:] == losses(tmp_path / "whole")[3:]


def test_export_cli_and_reranker_tools(tmp_path, toy_data):
    """A LoRA run; `grerank export` of its checkpoint gives a plain directory that transformers,
    sentence-transformers' CrossEncoder and FlagEmbedding's FlagReranker load and score alike."""
    from grerank_dist.reranker import export_reranker, tiny_reranker
    from toy import toy_records

    texts = [r["question"] for r in toy_records(200, 6, seed=3)] + [
        f"{c['title']} {c['text']}" for r in toy_records(200, 6, seed=3) for c in r["ctxs"]
    ]
    base = export_reranker(*tiny_reranker(texts, seed=1), tmp_path / "base")
    out = tmp_path / "lora"
    check(run_cli(train_args(out, toy_data, "train.max_steps=2", f"reranker.path={base}",
                             "reranker.lora={r: 4, target_modules: [query, value]}")))
    exported = tmp_path / "exported"
    check(run_cli(["-m", "grerank_dist.cli", "export", "--checkpoint", str(out / "checkpoints"), "--out", str(exported)]))
    assert not any("lora" in name for name in load_file(exported / "model.safetensors"))

    pairs = [("what is the code of key1 ?", "key1 has code code7"), ("what is the code of key1 ?", "key2 has no code")]
    model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    with torch.no_grad():
        logits = model(**tokenizer([q for q, _ in pairs], [p for _, p in pairs], return_tensors="pt", padding=True)).logits[:, 0]
    base_model = AutoModelForSequenceClassification.from_pretrained(base).eval()
    with torch.no_grad():
        base_logits = base_model(**tokenizer([q for q, _ in pairs], [p for _, p in pairs], return_tensors="pt", padding=True)).logits[:, 0]
    assert not torch.allclose(logits, base_logits)  # the LoRA update was merged in

    from FlagEmbedding import FlagReranker
    from sentence_transformers import CrossEncoder

    cross = CrossEncoder(str(exported), device="cpu", activation_fn=torch.nn.Identity())
    assert torch.allclose(torch.as_tensor(cross.predict(pairs)).float(), logits, atol=1e-5)
    flag = FlagReranker(str(exported), use_fp16=False, devices="cpu")
    assert torch.allclose(torch.tensor(flag.compute_score([list(p) for p in pairs])).float(), logits, atol=1e-5)
    # The run's own export (merged in-process) equals the one made from the checkpoint.
    own = load_file(out / "reranker" / "model.safetensors")
    for name, tensor in load_file(exported / "model.safetensors").items():
        assert torch.allclose(own[name], tensor, atol=1e-6), name


def test_bad_data_fails_before_training_naming_file_line_field(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}) + "\n"
                    + json.dumps({"question": "q", "ctxs": [{"title": "t", "text": "x"}]}) + "\n")
    result = run_cli(train_args(tmp_path / "out", data))
    assert result.returncode != 0
    assert f"{data}:2: field 'answers': missing or empty" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_impossible_config_fails_at_start(tmp_path, toy_data):
    result = run_cli(train_args(tmp_path / "out", toy_data, "relax.k=9"))
    assert result.returncode != 0 and "relax.k: k=9 exceeds data.n_candidates=6" in result.stderr


@pytest.mark.parametrize(
    "launcher",
    [["bash", "launch/torchrun.sh", "--nproc-per-node", "2"], ["bash", "launch/deepspeed.sh", "--num-gpus", "2"]],
    ids=["torchrun", "deepspeed"],
)
def test_launchers_run_two_process_training(tmp_path, toy_data, launcher):
    """A real 2-process CPU run started through each launcher script completes and exports."""
    env = clean_env(GRERANK_PYTHON=sys.executable)
    args = ["--", "--config", str(CONFIG), f"output_dir={tmp_path}", f"data.train_file={toy_data}", "train.max_steps=2"]
    result = subprocess.run(launcher + args, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    check(result)
    assert len(losses(tmp_path)) == 2
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "reranker").num_labels == 1
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_2"


@pytest.fixture(scope="module")
def toy_reader(tmp_path_factory, toy_data):
    """A tiny reader trained to copy the code from the one candidate that has it."""
    from toy import train_toy_reader

    root = tmp_path_factory.mktemp("reader")
    torch.manual_seed(0)
    return train_toy_reader(toy_records(400, 6, seed=3), root / "reader")


def test_two_processes_keep_ranks_identical_and_generator_frozen(tmp_path, toy_data, toy_reader):
    """torchrun, 2 ranks on gloo, the trained toy reader frozen under ZeRO-3: the loss falls,
    the reranker stays bit-identical across ranks, the generator partitioned and unchanged, its
    log-mask gradient that of an unsharded copy, each rank draws its own Gumbel noise, and the
    export scores as the checkpoint."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    check(
        run_cli(
            [str(ROOT / "tests" / "dist_worker.py"), str(CONFIG), str(out / "worker.json"), f"output_dir={out}",
             f"data.train_file={toy_data}", f"generator.path={toy_reader}", "train.max_steps=24",
             "train.lr=2e-3", "relax.tau=0.1", "train.save_every=0"],
            launcher=torchrun,
        )
    )
    ranks = [json.loads((out / f"worker.json.rank{r}").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["reranker_hash"] == ranks[1]["reranker_hash"]
    for rank in ranks:
        assert rank["generator_partitioned"] and not rank["generator_requires_grad"]
        assert rank["prefetch_trace_complete"]
        assert rank["generator_max_abs_change"] == 0.0
        assert rank["grad_abs_max"] > 0 and rank["sharded_vs_unsharded_grad_max_diff"] < 1e-6 * max(1.0, rank["grad_abs_max"])
    assert ranks[0]["first_noise_sample"] != ranks[1]["first_noise_sample"]
    history = losses(out)
    assert len(history) == 24 and sum(history[-5:]) < 0.7 * sum(history[:5]), history
    # The run's own export scores as the DeepSpeed checkpoint's module weights do.
    assert_export_matches_checkpoint(out / "reranker", out / "checkpoints" / "step_24")


def test_loss_decreases_when_one_candidate_helps(tmp_path, toy_data, toy_reader):
    """Single process, the trained toy reader frozen: G-Rerank lowers the answer loss by learning
    to put the mask on the candidate that holds the code."""
    out = tmp_path / "run"
    check(run_cli(train_args(out, toy_data, f"generator.path={toy_reader}", "train.max_steps=40", "train.lr=2e-3", "relax.tau=0.1")))
    history = losses(out)
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.7 * first, history
    # The reranker learned which candidate the generator needs: held-out top-1 far above chance (1/6).
    model = AutoModelForSequenceClassification.from_pretrained(out / "reranker").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "reranker")
    held_out = toy_records(64, 6, seed=9)
    hits = 0
    with torch.no_grad():
        for record in held_out:
            passages = [f"{c['title']} {c['text']}" for c in record["ctxs"]]
            pairs = tokenizer([record["question"]] * len(passages), passages, return_tensors="pt", padding=True)
            hits += record["ctxs"][int(model(**pairs).logits[:, 0].argmax())]["has_answer"]
    assert hits / len(held_out) > 0.8


def test_gradient_accumulation_equals_one_larger_batch(tmp_path, toy_data):
    """Two accumulated micro-batches of 8 make the same update as one micro-batch of 16 (no
    Gumbel noise so both see the same mask; toy answers all have the same token count)."""
    common = ["train.max_steps=2", "relax.noise=false", "train.save_every=0"]
    check(run_cli(train_args(tmp_path / "accum", toy_data, *common, "train.micro_batch_size=8",
                             "train.gradient_accumulation_steps=2")))
    check(run_cli(train_args(tmp_path / "large", toy_data, *common, "train.micro_batch_size=16")))
    accum = load_file(tmp_path / "accum" / "reranker" / "model.safetensors")
    large = load_file(tmp_path / "large" / "reranker" / "model.safetensors")
    # The gradients agree to float rounding (grad norms below); Adam's first steps divide each
    # gradient coordinate by its own magnitude, which turns that rounding on near-zero coordinates
    # into up to ~1% of one update (lr = 1e-3): hence atol 2e-5 on the weights. The classifier's
    # bias shifts every candidate's score alike, and the relaxed mask is a softmax over a query's
    # scores, so its gradient is zero up to rounding, which Adam scales to a full +-lr update of
    # either sign: it carries no information and is left out.
    for name in accum.keys() - {"classifier.bias"}:
        assert torch.allclose(accum[name], large[name], atol=2e-5, rtol=0), name
    for key in ("train/loss", "train/grad_norm"):
        assert [r[key] for r in read_metrics(tmp_path / "accum")] == pytest.approx(
            [r[key] for r in read_metrics(tmp_path / "large")], rel=1e-4)


def test_bf16_generator_keeps_the_reranker_in_fp32(tmp_path, toy_data):
    """The GPU layout on CPU: a bf16 generator engine beside an fp32 reranker engine; the
    reranker trains and exports in fp32."""
    check(run_cli(train_args(tmp_path, toy_data, "train.max_steps=2", "generator.dtype=bfloat16")))
    exported = load_file(tmp_path / "reranker" / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.float32}
    assert all(math.isfinite(x) for x in losses(tmp_path))


def test_mine_ranks_the_answer_document_from_learned_weights(tmp_path, toy_reader):
    """`grerank mine` (App. F) with the toy reader: per-document weights learned from zero rank the
    one answer-bearing candidate first far above chance (1/6), and the scalar baselines' metrics
    are written beside them. This reader was trained with every candidate visible, so a soft
    mask barely moves its loss: a low tau (near-hard masks) gives the weights their signal."""
    from grerank_dist.cli import main as cli_main

    data = write_jsonl(tmp_path / "mine.jsonl", toy_records(24, 6, seed=11))
    out = tmp_path / "mine"
    code = cli_main(["mine", "--config", str(CONFIG), "--data", data, "--out", str(out), "--steps", "30", "--lr", "0.3",
                     "--k", "1", f"generator.path={toy_reader}", "train.micro_batch_size=24", "relax.k=1", "relax.tau=0.1"])
    assert code == 0
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    assert set(methods) == {"grerank_mined", "lowest_perplexity", "highest_attention", "largest_loo_drop"}
    recall = {name: m["recall@1"] for name, m in methods.items()}
    print(f"mining recall@1 on 24 toy queries: {recall}")
    assert recall["grerank_mined"] >= 0.6, recall
    rows = [json.loads(line) for line in (out / "relevance.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["grerank_mined"]) == len(r["ctx_ids"]) == 6 for r in rows)
