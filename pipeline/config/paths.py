"""Section ``paths``: where each DVC stage reads and writes (templated into dvc.yaml as ``${paths.x}``)."""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.config.base import check


@dataclass(frozen=True)
class PathsConfig:
    """Stage inputs and outputs of the DVC pipeline (section ``paths``); the CLI takes them as flags."""

    demo_teacher: str = "models/demo-teacher"
    """The demo teacher's model directory (output of the demo_teacher stage)."""
    tokens: str = "data/tokens"
    """Packed token data (output of prepare)."""
    generated: str = "data/generated"
    """The teacher-written corpus (output of generate; a marker only unless generate.enabled)."""
    cache: str = "cache/demo"
    """The cache directory (DVC-tracked; share it with `dvc push`)."""
    teacher_caches: str = "cache/teachers"
    """Caches of ``extra_teachers``, one directory per name (stages ``cache_teacher@NAME``), plus the index
    ``teachers.json`` (stage ``teacher_caches``); the train stages depend on this whole directory."""
    student: str = "models/student"
    """The KD student (output of train)."""
    baseline: str = "models/baseline"
    """The CE-only baseline (output of train_baseline)."""
    student_run: str = "models/student-run"
    """The KD student's training run: checkpoints, log and final model (a DVC ``persist`` output, kept
    between runs so that a killed ``dvc repro`` resumes; the train stage publishes the model to ``student``)."""
    baseline_run: str = "models/baseline-run"
    """The baseline's training run (as ``student_run``, for train_baseline)."""
    metrics: str = "metrics/eval.json"
    """Evaluation metrics (DVC metrics file)."""
    plots: str = "plots"
    """Plot data directory (DVC plots)."""
    report: str = "report"
    """The report: report.md, its PNG plots and the training curves as CSV (output of report; DVC plots)."""

    def __post_init__(self) -> None:
        for key, value in vars(self).items():
            check(bool(value), "paths", key, "must be a non-empty path")
