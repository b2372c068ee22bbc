"""Section ``train.token_filter``: which positions the KD term trains on, chosen by the teacher's per-token signals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdcache.config.base import check


@dataclass(frozen=True)
class TokenFilterConfig:
    """Token selection for the KD term (section ``train.token_filter``), from the cache's teacher signals
    (format v2 ``teacher_nll`` / ``teacher_entropy``). Per batch and rank: of the positions that are KD targets,
    the ``fraction`` with the lowest (``keep: low``) or highest (``keep: high``) signal keep their KD term;
    ties go to the earlier position (row-major), so the choice is a pure function of the batch. CE is not
    filtered: hard-label CE still counts every position."""

    by: Literal["none", "nll", "entropy"] = "none"
    """Signal that ranks positions: ``nll`` (the teacher's NLL of the actual next token, nats at tau = 1:
    low = the teacher found the token easy), ``entropy`` (the teacher's entropy at tau = 1: low = confident),
    ``none`` (no filter: every position keeps KD). With ``nll`` the row's last position, which has no next
    token in the row (stored NaN), never keeps KD."""
    keep: Literal["low", "high"] = "low"
    """Keep the positions with the lowest (``low``) or the highest (``high``) signal."""
    fraction: float = 1.0
    """Share of each batch's KD positions kept, in (0, 1]: ceil(fraction * n) of the n ranked positions."""

    def __post_init__(self) -> None:
        s = "train.token_filter"
        check(self.by in ("none", "nll", "entropy"), s, "by", f"must be none|nll|entropy, got {self.by!r}")
        check(self.keep in ("low", "high"), s, "keep", f"must be low|high, got {self.keep!r}")
        check(0.0 < self.fraction <= 1.0, s, "fraction", f"must be in (0, 1], got {self.fraction}")
