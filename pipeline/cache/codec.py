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
VALUE_ENCODING = f"u8-pow{VALUE_GAMMA:.4f}-rel+u16-tail-logit/{int(TAIL_SCALE)}"
"""Format 2.0's first value encoding (``rel8``): uint8 codes uniform in (p / p_max) ** (1/3), relative to each
position's max, + uint16 tail codes. The default of ``TargetLayout`` (imports, v1 caches)."""
ABS_GAMMA = 0.25
"""``abs8``: uint8 codes uniform in the *absolute* probability p ** (1/4) (bench/cache_format.py chose 1/4)."""
ABS_ENCODING = f"u8-abspow{ABS_GAMMA:.4f}-minref+u16-tail-logit/{int(TAIL_SCALE)}"
"""``abs8``: codes round(255 p ** (1/4)), stored minus the position's smallest code (``topk_code_base``)."""
FINE_SCALE = 4096.0
"""``log32``: codes are round(4096 * (log p_max - log p)), i.e. steps of 1/4096 nat (error <= 1.2e-4 nats)."""
FINE_MAX_CODE = (1 << 24) - 1
"""``log32`` codes saturate here (4096 nats below the max: exact in float32, beyond any float32 probability)."""
FINE_TAIL_SCALE = float(1 << 20)
FINE_TAIL_EMPTY = (1 << 32) - 1
FINE_ENCODING = f"u32-log-rel/{int(FINE_SCALE)}+u32-tail-logit/{int(FINE_TAIL_SCALE)}"
"""``log32``: uint32 log-domain codes + uint32 tail codes at 2 ** -20 logit steps (for exact re-tempering)."""
VALUE_ENCODINGS = {"abs8": ABS_ENCODING, "rel8": VALUE_ENCODING, "log32": FINE_ENCODING}
"""``cache.value_encoding`` -> the manifest's ``targets.value_encoding`` (cache/README.md, "Value encodings")."""


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


def value_code_dtypes(encoding: str) -> tuple[np.dtype, np.dtype]:
    """A ``targets.value_encoding`` -> (value code dtype, tail code dtype); refuses encodings this kdcache does not
    know, naming the ones it reads."""
    if encoding in (VALUE_ENCODING, ABS_ENCODING):
        return np.dtype("u1"), np.dtype("<u2")
    if encoding == FINE_ENCODING:
        return np.dtype("<u4"), np.dtype("<u4")
    raise CacheFormatError(
        f"targets.value_encoding {encoding!r} is not supported by this kdcache (reads "
        f"{', '.join(repr(e) for e in VALUE_ENCODINGS.values())}); upgrade kdcache"
    )


def encode_topk_values(
    encoding: str, logprobs: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Flat log-probs (n,) in segments of ``lengths`` (each >= 1) -> (value codes (n,), per-position base codes
    (P,) uint8 for ``abs8`` else None, log of each segment's mass (P,) float64)."""
    value_code_dtypes(encoding)
    if encoding == VALUE_ENCODING:
        codes, log_mass = encode_values(logprobs, lengths)
        return codes, None, log_mass
    lp, starts = logprobs.astype(np.float64), segment_starts(lengths)
    if lp.size == 0:
        return np.zeros(0, value_code_dtypes(encoding)[0]), np.zeros(len(lengths), np.uint8), np.zeros(len(lengths))
    top = np.maximum.reduceat(lp, starts)  # (P,)
    rel = lp - np.repeat(top, lengths.astype(np.int64))  # (n,) <= 0
    log_mass = top + np.log(np.add.reduceat(np.exp(rel), starts, dtype=np.float64))
    if encoding == FINE_ENCODING:
        return np.rint(np.minimum(-rel * FINE_SCALE, FINE_MAX_CODE)).astype("<u4"), None, log_mass
    codes = np.rint(np.exp(ABS_GAMMA * lp) * VALUE_LEVELS).clip(0, VALUE_LEVELS).astype(np.uint8)
    base = np.minimum.reduceat(codes, starts)  # (P,) the position's smallest code
    return codes - np.repeat(base, lengths.astype(np.int64)), base, log_mass


def add_base(codes: np.ndarray, base: np.ndarray, lengths: np.ndarray, *, where: str) -> np.ndarray:
    """``abs8``: stored codes + each position's base code -> the absolute uint8 codes a reader decodes."""
    if lengths.size and codes.size == lengths.size * int(lengths[0]) and np.all(lengths == lengths[0]):
        out = (codes.reshape(lengths.size, -1) + base[:, None]).reshape(-1)  # fixed k: a broadcast, no repeat
    else:
        out = codes + np.repeat(base, lengths.astype(np.int64))
    if out.size and np.any(out < codes):  # uint8 arithmetic wrapped: base + code > 255
        raise CacheFormatError(f"{where}: topk_codes + topk_code_base exceed {VALUE_LEVELS}")
    return out


def check_fine_codes(codes: np.ndarray, lengths: np.ndarray, *, where: str) -> None:
    """``log32``: each position's largest entry is code 0 and every code is at most ``FINE_MAX_CODE`` -- else a
    position could decode to exp(-huge) everywhere, i.e. an infinite offset."""
    nonempty = lengths > 0
    if codes.size and (
        int(codes.max()) > FINE_MAX_CODE or np.any(np.minimum.reduceat(codes, segment_starts(lengths)[nonempty]))
    ):
        raise CacheFormatError(f"{where}: log32 codes above {FINE_MAX_CODE} or positions without a code-0 entry")


@functools.lru_cache(maxsize=4)
def abs_table() -> tuple[np.ndarray, np.ndarray]:
    """``abs8``: (log p per code (256,) float32, its exp as float64); code 0 decodes to its cell's middle, 0.25/255."""
    u = np.maximum(np.arange(VALUE_LEVELS + 1, dtype=np.float64), 0.25) / VALUE_LEVELS
    lp = np.log(u) / ABS_GAMMA
    return lp.astype(np.float32), np.exp(lp.astype(np.float32).astype(np.float64))


def _tail_code(dtype: np.dtype) -> tuple[float, int]:
    """Tail code dtype -> (steps per logit unit, the empty-tail code): uint16 1024 / 65535, uint32 2**20 / 2**32-1."""
    return (FINE_TAIL_SCALE, FINE_TAIL_EMPTY) if np.dtype(dtype) == np.dtype("<u4") else (TAIL_SCALE, TAIL_EMPTY)


def encode_tail(log_tail: np.ndarray, log_mass: np.ndarray, dtype: Any = "<u2") -> np.ndarray:
    """log p_tail, log (1 - p_tail) per position -> log-odds tail codes of ``dtype`` (uint16: 1/1024 logit steps,
    ``TAIL_EMPTY`` = no tail; uint32: 2 ** -20 steps, ``FINE_TAIL_EMPTY``)."""
    dtype = np.dtype(dtype)
    scale, empty = _tail_code(dtype)
    with np.errstate(invalid="ignore"):
        logit = log_tail.astype(np.float64) - log_mass.astype(np.float64)
    code = np.rint((TAIL_LOGIT_MAX - logit) * scale)
    is_empty = ~(code < empty)  # also catches NaN from -inf - -inf
    return np.where(is_empty, empty, code.clip(0, empty - 1)).astype(dtype)


def _tail_logit(tail_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale, empty = _tail_code(tail_codes.dtype)
    return TAIL_LOGIT_MAX - tail_codes.astype(np.float64) / scale, tail_codes == empty


def decode_log_mass(tail_codes: np.ndarray) -> np.ndarray:
    """Tail codes -> log of the kept mass, log(1 - p_tail) = -softplus(logit), float64."""
    logit, empty = _tail_logit(tail_codes)
    return np.where(empty, 0.0, -np.log1p(np.exp(logit)))  # logit <= 24: no overflow


def decode_log_tail(tail_codes: np.ndarray) -> np.ndarray:
    """Tail codes -> log p_tail = log sigmoid(logit), float64; -inf where there is no tail (the empty code)."""
    logit, empty = _tail_logit(tail_codes)
    with np.errstate(divide="ignore"):
        return np.where(empty, -np.inf, -np.logaddexp(0.0, -logit))


def decode_topk_logprobs(
    codes: np.ndarray,
    tail_codes: np.ndarray,
    keep: np.ndarray | None = None,
    *,
    encoding: str = VALUE_ENCODING,
    float64: bool = False,
) -> np.ndarray:
    """Padded value codes (..., k) + tail codes (...,) -> float32 log-probs (..., k), -inf where not ``keep``.

    logprob = rel(code) + log(1 - p_tail) - log(sum over the position's entries of exp(rel)): the
    kept mass is exactly 1 - p_tail. Readers and batches both call this, so they agree bit for bit.
    ``encoding`` is the cache's ``targets.value_encoding`` (``abs8`` codes are absolute, base added back);
    ``float64`` skips the final float32 rounding (exports whose readers recompute 1 - sum exp).
    """
    code_dtype, tail_dtype = value_code_dtypes(encoding)
    if codes.dtype != code_dtype or tail_codes.dtype != tail_dtype:
        raise CacheFormatError(
            f"value codes {codes.dtype}/{tail_codes.dtype} do not match the value encoding {encoding!r}"
        )
    if encoding == FINE_ENCODING:
        rel = codes.astype(np.float32) * np.float32(-1.0 / FINE_SCALE)  # exact: codes < 2 ** 24
        terms = np.exp(rel, dtype=np.float64)
    else:
        table, exp_table = value_table() if encoding == VALUE_ENCODING else abs_table()
        rel, terms = table.take(codes), exp_table.take(codes)  # (..., k) float32, float64 (take: 1.5x [])
    if keep is not None:
        terms = np.where(keep, terms, 0.0)
    offsets = decode_log_mass(tail_codes) - np.log(terms.sum(axis=-1))  # (...,) float64
    if float64:
        lp = rel + offsets[..., None]
    else:
        lp = rel  # a new array (take / astype): add in place
        lp += offsets.astype(np.float32)[..., None]
    return lp if keep is None else np.where(keep, lp, -np.inf if float64 else np.float32(-np.inf))


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
