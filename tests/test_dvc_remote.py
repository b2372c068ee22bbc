"""Sharing a cache between teams with a real DVC remote: make it on the "GPU box", `dvc push`, clone
the repository elsewhere, `dvc pull` just that cache, `kdcache verify`, train — no teacher there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import STUDENT, make_world

from kdcache.cache.format import Manifest
from kdcache.cache.reader import open_cache
from kdcache.cache.rows import decode_row
from kdcache.cli import main as kdcache

SEQ = 16
DVC = [sys.executable, "-m", "dvc"]
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
    "DVC_NO_ANALYTICS": "1",
    "KDCACHE_NO_PROGRESS": "1",
}


def sh(*cmd: str, cwd: Path) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("KDCACHE_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A producer repo whose content-named cache is `dvc add`ed, committed and pushed to a directory remote."""
    root = tmp_path_factory.mktemp("teams")
    world = make_world(root / "gpu-box", n=20, seq=SEQ, val=4)
    teacher, tokens = world["teacher"], world["tokens"]
    repo, remote = root / "producer", root / "remote"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh(*DVC, "init", "-q", cwd=repo)
    sh(*DVC, "remote", "add", "-d", "shared", str(remote), cwd=repo)
    cache_root = repo / "cache"
    assert (
        kdcache(
            [
                "cache",
                "--teacher",
                str(teacher),
                "--tokens",
                str(tokens),
                "--cache-root",
                str(cache_root),
                "--targets",
                "topk",
                "--top-k",
                "8",
                "--batch-size",
                "4",
                "--rows-per-shard",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    (cache,) = [p for p in cache_root.iterdir() if p.is_dir()]
    rel = str(cache.relative_to(repo))
    sh(*DVC, "add", "-q", rel, cwd=repo)
    sh("git", "add", ".dvc/config", f"{rel}.dvc", "cache/.gitignore", cwd=repo)
    sh("git", "commit", "-qm", "cache", cwd=repo)
    sh(*DVC, "push", "-q", cwd=repo)
    shutil.rmtree(teacher)  # from here on no teacher exists anywhere
    return {"root": root, "repo": repo, "remote": remote, "rel": Path(rel)}


def _pull(pushed: dict[str, Path], name: str) -> Path:
    clone = pushed["root"] / name
    sh("git", "clone", "-q", str(pushed["repo"]), str(clone), cwd=pushed["root"])
    sh(*DVC, "pull", "-q", f"{pushed['rel']}.dvc", cwd=clone)
    return clone / pushed["rel"]


def test_pulled_cache_verifies_and_trains_without_the_teacher(pushed, tmp_path, capsys) -> None:
    cache = _pull(pushed, "training-box")
    assert kdcache(["verify", str(cache)]) == 0
    assert kdcache(["inspect", str(cache)]) == 0
    shown = capsys.readouterr().out
    manifest = Manifest.load(cache)
    assert manifest.teacher["sha256"] in shown and manifest.corpus["fingerprint"] in shown
    assert cache.name.startswith(manifest.teacher["sha256"][:8] + "-" + manifest.corpus["fingerprint"][:8])
    (tmp_path / "student.json").write_text(json.dumps(STUDENT))
    out = tmp_path / "student"
    assert (
        kdcache(
            [
                "train",
                "--cache",
                str(cache),
                "--out",
                str(out),
                "--student",
                str(tmp_path / "student.json"),
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    summary = json.loads((out / "training.json").read_text())
    assert summary["complete"] and summary["cache"]["teacher_sha256"] == manifest.teacher["sha256"]


def test_pulled_shards_read_with_datasets_pandas_and_pyarrow(pushed, tmp_path) -> None:
    import datasets
    import pandas as pd

    cache = _pull(pushed, "analysis-box")
    files = sorted(str(p) for p in cache.glob("shard-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    frame = pd.concat(pd.read_parquet(f) for f in files)
    table = pq.read_table(files[0])
    manifest = Manifest.load(cache)
    assert ds.num_rows == len(frame) == manifest.num_rows and table.num_rows == manifest.shards[0].rows
    row = decode_row(manifest.layout, ds[int(np.argmin(ds["seq_index"]))])  # a plain datasets row holds everything
    with open_cache(cache) as reader:
        want = reader[0]
    assert np.array_equal(row.input_ids, want["input_ids"]) and row.input_ids.shape == (SEQ,)
    assert np.allclose(row.topk_logprobs, want["topk_logprobs"]) and np.array_equal(row.topk_ids, want["topk_ids"])


def test_a_shard_corrupted_on_the_remote_is_caught_by_verify_after_pull(pushed, capsys) -> None:
    shard = pushed["repo"] / pushed["rel"] / "shard-00000.parquet"
    (obj,) = [p for p in pushed["remote"].rglob("*") if p.is_file() and p.read_bytes() == shard.read_bytes()]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF  # DVC trusts its remote: pull does not re-hash what it downloads
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    cache = _pull(pushed, "unlucky-box")
    assert kdcache(["verify", str(cache)]) == 1
    assert "shard-00000.parquet" in capsys.readouterr().out
