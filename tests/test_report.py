"""pipeline/report*.py: the report page and plots built from small real outputs -- a tiny teacher's cache,
a KD student and a CE baseline trained on it, and the evaluate stage's metrics -- through the library, the
CLI and the DVC stage script."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import STUDENT, make_world

from kdcache.cache.build import cache_corpus
from kdcache.cache.format import Manifest
from kdcache.cli import main
from kdcache.config.cache import CacheConfig
from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import RampConfig, ScheduleConfig, StudentConfig, TrainConfig
from kdcache.evaluate import evaluate, write_metrics
from kdcache.outputs import OutputDirError
from kdcache.report import build_report
from kdcache.report_inputs import ReportError, read_run
from kdcache.report_page import comparison, describe_schedule
from kdcache.token_data import open_tokens
from kdcache.train import train

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 6


pytestmark = pytest.mark.usefixtures("staging_one_thread")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pipeline's outputs in miniature: cache, KD student (with a schedule), CE baseline, metrics, plots."""
    world = make_world(tmp_path_factory.mktemp("report"), n=16, val=4)
    root = world["root"]
    teacher = TeacherConfig(path=str(world["teacher"]))
    cache = cache_corpus(
        teacher, CacheConfig(targets="topk", top_k=8, batch_size=4), tokens_dir=world["tokens"], out_dir=root / "cache"
    )
    kd = TrainConfig(
        loss="topk_renorm",
        alpha=0.9,
        max_steps=STEPS,
        batch_size=4,
        warmup_steps=1,
        checkpoint_every=STEPS,
        student=StudentConfig(**STUDENT),
        schedule=ScheduleConfig(
            alpha=RampConfig("linear", 0.3), temperature=RampConfig("cosine", 2.0), ce_warmup_steps=2
        ),
    )
    torch.set_num_threads(1)
    train(kd, cache_dir=cache, out_dir=root / "student")
    train(TrainConfig(**{**vars(kd), "loss": "ce"}), cache_dir=cache, out_dir=root / "baseline")
    metrics = evaluate(
        EvaluateConfig(batch_size=4, calibration_bins=5),
        tokens=open_tokens(world["tokens"], "val"),
        teacher=teacher,
        models={"student": root / "student", "baseline": root / "baseline"},
    )
    write_metrics(metrics, metrics_path=root / "metrics" / "eval.json", plots_dir=root / "plots")
    return {"root": root, "cache": cache, "tokens": world["tokens"], "teacher": world["teacher"]}


@pytest.fixture(scope="module")
def page(outputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full report of ``outputs`` (all inputs given), built once."""
    return _build(outputs, tmp_path_factory.mktemp("built") / "report")


def _build(outputs: dict[str, Path], out: Path, **kw) -> Path:
    root = outputs["root"]
    args = dict(
        metrics=root / "metrics" / "eval.json",
        calibration=root / "plots" / "calibration.csv",
        runs={"student": root / "student", "baseline": root / "baseline"},
        cache=outputs["cache"],
        out_dir=out,
    )
    return build_report(**{**args, **kw})


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 2000


def test_report_states_the_evaluate_metrics_and_the_cache_figures(outputs: dict, page: Path) -> None:
    text = page.read_text()
    metrics = json.loads((outputs["root"] / "metrics" / "eval.json").read_text())
    for name in ("teacher", "student", "baseline"):
        m = metrics[name]
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | {m['ce']:.4f} |"))
        assert f"{m['ppl']:.2f}" in row and f"{m['ece']:.4f}" in row and f"{100 * m['top1_accuracy']:.1f}%" in row
        if name != "teacher":
            assert f"{m['kl_to_teacher']:.4f}" in row and f"{100 * m['top1_agreement']:.1f}%" in row
        cost = next(line for line in text.splitlines() if line.startswith(f"| {name} | {m['num_parameters']:,} |"))
        assert f"{m['tokens_per_s']:,.0f}" in cost
    speedup = metrics["student"]["tokens_per_s"] / metrics["teacher"]["tokens_per_s"]
    assert f"| {speedup:.2f}× |" in text
    assert f"val CE {metrics['student']['ce']:.4f} vs {metrics['baseline']['ce']:.4f} nats/token" in text
    manifest = Manifest.load(outputs["cache"])
    per_token = sum(s.bytes for s in manifest.shards) / manifest.num_tokens
    assert f"**{per_token:.2f} bytes/token**" in text and "top-8 at temperature 1" in text
    assert "alpha linear 0.9→0.3, tau cosine 1.0→2.0, CE-only first 2 steps" in text
    for figure in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert _is_png(page.parent / figure), figure
    assert {"comparison.png", "reliability.png", "training.png"} <= {p.name for p in page.parent.glob("*.png")}
    assert ("teacher_signals.png" in text) == bool(manifest.stats.get("nll_histogram"))


def test_training_curves_are_csv_with_the_logged_schedule(outputs: dict, page: Path) -> None:
    out = page.parent
    rows = list(csv.DictReader((out / "train_student.csv").open()))
    log = [json.loads(line) for line in (outputs["root"] / "student" / "train_log.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert [float(r["ce"]) for r in rows] == [r["ce"] for r in log]
    assert [float(r["alpha"]) for r in rows] == pytest.approx([0, 0, 0.9, 0.7, 0.5, 0.3], abs=1e-12)
    assert float(rows[-1]["temperature"]) == pytest.approx(2.0)
    baseline = list(csv.DictReader((out / "train_baseline.csv").open()))
    assert all(float(r["kd"]) == 0 and float(r["alpha"]) == 0 for r in baseline)


def test_teacher_signal_histograms_in_the_manifest_are_drawn(outputs: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(outputs["cache"], cache)
    data = json.loads((cache / "manifest.json").read_text())
    edges = [0.5 * i for i in range(33)]
    data["stats"] |= {
        "mean_nll": 2.5,
        "nll_histogram": {"edges": edges, "counts": [i % 7 for i in range(32)]},
        "entropy_histogram": {"edges": edges, "counts": [32 - i for i in range(32)]},
    }
    (cache / "manifest.json").write_text(json.dumps(data))
    text = _build(outputs, tmp_path / "report", cache=cache, calibration=None, runs={}).read_text()
    assert "![per-token teacher NLL and entropy](teacher_signals.png)" in text and "mean 2.500 nats/token" in text
    assert _is_png(tmp_path / "report" / "teacher_signals.png")


def test_a_rerun_replaces_the_report_and_drops_plots_it_no_longer_draws(outputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "report"
    _build(outputs, out, calibration=None, cache=None, runs={})
    for stale in ("teacher_signals.png", "reliability.png", "train_old.csv"):  # as an earlier report's
        (out / stale).write_bytes(b"old")
    (out / "notes.txt").write_text("a user's note")
    _build(outputs, out, calibration=None, cache=None, runs={})
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "comparison.png",
        "notes.txt",
        "report.md",
    ]
    text = (out / "report.md").read_text()
    assert "No calibration data given" in text and "No cache given." in text and "No training runs given." in text
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(OutputDirError):
        _build(outputs, tmp_path / "mine")


def test_missing_or_malformed_inputs_are_one_line_naming_the_file_and_the_fix(outputs: dict, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"nope.json: not found — run the evaluate stage first"):
        _build(outputs, tmp_path / "a", metrics=tmp_path / "nope.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ReportError, match=r"empty.json: no model metrics in it"):
        _build(outputs, tmp_path / "b", metrics=tmp_path / "empty.json")
    with pytest.raises(ReportError, match=r"train_log.jsonl: no training log for run 'x' — train it first"):
        _build(outputs, tmp_path / "c", runs={"x": tmp_path})
    with pytest.raises(ReportError, match=r"run names \['a/b'\]"):
        _build(outputs, tmp_path / "d", runs={"a/b": outputs["root"] / "student"})


def test_a_log_line_cut_short_by_a_crash_is_skipped_and_counted(outputs: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    good = (outputs["root"] / "student" / "train_log.jsonl").read_text()
    (run / "train_log.jsonl").write_text(good + '{"step": 7, "lo')
    got = read_run("student", run)
    assert len(got.log) == STEPS and got.skipped_lines == 1 and got.summary == {}


def test_comparison_numbers_follow_their_definitions() -> None:
    models = {
        "teacher": {"ce": 2.0, "tokens_per_s": 1000.0, "num_parameters": 4000},
        "student": {"ce": 2.6, "kl_to_teacher": 0.3, "tokens_per_s": 5000.0, "num_parameters": 500},
        "baseline": {"ce": 3.0, "kl_to_teacher": 0.7, "tokens_per_s": 5000.0, "num_parameters": 500},
    }
    d = comparison(models)
    assert d["speedup"]["student"] == 5.0 and d["smaller"]["student"] == 8.0 and d["speedup"]["teacher"] == 1.0
    assert d["ce_delta"] == pytest.approx(-0.4) and d["kl_delta"] == pytest.approx(-0.4)
    assert d["gap_closed"] == pytest.approx(0.4)  # (3.0 - 2.6) / (3.0 - 2.0)
    assert comparison({**models, "teacher": {**models["teacher"], "ce": 3.5}})["gap_closed"] is None
    assert (
        describe_schedule({"alpha": 0.5, "temperature": 1.0, "schedule": {"ce_warmup_steps": 0}})
        == "alpha 0.5, tau 1.0"
    )
    assert not math.isnan(d["gap_closed"])


def test_cli_and_dvc_stage_write_the_library_page(
    outputs: dict, page: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = outputs["root"]
    metrics = ["--metrics", str(root / "metrics" / "eval.json")]
    assert main(["report", *metrics, "--run", "student", "--out", str(tmp_path / "bad")]) == 1
    assert "--run student: each must be NAME=DIR" in capsys.readouterr().err
    assert main(["report", *metrics, "--out", str(tmp_path / "cli")]) == 0  # metrics alone: the tables
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "report.md")
    cli = (tmp_path / "cli" / "report.md").read_text()
    assert [line for line in cli.splitlines() if line.startswith("| ")] == [
        line for line in page.read_text().split("## Calibration")[0].splitlines() if line.startswith("| ")
    ]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] |= {
        "metrics": str(root / "metrics" / "eval.json"),
        "plots": str(root / "plots"),
        "student": str(root / "student"),
        "baseline": str(root / "baseline"),
        "cache": str(outputs["cache"]),
        "report": str(tmp_path / "stage"),
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage = [sys.executable, str(ROOT / "stages" / "report.py"), "--params", str(tmp_path / "params.yaml")]
    proc = subprocess.run(stage, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stage_page = tmp_path / "stage" / "report.md"
    assert stage_page.read_text() == page.read_text()
    for name in ("comparison.png", "reliability.png", "training.png", "train_student.csv"):
        assert (stage_page.parent / name).read_bytes() == (page.parent / name).read_bytes(), name
