"""Shard and manifest I/O for a cache being built: nothing here knows about teachers or scoring.

``ShardWriter`` is one background thread that encodes batches of ``SequenceTargets`` and writes
each shard as ``shard-NNNNN.parquet.tmp`` -> fsync -> rename, while the caller computes the next
batch. Each shard carries its statistics and the build key in its Parquet key-value metadata
(``read_shard_meta``), so a rerun can keep finished shards and rebuild the manifest without
sidecar files. ``seal`` writes ``manifest.json`` atomically, last, only when every shard exists.

Crash safety: a ``kill -9`` at any moment leaves only complete shards under final names, at most
stale ``.tmp`` files (deleted by the rerun), and either the previous manifest or the new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from kdcache import __version__
from kdcache.cache.format import (
    MANIFEST_NAME,
    PARQUET_OPTIONS,
    SHARD_PATTERN,
    TOKENIZER_DIR,
    Manifest,
    SequenceTargets,
    ShardInfo,
    TargetLayout,
)
from kdcache.cache.rows import encode_table
from kdcache.cache.signals import merge_signal_stats
from kdcache.files import (
    UnsafeFileError,
    atomic_dir,
    atomic_write_text,
    check_regular_file,
    crash_point,
    fsync_dir,
    fsync_file,
)
from kdcache.fingerprint import sha256_file, sha256_json, tokenizer_fingerprint
from kdcache.outputs import output_kind
from kdcache.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
SHARD_META_KEY = b"kdcache.shard"
"""Parquet key-value metadata key holding a shard's JSON statistics and build key."""
CACHE_KIND = "cache"
"""The marker kind of a cache directory (``kdcache.files``)."""


class CacheWriteError(ValueError):
    """The cache cannot be built: mismatched inputs, foreign files in the output dir, bad teacher
    outputs, or a failed write (disk full, read-only directory) — the message names the file."""


def write_error(path: Path, e: OSError) -> CacheWriteError:
    """A failed write as a ``CacheWriteError`` naming ``path`` and the fix."""
    err = CacheWriteError(
        f"{path}: cannot write ({e.strerror or e}) — free space on that filesystem (or raise the "
        "file-size/quota limit) or choose a writable output directory; finished shards are kept, "
        "rerun to resume"
    )
    err.__cause__ = e
    return err


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def build_key_of(header: dict[str, Any]) -> str:
    """The key every shard of a cache carries: a digest of the manifest's teacher sha256, tokenizer
    fingerprint, corpus and targets sections — so a shard and a manifest that disagree on any of them
    (vocab size, k, corpus, ...) are caught by comparing keys."""
    return sha256_json(
        {"corpus": header["corpus"], "targets": header["targets"]}
        | {"teacher": header["teacher"]["sha256"], "tokenizer": header["tokenizer"]["fingerprint"]}
    )


def is_cache_dir(path: Path) -> bool:
    """A cache directory written before output markers existed: a kdcache manifest or kdcache shards."""
    try:
        if json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8")).get("format") == "kdcache":
            return True
    except (OSError, ValueError, RecursionError, AttributeError):
        pass
    shards = [p for p in path.glob("shard-*.parquet") if p.is_file()]
    return bool(shards) and all(_has_shard_meta(p) for p in shards)


def _has_shard_meta(path: Path) -> bool:
    try:
        return SHARD_META_KEY in (pq.read_metadata(path).metadata or {})
    except (OSError, ValueError):
        return False


def read_shard_meta(path: Path, build_key: str) -> dict[str, Any]:
    """The statistics a shard carries in its Parquet metadata; refuse shards made with other settings."""
    try:
        check_regular_file(
            path,
            parent="the cache directory",
            fix="remove it (the cache stage writes its own shards; with DVC use `dvc config cache.type copy`)",
        )
    except UnsafeFileError as e:
        raise CacheWriteError(str(e)) from e
    try:
        meta = json.loads(pq.read_metadata(path).metadata[SHARD_META_KEY])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CacheWriteError(
            f"{path}: not a complete kdcache shard ({e}) — delete it and rerun to recompute it"
        ) from e
    if meta.get("build_key") != build_key:
        raise CacheWriteError(
            f"{path}: was written with another teacher, corpus, target settings or runtime (torch/transformers "
            "version, device, dtype, attention kernel: a resume must run where the cache started) — rerun there, "
            "or write to an empty out_dir (or delete this directory) instead of mixing caches"
        )
    return meta


def finished_shards(out: Path, *, num_shards: int, build_key: str) -> list[bool]:
    """Which shards exist, after refusing shards of another cache (footers only: cheap, before hours of work)."""
    check_writable(out)
    existing = [p for p in sorted(out.glob("shard-*.parquet")) if SHARD_PATTERN.match(p.name)]
    for path in existing:
        if int(path.name[6:11]) >= num_shards:
            raise CacheWriteError(
                f"{path}: this cache has only {num_shards} shards — the file belongs to another "
                "cache; write to an empty out_dir (or delete the directory)"
            )
    for path in existing:
        read_shard_meta(path, build_key)
    return [(out / shard_name(i)).exists() for i in range(num_shards)]


def check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written there, before hours of scoring."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".kdcache-probe-"):
            pass
    except OSError as e:
        raise CacheWriteError(
            f"{out}: the cache directory is not writable ({e.strerror or e}) — choose a writable "
            "output directory (--out / the stage's out) or fix its permissions"
        ) from e


def save_tokenizer(out: Path, tokenizer: Any, fingerprint: str) -> dict[str, str]:
    """Save the teacher's tokenizer to ``out/tokenizer/`` (replaced only if it changed); return file sha256s.

    ``out`` must be a cache directory kdcache made (its marker, ``kdcache.files``): a ``tokenizer/``
    in anyone else's directory is never replaced.
    """
    if output_kind(out) != CACHE_KIND:
        raise CacheWriteError(
            f"{out}: not a cache directory kdcache made (no cache marker); refusing to replace its "
            f"{TOKENIZER_DIR}/ — build caches with build_cache, which claims the directory first"
        )
    final = out / TOKENIZER_DIR
    saved: dict[str, str] = {}

    def same_as_saved() -> bool:
        current = {p.name: sha256_file(p) for p in sorted(final.iterdir()) if p.is_file()} if final.is_dir() else None
        return current == saved

    try:
        with atomic_dir(final, replace=True) as tmp:
            tokenizer.save_pretrained(tmp)
            saved.update({p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()})
            again = tokenizer_fingerprint(load_tokenizer(tmp))
            if again != fingerprint:
                raise CacheWriteError(
                    f"the teacher's tokenizer does not round-trip through save_pretrained "
                    f"(fingerprint {again[:12]}… != {fingerprint[:12]}…); the cache could not be self-contained"
                )
            if same_as_saved():
                raise _Unchanged
    except _Unchanged:
        pass
    except OSError as e:
        raise write_error(final, e) from e
    return saved


class _Unchanged(Exception):
    """The saved tokenizer equals the one already in the cache: keep that one (its files stay in place)."""


def seal(
    out: Path, header: dict[str, Any], *, build_key: str, num_shards: int, known: dict[int, dict[str, Any]]
) -> Manifest | None:
    """Write the manifest (atomically, last) if every shard exists; return it, else ``None``.

    ``known``: shards whose size and sha256 are known (written here, or gathered from the other ranks);
    the others are hashed from disk (a resumed run's earlier shards).
    """
    shards, metas, missing = [], [], []
    for i in range(num_shards):
        path = out / shard_name(i)
        if i in known:  # written by this process ({meta, bytes, sha256}) or gathered from its rank ({bytes, sha256})
            meta = known[i]["meta"] if "meta" in known[i] else read_shard_meta(path, build_key)
            size, digest = known[i]["bytes"], known[i]["sha256"]
        elif path.exists():
            meta, size, digest = read_shard_meta(path, build_key), path.stat().st_size, sha256_file(path)
        else:
            missing.append(i)
            continue
        metas.append(meta)
        shards.append(
            ShardInfo(
                file=path.name,
                rows=meta["rows"],
                tokens=meta["tokens"],
                bytes=size,
                sha256=digest,
                first_seq=meta["first_seq"],
            )
        )
    if missing:
        log.info(
            "cache %s: %d shard(s) still missing (%s…); no manifest yet — rerun rank 0 when all ranks finish",
            out,
            len(missing),
            shard_name(missing[0]),
        )
        return None
    tokens = sum(s.tokens for s in shards)
    skipped = sorted(j for m in metas for j in m["skipped"])
    stats = {
        "num_rows": sum(s.rows for s in shards),
        "num_tokens": tokens,
        "mean_entropy": sum(m["entropy_sum"] for m in metas) / max(tokens, 1),
        "mean_topk_mass": sum(m["topk_mass_sum"] for m in metas) / max(tokens, 1),
        "total_bytes": sum(s.bytes for s in shards),
        "bytes_per_token": sum(s.bytes for s in shards) / max(tokens, 1),
        "num_skipped": len(skipped),
        "skipped_sequences": skipped,
    } | merge_signal_stats(metas)
    manifest = Manifest(name=out.name, shards=shards, stats=stats, created_by=f"kdcache {__version__}", **header)
    text = manifest.to_json()
    path = out / MANIFEST_NAME
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # left by a kill mid-write
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise write_error(path, e) from e
    log.info(
        "cache %s sealed: %d rows, %d tokens, %.2f bytes/token, mean entropy %.3f nats, top-k mass %.4f",
        out,
        stats["num_rows"],
        tokens,
        stats["bytes_per_token"],
        stats["mean_entropy"],
        stats["mean_topk_mass"],
    )
    return Manifest.load(out)


_STOP = object()


class ShardWriter:
    """One background thread that encodes batches and writes shards: ``.tmp`` -> fsync -> rename.

    ``write`` and ``finish`` queue work (at most ``max_pending`` items ahead) and re-raise an error
    from the thread. Leaving the ``with`` block normally drains the queue and re-raises a late error;
    leaving it with an exception stops the thread and deletes the unfinished ``.tmp`` file.
    ``written`` maps each finished shard to ``{"meta", "bytes", "sha256"}``.
    """

    def __init__(self, out: Path, layout: TargetLayout, *, max_pending: int = 2) -> None:
        self.out, self.layout = out, layout
        self.written: dict[int, dict[str, Any]] = {}
        self.busy_s = self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdcache-shard-writer", daemon=True)

    def __enter__(self) -> ShardWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._abort.set()
        self._put(_STOP, check=False)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def write(self, shard: int, rows: list[SequenceTargets]) -> None:
        self._put(("rows", shard, rows))

    def finish(self, shard: int, meta: dict[str, Any]) -> None:
        self._put(("finish", shard, meta))

    def _put(self, item: Any, *, check: bool = True) -> None:
        began = time.perf_counter()
        while True:
            if check and self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                return
            try:
                self._queue.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        self.wait_s += time.perf_counter() - began

    def _run(self) -> None:
        writer, tmp, rows, shard = None, None, 0, -1
        try:
            while (item := self._queue.get()) is not _STOP:
                if self._abort.is_set():
                    continue
                began = time.perf_counter()
                kind, shard, payload = item
                if writer is None:
                    tmp = self.out / f"{shard_name(shard)}.tmp"
                    writer, rows = self._open(tmp), 0
                if kind == "rows" and payload:
                    writer.write_table(encode_table(self.layout, payload))
                    if rows == 0:
                        crash_point(f"during_shard:{shard}")
                    rows += len(payload)
                elif kind == "finish":
                    meta = payload | {"rows": rows, "tokens": rows * self.layout.seq_len}
                    writer, closing = None, writer
                    self._close(closing, tmp, shard, meta)
                    tmp = None
                self.busy_s += time.perf_counter() - began
        except OSError as e:  # disk full, quota, read-only: name the file
            self._error = write_error(self.out / shard_name(shard), e)
        except BaseException as e:  # handed to the main thread, which re-raises it
            self._error = e
        finally:
            if tmp is not None:
                with contextlib.suppress(Exception):  # the first error is already recorded
                    if writer is not None:
                        writer.close()
                tmp.unlink(missing_ok=True)

    def _open(self, tmp: Path) -> pq.ParquetWriter:
        return pq.ParquetWriter(tmp, self.layout.schema(), **PARQUET_OPTIONS, write_statistics=["seq_index"])

    def _close(self, writer: pq.ParquetWriter, tmp: Path, shard: int, meta: dict[str, Any]) -> None:
        writer.add_key_value_metadata({SHARD_META_KEY: json.dumps(meta, sort_keys=True)})
        writer.close()
        fsync_file(tmp)
        digest, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, self.out / shard_name(shard))
        fsync_dir(self.out)
        self.written[shard] = {"meta": meta, "bytes": size, "sha256": digest}
        crash_point(f"after_shard:{shard}")


class DiscardWriter:
    """``ShardWriter``'s interface, writing nothing: the ranks of a tensor-parallel build other than rank 0
    compute every batch in lockstep with it and drop the rows."""

    def __init__(self) -> None:
        self.written: dict[int, dict[str, Any]] = {}  # stays empty
        self.busy_s = self.wait_s = 0.0

    def __enter__(self) -> DiscardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def write(self, shard: int, rows: list[SequenceTargets]) -> None:
        return None

    def finish(self, shard: int, meta: dict[str, Any]) -> None:
        return None
