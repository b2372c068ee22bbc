"""Batch assembly from mapped shards: gather (and decode) the selected rows' columns into padded (B, ...) arrays.

Split from ``reader`` (which plans epochs and maps shards); ``CacheReader._assemble`` calls ``assemble`` with
``parts`` = [(mapped shard, batch slots, rows in the shard)] for each shard the batch touches.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from kdcache.cache.codec import decode_log_tail, decode_topk_logprobs
from kdcache.cache.format import TargetLayout
from kdcache.cache.hidden_format import dequantize
from kdcache.cache.mapped import MappedShard
from kdcache.cache.shards import CacheError

Parts = list[tuple[MappedShard, np.ndarray, np.ndarray]]


def assemble(
    parts: Parts, layout: TargetLayout, want: Collection[str] | None, *, log_z: int | None, where: str
) -> dict[str, np.ndarray]:
    """The batch's arrays (``CacheReader.batches`` documents them); decodes the top-k / sampled targets only if
    ``want`` (None = all) names one of their keys; ``log_z``: index of the reader's temperature in
    ``layout.temperatures`` (None: not stored)."""
    lay, B, T = layout, sum(len(p[1]) for p in parts), layout.seq_len
    out: dict[str, np.ndarray] = {"input_ids": np.empty((B, T), np.int64), "seq_index": np.empty(B, np.int64)}
    for shard, sel, local in parts:
        shard.take_fixed("input_ids", local, out["input_ids"], sel)
        out["seq_index"][sel] = shard.seq_index[local]
    if lay.has_topk and (want is None or any(k.startswith("topk_") for k in want)):
        code_dtype, tail_dtype = lay.value_dtypes
        out["topk_ids"], codes, keep = gather_ragged(
            parts, "topk", (B, T, lay.top_k), fixed=not lay.adaptive, val_dtype=code_dtype
        )
        tail = np.empty((B, T), tail_dtype)
        for shard, sel, local in parts:
            shard.take_fixed("topk_tail", local, tail, sel)
        mask = keep if lay.adaptive else None  # fixed k: every entry is real, two full passes saved
        out["topk_logprobs"] = decode_topk_logprobs(  # (B, T, k), -inf padded, as reader[i]
            codes, tail, mask, encoding=lay.value_encoding
        )
        out["topk_log_tail"] = decode_log_tail(tail).astype(np.float32)  # (B, T)
        out["topk_mask"] = keep
    if lay.has_samples and (want is None or any(k.startswith("sample_") for k in want)):
        width = max((int(p[0].lengths("sample", p[2]).max(initial=0)) for p in parts), default=0)
        ids, counts, _ = gather_ragged(parts, "sample", (B, T, max(width, 1)), fixed=False, val_dtype=np.int64)
        if int(counts.sum(axis=-1, dtype=np.int64).max(initial=0)) > lay.samples:
            raise CacheError(
                f"{where}: sample counts at a position sum to more than the {lay.samples} draws the "
                "manifest records (cache.samples); the cache is damaged: run `kdcache verify` and rebuild it"
            )  # checked here, off the training thread: kd_loss checks only CPU tensors
        out["sample_ids"], out["sample_counts"] = ids, counts.astype(np.float32)
        out["sample_total"] = np.full((B, T), lay.samples, np.float32)  # draws made per position
    if log_z is not None and (want is None or "topk_log_z" in want):
        out["topk_log_z"] = gather_positions(parts, "topk_log_z", (B, len(lay.temperatures), T))[:, log_z]  # (B, T)
    for name in [f"teacher_{s}" for s in lay.signals] + (["byte_lengths"] if lay.max_token_bytes else []):
        if want is None or name in want:
            out[name] = gather_positions(parts, name, (B, T))
    for name, scale_name in lay.hidden.columns().items() if lay.hidden else ():
        if want is None or name in want:
            out[name] = gather_hidden(parts, name, scale_name, (B, T, lay.hidden.dim))
    return out


def gather_ragged(
    parts: Parts, prefix: str, shape: tuple[int, int, int], *, fixed: bool, val_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position entry lists -> padded ``shape`` = (B, T, width) int64 ids, raw values (top-k value codes or
    sample counts) as ``val_dtype``, 0 where padded, and the real-entry mask.

    A row's entries are stored position by position, i.e. in the C order of its padded (T, width)
    block restricted to ``keep``; so the batch's entries are the selected rows' ranges concatenated
    in batch order, and one boolean-mask assignment pads them. Fixed top-k rows are plain (T*k,) blocks.
    """
    ids_col, val_col = ("topk_ids", "topk_codes") if prefix == "topk" else ("sample_ids", "sample_counts")
    B, T, width = shape
    if fixed:  # the parts' rows cover the batch: no zero fill
        ids, vals = np.empty(shape, np.int64), np.empty(shape, val_dtype)
        for shard, sel, local in parts:
            shard.take_fixed(ids_col, local, ids.reshape(B, -1), sel)
            shard.take_fixed(val_col, local, vals.reshape(B, -1), sel)
        return ids, vals, np.ones(shape, bool)
    ids, vals = np.zeros(shape, np.int64), np.zeros(shape, val_dtype)
    lens = np.zeros((B, T), np.int64)
    for shard, sel, local in parts:
        lens[sel] = shard.lengths(prefix, local)
    sizes = lens.sum(axis=1)  # (B,) entries per row
    start = np.cumsum(sizes) - sizes  # (B,) where each row starts in the batch's entries
    flat_ids, flat_vals = np.empty(int(sizes.sum()), np.int64), np.empty(int(sizes.sum()), val_dtype)
    for shard, sel, local in parts:
        shard.take_ragged(ids_col, local, flat_ids, start[sel])
        shard.take_ragged(val_col, local, flat_vals, start[sel])
    keep = np.arange(width) < lens[..., None]  # (B, T, width)
    ids[keep], vals[keep] = flat_ids, flat_vals
    return ids, vals, keep


def gather_positions(parts: Parts, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-width per-position column of the batch's rows -> ``shape`` = (B, ...) float32 (int32 for
    ``byte_lengths``)."""
    out = np.empty(shape, np.int32 if name == "byte_lengths" else np.float32)
    for shard, sel, local in parts:
        shard.take_fixed(name, local, out.reshape(shape[0], -1), sel)
    return out


def gather_hidden(parts: Parts, name: str, scale_name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """``hidden_<L>`` codes x ``hidden_scale_<L>`` scales of the batch's rows -> ``shape`` = (B, T, dim) float32."""
    out = np.empty(shape, np.float32)
    for shard, sel, local in parts:
        here = np.arange(len(sel))
        codes = np.empty((len(sel), shape[1] * shape[2]), shard.dtype[name])  # (b, T*dim) int8
        scales = np.empty((len(sel), shape[1]), shard.dtype[scale_name])  # (b, T) float16
        shard.take_fixed(name, local, codes, here)
        shard.take_fixed(scale_name, local, scales, here)
        out[sel] = dequantize(codes.reshape(-1, *shape[1:]), scales)
    return out
