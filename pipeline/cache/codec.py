"""Value codecs of the cache format: byte planes, gap-coded ids, companded log-probs, tail codes.

Pure numpy, vectorized over all positions of a batch or shard; ``cache_format`` puts them together
into the Parquet schema (see ``cache/README.md`` for the byte layout and the measurements behind
each choice). Flat arrays hold the entries of consecutive positions; ``lengths`` (P,) says how
many entries each position has.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa

VALUE_LEVELS = 255
"""uint8 value codes 0..255; code 0 is the position's most probable entry."""
VALUE_GAMMA = 1.0 / 3.0
"""Companding exponent: codes are uniform in (p / p_max) ** gamma (bench/cache_format.py chose 1/3)."""
TAIL_SCALE = 1024.0
"""Tail codes step 1/1024 in logit(p_tail): relative error <= 0.05% of p_tail (or of the kept mass)."""
TAIL_LOGIT_MAX = 24.0
TAIL_EMPTY = 65535
"""Tail code for an empty tail (k = V, or logit(p_tail) < 24 - 65534/1024 ~ -40)."""


class CacheFormatError(ValueError):
    """A cache file or manifest does not follow the format contract."""


def id_dtype_for(vocab_size: int) -> np.dtype:
    """Narrowest little-endian unsigned dtype holding ids < vocab_size."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def count_dtype_for(limit: int) -> np.dtype:
    """Dtype of lengths/counts bounded by ``limit``: uint8 up to 255, else uint16."""
    return np.dtype("u1") if limit <= 255 else np.dtype("<u2")


# ----------------------------------------------------------------------------- codecs


def to_planes(values: np.ndarray) -> bytes:
    """Array -> byte-plane-split little-endian bytes: byte 0 of every value, then byte 1, ..."""
    a = np.ascontiguousarray(values)
    if a.dtype.itemsize == 1:
        return a.tobytes()
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.dtype.itemsize).T).tobytes()


def from_planes(blob: Any, dtype: np.dtype, *, where: str = "blob") -> np.ndarray:
    """Inverse of ``to_planes``: bytes (or a uint8 array) -> a new (n,) array of ``dtype``."""
    raw = np.frombuffer(blob, np.uint8) if not isinstance(blob, np.ndarray) else blob.view(np.uint8)
    size = dtype.itemsize
    if raw.size % size:
        raise CacheFormatError(f"{where}: {raw.size} bytes is not a whole number of {size}-byte values")
    if size == 1:
        return raw.view(dtype).copy()
    out = np.empty(raw.size // size, dtype)
    planes, dest = raw.reshape(size, -1), out.view(np.uint8).reshape(-1, size)
    for b in range(size):
        dest[:, b] = planes[b]
    return out


def encode_gaps(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Ids ascending within each position (segments of ``lengths``) -> gaps: first id, then id - prev - 1."""
    x = ids.astype(np.int64)
    gaps = np.empty_like(x)
    gaps[1:] = x[1:] - x[:-1] - 1
    first = segment_starts(lengths)[lengths > 0]
    gaps[first] = x[first]
    if gaps.size and gaps.min() < 0:
        raise CacheFormatError("ids must be strictly ascending within each position")
    return gaps


def decode_gaps(gaps: np.ndarray, lengths: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of ``encode_gaps``, vectorized. All arithmetic wraps in ``dtype``, which is exact
    because every true id fits in it."""
    if gaps.size == 0:
        return np.zeros(0, dtype)
    width = int(lengths[0]) if lengths.size else 0
    if width and np.all(lengths == width):  # fixed k: id[j] = cumsum(gaps)[j] + j within each position
        ids = gaps.reshape(-1, width).cumsum(axis=1, dtype=dtype)
        ids += np.arange(width, dtype=dtype)
        return ids.reshape(-1)
    steps = np.add(gaps, 1, dtype=dtype)  # (n,) id - prev per entry, wrapping
    starts = segment_starts(lengths)[lengths > 0]
    steps[starts] -= dtype.type(1)
    total = steps.cumsum(dtype=dtype)  # (n,) running sum across positions, wrapping
    before = total[starts] - steps[starts]  # (positions,) running sum before each segment
    return total - np.repeat(before, lengths[lengths > 0].astype(np.int64))


def segment_starts(lengths: np.ndarray) -> np.ndarray:
    """(P,) lengths -> (P,) index of each segment's first entry in the flat array."""
    ends = np.cumsum(lengths, dtype=np.int64)
    return ends - lengths.astype(np.int64)


def encode_values(
    logprobs: np.ndarray, lengths: np.ndarray, *, gamma: float = VALUE_GAMMA, levels: int = VALUE_LEVELS
) -> tuple[np.ndarray, np.ndarray]:
    """Flat log-probs (n,) in segments of ``lengths`` (each >= 1) -> (uint8 codes relative to each
    segment's max (n,), log of each segment's mass (P,) in float64)."""
    lp = logprobs.astype(np.float64)
    if lp.size == 0:
        return np.zeros(0, np.uint8), np.zeros(len(lengths))
    starts = segment_starts(lengths)
    top = np.maximum.reduceat(lp, starts)  # (P,)
    rel = (lp - np.repeat(top, lengths.astype(np.int64))).astype(np.float32)  # (n,) <= 0
    codes = np.rint((1.0 - np.exp(np.float32(gamma) * rel)) * np.float32(levels)).clip(0, levels).astype(np.uint8)
    return codes, top + np.log(np.add.reduceat(np.exp(rel), starts, dtype=np.float64))


@functools.lru_cache(maxsize=8)
def value_table(gamma: float = VALUE_GAMMA, levels: int = VALUE_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """(relative log-prob per code (levels+1,) float32, its exp as float64). Code ``levels`` decodes
    to the middle of its half-width cell, (1 - 0.75/levels)."""
    u = 1.0 - np.arange(levels + 1, dtype=np.float64) / levels
    u[-1] = 0.25 / levels
    rel = np.log(u) / gamma
    return rel.astype(np.float32), np.exp(rel.astype(np.float32).astype(np.float64))


def encode_tail(log_tail: np.ndarray, log_mass: np.ndarray) -> np.ndarray:
    """log p_tail, log (1 - p_tail) per position -> uint16 log-odds codes (``TAIL_EMPTY``: no tail)."""
    with np.errstate(invalid="ignore"):
        logit = log_tail.astype(np.float64) - log_mass.astype(np.float64)
    code = np.rint((TAIL_LOGIT_MAX - logit) * TAIL_SCALE)
    empty = ~(code < TAIL_EMPTY)  # also catches NaN from -inf - -inf
    return np.where(empty, TAIL_EMPTY, code.clip(0, TAIL_EMPTY - 1)).astype(np.uint16)


def decode_log_mass(tail_codes: np.ndarray) -> np.ndarray:
    """Tail codes -> log of the kept mass, log(1 - p_tail) = -softplus(logit), float64."""
    logit = TAIL_LOGIT_MAX - tail_codes.astype(np.float64) / TAIL_SCALE
    return np.where(tail_codes == TAIL_EMPTY, 0.0, -np.log1p(np.exp(logit)))  # logit <= 24: no overflow


def decode_log_tail(tail_codes: np.ndarray) -> np.ndarray:
    """Tail codes -> log p_tail = log sigmoid(logit), float64; -inf where there is no tail (``TAIL_EMPTY``)."""
    logit = TAIL_LOGIT_MAX - tail_codes.astype(np.float64) / TAIL_SCALE
    with np.errstate(divide="ignore"):
        return np.where(tail_codes == TAIL_EMPTY, -np.inf, -np.logaddexp(0.0, -logit))


def decode_topk_logprobs(codes: np.ndarray, tail_codes: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Padded value codes (..., k) + tail codes (...,) -> float32 log-probs (..., k), -inf where not ``keep``.

    logprob = rel(code) + log(1 - p_tail) - log(sum over the position's entries of exp(rel)): the
    kept mass is exactly 1 - p_tail. Readers and batches both call this, so they agree bit for bit.
    """
    rel, exp_rel = value_table()
    terms = exp_rel[codes]  # (..., k) float64
    if keep is not None:
        terms = np.where(keep, terms, 0.0)
    offsets = (decode_log_mass(tail_codes) - np.log(terms.sum(axis=-1))).astype(np.float32)  # (...,)
    lp = rel[codes] + offsets[..., None]  # (..., k) float32
    return lp if keep is None else np.where(keep, lp, np.float32(-np.inf))


# ----------------------------------------------------------------------------- rows <-> blobs


def sorted_entries(
    ids: np.ndarray, values: np.ndarray, lengths: np.ndarray, vocab: int
) -> tuple[np.ndarray, np.ndarray]:
    """Kept entries (the first ``lengths[t]`` of row t) of padded (T, K) arrays, ascending by id -> flat (n,)."""
    keep = np.arange(ids.shape[1])[None, :] < lengths[:, None]  # (T, K)
    key = np.where(keep, ids.astype(np.int64), vocab)  # padding sorts last
    if np.any(np.diff(key, axis=1) <= 0):  # sparsify sorts on the device already; other callers may not
        order = np.argsort(key, axis=1, kind="stable")
        ids, values, keep = (np.take_along_axis(a, order, 1) for a in (ids, values, keep))
    return ids[keep], values[keep]


def row_blobs(flat: np.ndarray, per_row: np.ndarray, dtype: np.dtype) -> list[bytes]:
    """Flat values -> one byte-plane-split blob per row (``per_row`` values each)."""
    return [to_planes(part) for part in np.split(flat.astype(dtype), np.cumsum(per_row)[:-1])]


def column_values(
    column: pa.ChunkedArray | pa.Array, dtype: np.dtype, values_per_row: np.ndarray, *, rows: int, where: str
) -> np.ndarray:
    """A binary column of byte-plane-split blobs -> all rows' values, flat (zero copy for 1-byte
    values); refuses rows whose size is not ``values_per_row`` (R,) values."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise CacheFormatError(f"{where}: null values")
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, off_type)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    raw = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    sizes = np.diff(offsets)
    size = dtype.itemsize
    if np.any(sizes != values_per_row * size):
        bad = int(np.flatnonzero(sizes != values_per_row * size)[0])
        raise CacheFormatError(
            f"{where} of row {bad}: {sizes[bad]} bytes, expected {values_per_row[bad]} values of {size} bytes"
        )
    data = raw[offsets[0] : offsets[-1]]
    if size == 1:
        return data.view(dtype)
    if rows and np.all(values_per_row == values_per_row[0]):  # one vectorized transpose for all rows
        planes = data.reshape(rows, size, -1)  # (R, size, n)
        out = np.empty((rows, planes.shape[2], size), np.uint8)
        for b in range(size):
            out[:, :, b] = planes[:, b, :]
        return out.view(dtype).reshape(-1)
    rel = offsets - offsets[0]
    return np.concatenate([from_planes(data[rel[r] : rel[r + 1]], dtype) for r in range(rows)] or [np.zeros(0, dtype)])


def padded(flat: np.ndarray, lengths: np.ndarray, width: int, fill: Any, dtype: Any = None) -> np.ndarray:
    """Flat (sum(lengths),) entries -> (P, width) padded with ``fill`` (positions in order)."""
    out = np.full((lengths.shape[0], width), fill, dtype=dtype or flat.dtype)
    out[np.arange(width)[None, :] < lengths[:, None]] = flat
    return out
