"""The staged layout of a shard: decoded arrays as one Arrow IPC record batch of per-row blobs, and
``MappedShard``, numpy views into a memory-mapped staged file (no copies).

``staging`` decides where such files live and when they can be trusted; this module only knows
their columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.cache.format import TargetLayout
from kdcache.cache.rows import StagedRows, position_shapes
from kdcache.cache.shards import malformed

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
    v2 = {name: layout.blob_dtypes()[name] for name in position_shapes(layout, hidden=True)}  # stored as in the shard
    dtypes = STAGED_DTYPES | dict(zip(("topk_codes", "topk_tail"), layout.value_dtypes, strict=True))  # as stored
    return {n: dtypes.get(n, layout.id_dtype) for n in names} | v2


def staged_schema(layout: TargetLayout) -> pa.Schema:
    """large_binary (64-bit offsets) blobs, so no shard hits Arrow's 2 GiB limit."""
    return pa.schema(
        [pa.field("seq_index", pa.int64(), nullable=False)]
        + [pa.field(n, pa.large_binary(), nullable=False) for n in staged_columns(layout)]
    )


def staged_table(staged: StagedRows, layout: TargetLayout) -> pa.Table:
    """Decoded arrays -> one record batch of per-row blobs (what staging writes and ``MappedShard`` maps)."""
    R, T = staged.input_ids.shape
    arrays, shapes = [pa.array(staged.seq_index, pa.int64())], position_shapes(layout, hidden=True)
    for name, dtype in staged_columns(layout).items():
        flat = np.ascontiguousarray(staged.input_ids if name == "input_ids" else staged.arrays[name], dtype)
        if name in ("input_ids", "topk_lengths", "topk_tail", "sample_lengths") or name in shapes:
            per_row = np.full(R, int(np.prod(shapes.get(name, (T,)))), np.int64)
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
    return pa.Table.from_arrays(arrays, schema=staged_schema(layout))


def map_staged(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file; the buffers keep the mapping alive after the file handle closes."""
    with pa.memory_map(str(path), "r") as mm:
        table = pa.ipc.open_file(mm).read_all()
    return table.combine_chunks()  # a no-op (zero copy) for the single record batch that staging writes


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
        if table.schema != staged_schema(layout) or table.num_rows != rows:
            raise malformed(
                where,
                f"schema {table.schema} and {table.num_rows} rows, expected {staged_schema(layout)} and {rows} rows",
            )
        T = layout.seq_len
        widths = {"input_ids": T, "topk_lengths": T, "topk_tail": T, "sample_lengths": T}
        widths |= {name: int(np.prod(shape)) for name, shape in position_shapes(layout, hidden=True).items()}
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
