"""Section ``evaluate``: held-out comparison of teacher, students and baseline."""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.config.base import check


@dataclass(frozen=True)
class EvaluateConfig:
    """Held-out evaluation (section ``evaluate``)."""

    batch_size: int = 8
    max_sequences: int = 0
    """Evaluate on at most this many val sequences (0 = all)."""
    calibration_bins: int = 15
    """Bins for expected calibration error (ECE) of top-1 predictions."""
    allow_other_teacher: bool = False
    """Compare against a teacher (or a val split's tokenizer) other than the one recorded in a student's
    training.json (the teacher of the cache it learned from). Off: such a comparison is refused."""

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "evaluate", "batch_size", "must be > 0")
        check(self.max_sequences >= 0, "evaluate", "max_sequences", "must be >= 0")
        check(self.calibration_bins > 0, "evaluate", "calibration_bins", "must be > 0")
