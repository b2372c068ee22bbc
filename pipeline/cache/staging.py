"""Staged copies of cache shards on local disk: where they live, when they can be trusted, how many.

Each Parquet shard is decoded and checked once, then written as a compact Arrow IPC file (``mapped``,
layout version 2: per-row zstd frames where they pay, raw values elsewhere; about 1.0-1.3x the Parquet
bytes, bench/RESULTS.md "Staged copies vs Parquet") and memory-mapped; batches decode only the rows
they select. The design holds on a GPU box with shared storage:

- **Where.** ``staging_dir=``, else ``$KDCACHE_STAGING_DIR``, else node-local scratch:
  ``$TMPDIR`` (``tempfile.gettempdir()``) ``/kdcache-staging-<uid>``. Never inside the cache (a
  ``.staging/`` in ``cache/<name>/`` would change the DVC output's hash), and by default never on a
  home directory, which is usually NFS with a quota.
- **Names.** ``<shard sha256>-<xxh3-64 of the staged bytes>.v2.ipc`` (``mapped.STAGED_SUFFIX``): the
  name says which shard it is, what its bytes must hash to and which staged layout they hold (the
  layout version is in the file's metadata too); copies of layout v1 (``.arrow``) are never read, only
  counted and evicted. Files are written under a private temporary name and
  *created if absent* (``os.link``): a name that exists is never replaced or rewritten, so no
  process that has it mapped (here or on another node) can die of SIGBUS/ESTALE.
- **Trust.** A staged file is served only after its bytes hash (xxh3, several GB/s) to its name,
  once per process; a damaged one is renamed aside (``.damaged-<pid>``, a warning) and staged
  afresh. Staging itself hashes the Parquet bytes against the manifest's sha256 and checks the
  decoded content, so a corrupt shard is caught even with ``verify="size"``.
- **Concurrency.** A per-shard ``flock`` lets one process stage while DataLoader workers or ranks on
  the same node wait; a filesystem without locks (some NFS/Lustre mounts) is refused with the fix.
- **Compact.** Staging compresses columns until the copy is ~``$KDCACHE_STAGING_RATIO`` (default 1.45) x
  the Parquet bytes; any staged copy is readable whatever ratio made it (codecs are in its metadata).
- **Bounded.** With ``max_bytes`` (``$KDCACHE_STAGING_MAX_GB``), staging evicts the least recently
  used staged files (v1 copies included) until the directory fits (a process that has an evicted file
  mapped keeps it).
  Temporary files of killed stagers (their pid is gone) are removed when a reader opens the dir.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import xxhash

from kdcache.cache import mapped
from kdcache.cache.format import ShardInfo, TargetLayout
from kdcache.cache.mapped import STAGED_SUFFIX, MappedShard, map_staged, staged_table
from kdcache.cache.shards import CacheError, content_problems, decode_shard, read_shard

log = logging.getLogger(__name__)
_HASH_CHUNK = 8 << 20
LEGACY_SUFFIXES = (".arrow",)
"""Staged copies of earlier layout versions: counted and evicted, never read."""
_verified: set[tuple[str, int, int]] = set()
"""(path, inode, size) of staged files this process has hashed: each is hashed once per process."""


def default_staging_dir() -> Path:
    """Where staged shards go when ``staging_dir`` is not given (see the module docstring)."""
    if env := os.environ.get("KDCACHE_STAGING_DIR"):
        return Path(env)
    return Path(tempfile.gettempdir()) / f"kdcache-staging-{os.getuid()}"


def default_target_ratio() -> float:
    """Staged bytes / Parquet bytes that staging compresses down to: ``$KDCACHE_STAGING_RATIO``, else
    ``mapped.TARGET_RATIO`` (higher: fewer columns compressed, faster batches, more scratch)."""
    value = os.environ.get("KDCACHE_STAGING_RATIO")
    if not value:
        return mapped.TARGET_RATIO
    try:
        ratio = float(value)
    except ValueError:
        ratio = float("nan")
    if not ratio >= 1.0:
        raise CacheError(f"KDCACHE_STAGING_RATIO={value!r}: need a number >= 1 (staged / Parquet bytes, e.g. 1.45)")
    return ratio


def default_max_bytes() -> int | None:
    """The staging bound from ``$KDCACHE_STAGING_MAX_GB`` (None: unbounded)."""
    value = os.environ.get("KDCACHE_STAGING_MAX_GB")
    if not value:
        return None
    try:
        return int(float(value) * (1 << 30))
    except ValueError as e:
        raise CacheError(f"KDCACHE_STAGING_MAX_GB={value!r}: not a number of GiB (e.g. 50)") from e


def staged_files(staging_dir: Path) -> list[Path]:
    """Staged copies in ``staging_dir``, this layout's and earlier ones' (not temporary or damaged files)."""
    if not staging_dir.is_dir():
        return []
    return [p for suffix in (STAGED_SUFFIX, *LEGACY_SUFFIXES) for p in staging_dir.glob(f"*{suffix}")]


def staging_size(staging_dir: Path) -> tuple[int, int]:
    """(number of staged files, their total bytes) in ``staging_dir``."""
    sizes = []
    for p in staged_files(staging_dir):
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
            sizes.append(p.stat().st_size)
    return len(sizes), sum(sizes)


def load_shard(
    path: Path, info: ShardInfo, layout: TargetLayout, staging_dir: Path, *, max_bytes: int | None = None
) -> MappedShard:
    """Map the shard's staged copy, staging it first if there is no trustworthy one."""
    target = _trusted_copy(staging_dir, info) or stage_shard(path, info, layout, staging_dir, max_bytes=max_bytes)
    with contextlib.suppress(OSError):
        os.utime(target)  # recency for LRU eviction
    try:
        return MappedShard.from_table(map_staged(target), layout, rows=info.rows, where=str(target))
    except (pa.ArrowException, OSError, ValueError) as e:  # hashes fine but unreadable: a staging bug, restage
        _set_aside(target, f"unusable ({e})")
        target = stage_shard(path, info, layout, staging_dir, max_bytes=max_bytes)
        return MappedShard.from_table(map_staged(target), layout, rows=info.rows, where=str(target))


def stage_shard(
    path: Path, info: ShardInfo, layout: TargetLayout, staging_dir: Path, *, max_bytes: int | None = None
) -> Path:
    """Decode a Parquet shard into ``<staging_dir>/<sha256>-<xxh3>.v2.ipc`` unless a trusted copy exists."""
    try:
        staging_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(staging_dir / f".{info.sha256}.lock"):
            if (ready := _trusted_copy(staging_dir, info)) is not None:
                return ready  # another process staged it while we waited
            t0 = time.perf_counter()
            target = _write_staged(path, info, layout, staging_dir)
        log.debug("staged %s: %d tokens in %.3fs", path, info.tokens, time.perf_counter() - t0)
        if max_bytes is not None:
            evict(staging_dir, max_bytes=max_bytes, keep=target)
        return target
    except OSError as e:
        raise CacheError(
            f"{staging_dir}: cannot stage {path} there ({e}); pass staging_dir= or set "
            "KDCACHE_STAGING_DIR to a writable node-local directory with free space"
        ) from e


def _write_staged(path: Path, info: ShardInfo, layout: TargetLayout, staging_dir: Path) -> Path:
    staged = decode_shard(read_shard(path, info, layout), layout, where=str(path))
    problems = content_problems(staged, layout, info, None)  # one numpy pass, once per staging dir
    if problems:
        raise CacheError(f"{path}: {'; '.join(problems)} — do not train on this cache; rebuild or pull it again")
    table = staged_table(staged, layout, parquet_bytes=info.bytes, target_ratio=default_target_ratio())
    MappedShard.from_table(table, layout, rows=info.rows, where=str(path))  # refuse malformed rows here
    tmp = staging_dir / f".{info.sha256}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        target = staging_dir / f"{info.sha256}-{_xxh(tmp)}{STAGED_SUFFIX}"
        if target.exists():  # same bytes under the same name: damaged earlier (it failed its hash), set aside
            _set_aside(target, "its bytes do not hash to its name")
        os.link(tmp, target)  # create if absent: never replaces a name another process may have mapped
        return target
    finally:
        tmp.unlink(missing_ok=True)


def _trusted_copy(staging_dir: Path, info: ShardInfo) -> Path | None:
    """A staged copy of ``info`` whose bytes hash to its name, else None (damaged ones are set aside)."""
    for candidate in sorted(staging_dir.glob(f"{info.sha256}-*{STAGED_SUFFIX}")):
        try:
            st = candidate.stat()
            key = (str(candidate), st.st_ino, st.st_size)
            if key in _verified or _xxh(candidate) == candidate.name[len(info.sha256) + 1 : -len(STAGED_SUFFIX)]:
                _verified.add(key)
                return candidate
        except FileNotFoundError:  # evicted meanwhile
            continue
        _set_aside(candidate, "its bytes do not hash to its name")
    return None


def _set_aside(path: Path, why: str) -> None:
    """Rename a damaged staged file out of the way (never rewrite it: another process may have it mapped)."""
    aside = path.with_name(f"{path.name}.damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    log.warning("staged copy %s is damaged (%s); moved to %s and staging it afresh", path, why, aside.name)
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, aside)


def _xxh(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def evict(staging_dir: Path, *, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete least-recently-used staged files (and damaged ones) until the directory holds <= ``max_bytes``.

    Deleting a mapped file is safe: the process that mapped it keeps its pages until it unmaps.
    Returns the deleted paths.
    """
    gone = [p for suffix in (STAGED_SUFFIX, *LEGACY_SUFFIXES) for p in staging_dir.glob(f"*{suffix}.damaged-*")]
    stats = {}
    for p in staged_files(staging_dir):
        with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile
            stats[p] = p.stat()
    files = sorted(stats, key=lambda p: stats[p].st_mtime_ns)  # oldest use first (v1 copies are never used)
    total = sum(st.st_size for st in stats.values())
    for p in files:
        if total <= max_bytes:
            break
        if p != keep:
            total -= stats[p].st_size
            gone.append(p)
    for p in gone:
        p.unlink(missing_ok=True)
    if gone:
        log.info("staging %s: evicted %d file(s) to stay within %.2f GiB", staging_dir, len(gone), max_bytes / 2**30)
    return gone


def clean_stale(staging_dir: Path) -> list[Path]:
    """Remove temporary files left by killed stagers on this node (their pid no longer exists)."""
    removed = []
    for tmp in staging_dir.glob(".*.tmp") if staging_dir.is_dir() else []:
        parts = tmp.name.split(".")
        if len(parts) >= 4 and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent stagers write private tmp files; create-if-absent keeps it correct
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise CacheError(
                    f"{path.parent}: this filesystem does not support file locks ({e.strerror}); stage on "
                    "node-local disk: set KDCACHE_STAGING_DIR (or staging_dir=) to a local directory such as /tmp"
                ) from e
            raise
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
