"""The real `dvc repro` on tiny params in a temp copy of the repository, end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]

TINY = {
    "demo_teacher": {
        "vocab_size": 320,
        "seq_len": 32,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 64,
        "batch_size": 8,
        "lr": 0.01,
        "max_steps": 6,
        "max_minutes": 1.0,
    },
    "prepare": {"seq_len": 32, "max_train_sequences": 48, "max_val_sequences": 16},  # 12 steps of 4: one epoch
    "cache": {"targets": "topk", "top_k": 8, "batch_size": 4, "rows_per_shard": 16},
    "train": {
        "loss": "topk_tail",
        "max_steps": 12,
        "batch_size": 4,
        "warmup_steps": 2,
        "checkpoint_every": 6,
        "student": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
    },
    "evaluate": {"batch_size": 4, "max_sequences": 16},
}


def _tiny_corpus(dest: Path) -> list[str]:
    """24 real documents: slices of standard-library modules."""
    dest.mkdir()
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-m]*.py"))[:24]
    for i, src in enumerate(sources):
        (dest / f"doc{i:02d}.txt").write_text(src.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return [str(dest / "*.txt")]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _changed_stages(cwd: Path, env: dict[str, str]) -> set[str]:
    out = _run([*DVC, "status", "--json"], cwd, env).stdout
    return set(json.loads(out))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("e2e") / "repo"
    work.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, work / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["corpus"] = {**params["corpus"], "paths": _tiny_corpus(work.parent / "corpus"), "val_fraction": 0.2}
    for section, values in TINY.items():
        params[section] = {**params[section], **values}
    params["train_baseline"] = {**params["train"], "loss": "ce"}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": str(work),
        "KDCACHE_NO_PROGRESS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    _run(["git", "init", "-q"], work, env)
    _run([*DVC, "init", "-q"], work, env)
    _run([*DVC, "config", "core.analytics", "false"], work, env)
    _run([*DVC, "repro"], work, env)
    return work, env


def test_dvc_repro_writes_metrics_for_teacher_student_and_baseline(repo: tuple[Path, dict[str, str]]) -> None:
    work, env = repo
    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    for model in ("teacher", "student", "baseline"):
        for key in ("ce", "ppl", "tokens_per_s", "num_parameters"):
            assert key in metrics[model], f"{model}.{key} missing from metrics/eval.json"
    for model in ("student", "baseline"):
        assert {"kl_to_teacher", "top1_agreement"} <= set(metrics[model])
    shown = _run([*DVC, "metrics", "show", "--json"], work, env).stdout
    assert "kl_to_teacher" in shown
    assert (work / "cache" / "demo" / "manifest.json").is_file()
    assert "## Training" in (work / "report" / "report.md").read_text()
    plots = json.loads(_run([*DVC, "plots", "show", "--json"], work, env).stdout)
    assert {"train_ce", "train_loss", "train_schedule", "report/training.png"} <= set(plots["data"])
    assert not plots.get("errors"), plots["errors"]
    assert _changed_stages(work, env) == set(), "a fresh repro must leave every stage up to date"


def test_changing_train_lr_reruns_only_training_and_evaluation(repo: tuple[Path, dict[str, str]]) -> None:
    work, env = repo
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["lr"] *= 2
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _changed_stages(work, env) == {"check_params", "train"}  # check_params reads every section
    out = _run([*DVC, "repro"], work, env).stdout
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == {"check_params", "train", "evaluate", "report"}, out  # check_params' output is unchanged


def test_changing_cache_top_k_invalidates_the_cache_stage(repo: tuple[Path, dict[str, str]]) -> None:
    work, env = repo
    original = (work / "params.yaml").read_text()
    try:
        params = yaml.safe_load(original)
        params["cache"]["top_k"] = 4
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert _changed_stages(work, env) == {"check_params", "cache"}  # train/evaluate follow via the cache
    finally:
        (work / "params.yaml").write_text(original)


def test_a_new_train_config_field_reruns_training_not_the_cache(repo: tuple[Path, dict[str, str]]) -> None:
    """dvc.yaml deps are per module: a TrainConfig change invalidates train stages only."""
    work, env = repo
    module = work / "pipeline" / "config" / "train.py"
    original = module.read_text()
    try:
        added = original.replace(
            "    seed: int = 0\n",
            '    seed: int = 0\n    new_knob: int = 0\n    """A field added by this test."""\n',
            1,
        )
        assert added != original
        module.write_text(added)
        assert _changed_stages(work, env) == {"check_params", "train", "train_baseline"}  # evaluate: via outputs
    finally:
        module.write_text(original)
    assert _changed_stages(work, env) == set()
