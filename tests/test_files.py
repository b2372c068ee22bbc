"""Crash-safe writes and safe-input checks (kdcache.files), used by every writer in the library."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdcache import files
from kdcache.files import UnsafeFileError, atomic_dir, atomic_write, atomic_write_text, check_regular_file

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_whole_and_a_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "old")
    inode = target.stat().st_ino

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]  # no .tmp left behind
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_ino != inode  # a new inode: readers of the old keep it


def test_atomic_dir_swaps_in_a_complete_directory_or_leaves_the_old_one(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (final / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError), atomic_dir(final) as tmp:  # never replaces without being told
        (tmp / "b.txt").write_text("2")
    with pytest.raises(RuntimeError), atomic_dir(final, replace=True) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("killed half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (final / "a.txt").exists()
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "model"
    ]


def test_check_regular_file_refuses_fifos_directories_and_symlinks_that_leave_the_directory(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "inside").symlink_to(tmp_path / "real")
    assert check_regular_file(tmp_path / "inside") == tmp_path / "inside"
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_text("y")
    (tmp_path / "escape").symlink_to(outside)
    with pytest.raises(UnsafeFileError, match="escape: symlink to .*outside its directory — remove it"):
        check_regular_file(tmp_path / "escape")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafeFileError, match="fifo: not a regular file"):
        check_regular_file(tmp_path / "fifo")  # refused without opening it (opening a FIFO would block)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        check_regular_file(tmp_path)


def test_crash_points_do_nothing_unless_a_test_arms_them() -> None:
    files.crash_point("after_shard:0")  # no hook: a no-op
    seen: list[str] = []
    files.set_crash_hook(seen.append)
    try:
        files.crash_point("after_shard:1")
    finally:
        files.set_crash_hook(None)
    assert seen == ["after_shard:1"]


def test_no_production_module_reads_a_test_switch_from_the_environment() -> None:
    """Kill points are armed only by tests/faults.py; a stray variable must never SIGKILL a real run."""
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        text = path.read_text()
        assert "KDCACHE_FAULT" not in text and "set_crash_hook(" not in text.replace("def set_crash_hook(", ""), path
