"""Crash safety of the real CLI: ``kill -9`` mid-cache and mid-training, disk full, read-only output.

Every process under test is a real ``python -m kdcache.cli ...`` subprocess. Exact crash points come
from ``kdcache.files.crash_point``, armed only by the test-only entry ``tests/faults.py``:
the process SIGKILLs itself there, as a pre-empted GPU box would be. Disk full is a real
``RLIMIT_FSIZE`` (with SIGXFSZ ignored, writes past it fail with EFBIG); a read-only directory is
mode 0o555 for a process running as ``nobody`` (the tests run as root, whom modes do not stop).

"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STUDENT, make_world
from transformers import LlamaForCausalLM

from kdcache.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from kdcache.cli import main as kdcache
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.fingerprint import sha256_file

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, N = 48, 16, 12
CACHE_FLAGS = [
    "--targets",
    "topk",
    "--top-k",
    "8",
    "--batch-size",
    "2",
    "--rows-per-shard",
    "4",
    "--device",
    "cpu",
]  # 3 shards x 2 batches
TRAIN = {
    "batch_size": 4,
    "max_steps": 8,
    "checkpoint_every": 2,
    "lr": 0.01,
    "warmup_steps": 2,
    "log_every": 100,
    "chunk_tokens": 16,
}  # 12 sequences / 4 = 3 batches per epoch: resumes at step 4 (mid-epoch) and 6 (boundary)


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (tokenizer/ and manifest included), by relative path."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def cli(
    *args: str, fault: str | None = None, preexec=None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``kdcache ARGS`` single-threaded (same kernels, same bytes as this process) in a subprocess;
    with ``fault``, through tests/faults.py, which SIGKILLs it at that crash point."""
    full = {**os.environ, "KDCACHE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    entry = [str(Path(__file__).with_name("faults.py")), fault] if fault else ["-m", "kdcache.cli"]
    return subprocess.run(
        [sys.executable, *entry, *args],
        env=full,
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=preexec,
    )


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


@pytest.fixture(autouse=True)
def _one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("KDCACHE_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def clean_cache(world: dict[str, Path]) -> Path:
    """A cache built in this process with ``CACHE_FLAGS``, never killed: the reference bytes of
    the cache tests and the input of the training tests, which only read it."""
    out = world["root"] / "clean" / "cache"  # same leaf name as the tests' `out`: the manifest records it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same kernels, same bytes
    try:
        assert kdcache(_cache_args(world, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _cache_args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
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


# ----------------------------------------------------------------------------- cache stage


def test_cache_killed_in_a_shard_between_shards_and_in_the_manifest_resumes_byte_identically(
    world, clean_cache, tmp_path
):
    want = digests(clean_cache)
    shards = [f"shard-{i:05d}.parquet" for i in range(3)]
    assert set(shards) | {"manifest.json", "tokenizer/tokenizer.json"} <= set(want)
    out = tmp_path / "run" / "cache"

    def finals() -> list[str]:
        names = sorted(p.name for p in out.glob("shard-*.parquet"))
        for name in names:  # a final name only ever holds a complete shard, identical to the clean run's
            assert sha256_file(out / name) == want[name], f"{name} is visible but not the finished shard"
        return names

    proc = cli(*_cache_args(world, out), fault="during_shard:0")
    assert killed(proc), proc.stderr[-3000:]
    assert (out / "shard-00000.parquet.tmp").exists()  # the partial shard exists, under its temp name only
    assert finals() == [] and not (out / "manifest.json").exists()

    proc = cli(*_cache_args(world, out), fault="after_shard:1")
    assert killed(proc), proc.stderr[-3000:]
    assert finals() == shards[:2] and not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    kept = {name: identity(out / name) for name in shards[:2]}

    proc = cli(*_cache_args(world, out), fault="before_replace:manifest.json")
    assert killed(proc), proc.stderr[-3000:]
    assert "2 already done" in proc.stderr
    assert finals() == shards and (out / "manifest.json.tmp").exists() and not (out / "manifest.json").exists()
    assert {name: identity(out / name) for name in kept} == kept  # complete shards were not recomputed
    kept[shards[2]] = identity(out / shards[2])

    proc = cli(*_cache_args(world, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out) and "3 already done" in proc.stderr
    assert digests(out) == want  # every file, manifest and tokenizer included; no .tmp left
    assert {name: identity(out / name) for name in kept} == kept


def test_rerun_with_other_settings_into_a_killed_runs_dir_is_refused_and_changes_nothing(world, tmp_path, capsys):
    out = tmp_path / "cache"
    proc = cli(*_cache_args(world, out), fault="after_shard:0")  # no manifest yet: DVC's persist keeps this dir
    assert killed(proc), proc.stderr[-3000:]
    before = digests(out)
    for flags in (["--top-k", "4"], ["--temperature", "2.0"], ["--batch-size", "3"]):
        assert kdcache(_cache_args(world, out, *flags)) == 1
        err = capsys.readouterr().err
        assert (
            f"{out / 'shard-00000.parquet'}: was written with another teacher, corpus, target settings or runtime"
            in err
        )
        assert digests(out) == before
    assert kdcache(_cache_args(world, out)) == 0  # the same settings resume
    capsys.readouterr()
    assert kdcache(_cache_args(world, out, "--top-k", "4")) == 1  # and once sealed, the manifest refuses too
    assert "targets.top_k 8 (this run: 4)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_training_killed_twice_resumes_from_the_last_checkpoint_with_identical_losses(clean_cache, tmp_path):
    from kdcache.train import train

    cache = clean_cache
    ref = tmp_path / "ref"
    train(TrainConfig(student=StudentConfig(**STUDENT), **TRAIN), cache_dir=cache, out_dir=ref)
    (tmp_path / "student.json").write_text(json.dumps(STUDENT))
    out = tmp_path / "run"
    args = [
        "train",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--student",
        str(tmp_path / "student.json"),
        "--device",
        "cpu",
        *(f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()),
    ]

    proc = cli(*args, fault="checkpoint_write:6")  # dies while saving step 6 (its weights half in place)
    assert killed(proc), proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    assert (out / "checkpoints" / ".step-000006.incomplete" / "model.safetensors").exists()
    load_checkpoint(latest_checkpoint(out), model=LlamaForCausalLM.from_pretrained(ref))  # previous one is usable

    proc = cli(*args, "--resume", fault="checkpoint_replace:8")  # dies with step 8 complete but not renamed
    assert killed(proc), proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-000004 (step 4, epoch 1, batch 1)" in proc.stderr
    assert [p.name for p in list_checkpoints(out)] == ["step-000004", "step-000006"]

    proc = cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-000006 (step 6, epoch 2, batch 0)" in proc.stderr  # exactly at an epoch boundary
    assert np.allclose(_losses(out), _losses(ref), rtol=0, atol=1e-6), (_losses(out), _losses(ref))
    assert len(_losses(out)) == 8 and json.loads((out / "training.json").read_text())["complete"]
    a, b = (LlamaForCausalLM.from_pretrained(p).state_dict() for p in (ref, out))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not list((out / "checkpoints").glob(".*"))  # the crashed saves' temp dirs are gone


# ----------------------------------------------------------------------------- disk full, read-only


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _without_dac_override() -> None:
    """Drop CAP_DAC_OVERRIDE from the bounding set: after exec, root obeys file modes like any user."""
    import ctypes

    pr_capbset_drop, cap_dac_override = 24, 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


def test_disk_full_and_read_only_output_give_a_clear_error_and_leave_no_partial_file(world, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    full = tmp_path / "full" / "cache"
    limit = max(p.stat().st_size for p in world["teacher"].glob("tok*")) + 256  # tokenizer files fit, shards do not
    procs = {
        "full": _popen(*_cache_args(world, full), preexec=_file_size_limit(limit)),  # side by side: one
        "ro": _popen(*_cache_args(world, readonly / "c"), preexec=_without_dac_override),
    }  # start each
    results = {k: (p.wait(timeout=180), p.stderr.read()) for k, p in procs.items()}
    rc, err = results["full"]
    assert rc == 1 and f"kdcache: error: {full / 'shard-00000.parquet'}: cannot write (" in err, err
    assert "File too large" in err and "free space" in err and "Traceback" not in err
    assert not list(full.glob("shard-*")) and not (full / "manifest.json").exists()  # no .tmp, no partial shard
    assert not (full / "tokenizer.incomplete").exists()
    rc, err = results["ro"]
    assert rc == 1 and f"kdcache: error: {readonly / 'c'}: the cache directory is not writable" in err, err
    assert "Permission denied" in err and "Traceback" not in err
    assert list(readonly.iterdir()) == []
    readonly.chmod(0o755)
    assert kdcache(_cache_args(world, full)) == 0  # with room again, the same directory completes


def _popen(*args: str, preexec, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = {**os.environ, "KDCACHE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "kdcache.cli", *args],
        env=full,
        cwd=ROOT,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(clean_cache, tmp_path):
    from kdcache.train import train

    cache, out = clean_cache, tmp_path / "run"
    train(TrainConfig(student=StudentConfig(**STUDENT), **TRAIN), cache_dir=cache, out_dir=out, max_steps=4)
    weights = (out / "checkpoints" / "step-000004" / "model.safetensors").stat().st_size
    (tmp_path / "student.json").write_text(json.dumps(STUDENT))
    proc = cli(
        "train",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--student",
        str(tmp_path / "student.json"),
        "--device",
        "cpu",
        "--resume",
        *(f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()),
        preexec=_file_size_limit(weights + 1024),
    )  # the weights fit, the 2x larger optimizer state does not
    step6 = out / "checkpoints" / "step-000006"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"kdcache: error: {step6}: cannot write the checkpoint (" in proc.stderr, proc.stderr[-3000:]
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert f"the newest complete checkpoint is still {out / 'checkpoints' / 'step-000004'}" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]  # no partial dir
    assert latest_checkpoint(out).name == "step-000004"
    load_checkpoint(latest_checkpoint(out), model=LlamaForCausalLM.from_pretrained(out))
