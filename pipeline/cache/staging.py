"""Local staged copies of cache shards: decoded to Arrow IPC, memory-mapped as numpy views.

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

import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.cache.format import ShardInfo, StagedRows, TargetLayout
from kdcache.cache.shards import CacheError, content_problems, decode_shard, malformed, read_shard

log = logging.getLogger(__name__)


def default_staging_dir() -> Path:
    """Where staged shards go when ``staging_dir`` is not given (see the module docstring)."""
    if env := os.environ.get("KDCACHE_STAGING_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdcache" / "staging"


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
            problems = content_problems(staged, layout, info, None)  # one numpy pass, once per staging dir
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
            raise malformed(
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
                    raise malformed(
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
                    raise malformed(where, f"{prefix}_lengths disagree with the {prefix} blobs (limit {limit})")
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


def _blob_values(arr: pa.Array, dtype: np.dtype, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A large_binary array -> (all values as ``dtype``, (rows + 1,) element offsets), zero copy."""
    if arr.null_count:
        raise malformed(where, "null values")
    _, off_buf, data_buf = arr.buffers()
    offsets = (
        np.frombuffer(off_buf, np.int64)[arr.offset : arr.offset + len(arr) + 1] if off_buf else np.zeros(1, np.int64)
    )
    rel = offsets - offsets[0]
    data = np.frombuffer(data_buf, np.uint8) if data_buf else np.zeros(0, np.uint8)
    if np.any(rel % dtype.itemsize) or np.any(np.diff(rel) < 0) or offsets[0] < 0 or offsets[-1] > data.size:
        raise malformed(where, f"blob offsets are inconsistent or not multiples of {dtype.itemsize} bytes")
    return data[offsets[0] : offsets[-1]].view(dtype), rel // dtype.itemsize
