"""Per-token teacher signals (NLL of the next token, entropy; format v2) summarized for the manifest, and
the tokenizer's byte spans (``byte_spans``: what the ``byte_lengths`` column stores per token).

Each shard's footer carries fixed-bin histograms and sums (``shard_signal_stats``); ``seal`` adds
them up (``merge_signal_stats``) into ``stats.mean_nll``, ``stats.nll_histogram`` and
``stats.entropy_histogram``, so ``kdcache inspect`` prints them without reading a shard. The bins
are fixed (``SIGNAL_BINS``), so histograms of any shards merge by adding counts.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kdcache.tokenizer import UnsupportedTokenizerError, prefix_space, text_normalization, token_bytes

log = logging.getLogger(__name__)

SIGNAL_BINS = tuple(0.5 * i for i in range(33))
"""Histogram edges in nats: 32 bins of 0.5 nats over [0, 16]; the last bin also holds everything above."""


def signal_histogram(values: np.ndarray) -> list[int]:
    """Counts of the finite ``values`` in ``SIGNAL_BINS`` (values above 16 nats in the last bin; NaN skipped)."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = np.clip(v[np.isfinite(v)], SIGNAL_BINS[0], SIGNAL_BINS[-1])
    return np.histogram(v, bins=np.asarray(SIGNAL_BINS))[0].astype(int).tolist()


def shard_signal_stats(nll: np.ndarray | None, entropy: np.ndarray | None) -> dict[str, Any]:
    """One batch's signal statistics (keys added to a shard's footer metadata; add with ``add_signal_stats``)."""
    out: dict[str, Any] = {}
    if nll is not None:
        finite = np.asarray(nll, np.float64)[np.isfinite(nll)]
        out |= {"nll_sum": float(finite.sum()), "nll_count": int(finite.size), "nll_hist": signal_histogram(nll)}
    if entropy is not None:
        out["entropy_hist"] = signal_histogram(entropy)
    return out


def add_signal_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    """``total += part`` for the keys of ``shard_signal_stats`` (lists add element-wise)."""
    for key, value in part.items():
        if isinstance(value, list):
            have = total.get(key) or [0] * len(value)
            total[key] = [a + b for a, b in zip(have, value, strict=True)]
        else:
            total[key] = total.get(key, 0) + value


def merge_signal_stats(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's signal stats from the shards' metadata: ``mean_nll`` (nats, over positions with a next
    token), ``nll_histogram`` / ``entropy_histogram`` ({edges, counts}); empty when no shard has signals."""
    total: dict[str, Any] = {}
    for meta in metas:
        add_signal_stats(total, {k: meta[k] for k in ("nll_sum", "nll_count", "nll_hist", "entropy_hist") if k in meta})
    out: dict[str, Any] = {}
    if "nll_count" in total:
        out["mean_nll"] = total["nll_sum"] / max(total["nll_count"], 1)
        out["nll_histogram"] = {"edges": list(SIGNAL_BINS), "counts": total["nll_hist"]}
    if "entropy_hist" in total:
        out["entropy_histogram"] = {"edges": list(SIGNAL_BINS), "counts": total["entropy_hist"]}
    return out


def histogram_lines(histogram: Any, *, width: int = 40) -> list[str]:
    """A manifest histogram ({edges, counts}) as text bars, one line per bin up to the last non-empty one."""
    if not isinstance(histogram, dict):
        return []
    edges, counts = histogram.get("edges"), histogram.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or len(edges) != len(counts) + 1:
        return ["(malformed histogram)"]
    total, top = max(sum(counts), 1), max(max(counts, default=0), 1)
    last = max((i for i, c in enumerate(counts) if c), default=-1)
    lines = []
    for i in range(last + 1):
        upper = f"{edges[i + 1]:5.1f}" if i + 1 < len(counts) else "  inf"
        bar = "#" * round(width * counts[i] / top)
        lines.append(f"  [{edges[i]:4.1f}, {upper}) {100 * counts[i] / total:5.1f}% {bar}")
    return lines


def byte_spans(tokenizer: Any) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """(manifest ``tokenizer.bytes`` {normalization, max_token_bytes, prefix_space}, (vocab,) UTF-8 byte length
    of each token id), or (None, None) for a tokenizer whose tokens do not spell the text (word-level,
    WordPiece): such a cache stores no ``byte_lengths`` column (logged)."""
    try:
        table = np.array([len(b) for b in token_bytes(tokenizer)], np.int64)
    except UnsupportedTokenizerError as e:
        log.warning("cache without byte spans (byte_lengths): %s", e)
        return None, None
    spans = {
        "normalization": text_normalization(tokenizer),
        "max_token_bytes": max(1, int(table.max(initial=0))),
        "prefix_space": prefix_space(tokenizer),
    }
    return spans, table
