"""Multi-rank runs under real `torchrun` (gloo on CPU, 2 ranks): the cache stage and DDP training.

Tiny teacher (1-layer Llama) and a word-level tokenizer; 20 sequences in 5 shards, so the shard
count does not divide by the 2 ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import STUDENT, make_world

from kdcache.cli import main as kdcache
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.distributed import DistributedError, gather_file_digests, process_group, resolve_backend
from kdcache.fingerprint import sha256_file
from kdcache.train import train

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VOCAB, SEQ, N = 48, 16, 20
CACHE_FLAGS = [
    "--targets",
    "topk",
    "--top-k",
    "8",
    "--batch-size",
    "3",
    "--rows-per-shard",
    "4",
    "--device",
    "cpu",
]  # 5 shards
TRAIN = {"max_steps": 6, "lr": 0.01, "warmup_steps": 2, "checkpoint_every": 3, "log_every": 100, "chunk_tokens": 16}


def make_teacher_and_tokens(root: Path, *, n: int = N, seed: int = 0) -> tuple[Path, Path]:
    """A tiny Llama teacher dir and packed train (n) / val (4) token data made with its tokenizer."""
    world = make_world(root, vocab_size=VOCAB, n=n, seq=SEQ, val=4, seed=seed)
    return world["teacher"], world["tokens"]


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDCACHE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(autouse=True)
def _one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("KDCACHE_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): same kernels, same bytes
    yield
    torch.set_num_threads(threads)


def ddp_world(root: Path) -> dict[str, Path]:
    """Teacher, tokens, a one-process cache (``root/cache``) and a 2-rank DDP run on it (``root/ddp``, batch 2
    per rank, ``TRAIN``): built once per session by conftest's ``ddp_run`` fixture for this file and
    tests/test_fsdp.py, which only read it (torchrun imports torch in 3 processes: worth sharing)."""
    teacher, tokens = make_teacher_and_tokens(root)
    (root / "student.json").write_text(json.dumps(STUDENT))
    cache, ddp = root / "cache", root / "ddp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): same kernels, same bytes
    try:
        flags = ["--teacher", str(teacher), "--tokens", str(tokens), "--out", str(cache), *CACHE_FLAGS]
        assert kdcache(["cache", *flags]) == 0  # byte-identical to a torchrun build (test 1 below)
    finally:
        torch.set_num_threads(threads)
    torchrun(
        "--no-python",
        str(BIN / "kdcache"),
        "train",
        "--cache",
        str(cache),
        "--out",
        str(ddp),
        "--student",
        str(root / "student.json"),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        *(f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()),
        cwd=root,
    )
    return {"root": root, "teacher": teacher, "tokens": tokens, "cache": cache, "ddp": ddp}


@pytest.fixture(scope="module")
def world(ddp_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    (root / "student.json").write_text(json.dumps(STUDENT))
    return {"root": root, "teacher": ddp_run["teacher"], "tokens": ddp_run["tokens"]}


@pytest.fixture(scope="module")
def two_rank_cache(world: dict[str, Path]) -> Path:
    out = world["root"] / "two" / "cache"
    proc = torchrun(
        "--no-python",
        str(BIN / "kdcache"),
        "cache",
        "--teacher",
        str(world["teacher"]),
        "--tokens",
        str(world["tokens"]),
        "--out",
        str(out),
        *CACHE_FLAGS,
        cwd=world["root"],
    )
    assert proc.stdout.strip().splitlines() == [str(out)], "rank 0 alone prints the cache path"
    return out


def test_two_rank_cache_is_byte_identical_to_a_one_process_run(world, two_rank_cache, capsys) -> None:
    one = world["root"] / "one" / "cache"  # same leaf name: the manifest records it
    assert (
        kdcache(
            [
                "cache",
                "--teacher",
                str(world["teacher"]),
                "--tokens",
                str(world["tokens"]),
                "--out",
                str(one),
                *CACHE_FLAGS,
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(one)
    want = digests(one)
    assert {f"shard-{i:05d}.parquet" for i in range(5)} | {"manifest.json"} <= set(want)
    assert digests(two_rank_cache) == want


def test_rerun_under_torchrun_rescores_only_the_missing_shards_of_one_rank(world, two_rank_cache) -> None:
    want = digests(two_rank_cache)
    for name in ("shard-00001.parquet", "shard-00003.parquet", "manifest.json"):  # rank 1's share was lost
        (two_rank_cache / name).unlink()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in two_rank_cache.glob("shard-*.parquet")}
    params = world["root"] / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "paths": {"tokens": str(world["tokens"]), "cache": str(two_rank_cache)},
                "teacher": {"path": str(world["teacher"]), "device": "cpu"},
                "cache": {"targets": "topk", "top_k": 8, "batch_size": 3, "rows_per_shard": 4},
            }
        )
    )
    torchrun(str(ROOT / "stages" / "cache.py"), "--params", str(params), cwd=world["root"])
    assert digests(two_rank_cache) == want
    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n in kept for p in [two_rank_cache / n]} == kept


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_ddp_two_ranks_match_one_rank_with_twice_the_batch_and_resume(world, ddp_run) -> None:
    cache = ddp_run["cache"]  # the shared run's cache: byte-identical to two_rank_cache (test 1)
    ref = world["root"] / "ref"
    train(TrainConfig(batch_size=4, student=StudentConfig(**STUDENT), **TRAIN), cache_dir=cache, out_dir=ref)
    ddp = shutil.copytree(ddp_run["ddp"], world["root"] / "ddp")  # the shared 2-rank run; this test changes it
    full = _losses(ddp)
    assert len(full) == 6, "rank 0 alone writes the log"
    assert np.allclose(full, _losses(ref), rtol=0, atol=1e-5), (full, _losses(ref))
    summary = json.loads((ddp / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 4 and summary["tokens"] == 6 * 4 * SEQ
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-000003", "step-000006"]

    # lose the last checkpoint and the final model; resume both ranks from step 3 through the DVC stage script
    for p in (ddp / "checkpoints" / "step-000006").iterdir():
        p.unlink()
    (ddp / "checkpoints" / "step-000006").rmdir()
    (ddp / "training.json").unlink()
    params = world["root"] / "train-params.yaml"
    paths = {"cache": str(cache), "student_run": str(ddp), "student": str(world["root"] / "published")}
    params.write_text(yaml.safe_dump({"paths": paths, "train": {**TRAIN, "batch_size": 2, "student": STUDENT}}))
    proc = torchrun(str(ROOT / "stages" / "train.py"), "--params", str(params), "--resume", cwd=world["root"])
    assert proc.stderr.count("resumed from") == 2, "both ranks resume from the same checkpoint"
    assert np.allclose(_losses(ddp), full, rtol=0, atol=1e-6)
    assert json.loads((ddp / "training.json").read_text())["complete"]


# ----------------------------------------------------------------------------- GPU-box logic, tested on the CPU


def test_backend_follows_the_device_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU box
    assert resolve_backend("auto", "cpu") == "gloo"  # CPU training on a GPU box syncs CPU tensors: gloo
    assert resolve_backend("auto", "cuda") == resolve_backend("auto", "auto") == "nccl"
    assert resolve_backend("gloo", "cuda") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "auto") == "gloo"


@pytest.fixture
def fake_torchrun(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Rank 1 of 2 with LOCAL_RANK 5 on a box with one visible GPU; init_process_group only records the backend."""
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "5"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    backends: list[str] = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: backends.append(backend))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    return backends


def test_a_cpu_run_under_torchrun_on_a_gpu_box_uses_gloo_and_ignores_the_gpu_count(fake_torchrun: list[str]) -> None:
    with process_group(device="cpu") as (rank, world):
        assert (rank, world) == (1, 2)
    assert fake_torchrun == ["gloo"]
    with pytest.raises(DistributedError, match="LOCAL_RANK=5 but only 1 GPU"), process_group(device="cuda"):
        pass
    one_gpu = "'cuda:0' under torchrun with 2 ranks would put every rank on one GPU"
    with pytest.raises(DistributedError, match=one_gpu), process_group(device="cuda:0"):
        pass


def test_a_resume_deals_the_missing_shards_to_every_rank() -> None:
    from kdcache.cache.build import _deal

    done = [True, False, True, False, False, False, True, False]  # rank 1's shards were lost, say
    dealt = [_deal(done, rank=r, world_size=2, dynamic=True) for r in range(2)]
    assert dealt == [[1, 4, 7], [3, 5]]  # both ranks busy; every missing shard exactly once
    assert [_deal(done, rank=r, world_size=2, dynamic=False) for r in range(2)] == [[4], [1, 3, 5, 7]]


def test_rng_states_restore_per_rank_on_any_rank_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcache import checkpoint

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    saved = {**checkpoint.rng_state(), "torch": states}  # as two ranks saved it
    for rank, want in ((0, 0), (1, 1), (3, 1)):  # rank 3 of a bigger resumed job takes saved rank 3 % 2
        monkeypatch.setattr(checkpoint, "rank_world", lambda rank=rank: (rank, 4))
        checkpoint.set_rng_state(saved)
        assert torch.equal(torch.get_rng_state(), states[want])
    checkpoint.set_rng_state({**saved, "torch": states[0]})  # an older checkpoint: one state
    assert torch.equal(torch.get_rng_state(), states[0])


def test_file_digests_round_trip_without_a_process_group() -> None:
    digest = sha256_file(Path(__file__))
    assert gather_file_digests({2: (digest, 123)}, 4) == {2: (digest, 123)}
