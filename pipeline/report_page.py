"""The report's Markdown page (``kdcache.report``): headline, quality and cost tables, calibration,
training and cache sections, from the inputs ``kdcache.report_inputs`` read.
"""

from __future__ import annotations

import math
from typing import Any

from kdcache.cache.format import Manifest
from kdcache.report_inputs import ReportInputs, Run

TEACHER = "teacher"


def comparison(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Derived numbers: each model's speed-up and size vs the teacher; the KD student vs the baseline
    (``gap_closed``: the share of the baseline -> teacher val-CE gap the student closes)."""
    teacher = models.get(TEACHER)
    out: dict[str, Any] = {"speedup": {}, "smaller": {}}
    if teacher is not None:
        for name, m in models.items():
            out["speedup"][name] = _ratio(m.get("tokens_per_s"), teacher.get("tokens_per_s"))
            out["smaller"][name] = _ratio(teacher.get("num_parameters"), m.get("num_parameters"))
    student, baseline = models.get("student"), models.get("baseline")
    if student is not None and baseline is not None:
        out["ce_delta"] = student["ce"] - baseline["ce"]
        out["kl_delta"] = _delta(student.get("kl_to_teacher"), baseline.get("kl_to_teacher"))
        if teacher is not None:
            gap = baseline["ce"] - teacher["ce"]
            out["gap_closed"] = (baseline["ce"] - student["ce"]) / gap if gap > 0 else None
    return out


def render_markdown(inputs: ReportInputs, *, figures: set[str]) -> str:
    models, derived = inputs.models, comparison(inputs.models)
    scored = (
        f"{inputs.metrics.get('num_sequences', '?')} sequences, {_count(inputs.metrics.get('num_tokens'))} positions"
    )
    lines = ["# kdcache report", "", f"Teacher, students and baseline on the val split ({scored} scored)."]
    lines += ["Inputs: " + "; ".join(f"{k} `{v}`" for k, v in inputs.sources.items()), ""]
    lines += _headline(models, derived)
    lines += ["## Quality (val split)", "", *_quality_table(models), ""]
    lines += ["## Cost", "", *_cost_table(models, derived), ""]
    if "comparison.png" in figures:
        lines += ["![val CE, KL to teacher, top-1 agreement and throughput per model](comparison.png)", ""]
    lines += ["## Calibration", ""]
    if "reliability.png" in figures:
        lines += [
            "Top-1 confidence vs accuracy per confidence bin: on the diagonal is calibrated, below it "
            "over-confident. ECE (in the quality table) is the count-weighted gap.",
            "",
            "![reliability diagram](reliability.png)",
            "",
        ]
    else:
        lines += ["No calibration data given (the evaluate stage's calibration.csv).", ""]
    lines += ["## Training", "", *_training_section(inputs.runs), ""]
    if "training.png" in figures:
        lines += ["![training curves](training.png)", ""]
    lines += ["## Cache", "", *_cache_section(inputs.manifest, "teacher_signals.png" in figures), ""]
    return "\n".join(lines).rstrip() + "\n"


def _headline(models: dict[str, dict[str, Any]], derived: dict[str, Any]) -> list[str]:
    student, baseline, teacher = models.get("student"), models.get("baseline"), models.get(TEACHER)
    if student is None or baseline is None or teacher is None:
        return []
    better = "below" if derived["ce_delta"] < 0 else "above"
    lines = [
        f"**KD student vs CE-only baseline:** val CE {student['ce']:.4f} vs {baseline['ce']:.4f} nats/token "
        f"({abs(derived['ce_delta']):.4f} {better} the baseline; perplexity {student['ppl']:.2f} vs "
        f"{baseline['ppl']:.2f}); KL to the teacher {_num(student.get('kl_to_teacher'))} vs "
        f"{_num(baseline.get('kl_to_teacher'))}; top-1 agreement {_pct(student.get('top1_agreement'))} vs "
        f"{_pct(baseline.get('top1_agreement'))}.",
    ]
    if derived.get("gap_closed") is not None:
        lines += [
            f"The student closes {100 * derived['gap_closed']:.0f}% of the baseline → teacher val-CE gap "
            f"(teacher {teacher['ce']:.4f})."
        ]
    else:
        lines += [
            f"The teacher's val CE ({teacher['ce']:.4f}) is not below the baseline's: this teacher has nothing "
            "to teach on val CE — compare KL and agreement, or use a stronger teacher."
        ]
    speed, smaller = derived["speedup"].get("student"), derived["smaller"].get("student")
    if speed is not None and smaller is not None:
        lines += [
            f"It has {smaller:.1f}× fewer parameters than the teacher and runs {speed:.1f}× its forward tokens/s."
        ]
    return [" ".join(lines), ""]


def _quality_table(models: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| model | val CE (nats/token) | perplexity | KL to teacher | top-1 agreement | top-1 accuracy | ECE |"]
    rows += ["|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in models.items():
        kl = "—" if name == TEACHER else _num(m.get("kl_to_teacher"))
        agree = "—" if name == TEACHER else _pct(m.get("top1_agreement"))
        rows.append(
            f"| {name} | {m['ce']:.4f} | {_num(m.get('ppl'), 2)} | {kl} | {agree} | "
            f"{_pct(m.get('top1_accuracy'))} | {_num(m.get('ece'))} |"
        )
    return rows


def _cost_table(models: dict[str, dict[str, Any]], derived: dict[str, Any]) -> list[str]:
    rows = ["| model | parameters | bytes on disk | forward tokens/s | speed-up vs teacher | × fewer parameters |"]
    rows += ["|---|---:|---:|---:|---:|---:|"]
    for name, m in models.items():
        speed, smaller = derived["speedup"].get(name), derived["smaller"].get(name)
        rows.append(
            f"| {name} | {_count(m.get('num_parameters'))} | {_bytes(m.get('size_bytes'))} | "
            f"{_count(m.get('tokens_per_s'))} | {_times(speed)} | {_times(smaller)} |"
        )
    return rows + ["", "Throughput is a batched forward pass on the evaluate machine, measured side by side."]


def _training_section(runs: dict[str, Run]) -> list[str]:
    if not runs:
        return ["No training runs given."]
    rows = ["| run | loss | steps | final train CE | final KD term | train tokens/s | wall time | schedule |"]
    rows += ["|---|---|---:|---:|---:|---:|---:|---|"]
    notes = []
    for run in runs.values():
        tail = run.log[-10:]  # the last steps, averaged: one step is noisy
        ce = sum(r["ce"] for r in tail) / len(tail) if tail else None
        kd = sum(r["kd"] for r in tail) / len(tail) if tail else None
        s = run.summary
        cfg = s.get("config", {}) if isinstance(s.get("config"), dict) else {}
        kind = (s.get("loss") or {}).get("kind") if isinstance(s.get("loss"), dict) else cfg.get("loss", "?")
        steps = f"{run.log[-1]['step'] if run.log else 0}" + ("" if s.get("complete") else " (unfinished)")
        rows.append(
            f"| {run.name} | {kind or '?'} | {steps} | {_num(ce)} | {_num(kd) if kind != 'ce' else '—'} | "
            f"{_count(s.get('tokens_per_s'))} | {_seconds(s.get('elapsed_s'))} | "
            f"{describe_schedule(cfg) if kind != 'ce' else 'CE only'} |"
        )
        if run.skipped_lines:
            notes.append(f"{run.name}: {run.skipped_lines} unreadable log line(s) skipped (a crash cut them short).")
    rows += ["", "Final values average the last 10 logged steps. The per-step curves are `train_<run>.csv` here "]
    rows[-1] += "(declared as DVC plots: `dvc plots show`)."
    return rows + [f"- {n}" for n in notes]


def describe_schedule(cfg: dict[str, Any]) -> str:
    """``train.schedule`` in a few words, from a run's recorded config."""
    sched = cfg.get("schedule")
    if not isinstance(sched, dict):
        return "—"
    parts = []
    for name, start in (("alpha", cfg.get("alpha")), ("tau", cfg.get("temperature"))):
        ramp = sched.get("alpha" if name == "alpha" else "temperature") or {}
        if ramp.get("kind", "constant") == "constant":
            parts.append(f"{name} {start}")
        else:
            parts.append(f"{name} {ramp['kind']} {start}→{ramp.get('end')}")
    if sched.get("ce_warmup_steps"):
        parts.append(f"CE-only first {sched['ce_warmup_steps']} steps")
    return ", ".join(parts)


def _cache_section(manifest: Manifest | None, signals_figure: bool) -> list[str]:
    if manifest is None:
        return ["No cache given."]
    layout, stats = manifest.layout, manifest.stats
    size = sum(s.bytes for s in manifest.shards)
    per_token = size / max(manifest.num_tokens, 1)
    dense = 2 * layout.vocab_size  # fp16 logits of every id
    what = {"topk": f"top-{layout.top_k}", "sampled": f"{layout.samples} samples", "both": ""}[layout.kind]
    if layout.kind == "both":
        what = f"top-{layout.top_k} + {layout.samples} samples"
    if layout.adaptive:
        what += f" (adaptive, mass {layout.mass})"
    rows = [
        f"- `{manifest.name}`: {manifest.num_rows} sequences, {_count(manifest.num_tokens)} tokens; teacher "
        f"{manifest.teacher.get('model_type', '?')} with {_count(manifest.teacher.get('num_parameters'))} parameters; "
        f"format {manifest.format_version}",
        f"- Targets: {what} at temperature {layout.temperature:g}"
        + (
            f" (+ log-normalizers at {', '.join(f'{t:g}' for t in layout.temperatures)})" if layout.temperatures else ""
        ),
        f"- Size: {_bytes(size)}, **{per_token:.2f} bytes/token** ({dense / per_token:.0f}× smaller than fp16 "
        f"logits over the {_count(layout.vocab_size)}-id vocabulary, {dense} bytes/token)",
    ]
    if isinstance(stats.get("mean_entropy"), (int, float)):
        rows.append(f"- Teacher entropy: mean {stats['mean_entropy']:.3f} nats/token")
    if isinstance(stats.get("mean_nll"), (int, float)):
        rows.append(f"- Teacher NLL of the next token (train split): mean {stats['mean_nll']:.3f} nats/token")
    if signals_figure:
        rows += [
            "",
            "Per-token teacher signals (histograms over every cached position): low NLL and entropy mark tokens "
            "the teacher finds easy; mass at high entropy is where soft targets carry most beyond the label.",
            "",
            "![per-token teacher NLL and entropy](teacher_signals.png)",
        ]
    else:
        rows.append("- Per-token teacher signals: not in this cache (format v2 caches store NLL/entropy histograms).")
    return rows


def _ratio(a: Any, b: Any) -> float | None:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0
    return a / b if ok else None


def _delta(a: Any, b: Any) -> float | None:
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "—"


def _times(x: Any) -> str:
    return f"{x:.2f}×" if isinstance(x, (int, float)) else "—"


def _count(x: Any) -> str:
    return f"{x:,.0f}" if isinstance(x, (int, float)) else "—"


def _seconds(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "—"
    return f"{x:.0f} s" if x < 120 else f"{x / 60:.1f} min"


def _bytes(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x:.0f} B"
