"""The output-directory rule and lock, written once for every command that writes.

An output directory is
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
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from kdcache.files import atomic_write_text

log = logging.getLogger(__name__)

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
