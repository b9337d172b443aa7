"""Converters from the public QA dataset formats to the project's JSON-lines records.

Each output line is ``{"id", "question", "answers", "ctxs", "type"?}`` with ctxs
``{"id", "title", "text", "score"?, "has_answer", "is_supporting"?}`` (canonical names only).

- ``nq`` / ``tqa``: DPR retriever output or FiD's files (a JSON array, or JSON lines, of
  ``{id?, question, answers | answer | target, ctxs: [{id, title, text, score, has_answer |
  hasanswer}]}``). The ctxs are ordered by descending score, ties in file order, when every
  ctx has one (DPR writes them so; FiD sorts by score when it reads, so its files need not be
  sorted), else kept in file order; the first ``n`` are kept (a string score is parsed; a
  missing ``has_answer`` is computed from the passage text, :func:`metrics.has_answer`).
- ``hotpotqa`` / ``2wikimultihopqa`` (distractor setting; 2Wiki adds ``evidences`` and
  ``entity_ids``, which are not needed): the paragraphs become ctxs, ``is_supporting`` from the
  titles of ``supporting_facts``, ``type`` kept.
- ``musique``: ``answers = [answer] + answer_aliases``; unanswerable questions are dropped; the
  ``type`` is the id's hop prefix (``2hop``, ``3hop1``, ...).

Multi-hop records are brought to exactly ``n`` candidates as the paper does: padded with
random paragraphs of OTHER questions of the same file (never one whose title is already among
the question's own paragraphs, so a padding paragraph cannot be an unlabelled gold one), or,
when there are more paragraphs than ``n``, trimmed to every supporting paragraph plus the first
non-supporting ones. These sets have no retriever order, so the candidates are then shuffled
(seeded per record) and a candidate's position carries no hint of its label.

Malformed input (a missing field, a wrong type, invalid JSON) is an error naming the file, the
line, the record (0-based position in the file) and the field, or, with ``skip_bad``, a counted
skip. Records that are well-formed but unusable (unanswerable, no supporting paragraph, no
candidates, no answer left after normalisation) are always dropped and counted. The output is
written to a temporary file and moved into place only when the whole conversion succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from grerank_dist.method.metrics import answer_finder, has_answer, normalize_answer, retriever_order

_READ_CHUNK = 1 << 20
_MAX_RECORD_CHARS = 256 << 20  # a pending array element larger than this is treated as broken JSON
_LIST_INDEX = re.compile(r"\[\d+\]")
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


class ConversionError(ValueError):
    """A conversion that cannot proceed; nothing was written to the destination."""


@dataclass(frozen=True)
class Location:
    """Where a record starts: file, 1-based line, 0-based position among the file's records."""

    path: str
    line: int
    record: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} (record {self.record})"


class FormatError(ConversionError):
    """Malformed input; the message names the file, line, record and field."""

    def __init__(self, where: Location, field_path: str | None, problem: str, reason: str | None = None) -> None:
        self.where = where
        self.field_path = field_path
        if reason is None:
            # One reason per field whatever the list position (ctxs[3].score -> ctxs[].score).
            reason = f"malformed field '{_LIST_INDEX.sub('[]', field_path)}'" if field_path else "malformed record"
        self.reason = reason
        subject = f"field '{field_path}': " if field_path else ""
        super().__init__(f"{where}: {subject}{problem}")


class _Unusable(Exception):
    """A well-formed record the project cannot use; always dropped and counted by reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ConversionReport:
    """What a conversion read, wrote, dropped (by reason) and adjusted."""

    format: str
    source: str
    destination: str
    n: int
    seed: int
    read: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_dropped_at: dict[str, str] = field(default_factory=dict)
    adjustments: Counter = field(default_factory=Counter)

    def drop(self, reason: str, where: Location | str) -> None:
        self.dropped[reason] += 1
        self.first_dropped_at.setdefault(reason, str(where))

    def summary(self) -> str:
        lines = [
            f"{self.format}: {self.source} -> {self.destination}",
            f"  read {self.read} records, wrote {self.written} (n = {self.n} candidates, seed {self.seed})",
        ]
        lines.append(f"  dropped {sum(self.dropped.values())}" + (":" if self.dropped else ""))
        for reason, count in self.dropped.most_common():
            lines.append(f"    {count:>8}  {reason} (first at {self.first_dropped_at[reason]})")
        if self.adjustments:
            lines.append("  adjusted:")
            lines.extend(f"    {count:>8}  {what}" for what, count in self.adjustments.most_common())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "source": self.source,
            "destination": self.destination,
            "n": self.n,
            "seed": self.seed,
            "read": self.read,
            "written": self.written,
            "dropped": dict(self.dropped),
            "first_dropped_at": dict(self.first_dropped_at),
            "adjustments": dict(self.adjustments),
        }


# --------------------------------------------------------------------------- reading


def _iter_json_records(path: Path) -> Iterator[tuple[Location, Any]]:
    """(location, parsed value) of each record of a JSON array or JSON-lines file.

    An invalid JSON line is yielded as a :class:`FormatError` value so that it can be skipped;
    invalid JSON inside an array is raised, since the rest of the array cannot be resynchronised.
    """
    with path.open(encoding="utf-8-sig") as handle:
        head = handle.read(_READ_CHUNK)
        first = head.lstrip()[:1]
        if not first:
            raise FormatError(Location(str(path), 1, 0), None, "the file is empty")
        if first == "[":
            yield from _iter_json_array(handle, head, str(path))
        elif first == "{":
            yield from _iter_json_lines(_chain_lines(head, handle), str(path))
        else:
            line = head[: head.index(first)].count("\n") + 1
            raise FormatError(
                Location(str(path), line, 0), None, f"expected a JSON array or JSON lines, found {first!r}"
            )


def _chain_lines(head: str, handle: IO[str]) -> Iterator[str]:
    """The lines of a file of which ``head`` was already read (completed to a line end)."""
    pieces = (head + handle.readline()).split("\n")
    yield from pieces[:-1]
    if pieces[-1]:  # the file's last line, without a newline
        yield pieces[-1]
    yield from handle


def _iter_json_lines(lines: Iterable[str], path: str) -> Iterator[tuple[Location, Any]]:
    record = 0
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = Location(path, line_number, record)
        record += 1
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, FormatError(where, None, f"invalid JSON ({exc.msg} at column {exc.colno})", "invalid JSON")


def _iter_json_array(handle: IO[str], head: str, path: str) -> Iterator[tuple[Location, Any]]:
    """Stream the elements of a JSON array, holding about one element in memory at a time.

    DPR's top-100 retrieval files are JSON arrays of several GB; ``json.load`` would need many
    times that. Elements are decoded one by one with ``raw_decode``, reading more text when an
    element is cut at the end of the buffer.
    """
    decoder = json.JSONDecoder()
    buffer, pos, line, eof = head, 0, 1, False

    def refill() -> None:
        nonlocal buffer, pos, eof
        chunk = handle.read(max(_READ_CHUNK, len(buffer) - pos))  # doubles for large elements
        eof = not chunk
        buffer, pos = buffer[pos:] + chunk, 0

    def skip_whitespace() -> str:
        """Advance past whitespace (counting lines); return the next character, '' at the end."""
        nonlocal pos, line
        while True:
            after = _JSON_WHITESPACE.match(buffer, pos).end()
            line += buffer.count("\n", pos, after)
            pos = after
            if pos < len(buffer) or eof:
                return buffer[pos : pos + 1]
            refill()

    skip_whitespace()
    pos += 1  # the opening '['
    record = 0
    if skip_whitespace() == "]":
        pos += 1
    else:
        while True:
            where = Location(path, line, record)
            while True:
                try:
                    value, end = decoder.raw_decode(buffer, pos)
                    complete = end < len(buffer) or eof
                except json.JSONDecodeError as exc:
                    cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(buffer) - 16
                    if eof or not cut or len(buffer) - pos > _MAX_RECORD_CHARS:
                        error_line = line + buffer.count("\n", pos, exc.pos)
                        raise FormatError(
                            Location(path, error_line, record), None, f"invalid JSON in the array ({exc.msg})"
                        ) from None
                    complete = False
                if complete:
                    break
                refill()
            line += buffer.count("\n", pos, end)
            pos = end
            yield where, value
            record += 1
            separator = skip_whitespace()
            pos += 1
            if separator == "]":
                break
            if separator != "," or skip_whitespace() == "]":
                problem = f"invalid JSON in the array (expected ',' or ']', got {separator!r})"
                raise FormatError(Location(path, line, record), None, problem)
    if skip_whitespace():
        raise FormatError(Location(path, line, record), None, "unexpected text after the end of the JSON array")


# --------------------------------------------------------------------------- field checks


def _object(raw: Any, where: Location, field_path: str | None = None) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise FormatError(where, field_path, f"expected a JSON object, got {type(raw).__name__}")
    return raw


def _string(obj: Mapping[str, Any], key: str, where: Location, field_path: str, *, non_empty: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        raise FormatError(where, field_path, "missing")
    if not isinstance(value, str):
        raise FormatError(where, field_path, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if non_empty and not value.strip():
        raise FormatError(where, field_path, "empty string")
    return value


def _list(obj: Mapping[str, Any], key: str, where: Location, field_path: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        raise FormatError(where, field_path, "missing")
    if not isinstance(value, list):
        raise FormatError(where, field_path, f"expected a list, got {type(value).__name__}")
    return value


def _string_list(values: list[Any], where: Location, field_path: str) -> list[str]:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            problem = f"expected a string, got {type(value).__name__} {value!r:.60}"
            raise FormatError(where, f"{field_path}[{i}]", problem)
    return values


def _flag(value: Any, where: Location, field_path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise FormatError(where, field_path, f"expected true/false, got {value!r:.60}")


def _score(value: Any, where: Location, field_path: str) -> float:
    if isinstance(value, bool):
        raise FormatError(where, field_path, f"expected a number, got {value!r}")
    try:
        score = float(value)  # DPR writes scores as strings
    except (TypeError, ValueError):
        raise FormatError(where, field_path, f"expected a number, got {value!r:.60}") from None
    if score != score or score in (float("inf"), float("-inf")):
        raise FormatError(where, field_path, f"score must be finite, got {value!r}")
    return score


def _usable_answers(answers: list[str], report: ConversionReport) -> list[str]:
    """Distinct answers that survive normalisation (an empty one would match any text)."""
    kept = [a for i, a in enumerate(answers) if normalize_answer(a) and a not in answers[:i]]
    if not kept:
        raise _Unusable("no answer left after normalisation")
    if len(kept) < len(answers):
        report.adjustments["duplicate or empty answers removed"] += 1
    return kept


# --------------------------------------------------------------------------- NQ / TQA (DPR, FiD)


def _retrieval_answers(obj: Mapping[str, Any], where: Location) -> list[str]:
    for key in ("answers", "answer"):
        if obj.get(key) is not None:
            value = obj[key]
            answers = [value] if isinstance(value, str) else value
            if not isinstance(answers, list) or not answers:
                raise FormatError(where, key, "expected a non-empty list of strings")
            return _string_list(answers, where, key)
    if obj.get("target") is not None:
        return [_string(obj, "target", where, "target")]
    raise FormatError(where, "answers", "missing (neither 'answers', 'answer' nor 'target' is present)")


def _retrieval_ctx(
    raw: Any, where: Location, position: int, answers: list[str], report: ConversionReport
) -> dict[str, Any]:
    at = f"ctxs[{position}]"
    ctx = _object(raw, where, at)
    ctx_id = ctx.get("id", position)
    if isinstance(ctx_id, bool) or not isinstance(ctx_id, (str, int)):
        raise FormatError(where, f"{at}.id", f"expected a string or integer, got {ctx_id!r:.60}")
    text = _string(ctx, "text", where, f"{at}.text", non_empty=False)
    title = _string(ctx, "title", where, f"{at}.title", non_empty=False)
    out: dict[str, Any] = {"id": str(ctx_id), "title": title, "text": text}
    if ctx.get("score") is not None:
        out["score"] = _score(ctx["score"], where, f"{at}.score")
    label_key = "has_answer" if ctx.get("has_answer") is not None else "hasanswer"
    if ctx.get(label_key) is None:
        report.adjustments["has_answer computed from the text"] += 1
        out["has_answer"] = has_answer(out, answers)
    else:
        out["has_answer"] = _flag(ctx[label_key], where, f"{at}.{label_key}")
    return out


def _parse_retrieval(raw: Any, where: Location, n: int, report: ConversionReport) -> dict[str, Any]:
    obj = _object(raw, where)
    question = _string(obj, "question", where, "question")
    answers = _retrieval_answers(obj, where)
    ctxs = _list(obj, "ctxs", where, "ctxs")
    if not ctxs:
        raise _Unusable("no ctxs")
    record_id = obj.get("id", where.record)
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise FormatError(where, "id", f"expected a string or integer, got {record_id!r:.60}")
    answers = _usable_answers(answers, report)
    scores = [
        _score(c["score"], where, f"ctxs[{i}].score") if isinstance(c, dict) and c.get("score") is not None else None
        for i, c in enumerate(ctxs)
    ]
    order = retriever_order(scores)
    if order != sorted(order):
        report.adjustments["ctxs ordered by score"] += 1
    if len(ctxs) > n:
        report.adjustments[f"ctxs cut to the first {n}"] += 1
    elif len(ctxs) < n:
        report.adjustments[f"fewer than {n} ctxs (kept as they are)"] += 1
    return {
        "id": str(record_id),
        "question": question,
        "answers": answers,
        # Only the kept ctxs are checked (scores aside): a flaw in candidate 80 of 100 must not
        # stop a top-20 run.
        "ctxs": [_retrieval_ctx(ctxs[i], where, i, answers, report) for i in order[:n]],
    }


# --------------------------------------------------------------------------- multi-hop sets


@dataclass
class _MultiHopQuestion:
    """A parsed multi-hop question before padding: paragraphs as (title, text, is_supporting)."""

    where: Location
    id: str
    question: str
    answers: list[str]
    type: str | None
    paragraphs: list[tuple[str, str, bool]]


def _parse_hotpot_style(raw: Any, where: Location, n: int, report: ConversionReport) -> _MultiHopQuestion:
    """HotpotQA distractor and 2WikiMultiHopQA (the same layout; 2Wiki's extra fields unused)."""
    obj = _object(raw, where)
    record_id = _string(obj, "_id", where, "_id")
    question = _string(obj, "question", where, "question")
    answer = _string(obj, "answer", where, "answer")
    paragraphs = []
    for i, entry in enumerate(_list(obj, "context", where, "context")):
        is_pair = isinstance(entry, list) and len(entry) == 2
        if not (is_pair and isinstance(entry[0], str) and isinstance(entry[1], list)):
            raise FormatError(where, f"context[{i}]", f"expected [title, [sentences]], got {entry!r:.80}")
        sentences = _string_list(entry[1], where, f"context[{i}][1]")
        paragraphs.append((entry[0], " ".join(s.strip() for s in sentences if s.strip())))
    supporting_titles = set()
    for i, fact in enumerate(_list(obj, "supporting_facts", where, "supporting_facts")):
        if not (
            isinstance(fact, list) and len(fact) == 2 and isinstance(fact[0], str)
            and isinstance(fact[1], int) and not isinstance(fact[1], bool)
        ):
            raise FormatError(where, f"supporting_facts[{i}]", f"expected [title, sentence index], got {fact!r:.80}")
        supporting_titles.add(fact[0])
    question_type = obj.get("type")
    if question_type is not None and not isinstance(question_type, str):
        raise FormatError(where, "type", f"expected a string, got {question_type!r:.60}")
    if not supporting_titles:
        raise _Unusable("no supporting paragraph")
    if not supporting_titles <= {title for title, _ in paragraphs}:
        raise _Unusable("a supporting title is not among the context paragraphs")
    return _MultiHopQuestion(
        where=where,
        id=record_id,
        question=question,
        answers=_usable_answers([answer], report),
        type=question_type or None,
        paragraphs=[(title, text, title in supporting_titles) for title, text in paragraphs],
    )


def _parse_musique(raw: Any, where: Location, n: int, report: ConversionReport) -> _MultiHopQuestion:
    obj = _object(raw, where)
    record_id = _string(obj, "id", where, "id")
    question = _string(obj, "question", where, "question")
    answerable = _flag(obj.get("answerable", True), where, "answerable")
    answer = _string(obj, "answer", where, "answer", non_empty=answerable)
    aliases = _string_list(obj.get("answer_aliases") or [], where, "answer_aliases")
    paragraphs = []
    for i, entry in enumerate(_list(obj, "paragraphs", where, "paragraphs")):
        at = f"paragraphs[{i}]"
        paragraph = _object(entry, where, at)
        paragraphs.append(
            (
                _string(paragraph, "title", where, f"{at}.title", non_empty=False),
                _string(paragraph, "paragraph_text", where, f"{at}.paragraph_text", non_empty=False),
                _flag(paragraph.get("is_supporting"), where, f"{at}.is_supporting"),
            )
        )
    if not answerable:
        raise _Unusable("unanswerable")
    if not any(supporting for _, _, supporting in paragraphs):
        raise _Unusable("no supporting paragraph")
    hops, separator, _ = record_id.partition("__")
    return _MultiHopQuestion(
        where=where,
        id=record_id,
        question=question,
        answers=_usable_answers([answer, *aliases], report),
        type=hops if separator else None,
        paragraphs=paragraphs,
    )


def _sample_padding(
    pool: list[tuple[int, int, str]], own: int, own_titles: set[str], count: int, rng: random.Random
) -> list[tuple[int, int]]:
    """``count`` distinct pool paragraphs of other questions with titles new to this question.

    ``pool`` holds (question, paragraph, case-folded title). Rejection sampling keeps this
    O(count) per question on a pool of a million paragraphs; a small pool (tests, tiny files)
    falls back to a full scan.
    """
    taken_titles = set(own_titles)
    picked: list[tuple[int, int]] = []
    tried: set[int] = set()

    def take(slot: int) -> None:
        tried.add(slot)
        question, paragraph, title = pool[slot]
        if question != own and title not in taken_titles:
            picked.append((question, paragraph))
            taken_titles.add(title)

    for _ in range(20 * count + 100):
        if len(picked) == count:
            return picked
        slot = rng.randrange(len(pool))
        if slot not in tried:
            take(slot)
    remaining = [slot for slot in range(len(pool)) if slot not in tried]
    rng.shuffle(remaining)
    for slot in remaining:
        if len(picked) == count:
            break
        take(slot)
    return picked


def _assemble_multihop(
    parsed: Iterable[_MultiHopQuestion], n: int, seed: int, report: ConversionReport
) -> Iterator[dict[str, Any]]:
    """Bring every question to ``n`` candidates (trim or pad), shuffle, label has_answer."""
    questions = list(parsed)  # padding draws from the whole file
    pool = [
        (q, p, title.casefold())
        for q, question in enumerate(questions)
        for p, (title, _, _) in enumerate(question.paragraphs)
    ]
    for position, question in enumerate(questions):
        supporting = [p for p, (_, _, gold) in enumerate(question.paragraphs) if gold]
        if len(supporting) > n:
            report.drop(f"more supporting paragraphs than n = {n}", question.where)
            continue
        others = [p for p, (_, _, gold) in enumerate(question.paragraphs) if not gold]
        chosen = sorted(supporting + others[: n - len(supporting)])
        rng = random.Random(f"{seed}:{question.where.record}")
        if len(chosen) < len(question.paragraphs):
            report.adjustments[f"paragraphs trimmed to {n}"] += 1
        picks = [(position, p) for p in chosen]
        if len(picks) < n:
            own_titles = {title.casefold() for title, _, _ in question.paragraphs}
            picks += _sample_padding(pool, position, own_titles, n - len(picks), rng)
            report.adjustments["padded with paragraphs of other questions"] += 1
            if len(picks) < n:
                report.adjustments[f"fewer than {n} candidates (too few paragraphs to pad from)"] += 1
        rng.shuffle(picks)
        contains_answer = answer_finder(question.answers)
        ctxs = []
        for source, p in picks:
            title, text, gold = questions[source].paragraphs[p]
            ctxs.append(
                {
                    "id": f"{questions[source].id}/{p}",
                    "title": title,
                    "text": text,
                    "has_answer": contains_answer({"title": title, "text": text}),
                    "is_supporting": gold and source == position,
                }
            )
        record: dict[str, Any] = {
            "id": question.id, "question": question.question, "answers": question.answers, "ctxs": ctxs
        }
        if question.type:
            record["type"] = question.type
        yield record


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class _Format:
    parse: Callable[[Any, Location, int, ConversionReport], Any]
    assemble: Callable[[Iterable[Any], int, int, ConversionReport], Iterable[dict[str, Any]]]
    help: str


def _as_parsed(
    parsed: Iterable[dict[str, Any]], n: int, seed: int, report: ConversionReport
) -> Iterable[dict[str, Any]]:
    """NQ/TQA records need no second pass: they stream to the output as they are parsed."""
    return parsed


FORMATS: dict[str, _Format] = {
    "nq": _Format(_parse_retrieval, _as_parsed, "Natural Questions, DPR/FiD retrieval file (top-k ctxs)"),
    "tqa": _Format(_parse_retrieval, _as_parsed, "TriviaQA, DPR/FiD retrieval file (top-k ctxs)"),
    "hotpotqa": _Format(_parse_hotpot_style, _assemble_multihop, "HotpotQA distractor setting (JSON array)"),
    "2wikimultihopqa": _Format(_parse_hotpot_style, _assemble_multihop, "2WikiMultiHopQA (HotpotQA layout)"),
    "musique": _Format(_parse_musique, _assemble_multihop, "MuSiQue (JSON lines)"),
}


def _parsed_records(
    src: Path, fmt: _Format, n: int, skip_bad: bool, report: ConversionReport
) -> Iterator[Any]:
    for where, raw in _iter_json_records(src):
        report.read += 1
        try:
            if isinstance(raw, FormatError):
                raise raw
            parsed = fmt.parse(raw, where, n, report)
        except FormatError as exc:
            if not skip_bad:
                raise
            report.drop(exc.reason, where)
            continue
        except _Unusable as exc:
            report.drop(exc.reason, where)
            continue
        yield parsed


class _NothingToWrite(Exception):
    """Every record was dropped: the destination is left as it was."""


def _write_jsonl_atomically(dst: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records to a temporary file beside ``dst`` and rename it over ``dst`` at the end.

    A failure at any point removes the temporary file and leaves ``dst`` as it was.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        written = 0
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            out.flush()
            os.fsync(out.fileno())
        if written == 0:
            raise _NothingToWrite
        os.chmod(tmp_name, dst.stat().st_mode & 0o777 if dst.exists() else 0o644)
        os.replace(tmp_name, dst)
        return written
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def convert(
    fmt: str, src: str | Path, dst: str | Path, n: int = 20, seed: int = 0, skip_bad: bool = False
) -> ConversionReport:
    """Convert ``src`` (public format ``fmt``) into project records at ``dst`` (JSON lines).

    ``n`` candidates per question (first n for NQ/TQA; trimmed or padded for multi-hop sets),
    ``seed`` for the padding draws and shuffles, ``skip_bad`` to count malformed records instead
    of stopping at the first. Raises :class:`FormatError` / :class:`ConversionError`; the
    destination is then untouched.
    """
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(sorted(FORMATS))}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConversionError(f"n (candidates per question) must be a positive integer, got {n!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConversionError(f"{dst}: the output would overwrite the input file")
    report = ConversionReport(format=fmt, source=str(src), destination=str(dst), n=n, seed=seed)
    spec = FORMATS[fmt]
    records = spec.assemble(_parsed_records(src, spec, n, skip_bad, report), n, seed, report)
    try:
        report.written = _write_jsonl_atomically(dst, records)
    except _NothingToWrite:
        raise ConversionError(f"{src}: no usable records, nothing written\n{report.summary()}") from None
    return report


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``grerank prepare FORMAT --input SRC --output DST``."""
    parser.description = "Convert a public QA dataset file into the project's JSON-lines records."
    parser.add_argument(
        "format",
        choices=sorted(FORMATS),
        help="; ".join(f"{name}: {spec.help}" for name, spec in FORMATS.items()),
    )
    parser.add_argument("--input", required=True, type=Path, help="the public file (JSON array or JSON lines)")
    parser.add_argument("--output", required=True, type=Path, help="the JSON-lines file to write (replaced atomically)")
    parser.add_argument("--n", type=_positive_int, default=20, help="candidates per question (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the multi-hop padding and shuffles (default 0)")
    parser.add_argument(
        "--skip-bad", action="store_true", help="count and skip malformed records instead of stopping at the first"
    )


def run(args: argparse.Namespace) -> int:
    """Run one conversion and print its report; 0 on success, 1 with the error on stderr."""
    try:
        report = convert(args.format, args.input, args.output, n=args.n, seed=args.seed, skip_bad=args.skip_bad)
    except (ConversionError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grerank_dist.data.prepare")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
