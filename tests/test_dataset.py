"""Arrow training data (grerank_dist/data/dataset.py): the same batches as the in-memory Collator,
built once and reused, the same record errors, one builder among ranks, resumable loaders."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from grerank_dist.data import dataset as arrow_data
from grerank_dist.config import DataConfig
from grerank_dist.data.collate import Collator, MicroBatchSchedule, reranker_pairs
from grerank_dist.data.records import RecordError, read_records
from grerank_dist.interface import Batch
from grerank_dist.data.dataset import StepBatches, load_records, load_tokens, step_loader, tokenizer_identity
from grerank_dist.interface import InputFormat
from grerank_dist.models.tokenization import build_word_tokenizer
from toy import toy_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path.home() / ".cache" / "grerank_dist" / "models"
FORMATS = {  # the generator families' layouts (models/cepe.py, models/fid.py, models/decoder_only.py)
    "cepe": InputFormat("{title} : {text}", "question : {question} answer :", prompt_bos=True, docs_pad_to_batch=True),
    "fid": InputFormat("question: {question} title: {title} context: {text}", "question: {question}", prompt_bos=False, docs_pad_to_batch=True),
    "decoder-only": InputFormat("Document: {title} {text}", "Question: {question}\nAnswer:", prompt_bos=False),
}


def varied_records() -> list[dict]:
    """Toy records with short candidate lists (padding), several answers, retriever scores and
    candidates without has_answer (labels from the text)."""
    records = toy_records(14, 6, seed=1)
    for i, record in enumerate(records):
        if i % 3 == 0:
            record["ctxs"] = record["ctxs"][:4]
        if i % 4 == 1:
            record["answers"] = ["a much longer answer", record["answers"][0], "x"]
        if i % 5 == 2:
            for j, ctx in enumerate(record["ctxs"]):
                ctx["score"] = float(j % 3)
                del ctx["has_answer"]
    return records


def texts_of(records: list[dict]) -> list[str]:
    words = "document question answer context title : ( )"
    return [words] + [r["question"] for r in records] + [a for r in records for a in r["answers"]] + [
        f"{c['title']} {c['text']}" for r in records for c in r["ctxs"]
    ]


def trained_tokenizers(texts: list[str]) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """A byte-level BPE generator tokenizer and a BERT WordPiece cross-encoder tokenizer (left
    padding, to check both sides), trained offline on ``texts``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    generator = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer()
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    wordpiece.post_processor = processors.BertProcessing(("[SEP]", wordpiece.token_to_id("[SEP]")), ("[CLS]", wordpiece.token_to_id("[CLS]")))
    reranker = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", padding_side="left",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    return generator, reranker


def tokenizers_for(kind: str, records: list[dict]) -> tuple:
    if kind == "word":  # what random:tiny models build from the records
        texts = texts_of(records)
        return build_word_tokenizer(texts, "decoder"), build_word_tokenizer(texts, "cross-encoder")
    if kind == "trained":
        return trained_tokenizers(texts_of(records))
    paths = [MODELS / "smollm2-135m-instruct", MODELS / "all-minilm-l6-v2"]  # grerank fetch-models
    if not all(p.is_dir() for p in paths):
        pytest.skip("real tokenizers not fetched (grerank fetch-models)")
    return tuple(AutoTokenizer.from_pretrained(p) for p in paths)


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert a.record_ids == b.record_ids
    assert a.reranker_inputs.keys() == b.reranker_inputs.keys()
    pairs = [(f"reranker_inputs.{k}", a.reranker_inputs[k], b.reranker_inputs[k]) for k in a.reranker_inputs]
    for field in dataclasses.fields(Batch):
        if isinstance(getattr(a, field.name), torch.Tensor):
            pairs.append((field.name, getattr(a, field.name), getattr(b, field.name)))
    for name, x, y in pairs:
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())), name


@pytest.mark.parametrize("kind", ["word", "trained", "cached"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_arrow_batches_equal_the_collator_on_the_same_records(tmp_path, kind, fmt):
    """Every field of every micro-step's Batch over two epochs (random answer choice, EOS, padded
    candidates, NaN scores), for the CEPE, FiD and decoder-only layouts and three kinds of tokenizer."""
    raw = varied_records()
    path = write_jsonl(tmp_path / "train.jsonl", raw)
    gen_tok, rr_tok = tokenizers_for(kind, raw)
    data = DataConfig(train_file=path, n_candidates=5, doc_max_tokens=9, answer_choice="random", answer_eos=True,
                      cache_dir=str(tmp_path / "cache"), tokenize_workers=1)
    collate = Collator(data, gen_tok, rr_tok, 24, seed=3, input_format=FORMATS[fmt])
    records, _, key = load_records(data)
    steps = StepBatches(load_tokens(records, key, collate, data), MicroBatchSchedule(len(raw), 4, 1, 0, seed=5), collate)
    in_memory, _ = read_records(path, data.n_candidates)
    for micro_step in range(2 * steps.schedule.steps_per_epoch):
        ids = steps.schedule.indices(micro_step)
        expected = collate([in_memory[i] for i in ids], ids, epoch=steps.schedule.epoch_of(micro_step))
        got = steps[micro_step]
        assert_same_batch(got, expected)
        # The reranker's pairs as the tokenizer pads them itself (evaluation's path).
        pairs, valid = reranker_pairs([in_memory[i] for i in ids], rr_tok, data, 24)
        assert pairs.keys() == got.reranker_inputs.keys() and torch.equal(valid, got.valid)
        assert all(torch.equal(pairs[k], got.reranker_inputs[k]) for k in pairs)


_real_encode = Collator.encode


def test_a_second_load_tokenises_nothing_and_new_tokenizers_or_templates_rebuild(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", varied_records())
    gen_tok, rr_tok = tokenizers_for("word", varied_records())
    data = DataConfig(train_file=path, n_candidates=5, cache_dir=str(tmp_path / "cache"), tokenize_workers=2)
    monkeypatch.setattr(arrow_data, "RECORDS_PER_TOKENIZE_WORKER", 1)  # a small file still gets both processes
    records, _, key = load_records(data)
    first = load_tokens(records, key, Collator(data, gen_tok, rr_tok, 24), data)
    assert len({Path(f["filename"]).name for f in first.cache_files if "tokens" in f["filename"]}) == 2  # two processes

    encodes = []  # rows tokenised in this process (tokenize_workers=1 from here on)
    monkeypatch.setattr(Collator, "encode", lambda self, rows: encodes.append(len(rows)) or _real_encode(self, rows))
    data = dataclasses.replace(data, tokenize_workers=1)
    monkeypatch.setattr(arrow_data, "iter_records", lambda *a, **k: pytest.fail("records read again"))
    again_records, _, again_key = load_records(data)
    again = load_tokens(again_records, again_key, Collator(data, gen_tok, rr_tok, 24), data)
    assert again_key == key and encodes == [] and len(again) == len(first)
    assert {f["filename"] for f in again.cache_files} == {f["filename"] for f in first.cache_files}

    other_gen = build_word_tokenizer(texts_of(varied_records()) + ["an extra word"], "decoder")
    load_tokens(records, key, Collator(data, other_gen, rr_tok, 24), data)
    assert sum(encodes) > len(records), "a tokenizer with another vocabulary must tokenise again"
    encodes.clear()
    templated = dataclasses.replace(data, passage_template="{text} ({title})")
    load_tokens(records, key, Collator(templated, gen_tok, rr_tok, 24), templated)
    assert sum(encodes) > len(records), "another passage template must tokenise again"
    cache_dirs = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len([d for d in cache_dirs if d.startswith("tokens-")]) == 3 and not [d for d in cache_dirs if d.startswith(".")]


def test_tokenizer_identity_follows_the_vocabulary_not_the_call_state():
    tok = build_word_tokenizer(["a b c"], "decoder")
    before = tokenizer_identity(tok)
    tok(["a b c"], truncation=True, max_length=2)  # leaves truncation state in the backend
    assert tokenizer_identity(tok) == before
    assert tokenizer_identity(build_word_tokenizer(["a b c"], "decoder")) == before
    assert tokenizer_identity(build_word_tokenizer(["a b d"], "decoder")) != before


def test_a_changed_file_is_read_again(tmp_path):
    path = Path(write_jsonl(tmp_path / "train.jsonl", varied_records()))
    data = DataConfig(train_file=str(path), n_candidates=5, cache_dir=str(tmp_path / "cache"))
    _, _, key = load_records(data)
    write_jsonl(path, varied_records()[:10])
    records, report, new_key = load_records(data)
    assert new_key != key and len(records) == report.kept == 10


BAD = {"question": "q", "ctxs": [{"title": "t", "text": "x"}]}  # no answers
GOOD = {"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}, {"title": "u", "text": "y"}]}


def write_format(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        write_jsonl(path, records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name, where", [("train.jsonl", ":2"), ("train.json", "[1]"), ("train.parquet", "[1]"), ("saved", "[1]")])
def test_every_format_reads_the_same_records_and_names_the_bad_one(tmp_path, name, where):
    """JSON lines name the line; a JSON list, Parquet and a saved dataset the record index."""
    data = DataConfig(n_candidates=5, cache_dir=str(tmp_path / "cache"))
    records = varied_records()
    source = write_format(tmp_path / name, records)
    loaded, report, _ = load_records(dataclasses.replace(data, train_file=str(source)))
    expected, _ = read_records(write_jsonl(tmp_path / "reference.jsonl", records), 5)
    assert report.kept == len(records)
    for got, want in zip(loaded, expected):
        assert {k: v for k, v in got.items() if k != "line"} == {k: v for k, v in want.items() if k != "line"}

    bad = write_format(tmp_path / f"bad_{name}", [GOOD, BAD, GOOD])
    with pytest.raises(RecordError, match="^" + re.escape(f"{bad}{where}: field 'answers': missing or empty")):
        load_records(dataclasses.replace(data, train_file=str(bad)))
    assert not list((tmp_path / "cache").glob(".*")), "a failed build leaves no temporary directory"
    skipping = dataclasses.replace(data, train_file=str(bad), skip_bad_records=True)
    kept, report, _ = load_records(skipping)
    assert len(kept) == report.kept == 2 and report.skipped == {"field 'answers'": 1}
    with pytest.raises(RecordError, match="field 'answers'"):  # the same cache, read without skipping
        load_records(dataclasses.replace(data, train_file=str(bad)))


def test_a_failed_build_leaves_no_cache_and_the_next_call_builds(tmp_path):
    target = tmp_path / "cache" / "entry"

    def killed(tmp: Path) -> None:
        (tmp / "half.arrow").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        arrow_data.cached(target, killed)
    assert not target.exists() and list((tmp_path / "cache").iterdir()) == []
    arrow_data.cached(target, lambda tmp: (tmp / "done").write_text("ok"))
    assert (target / "done").read_text() == "ok"


TWO_RANKS = """
import json, os, sys
import torch.distributed as dist
from grerank_dist.data import dataset
from grerank_dist.config import DataConfig
from grerank_dist.data.records import RecordError

dist.init_process_group("gloo")
rank = dist.get_rank()
def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
reads = []
inner = dataset.iter_records
dataset.iter_records = lambda *a, **k: reads.append(1) or inner(*a, **k)
out, good, bad = sys.argv[1:4]
report = {}
# One shared cache: rank 0 builds, rank 1 waits and maps the same file.
shared = DataConfig(train_file=good, n_candidates=5, cache_dir=f"{out}/shared")
records, _, key = dataset.load_records(shared, dataset.Ranks(rank, rank, gather))
report["shared"] = [len(reads), len(records), key]
# Node-local caches (rank 1 plays local rank 0 of a second node): each node builds its own.
reads.clear()
local = DataConfig(train_file=good, n_candidates=5, cache_dir=f"{out}/node{rank}")
records, _, _ = dataset.load_records(local, dataset.Ranks(rank, 0, gather))
report["node_local"] = [len(reads), len(records)]
# A bad file: rank 0's error is raised on both ranks.
try:
    dataset.load_records(DataConfig(train_file=bad, n_candidates=5, cache_dir=f"{out}/shared"), dataset.Ranks(rank, rank, gather))
except RecordError as exc:
    report["error"] = str(exc)
with open(f"{out}/rank{rank}.json", "w") as handle:
    json.dump(report, handle)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_ranks_build_once_and_share_the_cache(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", varied_records())
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, BAD])
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), good, bad]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["shared"][0] == 1 and rank1["shared"][0] == 0  # only rank 0 read the file
    assert rank0["shared"][1:] == rank1["shared"][1:] == [len(varied_records()), rank0["shared"][2]]
    assert rank0["node_local"] == rank1["node_local"] == [1, len(varied_records())]
    assert rank0["error"] == rank1["error"] == f"{bad}:2: field 'answers': missing or empty (a record needs a gold answer)"


def test_a_resumed_loader_gives_the_same_batches_from_its_step(tmp_path):
    """A loader started at micro-step 5 with two workers yields what an uninterrupted in-loop
    loader yields from step 5 on: batches are a pure function of the step."""
    raw = varied_records()
    gen_tok, rr_tok = tokenizers_for("word", raw)
    data = DataConfig(train_file=write_jsonl(tmp_path / "train.jsonl", raw), n_candidates=5, answer_choice="random",
                      cache_dir=str(tmp_path / "cache"), tokenize_workers=1)
    collate = Collator(data, gen_tok, rr_tok, 24, input_format=FORMATS["cepe"])
    records, _, key = load_records(data)
    steps = StepBatches(load_tokens(records, key, collate, data), MicroBatchSchedule(len(raw), 3, 2, 1, seed=0), collate)
    whole = list(step_loader(steps, 0, 12, num_workers=0, pin_memory=False))
    resumed = list(step_loader(steps, 5, 12, num_workers=2, pin_memory=False))
    assert len(resumed) == 7
    for a, b in zip(resumed, whole[5:]):
        assert_same_batch(a, b)
