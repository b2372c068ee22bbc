"""pipeline/train_run.py: automatic resume (the DVC train stages) and publishing the final model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import STUDENT, make_world

from kdcache.cache.build import cache_corpus
from kdcache.checkpoint import RUN_JSON, list_checkpoints
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.fingerprint import sha256_file
from kdcache.train import train
from kdcache.train_data import TrainError
from kdcache.train_run import publish_run

CFG = TrainConfig(
    loss="topk_tail", batch_size=4, max_steps=6, checkpoint_every=2, warmup_steps=1, student=StudentConfig(**STUDENT)
)


pytestmark = pytest.mark.usefixtures("staging_one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = make_world(tmp_path_factory.mktemp("world"))
    return cache_corpus(
        TeacherConfig(path=str(world["teacher"]), device="cpu"),
        CacheConfig(targets="topk", top_k=8, batch_size=4, rows_per_shard=8),
        tokens_dir=world["tokens"],
        out_dir=world["root"] / "cache",
    )


def test_auto_resume_continues_a_matching_run_to_the_uninterrupted_weights(cache: Path, tmp_path: Path) -> None:
    train(CFG, cache_dir=cache, out_dir=tmp_path / "ref", device="cpu")
    train(CFG, cache_dir=cache, out_dir=tmp_path / "run", device="cpu", max_steps=3)  # "killed" after step 3
    summary = train(CFG, cache_dir=cache, out_dir=tmp_path / "run", device="cpu", resume="auto")
    assert summary["complete"] and not list((tmp_path / "run").glob("run.moved-*"))
    ref, run = tmp_path / "ref" / "model.safetensors", tmp_path / "run" / "model.safetensors"
    assert sha256_file(ref) == sha256_file(run)


def test_auto_resume_moves_a_run_of_other_settings_aside_naming_them(cache: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    train(CFG, cache_dir=cache, out_dir=out, device="cpu", max_steps=4)
    old = sha256_file(list_checkpoints(out)[-1] / "model.safetensors")
    other = TrainConfig(**{**CFG.__dict__, "lr": CFG.lr * 2, "seed": 1})
    with caplog.at_level(logging.WARNING):
        summary = train(other, cache_dir=cache, out_dir=out, device="cpu", resume="auto")
    assert summary["complete"] and summary["steps"] == 6
    (moved,) = out.glob("run.moved-*")
    assert moved.name.endswith("-changed-train.lr-train.seed")
    assert sha256_file(moved / "checkpoints" / "step-000004" / "model.safetensors") == old  # never deleted
    assert "not resuming" in caplog.text and "starting fresh" in caplog.text
    assert json.loads((out / RUN_JSON).read_text())["train"]["lr"] == other.lr


def test_auto_resume_starts_fresh_after_a_code_change_and_explicit_resume_only_warns(
    cache: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "run"
    train(CFG, cache_dir=cache, out_dir=out, device="cpu", max_steps=2)
    record = json.loads((out / RUN_JSON).read_text())
    (out / RUN_JSON).write_text(json.dumps({**record, "code": "0" * 64}))  # as if kdcache changed since
    with caplog.at_level(logging.WARNING):
        summary = train(CFG, cache_dir=cache, out_dir=out, device="cpu", resume=True, max_steps=4)
    assert summary["steps"] == 4 and not list(out.glob("run.moved-*"))  # resumed: the user asked for it
    assert "resuming across a code change" in caplog.text
    (out / RUN_JSON).write_text(json.dumps({**record, "code": "0" * 64}))
    train(CFG, cache_dir=cache, out_dir=out, device="cpu", resume="auto")
    assert [p.name.rsplit("-", 2)[-2:] for p in out.glob("run.moved-*")] == [["changed", "code"]]


def test_publish_copies_the_finished_model_and_refuses_an_unfinished_run(cache: Path, tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "student"
    train(CFG, cache_dir=cache, out_dir=run, device="cpu", max_steps=2)
    (run / "training.json").unlink()
    with pytest.raises(TrainError, match=rf"{run}: no training.json, so the run has not finished"):
        publish_run(run, out)
    train(CFG, cache_dir=cache, out_dir=run, device="cpu", resume="auto")
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")  # left by an earlier publication
    (out / ".kdcache-output.json").write_text(json.dumps({"kdcache": "output directory", "kind": "student"}))
    publish_run(run, out)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "train_log.jsonl", "training.json"):
        assert sha256_file(out / name) == sha256_file(run / name), name
    assert not (out / "checkpoints").exists()
    (moved,) = out.glob("run.moved-*-republished")
    assert (moved / "model-00001-of-00002.safetensors").read_bytes() == b"old"
    log = out / "train_log.jsonl"
    assert log.stat().st_ino != (run / "train_log.jsonl").stat().st_ino  # copied: a resumed run appends to it
