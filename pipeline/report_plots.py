"""The report's PNG plots (``kdcache.report``), drawn with matplotlib's object API on the Agg canvas:
no pyplot, no global backend or state, so it runs headless and inside other programs unchanged.

Each ``draw_*`` writes one PNG atomically and returns True.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdcache.files import atomic_write

if TYPE_CHECKING:
    from kdcache.report_inputs import Run

DPI = 100
COLORS = {"teacher": "#4c72b0", "student": "#dd8452", "baseline": "#55a868"}
"""The pipeline's model names keep their colours in every plot; other names take the cycle's."""
CYCLE = ("#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def colour(name: str, index: int) -> str:
    return COLORS.get(name, CYCLE[index % len(CYCLE)])


def _save(fig: Figure, path: Path) -> bool:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None}))
    return True


def draw_comparison(models: dict[str, dict[str, Any]], path: Path) -> bool:
    """Bars per model: val CE, KL to the teacher and top-1 agreement (students only), forward tokens/s."""
    panels = (
        ("ce", "val CE (nats/token)", True),
        ("kl_to_teacher", "KL to teacher (nats/token)", False),
        ("top1_agreement", "top-1 agreement with teacher", False),
        ("tokens_per_s", "forward tokens/s", True),
    )
    fig = Figure(figsize=(13, 3.4))
    for i, (key, title, with_teacher) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        names = [
            n for n, m in models.items() if isinstance(m.get(key), (int, float)) and (with_teacher or n != "teacher")
        ]
        values = [float(models[n][key]) for n in names]
        ax.bar(names, values, color=[colour(n, j) for j, n in enumerate(names)])
        for j, v in enumerate(values):
            ax.annotate(_short(v), (j, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=9)
        if key == "top1_agreement":
            ax.set_ylim(0, 1.05)
        elif key == "ce" and values:  # differences matter here, not the distance from 0
            low, high = min(values), max(values)
            pad = max(0.3 * (high - low), 0.01 * high)
            ax.set_ylim(max(0.0, low - 2 * pad), high + pad)
    return _save(fig, path)


def draw_reliability(rows: list[dict[str, Any]], path: Path) -> bool:
    """Left: accuracy vs mean confidence per bin, per model, with the diagonal. Right: the share of positions in
    each bin, at the bin's mean confidence."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="calibrated")
    names = list(dict.fromkeys(r["model"] for r in rows))
    for i, name in enumerate(names):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["bin"])
        conf = np.array([r["confidence"] for r in mine])
        acc = np.array([r["accuracy"] for r in mine])
        counts = np.array([r["count"] for r in mine], dtype=np.float64)
        left.plot(conf, acc, marker="o", markersize=3, color=colour(name, i), label=name)
        right.plot(conf, counts / max(counts.sum(), 1.0), marker="o", markersize=3, color=colour(name, i), label=name)
    left.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 confidence (bin mean)", ylabel="top-1 accuracy")
    left.set_title("reliability diagram", fontsize=10)
    left.legend(fontsize=8)
    right.set(xlim=(0, 1), xlabel="top-1 confidence (bin mean)", ylabel="share of positions in the bin")
    right.set_title("where confidences fall", fontsize=10)
    right.legend(fontsize=8)
    return _save(fig, path)


def draw_training(runs: dict[str, Run], path: Path) -> bool:
    """Training CE per step for every run and the KD term of the runs that distil (raw and smoothed); a third
    panel with alpha and temperature when either moves over a run (``train.schedule``)."""
    distilled = [r for r in runs.values() if any(x.get("alpha") or x.get("kd") for x in r.log)]
    scheduled = [r for r in distilled if _moves(r.log, "alpha") or _moves(r.log, "temperature")]
    fig = Figure(figsize=(13 if scheduled else 9, 3.8))
    count = 3 if scheduled else 2
    ce_ax, kd_ax = fig.add_subplot(1, count, 1), fig.add_subplot(1, count, 2)
    for i, run in enumerate(runs.values()):
        _curve(ce_ax, run, "ce", colour(run.name, i))
        if run in distilled:
            _curve(kd_ax, run, "kd", colour(run.name, i))
    ce_ax.set(xlabel="step", ylabel="nats/token")
    ce_ax.set_title("training CE (hard labels)", fontsize=10)
    kd_ax.set(xlabel="step", ylabel="nats/token (the logged kd)")
    kd_ax.set_title("KD term" if distilled else "KD term (no run distils)", fontsize=10)
    for ax in (ce_ax, kd_ax):
        if ax.lines:
            ax.legend(fontsize=8)
    if scheduled:
        ax = fig.add_subplot(1, count, 3)
        twin = ax.twinx()
        for run in scheduled:
            steps = [r["step"] for r in run.log]
            color = colour(run.name, list(runs).index(run.name))
            ax.plot(
                steps, [r.get("alpha") for r in run.log], color=color, label=f"{run.name}: alpha (solid), tau (dotted)"
            )
            twin.plot(steps, [r.get("temperature") for r in run.log], color=color, linestyle=":")
        ax.set(xlabel="step", ylabel="alpha (solid)", ylim=(-0.05, 1.05))
        twin.set_ylabel("temperature (dotted)")
        ax.set_title("schedule", fontsize=10)
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def draw_teacher_signals(histograms: dict[str, dict[str, list]], path: Path) -> bool:
    """One panel per signal (nll, entropy): the share of cached positions per bin, with the histogram's mean."""
    fig = Figure(figsize=(5 * len(histograms), 3.6))
    for i, (name, h) in enumerate(sorted(histograms.items())):
        ax = fig.add_subplot(1, len(histograms), i + 1)
        edges, counts = np.asarray(h["edges"], np.float64), np.asarray(h["counts"], np.float64)
        share = counts / max(counts.sum(), 1.0)
        ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
        mean = float((share * (edges[:-1] + edges[1:]) / 2).sum())
        ax.axvline(mean, color="#c44e52", linestyle="--", linewidth=1, label=f"mean ≈ {mean:.2f} (bin centres)")
        last = max((j for j, c in enumerate(counts) if c), default=len(counts) - 1)
        right = max(edges[min(last + 2, len(edges) - 1)], 2.0)
        ax.set(xlabel="nats", ylabel="share of positions", xlim=(edges[0], right))
        title = {"nll": "teacher NLL of the next token", "entropy": "teacher entropy"}.get(name, name)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _curve(ax: Any, run: Run, key: str, color: str) -> None:
    steps = np.array([r["step"] for r in run.log if isinstance(r.get(key), (int, float))], dtype=np.float64)
    values = np.array([r[key] for r in run.log if isinstance(r.get(key), (int, float))], dtype=np.float64)
    if not len(values):
        return
    ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
    ax.plot(steps, _smooth(values), color=color, linewidth=1.6, label=run.name)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Trailing mean over ~5% of the run (at least 1 step), the same length as ``values``."""
    window = max(1, len(values) // 20)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def _moves(log: list[dict[str, Any]], key: str) -> bool:
    values = {r.get(key) for r in log if isinstance(r.get(key), (int, float))}
    return len(values) > 1


def _short(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
