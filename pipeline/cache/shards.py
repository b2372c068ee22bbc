"""One Parquet shard as stored in a cache: checked on disk, read, hashed, decoded, checked in content.

Everything here refuses bad input with a ``CacheError`` that names the file and the fix;
``staging`` (local copies) and ``verify`` (whole caches) build on it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.cache.format import CacheFormatError, ShardInfo, TargetLayout
from kdcache.cache.rows import StagedRows, stage_rows
from kdcache.files import UnsafeFileError, check_regular_file


class CacheError(CacheFormatError):
    """A cache cannot be used: missing/damaged/hostile files or a tokenizer mismatch. Names the file and the fix."""


def check_shard_file(root: Path, info: ShardInfo) -> Path:
    """The shard's path, after refusing a missing file, a link outside ``root``, a non-file or a wrong size."""
    path = root / info.file
    try:
        check_regular_file(
            path,
            fix="refusing it: copy the file into the cache (with DVC: `dvc config cache.type copy` or "
            "hardlink/reflink), or remove it and pull the cache again",
            parent="the cache directory",
        )
    except FileNotFoundError as e:
        raise CacheError(
            f"{path}: shard listed in {root / 'manifest.json'} is missing; pull the cache again "
            "(dvc pull) or rerun the cache stage (it resumes)"
        ) from e
    except UnsafeFileError as e:
        raise CacheError(str(e)) from e
    size = path.stat().st_size
    if size != info.bytes:
        raise CacheError(
            f"{path}: {size} bytes but the manifest says {info.bytes}; the shard is truncated or "
            "damaged — pull it again (dvc pull) or rerun the cache stage"
        )
    return path


def sha_error(path: Path, digest: str, expected: str) -> CacheError:
    return CacheError(
        f"{path}: sha256 {digest} does not match the manifest's {expected}; the shard is corrupt — "
        "pull it again (dvc pull) or rerun the cache stage"
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


def malformed(where: str, what: str) -> CacheError:
    return CacheError(
        f"{where}: {what}; the shard does not follow the cache format — rebuild it (rerun the cache stage)"
    )


def content_problems(staged: StagedRows, layout: TargetLayout, info: ShardInfo, num_sequences: Any) -> list[str]:
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
    if "topk_log_z" in a and not np.all(np.isfinite(a["topk_log_z"])):
        out.append("topk_log_z: NaN/inf log-normalizers")
    for name in (f"teacher_{s}" for s in layout.signals):
        v = a[name].astype(np.float32)
        if np.any(np.isinf(v)) or np.any(v < -1e-2):  # NaN marks a position without a next token
            out.append(f"{name}: infinite or negative values")
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


COLUMN_GROUPS = {
    "seq_index": "ids",
    "input_ids": "ids",
    "topk_log_z": "log-normalizers",
    "byte_lengths": "byte spans",
}
"""Column -> the group ``column_bytes`` counts it in (else by prefix: ``topk_`` top-k, ``sample_`` samples,
``teacher_`` signals)."""


def column_bytes(root: Path, shards: list[ShardInfo]) -> dict[str, int]:
    """Compressed bytes per column group over ``shards``, read from the Parquet footers only (no data pages)."""
    prefixes = {"topk_": "top-k", "sample_": "samples", "teacher_": "signals", "hidden_": "hidden states"}
    out: dict[str, int] = {}
    for info in shards:
        meta = pq.read_metadata(check_shard_file(root, info))
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema
                kind = COLUMN_GROUPS.get(name) or next((v for k, v in prefixes.items() if name.startswith(k)), name)
                out[kind] = out.get(kind, 0) + column.total_compressed_size
    return out
