"""One page comparing a teacher, its KD student and a CE-only baseline: ``report.md`` plus PNG plots.

Reads only what earlier stages wrote -- never a model: the evaluate stage's metrics JSON and its
``calibration.csv``, each training run's ``train_log.jsonl`` and ``training.json``, and the cache's
manifest. Writes one output directory (the ``kdcache.outputs`` rule: new, or a report kdcache made)::

    report.md             the page: headline, quality and cost tables, calibration, training, cache
    comparison.png        val CE, KL to teacher, top-1 agreement, forward tokens/s per model
    reliability.png       accuracy vs confidence per bin (reliability diagram) and where confidences fall
    training.png          each run's per-step training CE and KD term (+ alpha and temperature when they move)
    teacher_signals.png   the cache's per-token teacher NLL / entropy histograms (format v2 caches that store them)
    train_<run>.csv       each run's per-step log as CSV, for `dvc plots` (which reads no JSON Lines)

The evaluate stage's model names are kept; the headline compares ``student`` and ``baseline`` with
``teacher`` when all three are there (the pipeline's names).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from kdcache.files import atomic_write_text
from kdcache.outputs import hold_output_dir
from kdcache.report_inputs import ReportError, ReportInputs, curve_csv, load_inputs, teacher_histograms
from kdcache.report_page import render_markdown
from kdcache.report_plots import draw_comparison, draw_reliability, draw_teacher_signals, draw_training

log = logging.getLogger(__name__)

OUTPUT_KIND = "report"
"""The marker kind of a report directory (``kdcache.outputs``)."""
REPORT_NAME = "report.md"
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def build_report(
    *,
    metrics: str | Path,
    calibration: str | Path | None,
    runs: dict[str, str | Path],
    cache: str | Path | None,
    out_dir: str | Path,
    overwrite: bool = False,
) -> Path:
    """Read the inputs (``load_inputs``) and write the report into ``out_dir``; returns ``out_dir/report.md``."""
    bad = [name for name in runs if not RUN_NAME.fullmatch(name)]
    if bad:
        raise ReportError(f"run names {bad}: each names a file train_<name>.csv; use letters, digits, '_', '-', '.'")
    inputs = load_inputs(metrics=metrics, calibration=calibration, runs=runs, cache=cache)
    named = {"metrics": metrics, "calibration": calibration, "cache": cache, **{f"run {k}": v for k, v in runs.items()}}
    with hold_output_dir(out_dir, kind=OUTPUT_KIND, inputs=named, overwrite=overwrite):
        return write_report(inputs, out_dir=Path(out_dir))


def write_report(inputs: ReportInputs, *, out_dir: Path) -> Path:
    """Write the CSV curves, the PNG plots and ``report.md`` (last) into the existing ``out_dir``, after removing
    what an earlier report there wrote (a plot this one does not draw must not linger)."""
    for old in [out_dir / REPORT_NAME, *out_dir.glob("*.png"), *out_dir.glob("train_*.csv")]:
        old.unlink(missing_ok=True)
    for run in inputs.runs.values():
        atomic_write_text(out_dir / f"train_{run.name}.csv", curve_csv(run))
    figures = {"comparison.png": draw_comparison(inputs.models, out_dir / "comparison.png")}
    if inputs.calibration:
        figures["reliability.png"] = draw_reliability(inputs.calibration, out_dir / "reliability.png")
    if inputs.runs:
        figures["training.png"] = draw_training(inputs.runs, out_dir / "training.png")
    histograms = teacher_histograms(inputs.manifest)
    if histograms:
        figures["teacher_signals.png"] = draw_teacher_signals(histograms, out_dir / "teacher_signals.png")
    path = out_dir / REPORT_NAME
    atomic_write_text(path, render_markdown(inputs, figures={k for k, drawn in figures.items() if drawn}))
    log.info("report: %s (%d plots)", path, sum(figures.values()))
    return path
