"""What the report reads: the evaluate stage's metrics and calibration table, the training runs' logs and
summaries, the cache's manifest (``kdcache.report``); and the per-step CSV curves it derives for `dvc plots`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.cache.format import Manifest
from kdcache.files import read_json_file

CALIBRATION_NAME = "calibration.csv"
"""The reliability-diagram data the evaluate stage writes into its plots directory."""
TRAIN_LOG_NAME, TRAINING_NAME = "train_log.jsonl", "training.json"
"""What a training run writes (``kdcache.train_run``)."""
CURVE_FIELDS = ("step", "loss", "kd", "ce", "lr", "alpha", "temperature")
"""Columns of ``train_<run>.csv``."""


class ReportError(ValueError):
    """The report's inputs are missing or malformed."""


@dataclass
class Run:
    """One training run: its per-step log and, when it finished, its summary."""

    name: str
    path: Path
    log: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    """``training.json``; empty when the run has not finished (or was interrupted)."""
    skipped_lines: int = 0
    """Log lines that are not JSON objects (a line cut short by a crash)."""


@dataclass
class ReportInputs:
    models: dict[str, dict[str, Any]]
    """Model name -> evaluate's scalars (ce, ppl, kl_to_teacher, top1_agreement, ece, tokens_per_s, ...)."""
    metrics: dict[str, Any]
    """The whole metrics JSON (num_sequences, num_tokens, ...)."""
    calibration: list[dict[str, Any]]
    """Rows of ``calibration.csv``: model, bin, confidence, accuracy, count."""
    runs: dict[str, Run]
    manifest: Manifest | None
    sources: dict[str, str]
    """What was read, by role, for the page's provenance line."""


def load_inputs(
    *,
    metrics: str | Path,
    calibration: str | Path | None,
    runs: dict[str, str | Path],
    cache: str | Path | None,
) -> ReportInputs:
    """Everything the page shows. ``calibration`` / ``cache`` None: those sections say they were not given."""
    fix = "run the evaluate stage first (`dvc repro evaluate` or `kdcache evaluate`)"
    if not Path(metrics).is_file():
        raise ReportError(f"{metrics}: not found — {fix}")
    data = read_json_file(metrics, what="the evaluate metrics", fix=fix)
    data = data if isinstance(data, dict) else {}
    models = {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("ce"), (int, float))}
    if not models:
        raise ReportError(f"{metrics}: no model metrics in it (expected name -> {{ce, ppl, ...}}); {fix}")
    manifest = None
    if cache is not None:
        manifest = Manifest.load(cache)
    sources = {"metrics": str(metrics), **{f"run {k}": str(v) for k, v in runs.items()}}
    sources |= {"calibration": str(calibration)} if calibration is not None else {}
    sources |= {"cache": str(cache)} if cache is not None else {}
    return ReportInputs(
        models=models,
        metrics=data,
        calibration=read_calibration(calibration) if calibration is not None else [],
        runs={name: read_run(name, path) for name, path in runs.items()},
        manifest=manifest,
        sources=sources,
    )


def read_calibration(path: str | Path) -> list[dict[str, Any]]:
    """The evaluate stage's ``calibration.csv`` (or its plots directory) as typed rows."""
    path = Path(path)
    path = path / CALIBRATION_NAME if path.is_dir() else path
    fix = "rerun the evaluate stage (it writes calibration.csv into paths.plots)"
    if not path.is_file():
        raise ReportError(f"{path}: not found — {fix}")
    rows = []
    try:
        for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
            rows.append(
                {
                    "model": row["model"],
                    "bin": int(row["bin"]),
                    "confidence": float(row["confidence"]),
                    "accuracy": float(row["accuracy"]),
                    "count": int(row["count"]),
                }
            )
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a calibration table (model,bin,confidence,accuracy,count): {e} — {fix}") from e
    return rows


def read_run(name: str, path: str | Path) -> Run:
    """A student directory's ``train_log.jsonl`` (lines cut short by a crash skipped) and ``training.json`` if any."""
    path = Path(path)
    log_path = path / TRAIN_LOG_NAME
    if not log_path.is_file():
        raise ReportError(f"{log_path}: no training log for run {name!r} — train it first (`dvc repro train`)")
    lines, skipped = [], 0
    for text in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text) if text.strip() else None
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            lines.append(record)
        elif text.strip():
            skipped += 1
    summary: dict[str, Any] = {}
    if (path / TRAINING_NAME).is_file():
        summary = read_json_file(path / TRAINING_NAME, what="the run summary", fix="retrain or resume the run")
    return Run(
        name=name, path=path, log=lines, summary=summary if isinstance(summary, dict) else {}, skipped_lines=skipped
    )


def curve_csv(run: Run) -> str:
    """A run's per-step log as CSV (``CURVE_FIELDS``; empty cells for fields an older log lacks)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(CURVE_FIELDS)
    for r in run.log:
        writer.writerow(["" if r.get(k) is None else r[k] for k in CURVE_FIELDS])
    return buf.getvalue()


def teacher_histograms(manifest: Manifest | None) -> dict[str, dict[str, list]]:
    """The manifest's per-token teacher signal histograms (``stats.<signal>_histogram``: {edges, counts})."""
    if manifest is None:
        return {}
    out = {}
    for key, value in manifest.stats.items():
        if key.endswith("_histogram") and isinstance(value, dict):
            edges, counts = value.get("edges"), value.get("counts")
            if isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1 and sum(counts):
                out[key.removesuffix("_histogram")] = {"edges": edges, "counts": counts}
    return out
