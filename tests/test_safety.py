"""Never destroy what isn't ours: the output-directory rule, the lock, moving aside, params checked before DVC.

Every case goes through the real CLI (``kdcache.cli.main`` in-process, or ``python -m kdcache.cli`` where a
second process is the point) or the real ``dvc repro``; each checks that the files that were there are
byte-for-byte still there, and that the refusal is one line naming what is there and the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import STUDENT, make_world

from kdcache.cli import main as kdcache
from kdcache.fingerprint import sha256_file
from kdcache.outputs import LOCK_NAME, MARKER_NAME

ROOT = Path(__file__).resolve().parents[1]
CACHE_FLAGS = ["--targets", "topk", "--top-k", "4", "--batch-size", "4", "--rows-per-shard", "4", "--device", "cpu"]
TRAIN_FLAGS = ["--device", "cpu", "--batch-size", "4", "--max-steps", "4", "--checkpoint-every", "2"]
TRAIN_FLAGS += ["--warmup-steps", "1", "--log-every", "100"]
ENV = {**os.environ, "KDCACHE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def digests(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory (symlinks by their target name)."""
    if path.is_file():
        return {".": sha256_file(path)}
    return {
        str(p.relative_to(path)): os.readlink(p) if p.is_symlink() else sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def error(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's one error line (after any library progress bars)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in reversed(err.splitlines()) if line.startswith("kdcache: error: "))


@pytest.fixture(autouse=True)
def _quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDCACHE_NO_PROGRESS", "1")
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    w = make_world(tmp_path_factory.mktemp("safety"))
    (w["root"] / "student.json").write_text(json.dumps(STUDENT))
    assert (
        kdcache(
            [
                "cache",
                "--teacher",
                str(w["teacher"]),
                "--tokens",
                str(w["tokens"]),
                "--out",
                str(w["root"] / "cache"),
                *CACHE_FLAGS,
            ]
        )
        == 0
    )
    return w | {"cache": w["root"] / "cache"}


def cache_args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "cache",
        "--teacher",
        str(world["teacher"]),
        "--tokens",
        str(world["tokens"]),
        "--out",
        str(out),
        *CACHE_FLAGS,
        *extra,
    ]


def train_args(world: dict[str, Path], out: Path, *extra: str, cache: Path | None = None) -> list[str]:
    cache = cache or world["cache"]
    return [
        "train",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--student",
        str(world["root"] / "student.json"),
        *TRAIN_FLAGS,
        *extra,
    ]


# ----------------------------------------------------------------------------- someone else's directory


def test_cache_into_a_directory_kdcache_did_not_make_is_refused_and_its_tokenizer_dir_survives(world, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "my-vocab.txt").write_text("mine")
    (out / "notes.txt").write_text("notes")
    before = digests(out)
    assert kdcache(cache_args(world, out)) == 1
    assert error(capsys) == (
        f"kdcache: error: {out}: holds notes.txt, tokenizer/, which kdcache did not make; refusing to write into it "
        "— choose another output directory, or pass --overwrite to move it aside (to mine.moved-<UTC time>-overwritten)"
    )
    assert digests(out) == before


def test_overwrite_moves_what_is_there_aside_and_never_deletes_it(world, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert kdcache(cache_args(world, out, "--overwrite")) == 0
    (aside,) = tmp_path.glob("mine.moved-*-overwritten")
    assert (aside / "precious.txt").read_text() == "keep me"
    assert (out / "manifest.json").is_file() and json.loads((out / MARKER_NAME).read_text())["kind"] == "cache"
    incompatible = digests(out)  # now a cache of top-k 4: top-k 8 refuses it, naming the flag ...
    assert kdcache(cache_args(world, out, "--top-k", "8")) == 1
    assert "targets.top_k 4 (this run: 8)" in (err := error(capsys)) and err.endswith(
        f"or pass --overwrite to move {out} aside"
    )
    assert kdcache(cache_args(world, out, "--top-k", "8", "--overwrite")) == 0  # ... and with it, moves it aside too
    (old_cache,) = [p for p in tmp_path.glob("mine.moved-*") if (p / "manifest.json").exists()]
    assert digests(old_cache) == incompatible


def test_demo_teacher_refuses_a_users_directory_and_never_touches_old_or_incomplete_siblings(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(f"document {i} " + "some words of text here\n" * 40)
    siblings = {}
    for name in ("teacher.old", "teacher.incomplete"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
        siblings[name] = digests(tmp_path / name)
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "draft.txt").write_text("my draft")
    sizes = ["--vocab-size", "300", "--teacher-seq-len", "16", "--hidden-size", "16", "--num-layers", "1"]
    sizes += ["--num-heads", "2", "--intermediate-size", "32", "--batch-size", "2", "--max-steps", "2"]
    args = ["demo-teacher", "--out", str(out), "--paths", str(corpus / "*.txt"), "--val-fraction", "0.2", *sizes]
    assert kdcache(args) == 1
    assert f"{out}: holds draft.txt, which kdcache did not make" in error(capsys)
    assert (out / "draft.txt").read_text() == "my draft"
    shutil.rmtree(out)
    assert kdcache(args) == 0 and kdcache(args) == 0  # new, then its own output: replaced
    assert {name: digests(tmp_path / name) for name in siblings} == siblings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "teacher", "teacher.incomplete", "teacher.old"]


@pytest.mark.parametrize(
    "case",
    [
        "train --out the teacher",
        "demo-teacher --out a cache",
        "evaluate --plots a student",
        "prepare --out a foreign dir",
    ],
)
def test_another_commands_output_or_a_users_directory_is_refused_untouched(world, tmp_path, capsys, case):
    student = tmp_path / "student"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"mine": true}')
    (foreign / "train.arrow").write_text("mine")
    if case.startswith("evaluate"):
        assert kdcache(train_args(world, student)) == 0
    target, args, expect = {
        "train --out the teacher": (
            world["teacher"],
            train_args(world, world["teacher"]),
            "which kdcache did not make",
        ),
        "demo-teacher --out a cache": (
            world["cache"],
            ["demo-teacher", "--out", str(world["cache"]), "--paths", str(world["teacher"] / "*.json")],
            "holds kdcache cache output, not demo-teacher output",
        ),
        "evaluate --plots a student": (
            student,
            ["evaluate", "--tokens", str(world["tokens"]), "--teacher", str(world["teacher"]), "--device", "cpu"]
            + ["--metrics", str(tmp_path / "m.json"), "--plots", str(student)],
            "holds kdcache student output, not plots output",
        ),
        "prepare --out a foreign dir": (
            foreign,
            [
                "prepare",
                "--tokenizer",
                str(world["teacher"]),
                "--out",
                str(foreign),
                "--corpus",
                str(tmp_path / "x.txt"),
            ],
            "holds manifest.json, train.arrow, which kdcache did not make",
        ),
    }[case]
    before = digests(target)
    capsys.readouterr()
    assert kdcache(args) == 1
    assert expect in error(capsys)
    assert digests(target) == before


@pytest.mark.parametrize(
    "case",
    [
        "cache --out the token data",
        "cache --out inside the teacher",
        "prepare --out the tokenizer's dir",
        "train --out the cache",
        "train --out a parent of the cache",
        "train --out a symlink to the cache",
        "evaluate --metrics the teacher's config.json",
    ],
)
def test_an_output_that_is_an_input_inside_one_or_around_one_is_refused_even_with_overwrite(
    world, tmp_path, capsys, case
):
    link = tmp_path / "link"
    link.symlink_to(world["cache"])
    evaluate = ["evaluate", "--tokens", str(world["tokens"]), "--teacher", str(world["teacher"]), "--device", "cpu"]
    args, how = {
        "cache --out the token data": (cache_args(world, world["tokens"]), "is the token data input"),
        "cache --out inside the teacher": (cache_args(world, world["teacher"] / "c"), "is inside the teacher input"),
        "prepare --out the tokenizer's dir": (
            ["prepare", "--tokenizer", str(world["teacher"]), "--out", str(world["teacher"]), "--corpus", "x.txt"],
            "is the tokenizer input",
        ),
        "train --out the cache": (train_args(world, world["cache"]), "is the cache input"),
        "train --out a parent of the cache": (train_args(world, world["root"]), "contains the cache input"),
        "train --out a symlink to the cache": (train_args(world, link), "is the cache input"),
        "evaluate --metrics the teacher's config.json": (
            [*evaluate, "--metrics", str(world["teacher"] / "config.json"), "--plots", str(tmp_path / "p")],
            "is inside the --teacher input",
        ),
    }[case]
    before = digests(world["root"])
    assert kdcache([*args, "--overwrite"]) == 1
    assert how in (err := error(capsys)) and "an output may never be one of the command's inputs" in err
    assert digests(world["root"]) == before


def test_evaluate_outputs_in_a_model_directory_are_refused_before_any_model_is_loaded(world, tmp_path, capsys):
    model = tmp_path / "some-model"
    shutil.copytree(world["teacher"], model)  # a model directory that is not an input of this run
    before = digests(model)
    base = ["evaluate", "--tokens", str(world["tokens"]), "--teacher", str(world["teacher"]), "--device", "cpu"]
    assert kdcache([*base, "--metrics", str(model / "eval.json"), "--plots", str(tmp_path / "p")]) == 1
    assert "holds config.json, model.safetensors (a model, token or cache directory); write it elsewhere" in error(
        capsys
    )
    assert kdcache([*base, "--metrics", str(tmp_path / "m.json"), "--plots", str(model)]) == 1
    assert "which kdcache did not make" in error(capsys)
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    assert kdcache([*base, "--metrics", str(tmp_path / "notes.json"), "--plots", str(tmp_path / "p")]) == 1
    assert "notes.json: exists and is not a file this command wrote" in error(capsys)
    assert digests(model) == before and (tmp_path / "notes.json").read_text() == '{"mine": 1}'


def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_untouched(world, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "cache"
    shutil.copytree(world["cache"], out)
    (out / LOCK_NAME).unlink()
    (out / LOCK_NAME).symlink_to(victim)
    assert kdcache(cache_args(world, out)) == 1
    assert f"{out / LOCK_NAME}: cannot open the lock file" in error(capsys)
    assert victim.read_text() == "precious"


# ----------------------------------------------------------------------------- training: move aside, resume checks


def test_train_without_resume_moves_the_previous_run_aside_instead_of_deleting_it(world, tmp_path):
    out = tmp_path / "student"
    assert kdcache(train_args(world, out)) == 0
    previous = digests(out / "checkpoints")
    assert kdcache(train_args(world, out, "--max-steps", "2")) == 0
    (moved,) = out.glob("run.moved-*-started-without-resume")
    assert digests(moved / "checkpoints") == previous and (moved / "training.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_resume_with_other_settings_another_cache_or_an_out_of_range_checkpoint_is_refused(world, tmp_path, capsys):
    out = tmp_path / "student"
    assert kdcache(train_args(world, out)) == 0
    other = tmp_path / "other-cache"
    assert kdcache(cache_args(world, other, "--top-k", "8")) == 0
    before = digests(out)
    for extra, cache, why in (
        (["--lr", "0.01"], None, "train.lr 0.003 (this run: 0.01)"),
        (["--batch-size", "2"], None, "train.batch_size 4 (this run: 2)"),
        (["--max-steps", "8"], None, "train.max_steps 4 (this run: 8)"),
        ([], other, "cache.targets.top_k 4 (this run: 8)"),
    ):
        capsys.readouterr()
        assert kdcache(train_args(world, out, "--resume", *extra, cache=cache)) == 1
        err = error(capsys)
        assert f"{out / 'checkpoints' / 'step-000004'}: written by a run with other settings — " in err and why in err
        assert digests(out) == before
    last = out / "checkpoints" / "step-000004"
    far = last.with_name("step-000009")
    shutil.copytree(last, far)
    (far / "trainer.json").write_text(json.dumps(json.loads((last / "trainer.json").read_text()) | {"step": 9}))
    assert kdcache(train_args(world, out, "--resume")) == 1
    assert "trainer.json: step 9 is outside this run's [1, train.max_steps=4]" in error(capsys)


# ----------------------------------------------------------------------------- one job per output directory


HOLD = """
import sys, time
from kdcache.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_job_is_refused_naming_the_holders_pid_and_a_killed_holder_releases_the_lock(world, tmp_path, capsys):
    for kind, args in (("cache", cache_args(world, tmp_path / "c")), ("student", train_args(world, tmp_path / "s"))):
        out = Path(args[args.index("--out") + 1])
        out.mkdir()
        (out / MARKER_NAME).write_text(json.dumps({"kdcache": "output directory", "kind": kind}))
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
        try:
            assert holder.stdout.readline().strip() == "held"
            assert kdcache(args) == 1
            assert f"kdcache: error: {out}: in use by pid {holder.pid} (" in error(capsys)
            assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, MARKER_NAME])  # nothing written
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        assert kdcache(args) == 0  # the kernel dropped the dead holder's lock


def test_two_real_training_runs_into_one_directory_the_second_is_refused(world, tmp_path, capsys):
    out = tmp_path / "student"
    first = subprocess.Popen(
        [sys.executable, "-m", "kdcache.cli", *train_args(world, out, "--max-steps", "100000")],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_log.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert kdcache(train_args(world, out)) == 1
        assert f"in use by pid {first.pid} (" in error(capsys)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert kdcache(train_args(world, out)) == 0  # killed: its lock is gone; its partial run is moved aside
    assert len(list(out.glob("run.moved-*-started-without-resume"))) == 1


def test_under_torchrun_a_second_job_is_refused_on_every_rank_and_writes_nothing(world, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / MARKER_NAME).write_text(json.dumps({"kdcache": "output directory", "kind": "cache"}))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "kdcache.cli", *cache_args(world, out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode != 0
    assert f"in use by pid {holder.pid}" in proc.stderr
    assert "rank 0 could not take the output directory (see its error); nothing written" in proc.stderr
    assert "pipeline/" not in proc.stderr  # one line per rank; the only traceback is torchrun's ChildFailedError
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, MARKER_NAME])


# ----------------------------------------------------------------------------- dvc repro: params checked first


def test_dvc_repro_with_bad_params_fails_before_dvc_deletes_any_stage_output(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, work / name)
    env = ENV | {"PYTHONPATH": str(work), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    outputs = {}
    for out in ("models/student", "models/demo-teacher"):  # a previous run's outputs, hours of work
        (work / out / "checkpoints").mkdir(parents=True)
        (work / out / "checkpoints" / "weights.bin").write_bytes(os.urandom(64))
        outputs[out] = digests(work / out)
    params = yaml.safe_load((work / "params.yaml").read_text())
    for section, key, bad, target in (("train", "lr", -1.0, []), ("demo_teacher", "num_layers", 0, ["demo_teacher"])):
        edited = yaml.safe_load((ROOT / "params.yaml").read_text()) | {section: {**params[section], key: bad}}
        (work / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
        proc = subprocess.run([*dvc, "repro", *target], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert f"stages/check_params.py: error: {section}.{key}: must be" in proc.stderr + proc.stdout
        assert {out: digests(work / out) for out in outputs} == outputs
