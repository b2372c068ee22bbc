"""Rows of a shard: ``SequenceTargets`` -> Parquet columns (``encode_table``) and back (``stage_rows``,
``decode_row``, ``unpack_row``), with the byte-level codes of ``codec``. The column list and the
manifest are the contract in ``format``; this module is the one place that builds or reads rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.cache.codec import (
    CacheFormatError,
    add_base,
    check_fine_codes,
    column_values,
    decode_gaps,
    decode_topk_logprobs,
    encode_gaps,
    encode_tail,
    encode_topk_values,
    padded,
    row_blobs,
    sorted_entries,
    to_planes,
)
from kdcache.cache.format import SIGNALS, SequenceTargets, TargetLayout


def _topk_columns(layout: TargetLayout, rows: list[SequenceTargets]) -> dict[str, list[bytes]]:
    ids, lps, lengths, tails = [], [], [], []
    for t in rows:
        if t.topk_ids is None or t.topk_logprobs is None:
            raise CacheFormatError(f"sequence {t.seq_index}: a top-k layout needs topk_ids and topk_logprobs")
        n = np.full(layout.seq_len, layout.top_k) if t.topk_lengths is None else np.asarray(t.topk_lengths)
        if n.shape != (layout.seq_len,) or n.min() < 1 or (not layout.adaptive and np.any(n != layout.top_k)):
            raise CacheFormatError(f"sequence {t.seq_index}: topk_lengths must be (T,) >= 1 (== top_k unless adaptive)")
        i, v = sorted_entries(t.topk_ids, t.topk_logprobs, n, layout.vocab_size)
        ids.append(i), lps.append(v), lengths.append(n.astype(np.int64)), tails.append(t.topk_log_tail)
    n = np.concatenate(lengths)
    codes, base, log_mass = encode_topk_values(layout.value_encoding, np.concatenate(lps), n)  # (sum n,), (R*T,)
    with np.errstate(divide="ignore"):
        approx = np.log(np.clip(-np.expm1(log_mass), 0.0, None))  # tail from the kept mass when not given
    log_tail = np.concatenate(
        [
            approx[r * layout.seq_len : (r + 1) * layout.seq_len] if t is None else np.asarray(t, np.float64)
            for r, t in enumerate(tails)
        ]
    )
    per_row = np.array([x.sum() for x in lengths], np.int64)
    dtypes, R, (code_dtype, tail_dtype) = layout.blob_dtypes(), len(rows), layout.value_dtypes
    per_position = np.full(R, layout.seq_len)
    out = {"topk_lengths": row_blobs(n, per_position, dtypes["topk_lengths"])} if layout.adaptive else {}
    out |= {"topk_code_base": row_blobs(base, per_position, np.dtype("u1"))} if base is not None else {}
    return out | {
        "topk_ids": row_blobs(encode_gaps(np.concatenate(ids), n), per_row, dtypes["topk_ids"]),
        "topk_codes": row_blobs(codes, per_row, code_dtype),
        "topk_tail": row_blobs(encode_tail(log_tail, log_mass, tail_dtype), per_position, tail_dtype),
    }


def _sample_columns(layout: TargetLayout, rows: list[SequenceTargets]) -> dict[str, list[bytes]]:
    ids, counts, lengths = [], [], []
    for t in rows:
        if t.sample_ids is None or t.sample_counts is None:
            raise CacheFormatError(f"sequence {t.seq_index}: a sampled layout needs sample_ids and sample_counts")
        n = (t.sample_counts > 0).sum(-1)
        i, c = sorted_entries(t.sample_ids, t.sample_counts, n, layout.vocab_size)
        ids.append(i), counts.append(c), lengths.append(n)
    n = np.concatenate(lengths)
    per_row, dtypes = np.array([x.sum() for x in lengths], np.int64), layout.blob_dtypes()
    return {
        "sample_lengths": row_blobs(n, np.full(len(rows), layout.seq_len), dtypes["sample_lengths"]),
        "sample_ids": row_blobs(encode_gaps(np.concatenate(ids), n), per_row, dtypes["sample_ids"]),
        "sample_counts": row_blobs(np.concatenate(counts), per_row, dtypes["sample_counts"]),
    }


def position_shapes(layout: TargetLayout, *, hidden: bool = False) -> dict[str, tuple[int, ...]]:
    """v2 per-position columns -> the shape of one row's array: ``topk_log_z`` (len(temperatures), T),
    ``teacher_<signal>`` and ``byte_lengths`` (T,); with ``hidden`` (the cache's own encode, stage and map
    paths) also ``hidden_<L>`` (T, dim) and ``hidden_scale_<L>`` (T,) -- views and exports of the soft targets
    (``kdcache.interop``) leave the hidden-state targets out."""
    T, dtypes = layout.seq_len, layout.blob_dtypes()
    shapes = {"topk_log_z": (len(layout.temperatures), T)} | {f"teacher_{s}": (T,) for s in SIGNALS}
    return {
        c: shapes.get(c, (T,))
        for c in ("topk_log_z", *(f"teacher_{s}" for s in SIGNALS), "byte_lengths")
        if c in dtypes
    } | (layout.hidden.shapes(T) if layout.hidden and hidden else {})


def _position_columns(layout: TargetLayout, rows: list[SequenceTargets]) -> dict[str, list[bytes]]:
    """The v2 per-position columns (``position_shapes``) of ``rows``, byte planes."""
    out, dtypes = {}, layout.blob_dtypes()
    for name, shape in position_shapes(layout, hidden=True).items():
        blobs = []
        for t in rows:
            value = (t.hidden or {}).get(name) if name.startswith("hidden_") else getattr(t, name)
            if value is None or np.shape(value) != shape:
                raise CacheFormatError(
                    f"sequence {t.seq_index}: {name} must be an array of shape {shape} (the layout stores it), "
                    f"got {None if value is None else np.shape(value)}"
                )
            value = np.asarray(value)
            if name == "byte_lengths" and value.size and (value.min() < 0 or value.max() > layout.max_token_bytes):
                raise CacheFormatError(
                    f"sequence {t.seq_index}: byte_lengths outside [0, {layout.max_token_bytes}] (tokenizer.bytes)"
                )
            blobs.append(to_planes(value.astype(dtypes[name]).reshape(-1)))
        out[name] = blobs
    return out


def encode_table(layout: TargetLayout, rows: list[SequenceTargets]) -> pa.Table:
    """Sequences -> an Arrow table with ``layout.schema()`` (vectorized over the rows)."""
    for t in rows:
        if np.shape(t.input_ids) != (layout.seq_len,):
            raise CacheFormatError(
                f"sequence {t.seq_index}: input_ids has shape {np.shape(t.input_ids)}, expected ({layout.seq_len},)"
            )
    cols: dict[str, list] = {
        "seq_index": [int(t.seq_index) for t in rows],
        "input_ids": [to_planes(np.asarray(t.input_ids).astype(layout.id_dtype)) for t in rows],
    }
    if rows and layout.has_topk:
        cols |= _topk_columns(layout, rows)
    if rows and layout.has_samples:
        cols |= _sample_columns(layout, rows)
    if rows:
        cols |= _position_columns(layout, rows)
    if not rows:
        cols = {c: [] for c in layout.columns()}
    return pa.table(
        {c: pa.array(cols[c], f.type) for c, f in zip(layout.columns(), layout.schema(), strict=True)},
        schema=layout.schema(),
    )


def encode_row(layout: TargetLayout, t: SequenceTargets) -> dict[str, Any]:
    """One sequence -> a dict of column values (bytes blobs) following ``layout``."""
    return encode_table(layout, [t]).to_pylist()[0]


# ----------------------------------------------------------------------------- decoding


@dataclass
class StagedRows:
    """Rows decoded to flat arrays (what staging memory-maps and batches gather from).

    Per row ``r``: ``input_ids[r]`` (T,); per position (R*T,): ``topk_lengths``, ``topk_tail``,
    ``sample_lengths``, ``teacher_<signal>``, ``byte_lengths``; per row (R*len(temperatures)*T,):
    ``topk_log_z``, temperature-major within a row; per entry: ``topk_ids``, ``topk_codes``,
    ``sample_ids``, ``sample_counts``; ids absolute and ascending per position; values still codes
    (``decode_topk_logprobs``).
    """

    seq_index: np.ndarray  # (R,) int64
    input_ids: np.ndarray  # (R, T)
    arrays: dict[str, np.ndarray]


def stage_rows(layout: TargetLayout, table: pa.Table, *, where: str = "rows") -> StagedRows:
    """Parquet columns (a table with ``layout.schema()``) -> ``StagedRows``; refuses malformed blobs."""
    dtypes, T, R = layout.blob_dtypes(), layout.seq_len, table.num_rows
    if table.schema != layout.schema():
        raise CacheFormatError(f"{where}: columns {table.schema.names}, expected {layout.columns()}")
    per_position = np.full(R, T, np.int64)

    def column(name: str, per_row: np.ndarray) -> np.ndarray:
        return column_values(table.column(name), dtypes[name], per_row, rows=R, where=f"{where}: {name}")

    arrays = {"input_ids": column("input_ids", per_position)}
    if layout.has_topk:
        k = layout.top_k
        lengths = column("topk_lengths", per_position) if layout.adaptive else np.full(R * T, k, np.uint16)
        _check_lengths(lengths, 1, k, f"{where}: topk_lengths")
        per_row = lengths.reshape(R, T).sum(axis=1, dtype=np.int64)
        codes, tail = column("topk_codes", per_row), column("topk_tail", per_position)
        if "topk_code_base" in dtypes:  # abs8: codes are stored minus their position's smallest code
            codes = add_base(codes, column("topk_code_base", per_position), lengths, where=f"{where}: topk_codes")
        elif codes.dtype == np.dtype("<u4"):  # log32
            check_fine_codes(codes, lengths, where=f"{where}: topk_codes")
        arrays |= {
            "topk_lengths": lengths.astype(np.uint16),
            "topk_ids": decode_gaps(column("topk_ids", per_row), lengths, layout.id_dtype),
            "topk_codes": codes,
            "topk_tail": tail,
        }
    if layout.has_samples:
        lengths = column("sample_lengths", per_position)
        _check_lengths(lengths, 0, layout.samples, f"{where}: sample_lengths")
        per_row = lengths.reshape(R, T).sum(axis=1, dtype=np.int64)
        arrays |= {
            "sample_lengths": lengths.astype(np.uint16),
            "sample_ids": decode_gaps(column("sample_ids", per_row), lengths, layout.id_dtype),
            "sample_counts": column("sample_counts", per_row).astype(np.uint16),
        }
    for name, shape in position_shapes(layout, hidden=True).items():
        arrays[name] = column(name, np.full(R, int(np.prod(shape)), np.int64))
    seq_index = table.column("seq_index").to_numpy().astype(np.int64)
    return StagedRows(seq_index=seq_index, input_ids=arrays.pop("input_ids").reshape(R, T), arrays=arrays)


def _check_lengths(lengths: np.ndarray, low: int, high: int, where: str) -> None:
    if lengths.size and (int(lengths.min()) < low or int(lengths.max()) > high):
        raise CacheFormatError(f"{where}: values outside [{low}, {high}]")


def decode_row(layout: TargetLayout, row: dict[str, Any]) -> SequenceTargets:
    """A dict of column values (bytes, e.g. ``table.slice(i, 1).to_pylist()[0]``) -> padded arrays."""
    try:
        table = pa.table({c: [row[c]] for c in layout.columns()}, schema=layout.schema())
    except (KeyError, pa.ArrowException) as e:
        raise CacheFormatError(f"row {row.get('seq_index')}: columns do not follow the layout ({e})") from e
    staged = stage_rows(layout, table, where=f"row {row.get('seq_index')}")
    return unpack_row(layout, staged.seq_index[0], staged.input_ids[0], staged.arrays)


def unpack_row(
    layout: TargetLayout, seq_index: int, input_ids: np.ndarray, a: dict[str, np.ndarray]
) -> SequenceTargets:
    """One row's staged arrays (per-position and per-entry slices) -> ``SequenceTargets`` (padded, new arrays)."""
    out = SequenceTargets(seq_index=int(seq_index), input_ids=np.array(input_ids))
    if layout.has_topk:
        lengths = a["topk_lengths"]
        keep = np.arange(layout.top_k)[None, :] < lengths[:, None]  # (T, k)
        out.topk_ids = padded(a["topk_ids"], lengths, layout.top_k, 0)
        out.topk_logprobs = decode_topk_logprobs(
            padded(a["topk_codes"], lengths, layout.top_k, 0), a["topk_tail"], keep, encoding=layout.value_encoding
        )
        out.topk_lengths = lengths.copy()
    if layout.has_samples:
        lengths = a["sample_lengths"]
        width = max(int(lengths.max(initial=0)), 1)
        out.sample_ids = padded(a["sample_ids"], lengths, width, 0)
        out.sample_counts = padded(a["sample_counts"], lengths, width, 0, np.int32)
    for name, shape in position_shapes(layout, hidden=True).items():
        value = np.asarray(a[name]).reshape(shape)
        if name.startswith("hidden_"):  # stored codes and scales, kept as stored: ``as_dict`` dequantizes
            out.hidden = (out.hidden or {}) | {name: value.copy()}
        else:
            setattr(out, name, value.astype(np.int64 if name == "byte_lengths" else np.float32))
    return out
