"""Files and directories that appear complete or not at all.

Everything the package writes for later reuse (token caches, fetched models, exported rerankers,
metrics) is built under a temporary name beside its final place and renamed into place when
complete: a crash, a kill or a full disk never leaves a half-written result that a later run
would read. Checkpoints have their own multi-stage protocol (``DeepSpeedStrategy.save_checkpoint``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["STALE_AFTER_S", "build_directory", "file_hashes", "sha256_file", "write_text"]

# A temporary directory untouched this long was left by a killed build (a build that is still
# running writes into it); it is removed by the next build of the same target.
STALE_AFTER_S = 24 * 3600


def build_directory(
    target: Path, build: Callable[[Path], None], replace: bool = False, complete: Callable[[Path], bool] = Path.is_dir
) -> Path:
    """``target``, made by ``build(tmp)`` in a temporary directory beside it, then renamed.

    ``replace=False`` (a cache): when another process puts a ``complete`` target in place first,
    its copy is kept and ours discarded. ``replace=True`` (an export): an existing target is
    moved aside only once the new one is complete, then deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache or export from other users
        if replace and target.exists():
            aside = target.with_name(f".{target.name}.old")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(target, aside)
            os.replace(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if not complete(target):  # not another process finishing the same target first
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temporaries(target: Path) -> None:
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_marked_section(path: Path, start: str, end: str, section: str) -> None:
    """Put ``section`` (which begins with the ``start`` marker and ends with the ``end`` one) in
    place of the file's text between those markers, or append it; the rest of the file is kept
    (hand-written text beside a generated report). Written atomically."""
    existing = path.read_text() if path.is_file() else ""
    if start in existing and end in existing:
        before, rest = existing.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = existing + ("\n" if existing else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """The sha256 of every file under ``directory`` by relative path: the manifest a complete
    directory (a fetched model, a checkpoint) is later checked against."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}
