"""Batch assembly from mapped shards: gather the selected rows' columns into padded (B, ...) arrays.

Split from ``reader`` (which plans epochs and maps shards); ``CacheReader._assemble`` calls these with
``parts`` = [(mapped shard, batch slots, rows in the shard)] for each shard the batch touches.
"""

from __future__ import annotations

import numpy as np

from kdcache.cache.hidden_format import dequantize
from kdcache.cache.mapped import MappedShard


def gather_ragged(
    parts: list[tuple[MappedShard, np.ndarray, np.ndarray]],
    prefix: str,
    shape: tuple[int, int, int],
    *,
    fixed: bool,
    dtypes: dict[str, np.dtype],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position entry lists -> padded ``shape`` = (B, T, width) int64 ids, raw values (codes or
    counts, 0 where padded) and the real-entry mask.

    A row's entries are stored position by position, i.e. in the C order of its padded (T, width)
    block restricted to ``keep``; so the batch's entries are the selected rows' ranges concatenated
    in batch order, and one boolean-mask assignment pads them. Fixed top-k rows are plain (T*k,) blocks.
    """
    ids_col, val_col = ("topk_ids", "topk_codes") if prefix == "topk" else ("sample_ids", "sample_counts")
    B, T, width = shape
    if fixed:  # the parts' rows cover the batch: no zero fill
        ids, vals = np.empty(shape, np.int64), np.empty(shape, dtypes[val_col])
        for shard, sel, local in parts:
            ids[sel] = shard.fixed[ids_col][local].reshape(-1, T, width)
            vals[sel] = shard.fixed[val_col][local].reshape(-1, T, width)
        return ids, vals, np.ones(shape, bool)
    ids, vals = np.zeros(shape, np.int64), np.zeros(shape, dtypes[val_col])
    lens = np.zeros((B, T), np.int64)
    for shard, sel, local in parts:
        lens[sel] = shard.lengths(prefix, local)
    sizes = lens.sum(axis=1)  # (B,) entries per row
    start = np.cumsum(sizes) - sizes  # (B,) where each row starts in the batch's entries
    flat_ids, flat_vals = np.empty(int(sizes.sum()), dtypes[ids_col]), np.empty(int(sizes.sum()), vals.dtype)
    for shard, sel, local in parts:
        src = ranges(shard.starts[ids_col][local], sizes[sel])  # into the shard's values
        dst = ranges(start[sel], sizes[sel])  # into the batch's entries
        flat_ids[dst], flat_vals[dst] = shard.flat[ids_col][src], shard.flat[val_col][src]
    keep = np.arange(width) < lens[..., None]  # (B, T, width)
    ids[keep], vals[keep] = flat_ids, flat_vals
    return ids, vals, keep


def gather_positions(
    parts: list[tuple[MappedShard, np.ndarray, np.ndarray]], name: str, shape: tuple[int, ...]
) -> np.ndarray:
    """A fixed-width per-position column of the batch's rows -> ``shape`` = (B, ...) float32 (int32 for
    ``byte_lengths``)."""
    out = np.empty(shape, np.int32 if name == "byte_lengths" else np.float32)
    for shard, sel, local in parts:
        out[sel] = shard.fixed[name][local].reshape(-1, *shape[1:])
    return out


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(starts[i], starts[i] + lengths[i])`` -> (sum(lengths),) int64, no Python loop."""
    lengths = lengths.astype(np.int64)
    return np.repeat(starts.astype(np.int64) - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


def gather_hidden(
    parts: list[tuple[MappedShard, np.ndarray, np.ndarray]], name: str, scale_name: str, shape: tuple[int, int, int]
) -> np.ndarray:
    """``hidden_<L>`` codes x ``hidden_scale_<L>`` scales of the batch's rows -> ``shape`` = (B, T, dim) float32."""
    out = np.empty(shape, np.float32)
    for shard, sel, local in parts:
        codes = shard.fixed[name][local].reshape(-1, *shape[1:])  # (b, T, dim) int8
        out[sel] = dequantize(codes, shard.fixed[scale_name][local])  # scales (b, T) float16
    return out
