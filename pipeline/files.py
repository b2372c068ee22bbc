"""Crash-safe file output, written once for every writer in kdcache.

Every file kdcache writes goes through ``atomic_write`` (a file) or ``atomic_dir`` (a directory):
the content is written under a temporary name next to the target, fsynced, renamed over the
target with ``os.replace`` and the parent directory fsynced — so a crash leaves either the old
content or the new, never a torn file. A file another process may have memory-mapped is never
rewritten in place: the rename gives the new content a new inode.

``crash_point(name)`` marks the places where the crash tests kill a process (tests/faults.py
installs the hook; production code never arms it).

Output directories (the rule every command follows, written once here): an output directory is
either new, or one this command made (its marker file ``.kdcache-output.json`` names the kind of
output) and compatible; anything else is refused, naming what is there, unless the user passes
``--overwrite``, which moves it aside (``<name>.moved-<UTC time>-overwritten``) — kdcache never
deletes what it did not make. An output may never be one of the command's inputs, inside one, or
around one. A job writing an output directory holds an ``fcntl.flock`` on its ``.kdcache.lock``
(``hold_output_dir``): a second job is refused with the holder's pid; the kernel drops the lock
when the holder dies.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
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


# ----------------------------------------------------------------------------- output directories

MARKER_NAME = ".kdcache-output.json"
"""Written into every directory kdcache creates as an output; records which kind of output it holds."""
LOCK_NAME = ".kdcache.lock"
"""An empty file in an output directory; the job writing the directory holds an ``fcntl.flock`` on it."""
BOOKKEEPING = frozenset({MARKER_NAME, LOCK_NAME})
"""kdcache's own files in an output directory: neither data nor a user's."""
MOVED_TAG = ".moved-"
"""``<name>.moved-<UTC time>-<reason>``: what kdcache moved aside instead of deleting."""
Inputs = Mapping[str, "str | Path | Iterable[str | Path] | None"]
"""A command's inputs by name (``{"teacher": path, "corpus": [glob, ...]}``), for the overlap check."""


class OutputDirError(ValueError):
    """An output path kdcache must not write: someone else's files, another command's output, one of
    the command's inputs, or a directory another job is writing."""


class OutputInUseError(OutputDirError):
    """Another job holds the output directory's lock."""


def marker_text(kind: str) -> str:
    """The marker's content: deterministic, so two runs that write the same output write the same bytes."""
    return json.dumps({"kdcache": "output directory", "kind": kind}) + "\n"


def output_kind(path: str | Path) -> str | None:
    """The kind in ``path``'s marker (``cache``, ``tokens``, ``student``, ...); None without a valid marker."""
    marker = Path(path) / MARKER_NAME
    try:
        st = os.lstat(marker)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    kind = data.get("kind") if isinstance(data, dict) and data.get("kdcache") == "output directory" else None
    return kind if isinstance(kind, str) else None


def mark_output_dir(path: str | Path, kind: str) -> None:
    """Write the marker that says kdcache made ``path`` for ``kind`` output (unless it is already there)."""
    if output_kind(path) != kind:
        atomic_write_text(Path(path) / MARKER_NAME, marker_text(kind))


def check_not_an_input(out: str | Path, inputs: Inputs) -> None:
    """Refuse an output that is one of the inputs, inside one, or around one (globs: the part before the wildcard)."""
    target = Path(out).resolve()
    for label, value in inputs.items():
        items = [value] if value is None or isinstance(value, (str, Path)) else list(value)
        for item in items:
            if not item:
                continue
            text = str(item)
            is_glob = any(c in text for c in "*?[")
            source = _static_root(text) if is_glob else Path(text).resolve()
            if target == source:
                how = "is"
            elif target.is_relative_to(source) and not is_glob:
                how = "is inside"
            elif source.is_relative_to(target):
                how = "contains"
            else:
                continue
            raise OutputDirError(
                f"{out}: {how} the {label} input ({text}) — an output may never be one of the command's "
                "inputs, inside one or around one; choose another output path"
            )


def _static_root(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard (``data/*/x.txt`` -> ``data``)."""
    parts = []
    for part in Path(pattern).parts:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return Path(*parts).resolve() if parts else Path.cwd()


def moved_aside_name(path: Path, reason: str, *, into: Path | None = None) -> Path:
    """``<name>.moved-<UTC time>-<reason>`` next to ``path`` (or in ``into``), numbered if taken."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = (into or path.parent) / f"{path.name}{MOVED_TAG}{stamp}-{reason}"
    candidate, n = base, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def move_aside(path: str | Path, reason: str) -> Path:
    """Rename ``path`` to ``<name>.moved-<UTC time>-<reason>`` beside it (never delete it); return the new path."""
    path = Path(path)
    target = moved_aside_name(path, reason)
    os.rename(path, target)
    log.warning("moved %s aside to %s (%s); delete it yourself once you no longer need it", path, target, reason)
    return target


def _listing(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if p.name not in BOOKKEEPING)
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return ", ".join(names[:4]) + more


def _not_ours(out: Path, kind: str, legacy: Callable[[Path], bool] | None) -> str | None:
    """Why ``out`` (which exists) is not ``kind`` output kdcache made; None when it is (or is empty)."""
    if not out.is_dir():
        return "is not a directory" if out.exists() else "is a broken symbolic link"
    have = output_kind(out)
    if have == kind or not any(p.name not in BOOKKEEPING for p in out.iterdir()):
        return None
    if have is not None:
        return f"holds kdcache {have} output, not {kind} output"
    if legacy is not None and legacy(out):
        return None  # made by an older kdcache, before markers: it is marked now
    return f"holds {_listing(out)}, which kdcache did not make"


def _refusal(out: Path, why: str) -> OutputDirError:
    return OutputDirError(
        f"{out}: {why}; refusing to write into it — choose another output directory, or pass --overwrite "
        f"to move it aside (to {out.name}{MOVED_TAG}<UTC time>-overwritten)"
    )


def _create(out: Path, kind: str) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        mark_output_dir(out, kind)
    except OSError as e:
        raise OutputDirError(
            f"{out}: the {kind} directory is not writable ({e.strerror or e}) — choose a writable output "
            "directory or fix its permissions"
        ) from e


def claim_output_dir(
    path: str | Path,
    *,
    kind: str,
    inputs: Inputs | None = None,
    overwrite: bool = False,
    legacy: Callable[[Path], bool] | None = None,
) -> Path:
    """Make ``path`` a ``kind`` output directory, or refuse (``OutputDirError``) — the rule, in one place.

    Refused: an output that is, is inside or contains one of ``inputs`` (always); a path that exists
    and is not ``kind`` output kdcache made (``overwrite`` moves it aside first, never deletes it).
    Accepted: a new path (created), an empty directory, one whose marker says ``kind``, or one
    ``legacy(path)`` recognizes (made before markers existed). Writes the marker; takes no lock
    (``hold_output_dir`` does both).
    """
    out = Path(path)
    check_not_an_input(out, inputs or {})
    if out.exists() or out.is_symlink():
        why = _not_ours(out, kind, legacy)
        if why is not None and not overwrite:
            raise _refusal(out, why)
        if why is not None:
            with output_lock(out) if (out / LOCK_NAME).is_file() else contextlib.nullcontext():
                move_aside(out, "overwritten")  # a job still writing it holds the lock: refused above
    _create(out, kind)
    return out


@contextlib.contextmanager
def hold_output_dir(
    path: str | Path,
    *,
    kind: str,
    inputs: Inputs | None = None,
    overwrite: bool = False,
    legacy: Callable[[Path], bool] | None = None,
    check: Callable[[Path], object] | None = None,
    leader: bool = True,
    sync: Callable[[bool], bool] | None = None,
) -> Iterator[Path]:
    """Claim ``path`` (``claim_output_dir``) and hold its lock for the ``with`` block; one lock per job.

    ``check(path)`` runs under the lock and raises ``ValueError`` when the directory, though ours, is
    incompatible with this run (a cache of other settings): refused with the ``--overwrite`` hint, or
    with ``overwrite`` moved aside and replaced by a fresh one. Under torchrun only the ``leader``
    (rank 0) claims and locks, and ``sync(failed) -> any_failed`` (an all-reduce over the ranks,
    ``kdcache.distributed.any_rank_failed``) tells every rank whether it could, so no rank of a
    refused job writes anything; the other ranks of the leader's job share its lock.
    """
    error: BaseException | None = None
    with contextlib.ExitStack() as held:
        if leader:
            try:
                _claim_and_lock(Path(path), held, kind, inputs, overwrite, legacy, check)
            except (ValueError, OSError) as e:
                if sync is None:
                    raise
                error = e
        if sync is not None and sync(error is not None):
            if error is not None:
                raise error
            raise OutputDirError(f"{path}: rank 0 could not take the output directory (see its error); nothing written")
        yield Path(path)


def _claim_and_lock(
    out: Path,
    held: contextlib.ExitStack,
    kind: str,
    inputs: Inputs | None,
    overwrite: bool,
    legacy: Callable[[Path], bool] | None,
    check: Callable[[Path], object] | None,
) -> None:
    claim_output_dir(out, kind=kind, inputs=inputs, overwrite=overwrite, legacy=legacy)
    held.enter_context(output_lock(out))
    if check is None:
        return
    try:
        check(out)
    except ValueError as e:
        if not overwrite:
            hinted = copy.copy(e)
            hinted.args = (f"{e} — or pass --overwrite to move {out} aside",)
            raise hinted from e
        move_aside(out, "overwritten")  # we hold its lock: nobody else is writing it
        _create(out, kind)
        held.enter_context(output_lock(out))


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``path/.kdcache.lock`` (an empty file) for the ``with`` block.

    Another holder -> ``OutputInUseError`` naming its pid; the kernel releases the lock when the
    holding process exits or dies. The lock file is never written, so it is identical in every copy.
    """
    lock = Path(path) / LOCK_NAME
    try:  # O_NOFOLLOW: a symlink planted under this name is refused, never followed and truncated
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputDirError(
            f"{lock}: cannot open the lock file ({e.strerror or e}) — it must be a regular file; remove "
            "whatever is there, or choose a writable output directory"
        ) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputDirError(f"{lock}: not a regular file — remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise OutputInUseError(
                f"{path}: in use by {lock_holder(fd)}, which is writing it — wait for it to finish or stop "
                "it (its finished work is kept), then rerun; two jobs writing one output directory would "
                "corrupt it"
            ) from e
        yield Path(path)
    finally:
        os.close(fd)  # releases the lock


def lock_holder(fd: int) -> str:
    """``pid N (its command line)`` of the process holding a flock on ``fd``'s file (Linux ``/proc/locks``)."""
    inode = os.fstat(fd).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] != "->" and fields[5].rsplit(":", 1)[-1] == str(inode):
            pid = int(fields[4]) if fields[4].isdigit() else 0
            if pid > 0:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                except OSError:
                    cmd = ""
                return f"pid {pid}" + (f" ({cmd[:100]})" if cmd else "")
    return "another process"


def claim_output_file(
    path: str | Path,
    *,
    inputs: Inputs | None = None,
    overwrite: bool = False,
    legacy: Callable[[Path], bool] | None = None,
) -> Path:
    """The file version of the rule (a metrics JSON): never an input or inside one, never inside a
    directory kdcache made for another output or a model/token/cache directory, and an existing file
    only when ``legacy(path)`` recognizes it as this command's (``overwrite`` moves it aside)."""
    out = Path(path)
    check_not_an_input(out, inputs or {})
    parent = out.parent
    if (kind := output_kind(parent)) is not None:
        raise OutputDirError(f"{out}: inside {parent}, a directory kdcache made for {kind} output; write it elsewhere")
    found = [n for n in ("config.json", "manifest.json", "model.safetensors") if (parent / n).exists()]
    if found:
        raise OutputDirError(
            f"{out}: inside {parent}, which holds {', '.join(found)} (a model, token or cache directory); "
            "write it elsewhere"
        )
    if out.exists() or out.is_symlink():
        if out.is_dir():
            raise OutputDirError(f"{out}: is a directory; choose another file name")
        if not (legacy is not None and out.is_file() and legacy(out)):
            if not overwrite:
                raise _refusal(out, "exists and is not a file this command wrote")
            move_aside(out, "overwritten")
    return out
