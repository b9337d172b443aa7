"""Records: reading, validation and the retriever's candidate order.

Records follow the FiD/DPR convention (JSON lines, a JSON list, Parquet or a ``datasets``
directory: :func:`raw_records`): ``question``, ``answers`` (``answer`` and
FiD's ``target`` accepted), ``ctxs`` of ``{title, text}`` with optional ``id``, ``score``,
``has_answer`` (``hasanswer`` accepted) and ``is_supporting``. Every record is checked as it is
read; a bad one is an error naming the file, the line (record index) and the field (or, when the user asks,
skipped and counted). When every ctx of a record has a ``score`` the ctxs are first ordered by
it, descending, ties in file order (as FiD does: the retriever's ranking, whatever order the
file is written in); ``candidate_order="file"`` keeps the file's order. The first
``n_candidates`` ctxs are then kept; shorter lists are padded with invalid candidates that the
relaxation never selects. The candidates' order is the retriever's ranking from then on: the
evaluation's "retriever" baseline and the tie-break of every top-k.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grerank_dist.config import CANDIDATE_ORDERS
from grerank_dist.method.metrics import retriever_order


class RecordError(ValueError):
    """A record that cannot be used: the message names the file, the line and the field."""


@dataclass
class ReadReport:
    """What reading a file kept and skipped (skips only when skip_bad_records is on)."""

    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0  # records with more ctxs than n_candidates
    padded: int = 0  # records with fewer
    reordered: int = 0  # records whose ctxs were not in score order in the file
    first_error: str = ""  # the first skipped record's message

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
        return (
            f"{self.path}: kept {self.kept} records (skipped: {skipped}; "
            f"{self.truncated} truncated to n_candidates, {self.padded} padded, {self.reordered} reordered by score)"
        )


def _as_bool(value: Any, where: str) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RecordError(f"{where}: expected a boolean, got {value!r}")


def _as_score(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        score = float(value)  # DPR writes scores as strings
    except (TypeError, ValueError):
        raise RecordError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(score):
        raise RecordError(f"{where}: score must be finite, got {value!r}")
    return score


def _ranked_positions(ctxs: list[Any], where: str, candidate_order: str) -> list[int]:
    """File positions of the ctxs in retriever order (:func:`metrics.retriever_order`: by
    descending ``score`` when every ctx has one), or file order when ``candidate_order`` is "file"."""
    if candidate_order == "file":
        return list(range(len(ctxs)))
    scores = [
        _as_score(ctx.get("score"), f"{where}: field 'ctxs[{i}].score'") if isinstance(ctx, dict) else None
        for i, ctx in enumerate(ctxs)
    ]
    return retriever_order(scores)


def normalize_record(raw: Any, where: str, n_candidates: int, candidate_order: str = "score") -> dict[str, Any]:
    """Check one parsed record and return it in canonical form (``where`` = "file:line"), its
    candidates in retriever order (see the module docstring) cut to ``n_candidates``."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f"{where}: field 'question': missing or not a non-empty string")
    answers = raw.get("answers", raw.get("answer", raw.get("target")))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise RecordError(f"{where}: field 'answers': missing or empty (a record needs a gold answer)")
    for j, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise RecordError(f"{where}: field 'answers[{j}]': expected a non-empty string, got {answer!r}")
    ctxs = raw.get("ctxs")
    if not isinstance(ctxs, list):
        raise RecordError(f"{where}: field 'ctxs': missing or not a list")
    if not ctxs:
        raise RecordError(f"{where}: field 'ctxs': empty (a record needs at least one candidate)")
    positions = _ranked_positions(ctxs, where, candidate_order)
    candidates = []
    for i in positions[:n_candidates]:  # i: the position in the file, for messages and default ids
        ctx = ctxs[i]
        at = f"{where}: field 'ctxs[{i}]"
        if not isinstance(ctx, dict):
            raise RecordError(f"{at}': expected an object, got {type(ctx).__name__}")
        text = ctx.get("text")
        if not isinstance(text, str):
            raise RecordError(f"{at}.text': missing or not a string")
        title = ctx.get("title", "")
        if not isinstance(title, str):
            raise RecordError(f"{at}.title': expected a string, got {title!r}")
        has_answer = ctx.get("has_answer", ctx.get("hasanswer"))
        candidates.append(
            {
                "id": str(ctx.get("id", i)),
                "title": title,
                "text": text,
                "score": _as_score(ctx.get("score"), f"{at}.score'"),
                "has_answer": _as_bool(has_answer, f"{at}.has_answer'"),
                "is_supporting": _as_bool(ctx.get("is_supporting"), f"{at}.is_supporting'"),
            }
        )
    return {
        "id": str(raw.get("id", raw.get("_id", ""))),
        "question": question,
        "answers": answers,
        "type": str(raw.get("type", "")),
        "ctxs": candidates,
        "n_ctxs_in_file": len(ctxs),
        "reordered": positions != sorted(positions),
    }


def _without_nulls(value: Any) -> Any:
    """An Arrow row as JSON would give it: a null field is an absent one (Parquet and Arrow
    store every column for every row, so a missing key reads back as None)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _arrow_batches(path: Path) -> Iterator[Any]:
    """The record batches of a Parquet file or of a directory written by ``datasets.save_to_disk``."""
    if path.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise RecordError(f"{path}: not a directory written by datasets.save_to_disk ({exc})") from None
        if isinstance(dataset, datasets.DatasetDict):
            raise RecordError(f"{path}: holds several splits ({', '.join(dataset)}); give the directory of one")
        yield from dataset.with_format("arrow").iter(batch_size=1000)
    else:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except OSError as exc:
            raise RecordError(f"{path}: cannot open data file ({exc})") from exc
        yield from parquet.iter_batches(batch_size=1000)


def raw_records(path: str | Path) -> Iterator[tuple[str, int, Any]]:
    """``(where, position, record)`` for every record of a training or evaluation file, unchecked.

    JSON lines (``where`` = "file:line", position = the line), a ``.json`` list, a ``.parquet``
    file or a ``datasets.save_to_disk`` directory (``where`` = "file[i]", position = i). A JSON
    line that does not parse comes as a :class:`RecordError` in place of the record, so the
    caller can skip it like any other bad record.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        position = 0
        for batch in _arrow_batches(path):
            for raw in batch.to_pylist():
                yield f"{path}[{position}]", position, _without_nulls(raw)
                position += 1
        return
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise RecordError(f"{path}: cannot open data file ({exc.strerror})") from exc
    with handle:
        if path.suffix == ".json":
            try:
                records = json.load(handle)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(records, list):
                raise RecordError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
            for position, raw in enumerate(records):
                yield f"{path}[{position}]", position, raw
            return
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raw = RecordError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            yield where, line_no, raw


def iter_records(
    path: str | Path, n_candidates: int, report: ReadReport, skip_bad: bool = False, candidate_order: str = "score"
) -> Iterator[dict[str, Any]]:
    """Check and normalise every record of ``path`` (see :func:`raw_records` for the formats),
    counting in ``report``; with ``skip_bad`` bad records are counted, not raised. The first
    bad record's message is kept in ``report.first_error``."""
    if candidate_order not in CANDIDATE_ORDERS:
        raise ValueError(f"candidate_order must be one of {CANDIDATE_ORDERS}, got {candidate_order!r}")
    for where, position, raw in raw_records(path):
        try:
            if isinstance(raw, RecordError):
                raise raw
            record = normalize_record(raw, where, n_candidates, candidate_order)
        except RecordError as exc:
            if not skip_bad:
                raise
            report.first_error = report.first_error or str(exc)
            report.skipped[str(exc)[len(where) + 2 :].split(":")[0]] += 1
            continue
        record["line"] = position
        report.kept += 1
        report.truncated += record["n_ctxs_in_file"] > n_candidates
        report.padded += record["n_ctxs_in_file"] < n_candidates
        report.reordered += record["reordered"]
        yield record


def read_records(
    path: str | Path, n_candidates: int, skip_bad: bool = False, candidate_order: str = "score"
) -> tuple[list[dict[str, Any]], ReadReport]:
    """Read and check a data file into memory (:func:`iter_records`); ``candidate_order`` is
    ``data.candidate_order`` (see the module docstring). Training reads through
    :mod:`grerank_dist.data.dataset` instead, which keeps the records in Arrow."""
    report = ReadReport(str(path))
    records = list(iter_records(path, n_candidates, report, skip_bad, candidate_order))
    if not records:
        raise RecordError(f"{path}: no usable records ({report.summary()})")
    return records, report


def training_answer(record: dict[str, Any], choice: str, seed: int, epoch: int) -> str:
    """The gold answer used as the training target (``first``, ``shortest`` or seeded ``random``)."""
    answers = record["answers"]
    if choice == "first":
        return answers[0]
    if choice == "shortest":
        return min(answers, key=len)
    rng = random.Random(f"{seed}:{epoch}:{record['id']}:{record.get('line', 0)}")
    return rng.choice(answers)
