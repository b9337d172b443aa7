"""Training data in Arrow: checked records and their token ids, built once, memory-mapped by every rank.

Reading an NQ-sized file into Python dicts on every rank costs gigabytes per rank and minutes of
tokenisation in the training loop. Here the file is read and checked once (the same
:func:`grerank_dist.data.records.iter_records`, so errors still name the file, the line and the field)
into an Arrow file of records; once the tokenizers are known, ``datasets.map`` (several
processes) stores every record's token ids beside it. Both live in a cache directory named by a
fingerprint of what they depend on: a restart or a second run with the same file, tokenizers and
templates tokenises nothing. Arrow files are memory-mapped, so the ranks of a node share one copy
in the page cache. A micro-step's batch is then a few rows padded by :meth:`Collator.pad`, in
DataLoader workers ahead of the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from datasets import Features, List, Value
from datasets.arrow_writer import ArrowWriter

from grerank_dist.atomic import build_directory
from grerank_dist.config import DataConfig
from grerank_dist.data.collate import Collator, MicroBatchSchedule
from grerank_dist.data.records import ReadReport, RecordError, iter_records
from grerank_dist.interface import Batch

CACHE_ENV = "GRERANK_DATA_DIR"
RECORDS_FILE = "records.arrow"
# The columns of a record that the batches read beside the token ids (the answer choice).
ANSWER_COLUMNS = ["id", "line", "answers"]
RECORD_FEATURES = Features(
    {
        "id": Value("string"),
        "question": Value("string"),
        "answers": List(Value("string")),
        "type": Value("string"),
        "ctxs": List(
            {
                "id": Value("string"),
                "title": Value("string"),
                "text": Value("string"),
                "score": Value("float64"),
                "has_answer": Value("bool"),
                "is_supporting": Value("bool"),
            }
        ),
        "n_ctxs_in_file": Value("int64"),
        "reordered": Value("bool"),
        "line": Value("int64"),
    }
)
# The code that decides what the caches hold: a change to it gives new fingerprints.
CODE_VERSION = hashlib.sha256(
    b"".join((Path(__file__).parent / name).read_bytes() for name in ("records.py", "collate.py", "dataset.py"))
).hexdigest()[:16]


@dataclass
class Ranks:
    """This process's place among the ranks, and a collective every rank calls (``all_gather_object``)."""

    rank: int = 0
    local_rank: int = 0
    gather: Callable[[Any], list[Any]] = lambda obj: [obj]


def cache_root(data: DataConfig) -> Path:
    """``data.cache_dir``, else ``$GRERANK_DATA_DIR``, else ``~/.cache/grerank_dist/data``."""
    return Path(data.cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "grerank_dist" / "data")


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CODE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:20]


def source_identity(path: str | Path) -> list[Any]:
    """The data file (or a saved dataset directory's files) by absolute path, size and mtime."""
    path = Path(path).resolve()
    if not path.exists():
        raise RecordError(f"{path}: cannot open data file (No such file or directory)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def tokenizer_identity(tokenizer: Any) -> Any:
    """What decides a tokenizer's ids: its class, truncation side and full definition (a fast
    tokenizer's JSON without the padding/truncation state that calls leave behind, else the vocabulary)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        definition = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    return [type(tokenizer).__name__, tokenizer.truncation_side, digest]


def cached(target: Path, build: Callable[[Path], None], ranks: Ranks = Ranks()) -> Path:
    """``target``, made by ``build(tmp)`` in a temporary directory beside it and renamed into place
    when complete, so a killed build never leaves a cache that is reused. Global rank 0 builds
    (a shared file system then holds one copy), then local rank 0 of every node that still lacks
    it; the other ranks wait in the gather, and a failure is raised on every rank."""
    for builds in (ranks.rank == 0, ranks.local_rank == 0):
        error = None
        if builds and not target.is_dir():
            try:
                build_directory(target, build)
            except Exception as exc:  # re-raised below, after the other ranks have heard of it
                error = exc
        failures = [f for f in ranks.gather(None if error is None else (type(error).__name__, str(error))) if f]
        if error is not None:
            raise error
        if failures:
            name, message = failures[0]
            raise RecordError(message) if name == "RecordError" else RuntimeError(f"building {target} failed on another rank: {name}: {message}")
    return target


def load_records(data: DataConfig, ranks: Ranks = Ranks()) -> tuple[datasets.Dataset, ReadReport, str]:
    """The checked records of ``data.train_file`` as a memory-mapped Arrow dataset (built on the
    first call), the read report and the records' fingerprint. A cache built with
    ``skip_bad_records`` that skipped records raises the first one's error without it."""
    key = fingerprint(source_identity(data.train_file), data.n_candidates, data.candidate_order)

    def build(tmp: Path) -> None:
        report = ReadReport(data.train_file)
        writer = ArrowWriter(features=RECORD_FEATURES, path=str(tmp / RECORDS_FILE))
        try:
            for record in iter_records(data.train_file, data.n_candidates, report, data.skip_bad_records, data.candidate_order):
                writer.write(record)
            writer.finalize()
        finally:
            writer.close()
        if not report.kept:
            raise RecordError(f"{data.train_file}: no usable records ({report.summary()})")
        (tmp / "report.json").write_text(json.dumps({**vars(report), "skipped": dict(report.skipped)}))

    target = cached(cache_root(data) / f"records-{key}", build, ranks)
    saved = json.loads((target / "report.json").read_text())
    report = ReadReport(**{**saved, "skipped": Counter(saved["skipped"])})
    if report.skipped and not data.skip_bad_records:
        raise RecordError(report.first_error)
    return datasets.Dataset.from_file(str(target / RECORDS_FILE)), report, key


def candidate_counts(records: datasets.Dataset) -> list[int]:
    """Each record's number of candidates (without reading their texts)."""
    return pc.list_value_length(records.data.column("ctxs")).to_pylist()


def _id_type(tokenizer: Any) -> str:
    return "uint16" if len(tokenizer) <= 2**16 else "int32"


def _token_features(collator: Collator, names: list[str]) -> Features:
    gen_ids = Value(_id_type(collator.gen_tok))
    types = {
        "doc_ids": List(List(gen_ids)),
        "prompt_ids": List(gen_ids),
        "answer_ids": List(List(gen_ids)),
        "valid": List(Value("bool")),
        "relevant": List(Value("bool")),
        "retriever_scores": List(Value("float32")),
    }
    if collator.rr_tok is not None:
        types["rr_input_ids"] = List(List(Value(_id_type(collator.rr_tok))))
        types["rr_token_type_ids"] = List(List(Value("int8")))
    return Features({name: types[name] for name in names})


def _encode_rows(batch: dict[str, list[Any]], collator: Collator) -> dict[str, list[Any]]:
    return collator.encode([dict(zip(batch, row)) for row in zip(*batch.values())])


RECORDS_PER_TOKENIZE_WORKER = 2000  # fewer records per process and start-up outweighs the work


def load_tokens(
    records: datasets.Dataset, records_key: str, collator: Collator, data: DataConfig, ranks: Ranks = Ranks()
) -> datasets.Dataset:
    """``records`` with the collator's token ids and labels per record (:meth:`Collator.encode`),
    tokenised once by ``data.tokenize_workers`` processes and cached by a fingerprint of the
    records, both tokenizers, the input format and the lengths. Only :data:`ANSWER_COLUMNS` of
    the records are kept beside the ids (the text stays on disk)."""
    key = fingerprint(
        records_key,
        tokenizer_identity(collator.gen_tok),
        tokenizer_identity(collator.rr_tok),
        dataclasses.asdict(collator.format),
        data.doc_max_tokens,
        data.passage_template,
        collator.rr_max_length if collator.rr_tok is not None else None,
    )

    def build(tmp: Path) -> None:
        names = list(_encode_rows(records[:1], collator))
        # A worker process costs seconds to start: a small file is tokenised in this process.
        workers = min(data.tokenize_workers or len(os.sched_getaffinity(0)), -(-len(records) // RECORDS_PER_TOKENIZE_WORKER))
        tokens = records.map(
            _encode_rows,
            fn_kwargs={"collator": collator},
            batched=True,
            batch_size=64,
            num_proc=workers if workers > 1 else None,  # datasets runs even num_proc=1 in a subprocess
            remove_columns=records.column_names,
            features=_token_features(collator, names),
            cache_file_name=str(tmp / "tokens.arrow"),
            new_fingerprint=key,
            desc="tokenising the training set",
        )
        (tmp / "files.json").write_text(json.dumps([Path(f["filename"]).name for f in tokens.cache_files]))

    target = cached(cache_root(data) / f"tokens-{key}", build, ranks)
    files = json.loads((target / "files.json").read_text())
    tokens = datasets.concatenate_datasets([datasets.Dataset.from_file(str(target / name)) for name in files])
    return datasets.concatenate_datasets([records.select_columns(ANSWER_COLUMNS), tokens], axis=1)


class StepBatches(torch.utils.data.Dataset):
    """Micro-step -> this rank's :class:`Batch` (:class:`MicroBatchSchedule`'s records, padded),
    so DataLoader workers build the batches of the coming steps while the model runs."""

    def __init__(self, tokens: datasets.Dataset, schedule: MicroBatchSchedule, collator: Collator) -> None:
        self.tokens = tokens
        self.schedule = schedule
        self.collator = collator

    def __getitem__(self, micro_step: int) -> Batch:
        ids = self.schedule.indices(micro_step)
        rows = self.tokens[ids]
        epoch = self.schedule.epoch_of(micro_step)
        records = [dict(zip(ANSWER_COLUMNS, row)) for row in zip(*(rows[c] for c in ANSWER_COLUMNS))]
        answer_index = [self.collator.answer_index(r, epoch) for r in records]
        return self.collator.pad({k: v for k, v in rows.items() if k not in ANSWER_COLUMNS}, answer_index, ids)


def _as_is(batch: Batch) -> Batch:
    return batch


def step_loader(batches: StepBatches, first_micro_step: int, end_micro_step: int, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches of micro-steps ``first..end-1`` in order (a resumed run starts at its step), built
    by ``num_workers`` processes (0: in the loop), each two steps ahead."""
    return torch.utils.data.DataLoader(
        batches,
        sampler=range(first_micro_step, end_micro_step),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
    )
