"""Directories and files that appear complete or not at all (grerank_dist.atomic)."""

from __future__ import annotations

import os
import time

import pytest

from grerank_dist.atomic import STALE_AFTER_S, build_directory, write_text


def test_a_failed_build_leaves_nothing_and_an_existing_export_untouched(tmp_path):
    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_directory(tmp_path / "cache", broken)
    assert list(tmp_path.iterdir()) == []

    build_directory(tmp_path / "export", lambda tmp: (tmp / "v").write_text("1"))
    with pytest.raises(OSError, match="disk full"):
        build_directory(tmp_path / "export", broken, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (tmp_path / "export" / "v").read_text() == "1"


def test_replace_swaps_an_export_and_a_cache_keeps_the_first_copy(tmp_path):
    build_directory(tmp_path / "export", lambda tmp: (tmp / "v").write_text("1"))
    build_directory(tmp_path / "export", lambda tmp: (tmp / "v").write_text("2"), replace=True)
    assert (tmp_path / "export" / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["export"]

    def racing(tmp):  # another process puts its complete copy in place while we build
        (tmp / "v").write_text("ours")
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "v").write_text("theirs")

    build_directory(tmp_path / "cache", racing)
    assert (tmp_path / "cache" / "v").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "export"]

    def racing_half(tmp):  # ... but a target that is not complete is an error, not a cache hit
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "v").write_text("partial")

    with pytest.raises(OSError):
        build_directory(tmp_path / "half", racing_half, complete=lambda done: (done / "manifest").is_file())


def test_temporaries_of_killed_builds_are_removed_once_stale(tmp_path):
    stale, fresh = tmp_path / ".cache.tmp-killed", tmp_path / ".cache.tmp-running"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "part").write_text("x")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    build_directory(tmp_path / "cache", lambda tmp: (tmp / "v").write_text("1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.tmp-running", "cache"]


def test_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_text(path, "first")
    write_text(path, "second")
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
