"""One cache shard on disk: checked, read, staged to Arrow IPC, memory-mapped as numpy views, verified.

Staging. Each Parquet shard is decoded once into an uncompressed Arrow IPC *file* named by the
shard's sha256 (``<sha256>.arrow``) and memory-mapped; readers fancy-index the mapped bytes.
Staged files are content-addressed, so caches may share a staging dir and a reopen reuses them.
They live outside the cache directory on purpose — a ``.staging/`` inside ``cache/<name>/`` would
change the DVC output's hash and be pushed with it — in, by priority: ``staging_dir=``,
``$KDCACHE_STAGING_DIR``, ``$XDG_CACHE_HOME/kdcache/staging``, ``~/.cache/kdcache/staging``.
Deleting that dir is safe whenever no reader is running. A staged file is written to a temporary
name and ``os.replace``d, never rewritten in place (a process that has it mapped would die of
SIGBUS); a per-shard ``flock`` lets one process stage while DataLoader workers or ranks on the
same machine wait. Staging hashes the Parquet bytes against the manifest, so a corrupt shard is
caught even when the reader was opened with ``verify="size"``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.cache.format import (
    CacheFormatError,
    Manifest,
    ShardInfo,
    StagedRows,
    TargetLayout,
    stage_rows,
)

log = logging.getLogger(__name__)


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
                raise CacheError(
                    f"{path}: symlink to {real}, outside the cache directory; refusing it — copy the "
                    "file into the cache (with DVC: `dvc config cache.type copy` or hardlink/reflink)"
                )
            st = os.stat(path)
    except FileNotFoundError as e:
        raise CacheError(
            f"{path}: shard listed in {root / 'manifest.json'} is missing; pull the cache again "
            "(dvc pull) or rerun the cache stage (it resumes)"
        ) from e
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"{path}: not a regular file; remove it and pull the cache again")
    if st.st_size != info.bytes:
        raise CacheError(
            f"{path}: {st.st_size} bytes but the manifest says {info.bytes}; the shard is truncated or "
            "damaged — pull it again (dvc pull) or rerun the cache stage"
        )
    return path


def sha_error(path: Path, digest: str, expected: str) -> CacheError:
    return CacheError(
        f"{path}: sha256 {digest} does not match the manifest's {expected}; the shard is corrupt — "
        "pull it again (dvc pull) or rerun the cache stage"
    )


STAGED_DTYPES = {
    "topk_lengths": np.dtype("<u2"),
    "topk_codes": np.dtype("u1"),
    "topk_tail": np.dtype("<u2"),
    "sample_lengths": np.dtype("<u2"),
    "sample_counts": np.dtype("<u2"),
}
"""Staged (decoded, memory-mapped) element types; ids keep ``layout.id_dtype``."""


def staged_columns(layout: TargetLayout) -> dict[str, np.dtype]:
    """Blob columns of a staged shard and their element dtypes (fixed top-k stores no lengths)."""
    names = ["input_ids"]
    if layout.has_topk:
        names += (["topk_lengths"] if layout.adaptive else []) + ["topk_ids", "topk_codes", "topk_tail"]
    if layout.has_samples:
        names += ["sample_lengths", "sample_ids", "sample_counts"]
    return {n: STAGED_DTYPES.get(n, layout.id_dtype) for n in names}


def _staged_schema(layout: TargetLayout) -> pa.Schema:
    """large_binary (64-bit offsets) blobs, so no shard hits Arrow's 2 GiB limit."""
    return pa.schema(
        [pa.field("seq_index", pa.int64(), nullable=False)]
        + [pa.field(n, pa.large_binary(), nullable=False) for n in staged_columns(layout)]
    )


def read_shard(path: Path, info: ShardInfo, layout: TargetLayout) -> pa.Table:
    """Read a shard once into memory, check its size and sha256, parse it (Parquet columns, as stored)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CacheError(
            f"{path}: cannot read the shard ({e}); check the file, pull it again or rerun the cache stage"
        ) from e
    if len(data) != info.bytes:
        raise CacheError(
            f"{path}: {len(data)} bytes but the manifest says {info.bytes}; pull it again or rerun the cache stage"
        )
    if (digest := hashlib.sha256(data).hexdigest()) != info.sha256:
        raise sha_error(path, digest, info.sha256)
    try:
        table = pq.read_table(pa.BufferReader(data), use_threads=False)  # one core; page CRCs add nothing past sha256
    except (pa.ArrowException, OSError) as e:
        raise CacheError(f"{path}: not a readable Parquet file ({e}); pull it again or rerun the cache stage") from e
    if table.schema != layout.schema():
        raise CacheError(
            f"{path}: columns {table.schema.names} ({table.schema.types}), the manifest's targets need "
            f"{layout.columns()} (int64 seq_index, binary blobs); the shard belongs to another cache — rebuild it"
        )
    if table.num_rows != info.rows:
        raise CacheError(f"{path}: {table.num_rows} rows but the manifest says {info.rows}; rebuild the shard")
    return table


def decode_shard(table: pa.Table, layout: TargetLayout, *, where: str) -> StagedRows:
    """Parquet columns -> decoded flat arrays (ids absolute); malformed blobs raise ``CacheError``."""
    try:
        return stage_rows(layout, table, where=where)
    except CacheFormatError as e:
        raise CacheError(f"{e}; the shard does not follow the cache format — rebuild it (rerun the cache stage)") from e


def staged_table(staged: StagedRows, layout: TargetLayout) -> pa.Table:
    """Decoded arrays -> one record batch of per-row blobs (what staging writes and ``MappedShard`` maps)."""
    R, T = staged.input_ids.shape
    arrays = [pa.array(staged.seq_index, pa.int64())]
    for name, dtype in staged_columns(layout).items():
        flat = np.ascontiguousarray(staged.input_ids if name == "input_ids" else staged.arrays[name], dtype)
        if name in ("input_ids", "topk_lengths", "topk_tail", "sample_lengths"):
            per_row = np.full(R, T, np.int64)
        else:
            lens = staged.arrays["topk_lengths" if name.startswith("topk") else "sample_lengths"]
            per_row = lens.reshape(R, T).sum(axis=1, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(per_row)]) * dtype.itemsize  # (R+1,) byte offsets
        arrays.append(
            pa.LargeBinaryArray.from_buffers(
                pa.large_binary(),
                R,
                [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(flat.reshape(-1).view(np.uint8))],
            )
        )
    return pa.Table.from_arrays(arrays, schema=_staged_schema(layout))


def stage_shard(path: Path, info: ShardInfo, layout: TargetLayout, staging_dir: Path, *, force: bool = False) -> Path:
    """Decode a Parquet shard into ``<staging_dir>/<sha256>.arrow`` (one record batch) unless already there."""
    target = staging_dir / f"{info.sha256}.arrow"
    try:
        staging_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(staging_dir / f"{info.sha256}.lock"):
            if target.exists() and not force:
                return target  # another process staged it while we waited
            t0 = time.perf_counter()
            staged = decode_shard(read_shard(path, info, layout), layout, where=str(path))
            problems = _content_problems(staged, layout, info, None)  # one numpy pass, once per staging dir
            if problems:
                raise CacheError(
                    f"{path}: {'; '.join(problems)} — do not train on this cache; rebuild or pull it again"
                )
            table = staged_table(staged, layout)
            MappedShard.from_table(table, layout, rows=info.rows, where=str(path))  # refuse malformed rows here
            tmp = staging_dir / f".{info.sha256}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            try:
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
                os.replace(tmp, target)  # new inode: processes mapping an older file keep theirs
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as e:
        raise CacheError(
            f"{staging_dir}: cannot stage {path} there ({e}); pass staging_dir= or set "
            "KDCACHE_STAGING_DIR to a writable local directory with free space"
        ) from e
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


def map_staged(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file; the buffers keep the mapping alive after the file handle closes."""
    with pa.memory_map(str(path), "r") as mm:
        table = pa.ipc.open_file(mm).read_all()
    return table.combine_chunks()  # a no-op (zero copy) for the single record batch that staging writes


def load_shard(path: Path, info: ShardInfo, layout: TargetLayout, staging_dir: Path) -> MappedShard:
    """Stage the shard unless a staged copy exists, and map it; a damaged staged copy is replaced."""
    target = staging_dir / f"{info.sha256}.arrow"
    if not target.exists():
        stage_shard(path, info, layout, staging_dir)
    try:
        return MappedShard.from_table(map_staged(target), layout, rows=info.rows, where=str(target))
    except (pa.ArrowException, OSError, ValueError) as e:
        log.warning("restaging %s: staged file %s unusable (%s)", path, target, e)
        stage_shard(path, info, layout, staging_dir, force=True)
        return MappedShard.from_table(map_staged(target), layout, rows=info.rows, where=str(target))


class MappedShard:
    """One staged shard's columns as numpy views into the mapped file (no copies).

    ``flat[c]``: every value of blob column c, (n,); ``starts[c]``: (rows + 1,) element offsets into it;
    ``fixed[c]``: (rows, width) for fixed-width columns (input_ids, lengths, offsets, fixed top-k).
    Columns are those of ``staged_columns``: ids absolute and ascending per position, top-k values as
    uint8 codes plus a tail code per position (``cache_format.decode_topk_logprobs``).
    """

    def __init__(
        self,
        seq_index: np.ndarray,
        flat: dict[str, np.ndarray],
        starts: dict[str, np.ndarray],
        fixed: dict[str, np.ndarray],
        layout: TargetLayout,
    ) -> None:
        self.seq_index, self.flat, self.starts, self.fixed, self.layout = seq_index, flat, starts, fixed, layout

    @classmethod
    def from_table(cls, table: pa.Table, layout: TargetLayout, *, rows: int, where: str) -> MappedShard:
        if table.schema != _staged_schema(layout) or table.num_rows != rows:
            raise _malformed(
                where,
                f"schema {table.schema} and {table.num_rows} rows, expected {_staged_schema(layout)} and {rows} rows",
            )
        T = layout.seq_len
        widths = {"input_ids": T, "topk_lengths": T, "topk_tail": T, "sample_lengths": T}
        if layout.has_topk and not layout.adaptive:
            widths |= {"topk_ids": T * layout.top_k, "topk_codes": T * layout.top_k}
        flat, starts, fixed = {}, {}, {}
        for name, dtype in staged_columns(layout).items():
            flat[name], starts[name] = _blob_values(table.column(name).combine_chunks(), dtype, f"{where}:{name}")
            if name in widths:
                if not np.all(np.diff(starts[name]) == widths[name]):
                    raise _malformed(
                        where, f"column {name} has rows of the wrong length (expected {widths[name]} values)"
                    )
                fixed[name] = flat[name].reshape(rows, widths[name])
        for prefix, vals, limit in (("topk", "topk_codes", layout.top_k), ("sample", "sample_counts", layout.samples)):
            if f"{prefix}_lengths" in fixed:
                lens = fixed[f"{prefix}_lengths"]  # (rows, T)
                per_row = lens.sum(axis=1, dtype=np.int64)
                if int(lens.max(initial=0)) > limit or not all(
                    np.array_equal(np.diff(starts[c]), per_row) for c in (f"{prefix}_ids", vals)
                ):
                    raise _malformed(where, f"{prefix}_lengths disagree with the {prefix} blobs (limit {limit})")
        seq_index = table.column("seq_index").to_numpy()
        return cls(seq_index, flat, starts, fixed, layout)

    def lengths(self, prefix: str, local: np.ndarray) -> np.ndarray:
        """(len(local), T) entries per position of rows ``local`` ('topk' or 'sample')."""
        if prefix == "topk" and not self.layout.adaptive:
            return np.full((len(local), self.layout.seq_len), self.layout.top_k, np.int64)
        return self.fixed[f"{prefix}_lengths"][local]

    def row(self, j: int) -> dict[str, Any]:
        """Row j: seq_index, input_ids and one array slice per staged column (``unpack_row`` input)."""
        out: dict[str, Any] = {"seq_index": int(self.seq_index[j])}
        for name, values in self.flat.items():
            out[name] = values[self.starts[name][j] : self.starts[name][j + 1]]
        if self.layout.has_topk and not self.layout.adaptive:
            out["topk_lengths"] = self.lengths("topk", np.array([j]))[0]
        return out


def _malformed(where: str, what: str) -> CacheError:
    return CacheError(
        f"{where}: {what}; the shard does not follow the cache format — rebuild it (rerun the cache stage)"
    )


def _blob_values(arr: pa.Array, dtype: np.dtype, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A large_binary array -> (all values as ``dtype``, (rows + 1,) element offsets), zero copy."""
    if arr.null_count:
        raise _malformed(where, "null values")
    _, off_buf, data_buf = arr.buffers()
    offsets = (
        np.frombuffer(off_buf, np.int64)[arr.offset : arr.offset + len(arr) + 1] if off_buf else np.zeros(1, np.int64)
    )
    rel = offsets - offsets[0]
    data = np.frombuffer(data_buf, np.uint8) if data_buf else np.zeros(0, np.uint8)
    if np.any(rel % dtype.itemsize) or np.any(np.diff(rel) < 0) or offsets[0] < 0 or offsets[-1] > data.size:
        raise _malformed(where, f"blob offsets are inconsistent or not multiples of {dtype.itemsize} bytes")
    return data[offsets[0] : offsets[-1]].view(dtype), rel // dtype.itemsize


def verify_cache(path: str | Path, *, progress: bool = False) -> list[str]:
    """Every problem found in a cache, human-readable and naming its file; empty means OK.

    Checks the manifest, each shard's size, sha256, Parquet structure and blob sizes, row and token
    counts, that ``seq_index`` is increasing from the shard's ``first_seq`` and unique across shards,
    ids < vocab_size and strictly ascending within a position (gap coding wraps on corrupt gaps),
    lengths within [1, top_k] (adaptive) / [1, samples], and sample counts >= 1 summing to ``samples``.
    Top-k values need no check: every code and tail code decodes to a finite, normalized distribution.
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
            staged = decode_shard(read_shard(file, info, layout), layout, where=str(file))
        except CacheFormatError as e:
            problems.append(str(e))
            continue
        problems += [f"{file}: {p}" for p in _content_problems(staged, layout, info, meta.corpus.get("num_sequences"))]
        seen.append(staged.seq_index)
    if seen and len(np.unique(all_seq := np.concatenate(seen))) != len(all_seq):
        problems.append(f"{root / 'manifest.json'}: some seq_index values appear more than once")
    return problems


def _content_problems(staged: StagedRows, layout: TargetLayout, info: ShardInfo, num_sequences: Any) -> list[str]:
    out, sq, rows, a = [], staged.seq_index, info.rows, staged.arrays
    if rows and int(sq.min()) != info.first_seq:
        out.append(f"smallest seq_index {int(sq.min())} != the manifest's first_seq {info.first_seq}")
    if np.any(np.diff(sq) <= 0) or (rows and int(sq.min()) < 0):
        out.append("seq_index values are not increasing and non-negative")
    if rows and isinstance(num_sequences, int) and int(sq.max()) >= num_sequences:
        out.append(f"seq_index {int(sq.max())} >= the corpus's {num_sequences} sequences")
    if staged.input_ids.size and int(staged.input_ids.max()) >= layout.vocab_size:
        out.append(f"input_ids: ids >= vocab_size {layout.vocab_size}")
    for prefix in ("topk", "sample"):
        if f"{prefix}_ids" not in a:
            continue
        ids, lens = a[f"{prefix}_ids"].astype(np.int64), a[f"{prefix}_lengths"]
        same = np.repeat(np.arange(lens.size), lens.astype(np.int64))  # (n,) position of each entry
        if ids.size and int(ids.max()) >= layout.vocab_size:
            out.append(f"{prefix}_ids: ids >= vocab_size {layout.vocab_size}")
        if np.any((np.diff(ids) <= 0) & (same[1:] == same[:-1])):
            out.append(f"{prefix}_ids: not strictly ascending within a position")
        if lens.size and int(lens.min()) < 1:
            out.append(f"{prefix}_lengths: positions with no entry")
    if layout.has_samples:
        counts, lens = a["sample_counts"], a["sample_lengths"]
        sums = np.bincount(np.repeat(np.arange(lens.size), lens.astype(np.int64)), weights=counts, minlength=lens.size)
        if counts.size and int(counts.min()) < 1:
            out.append("sample_counts: stored entries with zero draws")
        if np.any(sums != layout.samples):
            out.append(
                f"sample_counts: {int(np.sum(sums != layout.samples))} positions do not sum to {layout.samples} draws"
            )
    return out
