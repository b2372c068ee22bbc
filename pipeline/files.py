"""Crash-safe file output, written once for every writer in kdcache.

Every file kdcache writes goes through ``atomic_write`` (a file) or ``atomic_dir`` (a directory):
the content is written under a temporary name next to the target, fsynced, renamed over the
target with ``os.replace`` and the parent directory fsynced — so a crash leaves either the old
content or the new, never a torn file. A file another process may have memory-mapped is never
rewritten in place: the rename gives the new content a new inode.

``crash_point(name)`` marks the places where the crash tests kill a process (tests/faults.py
installs the hook; production code never arms it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

log = logging.getLogger(__name__)

_crash_hook: Callable[[str], None] | None = None


class UnsafeFileError(ValueError):
    """An input path is a symlink out of its directory, a FIFO, a device or a directory."""


def set_crash_hook(hook: Callable[[str], None] | None) -> None:
    """Install (or remove, with ``None``) the function ``crash_point`` calls; for the crash tests only."""
    global _crash_hook
    _crash_hook = hook


def crash_point(name: str) -> None:
    """A named point where a crash test may kill the process (``after_shard:3``, ``checkpoint_write:20``)."""
    if _crash_hook is not None:
        _crash_hook(name)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` creates the content at ``path.tmp``; it is then fsynced and renamed over ``path``.

    On any error the ``.tmp`` file is removed and the error propagates (``path`` is untouched).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        crash_point(f"before_replace:{path.name}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty ``.<final>.kdcache-incomplete`` directory; on success fsync it and rename it to ``final``.

    A stale temporary directory from a killed run is removed first (the ``kdcache-`` names are
    kdcache's own: a user's ``final.old`` or ``final.incomplete`` is never touched). With
    ``replace``, an existing ``final`` — the caller has checked it is kdcache's — is moved to
    ``.<final>.kdcache-old`` before the rename and removed after it; without it, an existing
    ``final`` is an error (``FileExistsError``). On failure the temporary directory is removed and
    ``final`` is untouched.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.kdcache-incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        fsync_dir(tmp)
        old = final.with_name(f".{final.name}.kdcache-old")
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final}: already exists")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_regular_file(path: str | Path, *, fix: str = "remove it and rerun", parent: str = "its directory") -> Path:
    """Refuse, before opening it, a FIFO, device or directory, or a symlink that leaves its directory.

    A symlink that stays inside its directory is allowed; ``parent`` names that directory in the
    message, ``fix`` says what to do. Returns ``path``.
    """
    path = Path(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = path.resolve()
        if not target.is_relative_to(path.parent.resolve()):
            raise UnsafeFileError(f"{path}: symlink to {target}, outside {parent} — {fix}")
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{path}: not a regular file — {fix}")
    return path


# ----------------------------------------------------------------------------- reading untrusted input files

LOAD_ERRORS: tuple[type[BaseException], ...] = (
    RecursionError,  # deeply nested JSON
    SafetensorError,  # truncated or malformed .safetensors
    KeyError,  # a field missing from a malformed tokenizer.json / config.json
    IndexError,
    TypeError,  # a field of the wrong JSON type
    AttributeError,
    RuntimeError,  # weights whose sizes do not match the config
    ValueError,  # including json.JSONDecodeError and UnicodeDecodeError
    OSError,
)
"""What parsing a model, tokenizer or JSON file written by someone else may raise."""


class InputFileError(ValueError):
    """An input file (model, tokenizer, manifest, config) cannot be loaded; the message names it and the fix."""


@contextlib.contextmanager
def loading(path: str | Path, *, what: str, fix: str) -> Iterator[None]:
    """Turn any error of the ``with`` block (``LOAD_ERRORS``) into one ``InputFileError``: ``path``, what, fix.

    >>> with loading("m/tokenizer.json", what="the tokenizer", fix="copy the model directory again"): ...
    """
    try:
        yield
    except InputFileError:
        raise
    except LOAD_ERRORS as e:
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputFileError(f"{path}: cannot load {what} ({type(e).__name__}: {detail}) — {fix}") from e


def read_json_file(path: str | Path, *, what: str, fix: str, max_bytes: int = 64 << 20) -> Any:
    """Parse a JSON file someone else may have written: a regular file of at most ``max_bytes``, any
    decode error (deep nesting included) as one ``InputFileError`` naming the file."""
    path = Path(path)
    check_regular_file(path, fix=fix)
    if (size := path.stat().st_size) > max_bytes:
        raise InputFileError(f"{path}: {size} bytes, more than the {max_bytes} allowed for {what} — {fix}")
    with loading(path, what=what, fix=fix):
        return json.loads(path.read_bytes())
