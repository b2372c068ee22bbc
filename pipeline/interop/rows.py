"""A cache's rows decoded into Parquet-native columns: the one schema every interop path speaks.

One row per packed sequence, T = seq_len, per position the kept entries in ascending id order:

- ``seq_index``      int64                  global index of the sequence in the token split
- ``input_ids``      list<int32>            (T,)
- ``topk_ids``       list<list<int32>>      (T, n_t) top-k ids (n_t = k, or fewer with adaptive top-k)
- ``topk_logprobs``  list<list<float32>>    (T, n_t) teacher log-probs at ``targets.temperature``
- ``topk_log_tail``  list<float32>          (T,) log of the probability outside the kept ids (-inf: none)
- ``sample_ids``     list<list<int32>>      (T, m_t) distinct sampled ids
- ``sample_counts``  list<list<int32>>      (T, m_t) draws of each (they sum to ``targets.samples``)
- ``topk_log_z``     list<list<float32>>    format 2: (Z, T) log-normalizers at ``targets.temperatures``
- ``teacher_nll``    list<float32>          format 2: (T,) teacher NLL of the next token, nats at tau = 1 (NaN: none)
- ``teacher_entropy`` list<float32>         format 2: (T,) teacher entropy, nats at tau = 1
- ``byte_lengths``   list<int32>            format 2: (T,) UTF-8 bytes each input token spells

Values are exactly what ``kdcache.open_cache(path)[i]`` returns (same decoder, same float32
arithmetic), without its padding. The shards are read only after their sha256 matches the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from kdcache.cache.codec import decode_log_tail, padded
from kdcache.cache.format import Manifest, TargetLayout, decode_topk_logprobs
from kdcache.cache.rows import StagedRows, position_shapes
from kdcache.cache.shards import CacheError, check_shard_file, decode_shard, read_shard, sha_error
from kdcache.fingerprint import sha256_file

INT32_LIMIT = (1 << 31) - 1
"""Arrow ``list`` offsets are int32: a decoded table holds fewer entries than this."""


@dataclass
class DecodedRows:
    """Decoded rows as flat arrays: ``ragged[name]`` = (values in position order, entries per position (R*T,))."""

    layout: TargetLayout
    seq_index: np.ndarray  # (R,) int64
    input_ids: np.ndarray  # (R, T) int32
    ragged: dict[str, tuple[np.ndarray, np.ndarray]]
    topk_log_tail: np.ndarray | None = None  # (R, T) float32
    positional: dict[str, np.ndarray] = field(default_factory=dict)  # format 2: (R, T) or (R, Z, T) per column


def decoded_schema(layout: TargetLayout) -> pa.Schema:
    """The native schema of ``layout``'s decoded rows (module docstring)."""
    nested = {"int32": pa.list_(pa.list_(pa.int32())), "float32": pa.list_(pa.list_(pa.float32()))}
    fields = [pa.field("seq_index", pa.int64()), pa.field("input_ids", pa.list_(pa.int32()))]
    if layout.has_topk:
        fields += [
            pa.field("topk_ids", nested["int32"]),
            pa.field("topk_logprobs", nested["float32"]),
            pa.field("topk_log_tail", pa.list_(pa.float32())),
        ]
    if layout.has_samples:
        fields += [pa.field("sample_ids", nested["int32"]), pa.field("sample_counts", nested["int32"])]
    for name in position_shapes(layout):
        kind = pa.int32() if name == "byte_lengths" else pa.float32()
        fields.append(pa.field(name, nested["float32"] if name == "topk_log_z" else pa.list_(kind)))
    return pa.schema(fields)


def decode_staged(layout: TargetLayout, staged: StagedRows, *, float64: bool = False) -> DecodedRows:
    """Staged (Parquet-decoded) rows -> ``DecodedRows``; top-k values decoded as ``open_cache(path)[i]`` does,
    or with ``float64`` the same arithmetic left in float64 (for text formats whose readers recompute the
    tail as 1 - sum exp(logprob): float32 values would lose tails below ~1e-6 to rounding)."""
    R, T = staged.input_ids.shape
    a, ragged, tail = staged.arrays, {}, None
    if layout.has_topk:
        lengths = a["topk_lengths"].astype(np.int64)  # (R*T,)
        keep = np.arange(layout.top_k)[None, :] < lengths[:, None]  # (R*T, k)
        codes = padded(a["topk_codes"], lengths, layout.top_k, 0)  # (R*T, k)
        logprobs = decode_topk_logprobs(  # (R*T, k) float32 (float64 with ``float64``), -inf padded
            codes, a["topk_tail"], keep, encoding=layout.value_encoding, float64=float64
        )
        ragged["topk_ids"] = (a["topk_ids"].astype(np.int32), lengths)
        ragged["topk_logprobs"] = (logprobs[keep], lengths)
        tail = decode_log_tail(a["topk_tail"]).astype(np.float32).reshape(R, T)
    if layout.has_samples:
        lengths = a["sample_lengths"].astype(np.int64)
        ragged["sample_ids"] = (a["sample_ids"].astype(np.int32), lengths)
        ragged["sample_counts"] = (a["sample_counts"].astype(np.int32), lengths)
    positional = {
        name: a[name].astype(np.int32 if name == "byte_lengths" else np.float32).reshape(R, *shape)
        for name, shape in position_shapes(layout).items()
    }
    return DecodedRows(layout, staged.seq_index, staged.input_ids.astype(np.int32), ragged, tail, positional)


def to_arrow(rows: DecodedRows) -> pa.Table:
    """``DecodedRows`` -> an Arrow table with ``decoded_schema`` (zero-copy list offsets over the flat arrays)."""
    R, T = rows.input_ids.shape
    per_row = np.arange(R + 1, dtype=np.int32) * T  # (R+1,) offsets of each row's positions
    columns = {"seq_index": pa.array(rows.seq_index, pa.int64()), "input_ids": _lists(rows.input_ids, per_row)}
    for name, (values, lengths) in rows.ragged.items():
        if values.size > INT32_LIMIT:
            raise CacheError(f"{name}: {values.size} entries exceed an Arrow list's int32 offsets; decode fewer rows")
        inner = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # (R*T+1,)
        columns[name] = pa.ListArray.from_arrays(pa.array(per_row), pa.ListArray.from_arrays(pa.array(inner), values))
        if name == "topk_logprobs":
            columns["topk_log_tail"] = _lists(rows.topk_log_tail, per_row)
    for name, values in rows.positional.items():
        if values.ndim == 2:  # (R, T)
            columns[name] = _lists(values, per_row)
        else:  # (R, Z, T)
            Z = values.shape[1]
            outer = np.arange(R + 1, dtype=np.int32) * Z
            columns[name] = pa.ListArray.from_arrays(pa.array(outer), _lists(values, np.arange(R * Z + 1) * T))
    schema = decoded_schema(rows.layout)
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def to_padded(rows: DecodedRows) -> dict[str, np.ndarray]:
    """``DecodedRows`` -> fixed-shape arrays a ``default_collate`` can stack: ``input_ids`` (R, T) int64,
    ``topk_ids``/``topk_logprobs`` (R, T, top_k) padded with 0 / -inf, ``topk_log_tail`` (R, T),
    ``sample_ids``/``sample_counts`` (R, T, samples) padded with 0; ``seq_index`` (R,)."""
    lay, (R, T) = rows.layout, rows.input_ids.shape
    out = {"seq_index": rows.seq_index, "input_ids": rows.input_ids.astype(np.int64)}
    widths = {"topk": lay.top_k, "sample": lay.samples}
    fills = {"topk_ids": 0, "topk_logprobs": -np.inf, "sample_ids": 0, "sample_counts": 0}
    for name, (values, lengths) in rows.ragged.items():
        width = widths[name.split("_")[0]]
        dtype = np.float32 if name == "topk_logprobs" else np.int64
        out[name] = padded(values, lengths, width, fills[name], dtype).reshape(R, T, width)
    if rows.topk_log_tail is not None:
        out["topk_log_tail"] = rows.topk_log_tail
    return out | rows.positional


def _lists(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(values).reshape(-1)))


def verified_shard_files(cache_dir: str | Path, *, verify: Literal["size", "full"] = "full") -> tuple[Manifest, list]:
    """The cache's manifest and shard paths, after refusing a missing, linked or resized shard (and, with
    ``verify="full"``, one whose sha256 differs from the manifest's)."""
    root = Path(cache_dir)
    manifest = Manifest.load(root)
    files = [check_shard_file(root, info) for info in manifest.shards]
    if verify == "full":
        for path, info in zip(files, manifest.shards, strict=True):
            if (digest := sha256_file(path)) != info.sha256:
                raise sha_error(path, digest, info.sha256)
    elif verify != "size":
        raise ValueError(f"verify must be 'size' or 'full', got {verify!r}")
    return manifest, files


def decoded_batches(
    root: Path, manifest: Manifest, index: int, *, rows_per_batch: int = 64, float64: bool = False
) -> Iterator[DecodedRows]:
    """Shard ``index`` of the cache at ``root`` as ``DecodedRows`` of up to ``rows_per_batch`` rows each; the
    shard is read once and checked against its manifest sha256 before anything is decoded."""
    layout, info = manifest.layout, manifest.shards[index]
    path = check_shard_file(root, info)
    table = read_shard(path, info, layout)
    for start in range(0, table.num_rows, rows_per_batch):
        staged = decode_shard(table.slice(start, rows_per_batch), layout, where=str(path))
        yield decode_staged(layout, staged, float64=float64)
