"""The trainer end to end with real DeepSpeed on CPU: one and two processes, export, resume."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from grerank_dist.training.export import MODEL_STATES
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
    return ["-m", "grerank_dist.cli", "train", "--config", str(CONFIG), f"output_dir={out_dir}", f"data.train_file={data}", *extra]


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


# The trainer, sending itself Slurm's SIGUSR1 warning during its third step.
SIGNAL_AT_STEP_3 = """
import os, signal, sys
from grerank_dist.training import train as recipe
inner, calls = recipe.training_step, []
def signalling(*args, **kwargs):
    calls.append(None)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGUSR1)
    return inner(*args, **kwargs)
recipe.training_step = signalling
parser = recipe.argparse.ArgumentParser()
recipe.configure_parser(parser)
sys.exit(recipe.run(parser.parse_args(sys.argv[1:])))
"""


class WritesMarker:
    """Pickles to code that writes ``marker`` when unpickled: a swapped checkpoint file's payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def test_resume_ends_with_the_uninterrupted_weights(tmp_path, toy_data):
    """SIGUSR1 during step 3 (checkpoints at steps 2 and 3): the stopped run leaves no final
    export and says how to resume. Then step_3 is lost (`latest` dangles): --resume auto falls
    back to step_2, drops step 3 from the metrics, and ends with the weights of an uninterrupted
    6-step run, each step logged once with its windowed throughput and data time. A swapped
    checkpoint file is refused before DeepSpeed unpickles it."""
    steps = ["train.max_steps=6", "train.save_every=2"]
    check(run_cli(train_args(tmp_path / "whole", toy_data, *steps)))
    stopped = check(run_cli(["-c", SIGNAL_AT_STEP_3, *train_args(tmp_path / "split", toy_data, *steps)[3:]]))
    ckpt = tmp_path / "split" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_3"
    assert not (tmp_path / "split" / "reranker").exists() and (ckpt / "step_3" / "reranker" / "config.json").is_file()
    assert "stopped early at step 3 of 6 (on a stop signal)" in stopped.stdout and "--resume auto" in stopped.stdout
    shutil.rmtree(ckpt / "step_3")
    resumed = check(run_cli(train_args(tmp_path / "split", toy_data, *steps, "--resume", "auto")))
    assert f"{ckpt / 'step_3'} is missing" in resumed.stdout
    assert f"resumed from {ckpt / 'step_2'} at step 2" in resumed.stdout
    whole = load_file(tmp_path / "whole" / "reranker" / "model.safetensors")
    split = load_file(tmp_path / "split" / "reranker" / "model.safetensors")
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=0), name
    records = read_metrics(tmp_path / "split")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "split")[2:] == losses(tmp_path / "whole")[2:]
    assert all(r["train/queries_per_s"] > 0 and r["train/data_time_s"] > 0 and r["train/step_time_s"] > 0 for r in records)
    # A copy of the finished run whose last checkpoint's model-states file (which DeepSpeed
    # unpickles) is swapped for a pickle that writes a file when loaded: --resume auto stops,
    # naming the file, and the pickle is never loaded.
    shutil.copytree(tmp_path / "whole", tmp_path / "swapped")
    states = tmp_path / "swapped" / "checkpoints" / "step_6" / MODEL_STATES
    marker = tmp_path / "unpickled"
    torch.save(WritesMarker(marker), states)
    refused = run_cli(train_args(tmp_path / "swapped", toy_data, *steps, "--resume", "auto"))
    assert not marker.exists(), "the swapped checkpoint file was unpickled"
    assert refused.returncode != 0 and f"{states}: sha256" in refused.stderr, refused.stderr[-3000:]


# The trainer whose reranker scores turn NaN from its fourth step on.
NAN_SCORES_FROM_STEP_4 = """
import sys
from grerank_dist.training import train as recipe
inner, calls = recipe.reranker_scores, []
def diverging(*args, **kwargs):
    calls.append(None)
    scores = inner(*args, **kwargs)
    return scores * float("nan") if len(calls) >= 4 else scores
recipe.reranker_scores = diverging
parser = recipe.argparse.ArgumentParser()
recipe.configure_parser(parser)
sys.exit(recipe.run(parser.parse_args(sys.argv[1:])))
"""


def test_nan_scores_stop_the_run_at_the_next_log_point_before_any_checkpoint_of_them(tmp_path, toy_data):
    """The value checks are deferred to the log points (no device read per step): NaN scores in
    step 4 stop the run at step 6's read, naming the steps, and no checkpoint after step 3 is
    written from them."""
    args = train_args(tmp_path, toy_data, "train.max_steps=10", "train.log_every=3", "train.save_every=3")[3:]
    result = run_cli(["-c", NAN_SCORES_FROM_STEP_4, *args])
    assert result.returncode != 0
    assert "ValueError: training steps up to 6: scores are NaN or infinite for valid candidates" in result.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_3"
    assert not (tmp_path / "checkpoints" / "step_6").exists() and not (tmp_path / "reranker").exists()


def test_compiled_reranker_trains_like_the_plain_one(tmp_path, toy_data):
    """reranker.compile hands the reranker to torch.compile inside its engine (the `eager`
    backend: graph capture without code generation, as CI has no time for inductor); the
    compiled run's losses equal the plain run's."""
    common = ["train.max_steps=1", "train.save_every=0"]
    check(run_cli(train_args(tmp_path / "plain", toy_data, *common)))
    check(run_cli(train_args(tmp_path / "compiled", toy_data, *common, "reranker.compile=eager")))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    from grerank_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reranker.compile"):
        load_config(CONFIG, ["reranker.compile=fast"])


def test_export_cli_and_reranker_tools(tmp_path, toy_data):
    """A LoRA run; `grerank export` of its checkpoint gives a plain directory that transformers,
    sentence-transformers' CrossEncoder and FlagEmbedding's FlagReranker load and score alike."""
    from grerank_dist.models.reranker import export_reranker, tiny_reranker
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


@pytest.mark.distributed
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


def fp32_masters_on_disk(step_dir: Path) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 master weights as a checkpoint stores them: ZeRO partitions of all
    ranks joined by DeepSpeed's zero_to_fp32, or (stage 0) the replicated fp32 groups, which
    follow the module's parameter order."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(step_dir.glob("*zero_pp_rank_*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    states = torch.load(step_dir / MODEL_STATES, map_location="cpu", weights_only=True)
    masters = [t for group in states["optimizer"]["fp32_groups"] for t in group]
    assert len(masters) == len(states["module"])
    return dict(zip(states["module"], masters))


@pytest.mark.distributed
@pytest.mark.parametrize("stage,ranks", [(1, 2), (0, 1)], ids=["zero1-2ranks", "zero0-1rank"])
def test_bf16_reranker_exports_its_fp32_master_weights(tmp_path, toy_data, stage, ranks):
    """A bf16 reranker engine (ZeRO-1 over two ranks, each holding half of the fp32 master
    weights; or stage 0): the run's export and the checkpoint's (and under ZeRO `grerank
    export`'s) are fp32 and equal the optimizer's fp32 masters stored in the checkpoint, which
    carry more precision than the bf16 module weights."""
    from grerank_dist.training.export import export_checkpoint

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    check(run_cli(train_args(tmp_path, toy_data, "train.max_steps=3", "reranker.dtype=bfloat16",
                             f"deepspeed.reranker_overrides={{zero_optimization: {{stage: {stage}}}}}"), launcher=launcher))
    step_dir = tmp_path / "checkpoints" / "step_3"
    masters = fp32_masters_on_disk(step_dir)
    module = torch.load(step_dir / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
    assert {t.dtype for t in module.values()} == {torch.bfloat16}
    # The masters carry more precision than their bf16 copies (else the test could not fail).
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())
    exports = [tmp_path / "reranker", step_dir / "reranker"]
    if stage:
        exports.append(export_checkpoint(step_dir, tmp_path / "cli_export"))
        # zero_to_fp32 unpickles the optimizer files: a swapped one is refused, never loaded.
        swapped = tmp_path / "swapped"
        shutil.copytree(tmp_path / "checkpoints", swapped)
        optim = sorted((swapped / "step_3").glob("*optim_states.pt"))[0]
        marker = tmp_path / "unpickled"
        torch.save(WritesMarker(marker), optim)
        with pytest.raises(ValueError, match=f"refusing to unpickle.*{re.escape(str(optim))}: sha256"):
            export_checkpoint(swapped / "step_3", tmp_path / "swapped_export")
        assert not marker.exists()
    else:
        with pytest.raises(ValueError, match="use the reranker/ export saved inside the checkpoint"):
            export_checkpoint(step_dir, tmp_path / "cli_export")
    for export_dir in exports:
        exported = load_file(export_dir / "model.safetensors")
        assert exported.keys() == masters.keys(), export_dir
        for name, master in masters.items():
            assert exported[name].dtype == torch.float32 and torch.equal(exported[name], master), (export_dir, name)


@pytest.fixture(scope="module")
def toy_reader(tmp_path_factory, toy_data):
    """A tiny reader trained to copy the code from the one candidate that has it."""
    from toy import train_toy_reader

    root = tmp_path_factory.mktemp("reader")
    torch.manual_seed(0)
    return train_toy_reader(toy_records(400, 6, seed=3), root / "reader")


@pytest.mark.distributed
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


@pytest.mark.distributed
def test_two_process_zero3_training_with_a_decoder_only_generator(tmp_path, toy_data):
    """torchrun, 2 ranks, a random tiny Llama frozen under ZeRO-3 in parallel-context mode with
    gradient checkpointing: the run completes, logs finite losses and exports the reranker."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    check(run_cli(["-m", "grerank_dist.cli", "train", "--config", str(CONFIG), f"output_dir={tmp_path}",
                   f"data.train_file={toy_data}", "generator.path=random:tiny-llama", "train.max_steps=2"],
                  launcher=torchrun))
    history = losses(tmp_path)
    assert len(history) == 2 and all(math.isfinite(x) and x > 0 for x in history)
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "reranker").num_labels == 1


# ----------------------------------------------------------------- checkpoint files, no engine
class FakeEngine:
    """Stands in for the reranker engine: a checkpoint is one model-states file naming its content."""

    def __init__(self) -> None:
        self.content = "new"
        self.loaded: str | None = None  # the content of the last checkpoint loaded

    def save_checkpoint(self, save_dir: str, tag: str, **options) -> None:
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / MODEL_STATES).write_text(self.content)

    def load_checkpoint(self, load_dir: str, tag: str, **options) -> tuple[str, dict]:
        self.loaded = (Path(load_dir) / tag / MODEL_STATES).read_text()
        return str(Path(load_dir) / tag), {}


def file_strategy():
    """A one-process strategy whose engine writes marker files (no process group, no DeepSpeed)."""
    from grerank_dist.config import load_config
    from grerank_dist.training.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config, strategy.rank, strategy.world_size = load_config(None, []), 0, 1
    strategy.reranker_engine = FakeEngine()
    strategy.barrier = lambda: None
    strategy.all_gather_object = lambda obj: [obj]
    return strategy


def complete_checkpoint(ckpt_dir: Path, tag: str, content: str) -> None:
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / MODEL_STATES).write_text(content)


class Crash(Exception):
    pass


def test_resaving_a_step_never_leaves_latest_without_a_complete_checkpoint(tmp_path, monkeypatch):
    """Save step_4 again over the current step_4, crashing at each file-system operation in turn:
    after every crash `latest` names a complete checkpoint holding the old or the new state, and
    a later save recovers; without a crash `latest` names step_4 with the new state."""
    import shutil

    from grerank_dist.training.strategy import LATEST, RUN_ID

    real = {"replace": os.replace, "rmtree": shutil.rmtree, "copytree": shutil.copytree}
    crash_at, calls = [0], [0]

    def faulty(name):
        def op(*args, **kwargs):
            calls[0] += 1
            if calls[0] == crash_at[0]:
                raise Crash(f"crash at {name} #{calls[0]}")
            return real[name](*args, **kwargs)
        return op

    crashes = 0
    for point in range(1, 50):
        ckpt = tmp_path / f"crash{point}"
        complete_checkpoint(ckpt, "step_4", "old")
        (ckpt / LATEST).write_text("step_4")
        strategy = file_strategy()
        crash_at[0], calls[0] = point, 0
        with monkeypatch.context() as patch:
            for name in real:
                patch.setattr(os if name == "replace" else shutil, name, faulty(name))
            try:
                strategy.save_checkpoint(ckpt, 4, {"step": 4})
            except Crash:
                crashes += 1
            else:
                assert (ckpt / LATEST).read_text() == "step_4"
                assert (ckpt / "step_4" / MODEL_STATES).read_text() == "new"
                assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, RUN_ID, "step_4"]
                break
        named = ckpt / (ckpt / LATEST).read_text()
        assert (named / MODEL_STATES).read_text() in ("old", "new"), (point, named)
        strategy.save_checkpoint(ckpt, 4, {"step": 4})  # the next save recovers from any leftover
        assert (ckpt / LATEST).read_text() == "step_4" and (ckpt / "step_4" / MODEL_STATES).read_text() == "new"
    assert crashes >= 3


def write_export(directory: Path) -> None:
    """Stands in for the recipe's export into the checkpoint: a file in a subdirectory."""
    directory.mkdir()
    (directory / "model.safetensors").write_text("weights")


def test_resume_checks_every_checkpoint_file_before_the_engine_reads_any(tmp_path):
    """The manifest written last at save time (the sha256 of every file, keyed to the run)
    is checked before the engine loads anything: a changed, missing or extra file, no manifest,
    or a step directory of another run is refused by name, and so is a checkpoint another rank
    refused. An intact one loads, with the trainer's own state read from JSON."""
    from grerank_dist.training.strategy import CHECKPOINT_MANIFEST, CheckpointVerificationError

    ckpt = tmp_path / "run" / "checkpoints"
    file_strategy().save_checkpoint(ckpt, 4, {"step": 4}, export_fn=write_export)
    other_run = tmp_path / "other" / "checkpoints"
    file_strategy().save_checkpoint(other_run, 2, {"step": 2}, export_fn=write_export)
    shutil.copytree(ckpt / "step_4", other_run / "step_4")

    def tamper_states(step):
        (step / MODEL_STATES).write_text("swapped")

    def tamper_export(step):
        (step / "reranker" / "model.safetensors").write_text("swapped")

    def remove_export(step):
        (step / "reranker" / "model.safetensors").unlink()

    def add_partition(step):
        (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_text("extra")

    def remove_manifest(step):
        (step / CHECKPOINT_MANIFEST).unlink()

    cases = [
        (tamper_states, rf"checkpoints/step_4/{MODEL_STATES}: sha256 .* does not match"),
        (tamper_export, r"step_4/reranker/model.safetensors: sha256 .* does not match"),
        (remove_export, r"step_4/reranker/model.safetensors: listed in .* missing"),
        (add_partition, r"step_4/zero_pp_rank_1_mp_rank_00_optim_states.pt: not in the manifest"),
        (remove_manifest, rf"step_4/{CHECKPOINT_MANIFEST}: missing"),
    ]
    for tamper, message in cases:
        copy = tmp_path / tamper.__name__ / "checkpoints"
        shutil.copytree(ckpt, copy)
        tamper(copy / "step_4")
        strategy = file_strategy()
        with pytest.raises(CheckpointVerificationError, match=message):
            strategy.load_checkpoint(copy, "step_4")
        assert strategy.reranker_engine.loaded is None, tamper.__name__

    strategy = file_strategy()
    with pytest.raises(CheckpointVerificationError, match=r"step_4 was saved by run \w+, but .* names run \w+"):
        strategy.load_checkpoint(other_run, "step_4")
    strategy.all_gather_object = lambda problem: [problem, "rank 1: a file differs"]
    with pytest.raises(CheckpointVerificationError, match="rank 1: a file differs"):
        strategy.load_checkpoint(ckpt, "step_4")
    assert strategy.reranker_engine.loaded is None

    strategy = file_strategy()
    assert strategy.load_checkpoint(ckpt, "step_4") == {"step": 4} and strategy.reranker_engine.loaded == "new"


def test_resume_falls_back_from_a_dangling_latest_pointer(tmp_path, capsys):
    """`latest` names a deleted step_6: resume takes the newest complete checkpoint (step_4, not
    the incomplete step_5 or the older step_2) and says so; with no complete one it stops."""
    from grerank_dist.training.strategy import LATEST

    strategy = file_strategy()
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 10):
        complete_checkpoint(ckpt, f"step_{step}", "x")
    (ckpt / "step_10" / MODEL_STATES).unlink()  # incomplete: not a candidate
    (ckpt / LATEST).write_text("step_6")
    assert strategy.resume_tag(ckpt) == "step_4"
    assert f"{ckpt / 'step_6'} is missing" in capsys.readouterr().out
    (ckpt / LATEST).write_text("step_4")
    assert strategy.resume_tag(ckpt) == "step_4"
    assert strategy.resume_tag(tmp_path / "fresh") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LATEST).write_text("step_6")
    with pytest.raises(FileNotFoundError, match=str(empty / "step_6")):
        strategy.resume_tag(empty)


def test_metrics_file_keeps_each_step_once_on_resume(tmp_path):
    """Steps 1-5 were logged but the checkpoint is at step 3: resuming drops 4 and 5 before
    the resumed run logs them again."""
    from grerank_dist.training.tracking import MetricsLogger, read_metrics as read_records

    first = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, enabled=True, resume_step=3)
    for step in (4, 5, 6):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in records] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]


def test_throughput_is_windowed_and_separates_data_time():
    """queries_per_s is the queries of every step since the last log over the wall time since
    then; data and step time are per-step means over the window (hand-computed, fake clock)."""
    from grerank_dist.training.tracking import ThroughputWindow

    now = [100.0]
    window = ThroughputWindow(clock=lambda: now[0])
    for data_s, step_s in ((0.5, 1.5), (1.0, 2.0)):  # two steps of 8 queries, then a log
        window.add_step(queries=8, data_time=data_s, step_time=step_s)
        now[0] += data_s + step_s
    now[0] += 1.0  # logging and checkpoint time also count toward the wall time
    assert window.summary() == {"queries_per_s": 16 / 6.0, "data_time_s": 0.75, "step_time_s": 1.75}
    window.add_step(queries=8, data_time=1.0, step_time=1.0)
    now[0] += 4.0
    assert window.summary() == {"queries_per_s": 8 / 4.0, "data_time_s": 1.0, "step_time_s": 1.0}


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
