"""Stage two's loader: validate a cache on open, stage shards to Arrow IPC, memory-map, serve batches.

Staging. Each Parquet shard is decoded once into an uncompressed Arrow IPC *file* named by the
shard's sha256 (``<sha256>.arrow``), then memory-mapped; batches are fancy-indexed out of the
mapped bytes. Staged files are content-addressed, so caches may share a staging dir and a reopen
reuses them. They live outside the cache directory on purpose — a ``.staging/`` inside
``cache/<name>/`` would change the DVC output's hash and be pushed with it — in, by priority:
``staging_dir=``, ``$KDCACHE_STAGING_DIR``, ``$XDG_CACHE_HOME/kdcache/staging``,
``~/.cache/kdcache/staging``. Deleting that dir is safe whenever no reader is running. A staged
file is written to a temporary name and ``os.replace``d, never rewritten in place (a process
that has it mapped would die of SIGBUS); a per-shard ``flock`` lets one process stage while
DataLoader workers or ranks on the same machine wait. The first staging of a shard hashes the
Parquet bytes against the manifest, so a corrupt shard is caught even with ``verify="size"``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from threading import Lock
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.cache_format import (
    CODE_DTYPE,
    LENGTH_DTYPE,
    CacheFormatError,
    Manifest,
    ShardInfo,
    TargetLayout,
    decode_logprobs,
    decode_row,
)
from pipeline.fingerprint import sha256_file

log = logging.getLogger(__name__)

MAX_MAPPED = 16
"""Mapped shards kept open (LRU) beyond the current shuffle window and prefetch; remapping is cheap."""


class CacheError(CacheFormatError):
    """A cache cannot be used: missing/damaged/hostile files or a tokenizer mismatch. Names the file and the fix."""


def default_staging_dir() -> Path:
    """Where staged shards go when ``staging_dir`` is not given (see the module docstring)."""
    if env := os.environ.get("KDCACHE_STAGING_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdcache" / "staging"


def check_shard_file(root: Path, info: ShardInfo) -> Path:
    """The shard's path, after refusing a missing file, a link outside ``root``, a non-file or a wrong size."""
    path = root / info.file
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            real = path.resolve()
            if not real.is_relative_to(root.resolve()):
                raise CacheError(f"{path}: symlink to {real}, outside the cache directory; refusing it — copy the "
                                 "file into the cache (with DVC: `dvc config cache.type copy` or hardlink/reflink)")
            st = os.stat(path)
    except FileNotFoundError as e:
        raise CacheError(f"{path}: shard listed in {root / 'manifest.json'} is missing; pull the cache again "
                         "(dvc pull) or rerun the cache stage (it resumes)") from e
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"{path}: not a regular file; remove it and pull the cache again")
    if st.st_size != info.bytes:
        raise CacheError(f"{path}: {st.st_size} bytes but the manifest says {info.bytes}; the shard is truncated or "
                         "damaged — pull it again (dvc pull) or rerun the cache stage")
    return path


def open_cache(path: str | Path, *, staging_dir: str | Path | None = None, verify: Literal["size", "full"] = "size",
               expect_tokenizer: str | None = None, prefetch: int = 2) -> CacheReader:
    """Validate a cache (manifest, shard names, files, sizes; sha256 too with ``verify="full"``) and open it.

    ``expect_tokenizer``: the student's tokenizer fingerprint; a different one is refused.
    ``prefetch``: shards staged ahead in a background thread while batches are served.
    """
    return CacheReader(path, staging_dir=staging_dir, verify=verify, expect_tokenizer=expect_tokenizer,
                       prefetch=prefetch)


class CacheReader:
    """Memory-mapped access to a cache: ``len``, ``reader[i]``, ``batches(...)``. Pickles by path."""

    def __init__(self, path: str | Path, *, staging_dir: str | Path | None = None,
                 verify: Literal["size", "full"] = "size", expect_tokenizer: str | None = None,
                 prefetch: int = 2) -> None:
        if verify not in ("size", "full"):
            raise ValueError(f"verify must be 'size' or 'full', got {verify!r}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.path = Path(path)
        self._args = {"staging_dir": staging_dir, "expect_tokenizer": expect_tokenizer, "prefetch": prefetch}
        try:
            self.meta = Manifest.load(self.path)
        except CacheFormatError as e:
            raise CacheError(str(e)) from e
        self.layout: TargetLayout = self.meta.layout
        if not self.meta.shards or self.meta.num_rows == 0:
            raise CacheError(f"{self.path / 'manifest.json'}: the cache holds no sequences; rerun the cache stage")
        self._check_tokenizer(expect_tokenizer)
        self._files = [check_shard_file(self.path, s) for s in self.meta.shards]
        if verify == "full":
            for f, s in zip(self._files, self.meta.shards, strict=True):
                if (digest := sha256_file(f)) != s.sha256:
                    raise _sha_error(f, digest, s.sha256)
        self.staging_dir = Path(staging_dir) if staging_dir is not None else default_staging_dir()
        self.prefetch = prefetch
        self._offsets = np.cumsum([0] + [s.rows for s in self.meta.shards], dtype=np.int64)  # (S+1,)
        self._mapped: OrderedDict[int, _Shard] = OrderedDict()
        self._futures: dict[int, Future[_Shard]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = Lock()
        self._capacity = MAX_MAPPED

    def _check_tokenizer(self, expect: str | None) -> None:
        have = self.meta.tokenizer.get("fingerprint")
        if expect is not None and expect != have:
            raise CacheError(f"{self.path / 'manifest.json'}: the student's tokenizer differs from the cache's "
                             f"(student {expect}, cache {have}); use the cache's tokenizer ({self.path / 'tokenizer'}/) "
                             "or set train.vocab_map: exact")

    # -- pickling: by path, so DataLoader workers reopen cheaply (staged files are reused)
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), **self._args, "staging_dir": str(self.staging_dir)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("path"), verify="size", **state)  # type: ignore[misc]

    @property
    def manifest(self) -> dict[str, Any]:
        return asdict(self.meta)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sequence at position ``i`` (storage order), decoded like ``cache_format.decode_row``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n}")
        i %= n
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        shard = self._shard(s)
        out = decode_row(self.layout, shard.row(i - int(self._offsets[s]))).as_dict()
        return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in out.items()}

    def iter_sequences(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
        """``reader[i]`` for i in [start, stop), staging the next shards ahead."""
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop):
            if i == start or i in self._offsets:  # entering a shard: stage the next ones
                self._prefetch_from(int(np.searchsorted(self._offsets, i, side="right")), list(range(len(self._files))))
            yield self[i]

    # -- epoch order and batches
    def num_batches(self, batch_size: int, world_size: int = 1, *, drop_last: bool = True) -> int:
        """Global batches (``batch_size * world_size`` sequences each) in one epoch."""
        global_batch = batch_size * world_size
        return len(self) // global_batch if drop_last else -(-len(self) // global_batch)

    def epoch_order(self, seed: int, epoch: int, *, window: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """(sequence positions (N,), shard order (S,)) of an epoch: a pure function of (seed, epoch, window).

        The shard order is permuted, cut into windows of ``window`` consecutive shards, and the rows
        of each window are permuted together. A full permutation would touch every shard from the
        first batch on (all must be staged before training starts); shard-local shuffling
        (``window=1``) fills each batch from one shard, i.e. one neighbourhood of the corpus. A
        window of a few shards mixes neighbourhoods while keeping only window + prefetch shards
        live; ``window >= num shards`` is a full shuffle.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        rng = np.random.default_rng([seed, epoch])
        shards = rng.permutation(len(self._files))
        parts = []
        for w in range(0, len(shards), window):
            rows = np.concatenate([np.arange(self._offsets[s], self._offsets[s + 1]) for s in shards[w:w + window]])
            parts.append(rows[rng.permutation(len(rows))])
        return np.concatenate(parts), shards

    def batches(self, batch_size: int, *, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1,
                start_batch: int = 0, drop_last: bool = True, shuffle: bool = True,
                window: int = 4) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of each global batch of an epoch, from global batch ``start_batch`` on.

        Global batch g is ``batch_size * world_size`` consecutive sequences of ``epoch_order`` (storage
        order when ``shuffle=False``); rank r takes the r-th of ``world_size`` contiguous slices, so
        2 ranks x b see exactly the data of 1 rank x 2b, and ``start_batch`` resumes mid-epoch
        without decoding what came before. Each sequence is used at most once per epoch. With
        ``drop_last`` the final ``N mod (batch_size * world_size)`` sequences of the order are
        dropped (different ones each epoch); without it the final partial global batch is split
        into near-equal contiguous slices (``np.array_split``) and every rank yields its slice,
        possibly empty, so all ranks take the same number of steps.

        Yields CPU tensors: ``input_ids`` (B, T) int64, ``seq_index`` (B,) int64; with top-k
        ``topk_ids`` (B, T, k) int64, ``topk_logprobs`` (B, T, k) float32 (0.0 where padded) and,
        for adaptive caches only, ``topk_mask`` (B, T, k) bool; with samples ``sample_ids``
        (B, T, S) int64 and ``sample_counts`` (B, T, S) float32, S = the batch's most unique
        draws at a position, 0 = padding.
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        total = self.num_batches(batch_size, world_size, drop_last=drop_last)
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch {start_batch} outside [0, {total}] for batch_size {batch_size} x "
                             f"{world_size} rank(s) over {len(self)} sequences")
        if shuffle:
            order, shard_seq = self.epoch_order(seed, epoch, window=window)
        else:
            order, shard_seq = np.arange(len(self)), np.arange(len(self._files))
        self._capacity = max(MAX_MAPPED, window + self.prefetch + 1)
        rank_of = np.empty(len(shard_seq), np.int64)
        rank_of[shard_seq] = np.arange(len(shard_seq))  # position of each shard in the epoch's shard order
        global_batch = batch_size * world_size
        for g in range(start_batch, total):
            rows = order[g * global_batch:(g + 1) * global_batch]
            reached = rank_of[np.searchsorted(self._offsets, rows, side="right") - 1].max()
            self._prefetch_from(int(reached) + 1, list(shard_seq))  # every rank stages what the global batch needs
            yield self._assemble(np.array_split(rows, world_size)[rank])

    def _assemble(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Vectorized gather of sequences ``idx`` (global positions) from their mapped shards."""
        lay, B, T = self.layout, len(idx), self.layout.seq_len
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1  # (B,)
        parts = [(self._shard(int(s)), sel, idx[sel] - self._offsets[s])
                 for s in np.unique(shard_of) for sel in [np.flatnonzero(shard_of == s)]]
        out: dict[str, np.ndarray] = {"input_ids": np.empty((B, T), np.int64), "seq_index": np.empty(B, np.int64)}
        for shard, sel, local in parts:
            out["input_ids"][sel] = shard.fixed["input_ids"][local]
            out["seq_index"][sel] = shard.seq_index[local]
        if lay.has_topk and not lay.adaptive:
            k = lay.top_k
            out["topk_ids"], out["topk_logprobs"] = np.empty((B, T, k), np.int64), np.empty((B, T, k), np.float32)
            for shard, sel, local in parts:
                out["topk_ids"][sel] = shard.fixed["topk_ids"][local].reshape(-1, T, k)
                out["topk_logprobs"][sel] = decode_logprobs(shard.fixed["topk_logprobs"][local]).reshape(-1, T, k)
        elif lay.has_topk:
            ids, lp, lens = _gather_ragged(parts, "topk", B, T, lay.top_k, decode_logprobs)
            out["topk_ids"], out["topk_logprobs"] = ids, lp
            out["topk_mask"] = np.arange(lay.top_k) < lens[..., None]  # (B, T, k)
        if lay.has_samples:
            width = max((int(p[0].fixed["sample_lengths"][p[2]].max(initial=0)) for p in parts), default=0)
            ids, counts, _ = _gather_ragged(parts, "sample", B, T, max(width, 1), lambda c: c.astype(np.float32))
            out["sample_ids"], out["sample_counts"] = ids, counts
        return {k: torch.from_numpy(v) for k, v in out.items()}

    # -- staging, mapping, prefetch
    def _executor(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():  # forked (e.g. a DataLoader worker): the parent's thread and lock are gone
            self._pool, self._futures, self._lock, self._pid = None, {}, Lock(), os.getpid()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-stage")
        return self._pool

    def _prefetch_from(self, pos: int, shard_seq: list[int]) -> None:
        if self.prefetch == 0:
            return
        pool = self._executor()
        with self._lock:
            for s in shard_seq[pos:pos + self.prefetch]:
                s = int(s)
                if s not in self._mapped and s not in self._futures:
                    self._futures[s] = pool.submit(self._load, s)

    def _shard(self, s: int) -> _Shard:
        if self._pid != os.getpid():
            self._executor()
        with self._lock:
            if (shard := self._mapped.get(s)) is not None:
                self._mapped.move_to_end(s)
                return shard
            future = self._futures.pop(s, None)
        shard = future.result() if future is not None else self._load(s)
        with self._lock:
            self._mapped[s] = shard
            while len(self._mapped) > self._capacity:
                self._mapped.popitem(last=False)  # drops the mapping once no batch refers to it
        return shard

    def _load(self, s: int) -> _Shard:
        info, path = self.meta.shards[s], self._files[s]
        target = self.staging_dir / f"{info.sha256}.arrow"
        if not target.exists():
            stage_shard(path, info, self.layout, self.staging_dir)
        try:
            return _Shard.from_table(_map_ipc(target), self.layout, rows=info.rows, where=str(target))
        except (pa.ArrowException, OSError, CacheFormatError) as e:  # stale or damaged staged file: stage anew
            log.warning("restaging %s: staged file %s unusable (%s)", path, target, e)
            stage_shard(path, info, self.layout, self.staging_dir, force=True)
            return _Shard.from_table(_map_ipc(target), self.layout, rows=info.rows, where=str(target))

    def close(self) -> None:
        """Stop prefetching and drop mappings (arrays already handed out stay valid)."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._futures = None, {}
        self._mapped.clear()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha_error(path: Path, digest: str, expected: str) -> CacheError:
    return CacheError(f"{path}: sha256 {digest} does not match the manifest's {expected}; the shard is corrupt — "
                      "pull it again (dvc pull) or rerun the cache stage")


def _staged_schema(layout: TargetLayout) -> pa.Schema:
    """Parquet's binary columns become large_binary (64-bit offsets) so no shard hits Arrow's 2 GiB limit."""
    return pa.schema([pa.field(f.name, pa.large_binary() if f.type == pa.binary() else f.type, nullable=False)
                      for f in layout.schema()])


def read_shard(path: Path, info: ShardInfo, layout: TargetLayout) -> pa.Table:
    """Read a shard once into memory, check its size and sha256, parse it (page checksums on), one chunk per column."""
    data = path.read_bytes()
    if len(data) != info.bytes:
        raise CacheError(f"{path}: {len(data)} bytes but the manifest says {info.bytes}; pull it again or rerun the cache stage")
    if (digest := hashlib.sha256(data).hexdigest()) != info.sha256:
        raise _sha_error(path, digest, info.sha256)
    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise CacheError(f"{path}: not a readable Parquet file ({e}); pull it again or rerun the cache stage") from e
    if table.column_names != layout.columns():
        raise CacheError(f"{path}: columns {table.column_names}, the manifest's targets need {layout.columns()}; "
                         "the shard belongs to another cache — rebuild it")
    try:
        table = table.cast(_staged_schema(layout)).combine_chunks()
    except (pa.ArrowException, ValueError) as e:
        raise CacheError(f"{path}: column types do not follow the cache format ({e}); rebuild the shard") from e
    if table.num_rows != info.rows:
        raise CacheError(f"{path}: {table.num_rows} rows but the manifest says {info.rows}; rebuild the shard")
    return table


def stage_shard(path: Path, info: ShardInfo, layout: TargetLayout, staging_dir: Path, *, force: bool = False) -> Path:
    """Decode a Parquet shard into ``<staging_dir>/<sha256>.arrow`` (one record batch) unless already there."""
    target = staging_dir / f"{info.sha256}.arrow"
    try:
        staging_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(staging_dir / f"{info.sha256}.lock"):
            if target.exists() and not force:
                return target  # another process staged it while we waited
            t0 = time.perf_counter()
            table = read_shard(path, info, layout)
            tmp = staging_dir / f".{info.sha256}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            try:
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
                os.replace(tmp, target)  # new inode: processes mapping an older file keep theirs
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as e:
        raise CacheError(f"{staging_dir}: cannot stage {path} there ({e}); pass staging_dir= or set "
                         "KDCACHE_STAGING_DIR to a writable local directory with free space") from e
    dt = time.perf_counter() - t0
    log.debug("staged %s: %d tokens in %.3fs (%.0f tokens/s)", path, info.tokens, dt, info.tokens / max(dt, 1e-9))
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent stagers each write their own tmp file; os.replace keeps it correct
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _map_ipc(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file; the buffers keep the mapping alive after the file handle closes."""
    with pa.memory_map(str(path), "r") as mm:
        table = pa.ipc.open_file(mm).read_all()
    return table.combine_chunks()  # a no-op (zero copy) for the single record batch that staging writes


def _gather_ragged(parts: list[tuple[Any, np.ndarray, np.ndarray]], prefix: str, B: int, T: int, width: int,
                   decode: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scatter per-position variable-length lists into padded (B, T, width) ids/values, and lengths (B, T)."""
    ids_col, val_col = (f"{prefix}_ids", f"{prefix}_logprobs") if prefix == "topk" else ("sample_ids", "sample_counts")
    ids, vals = np.zeros((B, T, width), np.int64), np.zeros((B, T, width), np.float32)
    lens_all = np.zeros((B, T), np.int64)
    pos = np.arange(width)
    for shard, sel, local in parts:
        lens = shard.fixed[f"{prefix}_lengths"][local].astype(np.int64)  # (b, T)
        lens_all[sel] = lens
        keep = pos < lens[..., None]  # (b, T, width)
        first = np.cumsum(lens, axis=1) - lens + shard.starts[f"{prefix}_ids"][local][:, None]  # (b, T)
        src = (first[..., None] + pos)[keep]  # (nnz,) into the shard's flat values
        dst = ((sel[:, None, None] * T + np.arange(T)[:, None]) * width + pos)[keep]  # (nnz,) into (B, T, width)
        ids.reshape(-1)[dst] = shard.flat[ids_col][src]
        vals.reshape(-1)[dst] = decode(shard.flat[val_col][src])
    return ids, vals, lens_all


class _Shard:
    """One staged shard's columns as numpy views into the mapped file (no copies).

    ``flat[c]``: every value of blob column c, (n,); ``starts[c]``: (rows + 1,) element offsets into it;
    ``fixed[c]``: (rows, width) for fixed-width columns (input_ids, *_lengths, fixed top-k).
    """

    def __init__(self, seq_index: np.ndarray, flat: dict[str, np.ndarray], starts: dict[str, np.ndarray],
                 fixed: dict[str, np.ndarray]) -> None:
        self.seq_index, self.flat, self.starts, self.fixed = seq_index, flat, starts, fixed

    @classmethod
    def from_table(cls, table: pa.Table, layout: TargetLayout, *, rows: int, where: str) -> _Shard:
        if table.schema != _staged_schema(layout) or table.num_rows != rows:
            raise CacheFormatError(f"{where}: staged table has schema {table.schema} and {table.num_rows} rows; "
                                   f"expected {_staged_schema(layout)} and {rows} rows")
        T, ids = layout.seq_len, layout.id_dtype
        dtypes = {"input_ids": ids, "topk_ids": ids, "sample_ids": ids, "topk_logprobs": CODE_DTYPE,
                  "sample_counts": CODE_DTYPE, "topk_lengths": LENGTH_DTYPE, "sample_lengths": LENGTH_DTYPE}
        widths = {"input_ids": T, "topk_lengths": T, "sample_lengths": T}
        if layout.has_topk and not layout.adaptive:
            widths |= {"topk_ids": T * layout.top_k, "topk_logprobs": T * layout.top_k}
        flat, starts, fixed = {}, {}, {}
        for name in layout.columns()[1:]:
            flat[name], starts[name] = _blob_values(table.column(name).combine_chunks(), dtypes[name], f"{where}:{name}")
            if name in widths:
                if not np.all(np.diff(starts[name]) == widths[name]):
                    raise CacheFormatError(f"{where}: column {name} has rows of the wrong length (expected {widths[name]} values)")
                fixed[name] = flat[name].reshape(rows, widths[name])
        for prefix, vals, limit in (("topk", "topk_logprobs", layout.top_k), ("sample", "sample_counts", layout.samples)):
            if f"{prefix}_lengths" in fixed:
                lens = fixed[f"{prefix}_lengths"]  # (rows, T)
                per_row = lens.sum(axis=1, dtype=np.int64)
                if int(lens.max(initial=0)) > limit or not all(np.array_equal(np.diff(starts[c]), per_row)
                                                               for c in (f"{prefix}_ids", vals)):
                    raise CacheFormatError(f"{where}: {prefix}_lengths disagree with the {prefix} blobs (limit {limit})")
        seq_index = table.column("seq_index").to_numpy()
        return cls(seq_index, flat, starts, fixed)

    def row(self, j: int) -> dict[str, Any]:
        """Row j as ``decode_row`` input: seq_index and one contiguous array slice per blob column."""
        out: dict[str, Any] = {"seq_index": int(self.seq_index[j])}
        for name, values in self.flat.items():
            out[name] = values[self.starts[name][j]:self.starts[name][j + 1]]
        return out


def _blob_values(arr: pa.Array, dtype: np.dtype, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A large_binary array -> (all values as ``dtype``, (rows + 1,) element offsets), zero copy."""
    if arr.null_count:
        raise CacheFormatError(f"{where}: null values")
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, np.int64)[arr.offset:arr.offset + len(arr) + 1] if off_buf else np.zeros(1, np.int64)
    rel = offsets - offsets[0]
    if np.any(rel % dtype.itemsize) or np.any(np.diff(rel) < 0):
        raise CacheFormatError(f"{where}: blob lengths are not multiples of {dtype.itemsize} bytes")
    data = np.frombuffer(data_buf, np.uint8) if data_buf else np.zeros(0, np.uint8)
    return data[offsets[0]:offsets[-1]].view(dtype), rel // dtype.itemsize


def verify_cache(path: str | Path, *, progress: bool = False) -> list[str]:
    """Every problem found in a cache, human-readable and naming its file; empty means OK.

    Checks the manifest, each shard's size, sha256 and Parquet pages, row and token counts, that
    ``seq_index`` is increasing from the shard's ``first_seq`` and unique across shards, ids <
    vocab_size, top-k log-probs finite, <= 0, descending, distinct ids with mass <= 1, adaptive
    lengths >= 1, and sampled ids ascending with counts summing to ``samples``.
    """
    root = Path(path)
    try:
        meta = Manifest.load(root)
    except CacheFormatError as e:
        return [str(e)]
    layout, problems, seen = meta.layout, [], []
    shards = meta.shards
    if progress:
        from tqdm.auto import tqdm

        shards = tqdm(shards, desc="verify", unit="shard")
    for info in shards:
        try:
            file = check_shard_file(root, info)
            shard = _Shard.from_table(read_shard(file, info, layout), layout, rows=info.rows, where=str(file))
        except CacheFormatError as e:
            problems.append(str(e))
            continue
        problems += [f"{file}: {p}" for p in _content_problems(shard, layout, info, meta.corpus.get("num_sequences"))]
        seen.append(shard.seq_index)
    if seen and len(np.unique(all_seq := np.concatenate(seen))) != len(all_seq):
        problems.append(f"{root / 'manifest.json'}: some seq_index values appear more than once")
    return problems


def _content_problems(shard: _Shard, layout: TargetLayout, info: ShardInfo, num_sequences: Any) -> list[str]:
    out, sq, rows, T = [], shard.seq_index, info.rows, layout.seq_len
    if rows and int(sq.min()) != info.first_seq:
        out.append(f"smallest seq_index {int(sq.min())} != the manifest's first_seq {info.first_seq}")
    if np.any(np.diff(sq) <= 0) or (rows and int(sq.min()) < 0):
        out.append("seq_index values are not increasing and non-negative")
    if rows and isinstance(num_sequences, int) and int(sq.max()) >= num_sequences:
        out.append(f"seq_index {int(sq.max())} >= the corpus's {num_sequences} sequences")
    for name in ("input_ids", "topk_ids", "sample_ids"):
        if name in shard.flat and shard.flat[name].size and int(shard.flat[name].max()) >= layout.vocab_size:
            out.append(f"{name}: ids >= vocab_size {layout.vocab_size}")
    if layout.has_topk:
        lens = shard.fixed["topk_lengths"] if layout.adaptive else np.full((rows, T), layout.top_k)
        seg = np.repeat(np.arange(rows * T), lens.ravel())  # (n,) position of each entry
        codes, lp, same = shard.flat["topk_logprobs"], decode_logprobs(shard.flat["topk_logprobs"]), seg[1:] == seg[:-1]
        if layout.adaptive and rows and int(lens.min()) < 1:
            out.append("topk_lengths: positions with no top-k entry")
        if not np.all(np.isfinite(lp)) or np.any(lp > 0):
            out.append("topk_logprobs: non-finite or positive log-probs")
        if np.any((np.diff(codes.astype(np.int32)) < 0) & same):
            out.append("topk_logprobs: not in descending order within a position")
        ids = shard.flat["topk_ids"][np.lexsort((shard.flat["topk_ids"], seg))]
        if np.any((ids[1:] == ids[:-1]) & same):
            out.append("topk_ids: an id repeats within a position")
        if seg.size and (mass := np.bincount(seg, weights=np.exp(lp.astype(np.float64)))).max() > 1 + 1e-3:
            out.append(f"topk_logprobs: top-k probabilities sum to {mass.max():.4f} > 1")
    if layout.has_samples:
        lens = shard.fixed["sample_lengths"]
        seg = np.repeat(np.arange(rows * T), lens.ravel())
        counts, ids = shard.flat["sample_counts"], shard.flat["sample_ids"].astype(np.int64)
        sums = np.bincount(seg, weights=counts, minlength=rows * T)
        if counts.size and int(counts.min()) < 1:
            out.append("sample_counts: stored entries with zero draws")
        if np.any(sums != layout.samples):
            out.append(f"sample_counts: {int(np.sum(sums != layout.samples))} positions do not sum to {layout.samples} draws")
        if np.any((np.diff(ids) <= 0) & (seg[1:] == seg[:-1])):
            out.append("sample_ids: not strictly ascending within a position")
    return out
