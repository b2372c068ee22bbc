"""The staged layout of a shard (version 2): one Arrow IPC record batch of per-row blobs, each column's rows
either raw little-endian values or one zstd frame per row, and ``MappedShard``, which memory-maps such a file
and decodes only the rows a batch selects.

Why compact: the uncompressed staged copy (v1) was 1.8-3.3x the Parquet bytes (ids widen to 4 bytes past
V = 65,536; sample counts and lengths were uint16), so a 1B-token cache needed several times its size in
local scratch. Here each column keeps the Parquet's element width, and staging compresses columns in order
of the bytes zstd saves (ids first: 128-256 B/token raw at top-64) until the copy is about ``TARGET_RATIO``
x the Parquet bytes; the rest (top-k value codes barely compress) stay raw and are gathered zero-copy, as
decoding costs more than gathering. A compressed row is its values' little-endian bytes or, when that
compresses clearly smaller (``PLANES_MIN_GAIN``), the low byte planes that hold them (18-bit ids at
V = 151,936: 3 planes of the 4 bytes). Ids stay absolute, so batches need no prefix sum.
``bench/staging.py`` measures bytes and loader speed against v1.

``staging`` decides where such files live and when they can be trusted; this module only knows
their columns. ``STAGED_VERSION`` is in every file's schema metadata and ``STAGED_SUFFIX`` in its name:
a staged copy of another layout version is never read as this one.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zstandard

from kdcache.cache.format import TargetLayout
from kdcache.cache.rows import StagedRows, position_shapes
from kdcache.cache.shards import CacheError

STAGED_VERSION = 2
"""Layout version of staged files (v1: uncompressed ``.arrow`` files, which this reader ignores)."""
STAGED_SUFFIX = ".v2.ipc"
"""Staged file names end ``<shard sha256>-<xxh3 of the bytes>`` + this suffix."""
META_KEY = b"kdcache.staged"
ZSTD_LEVEL = 1
"""Staging compresses at zstd level 1: level 3 saves < 1% more here and stages ~1.7x slower."""
MIN_SAVING = 0.10
"""A column is stored compressed only if zstd saves at least this fraction of its bytes."""
TARGET_RATIO = 1.45
"""Staging compresses columns (most bytes saved first) until the staged copy is about this many times the
Parquet shard (issue 12's bound: 1.5x): decoding a compressed column costs more than gathering a raw one (ids of
a top-64 batch: ~20-35% of its assembly time), so columns the bound does not need stay raw (the demo's sampled
cache compresses its ids and counts; a top-64 cache only its ids). ``$KDCACHE_STAGING_RATIO`` overrides it
(``staging.default_target_ratio``): a node with scratch to spare trades bytes for loader speed (~2.6: nothing
compressed)."""
CODECS = ("raw", "zstd", "zstd-planes")
"""Per column: raw little-endian values (gathered zero-copy), or one zstd frame per row of the row's
little-endian bytes, or of its low byte planes (``planes`` bytes of each value; byte 0 of every value, then
byte 1, ...; see ``PLANES_MIN_GAIN``)."""
PLANES_MIN_GAIN = 0.10
"""Byte planes are chosen over plain little-endian values only if they compress the sample this much smaller:
reassembling values from planes costs ~6x a plain cast (ids at V = 151,936: planes 25% smaller, kept)."""
SAMPLE_ROWS = 8
"""Rows of a column compressed each way to choose its codec."""
_local = threading.local()


def staged_columns(layout: TargetLayout) -> dict[str, np.dtype]:
    """Blob columns of a staged shard and their element dtypes: the Parquet's widths (``blob_dtypes``)
    with ids absolute; fixed top-k stores no lengths."""
    dtypes = layout.blob_dtypes()
    names = ["input_ids"]
    if layout.has_topk:
        names += (["topk_lengths"] if layout.adaptive else []) + ["topk_ids", "topk_codes", "topk_tail"]
    if layout.has_samples:
        names += ["sample_lengths", "sample_ids", "sample_counts"]
    names += list(position_shapes(layout, hidden=True))
    return {n: dtypes[n] for n in names}


def staged_schema(layout: TargetLayout) -> pa.Schema:
    """large_binary (64-bit offsets) blobs, so no shard hits Arrow's 2 GiB limit (metadata not included)."""
    return pa.schema(
        [pa.field("seq_index", pa.int64(), nullable=False)]
        + [pa.field(n, pa.large_binary(), nullable=False) for n in staged_columns(layout)]
    )


def _row_sizes(staged: StagedRows, layout: TargetLayout, name: str) -> np.ndarray:
    """(R,) values per row of column ``name``."""
    R, T = staged.input_ids.shape
    shapes = position_shapes(layout, hidden=True)
    if name in ("input_ids", "topk_lengths", "topk_tail", "sample_lengths") or name in shapes:
        return np.full(R, int(np.prod(shapes.get(name, (T,)))), np.int64)
    lens = staged.arrays["topk_lengths" if name.startswith("topk") else "sample_lengths"]
    return lens.reshape(R, T).sum(axis=1, dtype=np.int64)


def staged_table(
    staged: StagedRows,
    layout: TargetLayout,
    *,
    parquet_bytes: int | None = None,
    target_ratio: float = TARGET_RATIO,
    codecs: dict[str, str] | None = None,
) -> pa.Table:
    """Decoded arrays -> one record batch of per-row blobs (what staging writes and ``MappedShard`` maps).

    Columns are compressed in order of the bytes zstd saves on them (estimated on their first ``SAMPLE_ROWS``
    rows, each with its smaller codec), until the staged copy is estimated to fit ``target_ratio`` x
    ``parquet_bytes``; the rest stay raw (gathered zero-copy, the cheapest to decode). Without
    ``parquet_bytes``, every column that zstd shrinks by ``MIN_SAVING`` is compressed. ``codecs`` forces a
    column's codec (tests)."""
    R = staged.input_ids.shape[0]
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    columns: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]] = {}  # name -> (values, row ends, spec)
    saving: dict[str, tuple[str, float]] = {}  # column -> (best codec, estimated bytes saved)
    for name, dtype in staged_columns(layout).items():
        flat = np.ascontiguousarray(staged.input_ids if name == "input_ids" else staged.arrays[name]).reshape(-1)
        if flat.dtype != dtype and flat.size and np.any(flat.astype(dtype) != flat):
            raise ValueError(f"staged column {name}: values do not fit {dtype}")  # the content checks prevent it
        flat = flat.astype(dtype, copy=False)
        ends = np.cumsum(_row_sizes(staged, layout, name))  # (R,)
        spec = {"dtype": dtype.str, "codec": (codecs or {}).get(name, "raw"), "planes": _planes_needed(flat)}
        columns[name] = (flat, ends, spec)
        if name not in (codecs or {}):
            sample = np.split(flat[: ends[min(SAMPLE_ROWS, R) - 1]], ends[: min(SAMPLE_ROWS, R) - 1]) if R else []
            codec, fraction = _best_codec(sample, spec["planes"], compressor)
            if fraction >= MIN_SAVING:
                saving[name] = (codec, fraction * flat.nbytes)
    total = sum(flat.nbytes for flat, _, _ in columns.values())
    for name in sorted(saving, key=lambda n: -saving[n][1]):
        if parquet_bytes is not None and total <= target_ratio * parquet_bytes:
            break
        columns[name][2]["codec"], total = saving[name][0], total - saving[name][1]
    arrays, chosen = [pa.array(staged.seq_index, pa.int64())], {}
    for name, (flat, ends, spec) in columns.items():
        if spec["codec"] == "raw":
            data = flat.view(np.uint8)
            offsets = np.concatenate([[0], ends]) * np.dtype(spec["dtype"]).itemsize
        else:
            frames = [
                compressor.compress(_encode(row, spec["codec"], spec["planes"])) for row in np.split(flat, ends[:-1])
            ]
            data = np.frombuffer(b"".join(frames), np.uint8)
            offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames], dtype=np.int64)])
        chosen[name] = spec
        arrays.append(
            pa.LargeBinaryArray.from_buffers(
                pa.large_binary(), R, [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data)]
            )
        )
    meta = {META_KEY: json.dumps({"version": STAGED_VERSION, "columns": chosen}, sort_keys=True).encode()}
    return pa.Table.from_arrays(arrays, schema=staged_schema(layout).with_metadata(meta))


def _planes_needed(flat: np.ndarray) -> int:
    """Low bytes that hold every value of an unsigned column (ids < 151,936 need 3 of 4); else all bytes."""
    if flat.dtype.kind != "u" or not flat.size:
        return flat.dtype.itemsize
    return max(1, (int(flat.max()).bit_length() + 7) // 8)


def _encode(row: np.ndarray, codec: str, planes: int) -> bytes:
    """A row's bytes before zstd: little-endian values ('zstd') or their low ``planes`` byte planes."""
    if codec == "zstd":
        return row.tobytes()
    return np.ascontiguousarray(row.view(np.uint8).reshape(-1, row.dtype.itemsize)[:, :planes].T).tobytes()


def _best_codec(sample: list[np.ndarray], planes: int, compressor: zstandard.ZstdCompressor) -> tuple[str, float]:
    """(the compressed codec that makes ``sample`` smallest, the fraction of its bytes it saves)."""
    raw = sum(row.nbytes for row in sample)
    sizes = {
        codec: sum(len(compressor.compress(_encode(row, codec, planes))) for row in sample) for codec in CODECS[1:]
    }
    best = "zstd-planes" if sizes["zstd-planes"] < (1 - PLANES_MIN_GAIN) * sizes["zstd"] else "zstd"
    return best, (1 - sizes[best] / raw) if raw else 0.0


def map_staged(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file; the buffers keep the mapping alive after the file handle closes."""
    with pa.memory_map(str(path), "r") as mm:
        table = pa.ipc.open_file(mm).read_all()
    return table.combine_chunks()  # a no-op (zero copy) for the single record batch that staging writes


def _decompressor() -> zstandard.ZstdDecompressor:
    """One decompressor per thread (they are not thread-safe)."""
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor()
    return d


class MappedShard:
    """One staged shard: ``seq_index`` (rows,), and per column the mapped blob bytes, decoded on access.

    Columns are those of ``staged_columns``: ids absolute and ascending per position, top-k values as
    uint8 codes plus a tail code per position (``cache_format.decode_topk_logprobs``). ``codec[c]``:
    'raw' columns are numpy views (``flat[c]`` every value, ``starts[c]`` (rows + 1,) element offsets,
    ``fixed[c]`` (rows, width) for fixed-width columns); 'zstd' columns are decoded per row by
    ``take_fixed`` / ``take_ragged``. Ragged targets' ``lengths`` are decoded once, at map time (1-2 bytes
    per position).
    """

    def __init__(self, table: pa.Table, layout: TargetLayout, *, rows: int, where: str) -> None:
        self.layout, self.rows, self.where = layout, rows, where
        columns = _check_schema(table, layout, rows, where)
        T = layout.seq_len
        self.width = {"input_ids": T, "topk_lengths": T, "topk_tail": T, "sample_lengths": T}
        self.width |= {name: int(np.prod(shape)) for name, shape in position_shapes(layout, hidden=True).items()}
        if layout.has_topk and not layout.adaptive:
            self.width |= {"topk_ids": T * layout.top_k, "topk_codes": T * layout.top_k}
        self.dtype = {name: np.dtype(spec["dtype"]) for name, spec in columns.items()}
        self.codec = {name: spec["codec"] for name, spec in columns.items()}
        self.planes = {name: int(spec.get("planes", 0)) for name, spec in columns.items()}
        self.data, self.offsets, self.flat, self.starts, self.fixed = {}, {}, {}, {}, {}
        for name, dtype in self.dtype.items():
            data, offsets = _blob_bytes(table.column(name).combine_chunks(), f"{where}:{name}")
            self.data[name], self.offsets[name] = data, offsets
            if self.codec[name] == "raw":
                if np.any(offsets % dtype.itemsize):
                    raise _damaged(where, f"column {name}: rows are not whole {dtype.itemsize}-byte values")
                self.flat[name] = data[offsets[0] : offsets[-1]].view(dtype)
                self.starts[name] = (offsets - offsets[0]) // dtype.itemsize
                if name in self.width:
                    self._check_sizes(name)
                    self.fixed[name] = self.flat[name].reshape(rows, self.width[name])
        self.entries: dict[str, np.ndarray] = {}  # (rows,) entries per row of ragged targets
        self.lengths_rows: dict[str, np.ndarray] = {}  # (rows, T) entries per position
        for prefix, limit in (("topk", layout.top_k), ("sample", layout.samples)):
            if f"{prefix}_lengths" in self.dtype:
                lens = np.empty((rows, T), np.int64)
                self.take_fixed(f"{prefix}_lengths", np.arange(rows), lens, np.arange(rows))
                if rows and int(lens.max()) > limit:
                    raise _damaged(where, f"{prefix}_lengths above the limit {limit}")
                self.lengths_rows[prefix], self.entries[prefix] = lens, lens.sum(axis=1)
            elif prefix == "topk" and layout.has_topk:
                self.entries[prefix] = np.full(rows, T * layout.top_k, np.int64)
        for name in self.flat.keys() - self.width.keys():  # raw ragged columns
            self._check_sizes(name)
        self.seq_index = table.column("seq_index").to_numpy()

    def _check_sizes(self, name: str) -> None:
        """A raw column's rows hold the values ``sizes`` says (fixed width, or the entries its lengths give)."""
        if not np.array_equal(np.diff(self.starts[name]), self.sizes(name, np.arange(self.rows))):
            raise _damaged(self.where, f"column {name} has rows of the wrong length")

    @classmethod
    def from_table(cls, table: pa.Table, layout: TargetLayout, *, rows: int, where: str) -> MappedShard:
        return cls(table, layout, rows=rows, where=where)

    def sizes(self, name: str, local: np.ndarray) -> np.ndarray:
        """(len(local),) values per row of column ``name``."""
        if name in self.width:
            return np.full(len(local), self.width[name], np.int64)
        return self.entries["topk" if name.startswith("topk") else "sample"][local]

    def take_fixed(self, name: str, local: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        """Fixed-width column ``name``: row ``local[i]`` into ``out[at[i]]``; ``out`` (B, width) C-contiguous,
        any dtype (cast)."""
        if self.codec[name] == "raw":
            out[at] = self.fixed[name][local]
            return
        for j, i in zip(local.tolist(), at.tolist(), strict=True):
            self._decode(name, j, out[i])

    def take_ragged(self, name: str, local: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        """Ragged column ``name`` (per-entry ids or values): row ``local[i]``'s entries into
        ``out[at[i] : at[i] + entries]``; ``out`` flat, any dtype (cast)."""
        sizes = self.sizes(name, local)
        if self.codec[name] == "raw":
            out[ranges(at, sizes)] = self.flat[name][ranges(self.starts[name][local], sizes)]
            return
        for j, i, n in zip(local.tolist(), at.tolist(), sizes.tolist(), strict=True):
            self._decode(name, j, out[i : i + n])

    def _decode(self, name: str, j: int, dst: np.ndarray) -> None:
        """Row j of a compressed column into ``dst`` (a contiguous 1-D view of its length, any dtype: cast)."""
        dtype, offsets, n, codec = self.dtype[name], self.offsets[name], dst.shape[0], self.codec[name]
        raw = _decompressor().decompress(self.data[name][offsets[j] : offsets[j + 1]])
        planes = self.planes[name] if codec == "zstd-planes" else dtype.itemsize
        if len(raw) != n * planes:
            raise _damaged(self.where, f"column {name} row {j}: {len(raw)} bytes, expected {n} values")
        if codec == "zstd" or dtype.itemsize == 1:
            dst[...] = np.frombuffer(raw, dtype)
            return
        bits = np.empty(n, f"u{dtype.itemsize}")  # the values' bits, native order: high plane first, shifted down
        plane = np.frombuffer(raw, np.uint8).reshape(planes, n)  # byte q of every value, then byte q + 1
        np.copyto(bits, plane[planes - 1])
        for q in range(planes - 2, -1, -1):
            np.left_shift(bits, 8, out=bits)
            np.bitwise_or(bits, plane[q], out=bits)
        dst[...] = bits.view(dtype.newbyteorder("="))  # contiguous passes: ~20% faster than strided byte copies

    def lengths(self, prefix: str, local: np.ndarray) -> np.ndarray:
        """(len(local), T) entries per position of rows ``local`` ('topk' or 'sample')."""
        if prefix == "topk" and not self.layout.adaptive:
            return np.full((len(local), self.layout.seq_len), self.layout.top_k, np.int64)
        return self.lengths_rows[prefix][local]

    def row(self, j: int) -> dict[str, Any]:
        """Row j: seq_index, input_ids and one array per staged column (``unpack_row`` input, new arrays)."""
        out: dict[str, Any] = {"seq_index": int(self.seq_index[j])}
        one, zero = np.array([j]), np.zeros(1, np.int64)
        for name, dtype in self.dtype.items():
            if name in self.width:
                out[name] = np.empty((1, self.width[name]), dtype)
                self.take_fixed(name, one, out[name], zero)
                out[name] = out[name][0]
            else:
                out[name] = np.empty(int(self.sizes(name, one)[0]), dtype)
                self.take_ragged(name, one, out[name], zero)
        if self.layout.has_topk and not self.layout.adaptive:
            out["topk_lengths"] = self.lengths("topk", one)[0]
        return out


def _check_schema(table: pa.Table, layout: TargetLayout, rows: int, where: str) -> dict[str, dict[str, str]]:
    """The staged file's column specs (dtype, codec), after refusing another layout, version or row count."""
    try:
        meta = json.loads((table.schema.metadata or {})[META_KEY])
        columns = meta["columns"]
        version = meta["version"]
    except (KeyError, ValueError, TypeError) as e:
        raise _damaged(where, f"no staged-layout metadata ({e!r}); not a version-{STAGED_VERSION} staged file") from e
    expected = staged_columns(layout)
    if (
        version != STAGED_VERSION
        or table.schema.remove_metadata() != staged_schema(layout)
        or table.num_rows != rows
        or set(columns) != set(expected)
        or any(not _spec_ok(columns[n], expected[n]) for n in expected)
    ):
        raise _damaged(
            where,
            f"staged layout v{version}, schema {table.schema.remove_metadata()}, columns {columns} and "
            f"{table.num_rows} rows; expected v{STAGED_VERSION}, {staged_schema(layout)}, dtypes "
            f"{ {n: d.str for n, d in expected.items()} } and {rows} rows",
        )
    return columns


def _damaged(where: str, what: str) -> CacheError:
    """A staged file that is not what this kdcache writes (``staging`` sets it aside and stages the shard afresh)."""
    return CacheError(f"{where}: {what}; not a usable staged copy — delete it (a reader sets it aside and restages)")


def _spec_ok(spec: dict, dtype: np.dtype) -> bool:
    planes = spec.get("planes")
    return (
        spec.get("dtype") == dtype.str
        and spec.get("codec") in CODECS
        and isinstance(planes, int)
        and 1 <= planes <= dtype.itemsize
    )


def _blob_bytes(arr: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A large_binary array -> (its data bytes, (rows + 1,) byte offsets into them), zero copy."""
    if arr.null_count:
        raise _damaged(where, "null values")
    _, off_buf, data_buf = arr.buffers()
    offsets = (
        np.frombuffer(off_buf, np.int64)[arr.offset : arr.offset + len(arr) + 1] if off_buf else np.zeros(1, np.int64)
    )
    data = np.frombuffer(data_buf, np.uint8) if data_buf else np.zeros(0, np.uint8)
    if np.any(np.diff(offsets) < 0) or offsets[0] < 0 or offsets[-1] > data.size:
        raise _damaged(where, "blob offsets are inconsistent")
    return data, offsets


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(starts[i], starts[i] + lengths[i])`` -> (sum(lengths),) int64, no Python loop."""
    lengths = lengths.astype(np.int64)
    return np.repeat(starts.astype(np.int64) - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
