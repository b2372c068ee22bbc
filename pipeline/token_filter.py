"""Token selection for the KD term (``train.token_filter``): rank a batch's KD positions by a teacher signal
(format v2 ``teacher_nll`` / ``teacher_entropy``) and keep a fixed share, deterministically."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcache.config.token_filter import TokenFilterConfig


def signal_key(cfg: TokenFilterConfig) -> str | None:
    """The batch key the filter ranks by (``teacher_nll`` / ``teacher_entropy``), None when off."""
    return None if cfg.by == "none" else f"teacher_{cfg.by}"


def kept_positions(signal: Tensor, cfg: TokenFilterConfig, loss_mask: Tensor | None = None) -> Tensor:
    """(B, T) teacher signal (+ the batch's KD mask) -> (B, T) bool: the positions whose KD term is kept.

    Of the n eligible positions (``loss_mask`` True, or all, and a finite signal: NaN marks a position
    without a next token), keep ceil(fraction * n) with the lowest (``keep: low``) or highest signal; ties
    go to the earlier position in row-major order (a stable sort), so the result depends on the batch only.
    """
    eligible = torch.isfinite(signal)  # (B, T)
    if loss_mask is not None:
        eligible &= loss_mask.to(torch.bool)
    n = int(eligible.sum())
    keep = min(n, math.ceil(round(cfg.fraction * n, 9)))  # round: 0.3 * 10 is 3.0000000000000004
    key = signal.to(torch.float64).reshape(-1)  # (B*T,)
    key = torch.where(eligible.reshape(-1), key if cfg.keep == "low" else -key, torch.inf)
    order = torch.sort(key, stable=True).indices  # (B*T,) eligible first, best first, ties by position
    kept = torch.zeros(key.shape, dtype=torch.bool)
    kept[order[:keep]] = True
    return kept.view(signal.shape)


def apply_token_filter(batch: dict[str, Tensor], cfg: TokenFilterConfig) -> dict[str, Tensor]:
    """``batch`` with ``loss_mask`` narrowed to ``kept_positions`` (``ce_mask`` untouched: CE keeps every
    position it had). A no-op for ``by: none``, and for a batch without the signal: the trainer asks the
    reader for it whenever there is a KD term (``kdcache.train_data.batch_keys``; not for ``loss: ce``, e.g.
    a baseline inheriting the section), and ``loss_spec`` refuses a cache that lacks it."""
    key = signal_key(cfg)
    if key is None or key not in batch:
        return batch
    loss_mask = batch.get("loss_mask")
    return {**batch, "loss_mask": kept_positions(batch[key], cfg, loss_mask)}
