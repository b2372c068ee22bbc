"""`dvc repro` killed during training resumes from its checkpoints (the real DVC, the real train stage).

The train stage keeps its run (checkpoints, log, final model) in `paths.student_run`, a `persist`
output DVC never deletes, and publishes the finished model to `paths.student`. Here a copy of the
repository's dvc.yaml, reduced to the train stage, runs on a tiny cache; the stage process group is
SIGKILLed at a checkpoint (a `sitecustomize` on PYTHONPATH arms `kdcache.files.crash_point` in the
stage's process only: production code never arms it), `dvc repro` is run again, and the final weights
and per-step losses must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import STUDENT, make_world

from kdcache.cache.build import cache_corpus
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.fingerprint import sha256_file

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
TRAIN = {
    "loss": "topk_tail",
    "max_steps": 12,
    "batch_size": 4,
    "warmup_steps": 2,
    "lr": 0.01,
    "checkpoint_every": 4,
    "log_every": 1,
    "student": STUDENT,
}  # 12 sequences / 4 = 3 batches per epoch: checkpoints at steps 4 and 8 are mid-epoch
CRASH_HOOK = """
import os
if os.environ.get("DVC_STAGE") == "train" and os.environ.get("KDCACHE_TEST_CRASH"):
    import signal
    from kdcache.files import set_crash_hook

    def _hook(name, point=os.environ["KDCACHE_TEST_CRASH"]):
        if name == point:  # the whole process group: the stage, its shell and `dvc repro`, as a power cut
            os.killpg(os.getpgid(0), signal.SIGKILL)

    set_crash_hook(_hook)
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dvc-resume")
    world = make_world(root, n=12, seq=16, val=2)
    out = root / "demo"
    cache_corpus(
        TeacherConfig(path=str(world["teacher"]), device="cpu"),
        CacheConfig(targets="topk", top_k=8, batch_size=4, rows_per_shard=8),
        tokens_dir=world["tokens"],
        out_dir=out,
    )
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(CRASH_HOOK)
    return out


def _env(work: Path, cache: Path, crash: str | None = None) -> dict[str, str]:
    """The stage imports ``kdcache`` from the repository's own copy of pipeline/ (``work/py/kdcache``), a
    snapshot: the run's code fingerprint stays put while pipeline/ is edited elsewhere."""
    env = {
        **os.environ,
        "KDCACHE_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": "1",
        "KDCACHE_STAGING_DIR": str(cache.parent / "staging"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("KDCACHE_TEST_CRASH", None)
    env["PYTHONPATH"] = str(work / "py")
    if crash:
        env |= {"KDCACHE_TEST_CRASH": crash, "PYTHONPATH": f"{cache.parent / 'hook'}{os.pathsep}{work / 'py'}"}
    return env


def _repo(cache: Path, work: Path) -> Path:
    """A git + DVC repository with the real pipeline code, the train stage of dvc.yaml and a tiny cache.

    ``git init``, ``dvc init`` and ``dvc config`` run once per module (``cache.parent / "template"``); each
    repository starts as a copy of that one (three subprocesses fewer per repository)."""
    template = cache.parent / "template"
    if not template.exists():
        template.mkdir()
        env = _env(template, cache)
        for cmd in (["git", "init", "-q"], [*DVC, "init", "-q"], [*DVC, "config", "core.analytics", "false"]):
            subprocess.run(cmd, cwd=template, env=env, check=True, capture_output=True)
    shutil.copytree(template, work, symlinks=True)
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stages["train"]}}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"] = {**params["train"], **TRAIN}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "data").mkdir()
    (work / "data" / "params.checked").write_text("checked\n")  # the check_params stage's output
    shutil.copytree(cache, work / params["paths"]["cache"])
    (work / params["paths"]["teacher_caches"]).mkdir(parents=True)  # the teacher_caches stage's directory
    (work / "py").mkdir()
    (work / "py" / "kdcache").symlink_to(work / "pipeline", target_is_directory=True)
    return work


def _repro(work: Path, cache: Path, *, crash: str | None = None) -> subprocess.CompletedProcess:
    """`dvc repro train` in its own session (the crash hook kills that whole process group)."""
    proc = subprocess.run(
        [*DVC, "repro", "train"],
        cwd=work,
        env=_env(work, cache, crash),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    if crash:
        assert proc.returncode == -signal.SIGKILL, f"not killed at {crash}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    else:
        assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _losses(work: Path) -> list[tuple[int, float]]:
    lines = (work / "models" / "student" / "train_log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _up_to_date(work: Path, cache: Path) -> bool:
    out = subprocess.run([*DVC, "status", "--json"], cwd=work, env=_env(work, cache), capture_output=True, text=True)
    return json.loads(out.stdout) == {}


@pytest.fixture(scope="module")
def reference(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = _repo(cache, tmp_path_factory.mktemp("ref") / "repo")
    _repro(work, cache)
    return work


def test_a_killed_dvc_repro_resumes_twice_and_ends_with_the_uninterrupted_weights(reference: Path, cache, tmp_path):
    work = _repo(cache, tmp_path / "repo")
    run = work / "models" / "student-run" / "checkpoints"
    _repro(work, cache, crash="checkpoint_write:8")  # killed writing step 8: step 4 is the newest checkpoint
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["step-000004"]
    assert not (work / "models" / "student" / "training.json").exists()
    second = _repro(work, cache, crash="checkpoint_write:12")  # DVC reran the stage; it resumed at step 4
    assert "resumed from" in second.stderr and "step-000004" in second.stderr
    assert "step-000008" in {p.name for p in run.iterdir()}
    third = _repro(work, cache)
    assert re.search(r"resumed from \S*step-000008 \(step 8", third.stderr), third.stderr[-3000:]
    final = work / "models" / "student" / "model.safetensors"
    assert sha256_file(final) == sha256_file(reference / "models" / "student" / "model.safetensors")
    assert _losses(work) == _losses(reference)  # every step once, the same numbers
    assert json.loads((work / "models" / "student" / "training.json").read_text())["complete"]
    assert _up_to_date(work, cache)


def test_changed_train_params_move_the_old_run_aside_and_train_afresh(reference: Path, cache, tmp_path):
    work = shutil.copytree(reference, tmp_path / "repo", symlinks=True)
    before = sha256_file(work / "models" / "student" / "model.safetensors")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["lr"] = 0.02
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _repro(work, cache)
    assert "not resuming" in proc.stderr and "changed-train.lr" in proc.stderr
    moved = list((work / "models" / "student-run").glob("run.moved-*-changed-train.lr"))
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "step-000012" / "model.safetensors").is_file()
    assert sha256_file(moved[0] / "model.safetensors") == before  # the old final model kept too, not deleted
    assert sha256_file(work / "models" / "student" / "model.safetensors") != before
    assert [s for s, _ in _losses(work)] == list(range(1, 13))
    assert _up_to_date(work, cache)


def test_a_rerun_with_nothing_changed_is_up_to_date_and_a_forced_one_reproduces_the_model(reference, cache, tmp_path):
    work = shutil.copytree(reference, tmp_path / "repo", symlinks=True)
    assert _up_to_date(work, cache)
    before = sha256_file(work / "models" / "student" / "model.safetensors")
    proc = subprocess.run(
        [*DVC, "repro", "-f", "train"], cwd=work, env=_env(work, cache), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-000012" in proc.stderr  # the finished run: no step retrained
    assert sha256_file(work / "models" / "student" / "model.safetensors") == before
