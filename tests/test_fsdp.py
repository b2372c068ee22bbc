"""FSDP2 students (``train.parallel: fsdp``) under real `torchrun` (gloo on CPU, 2 ranks).

The same tiny student, cache and data order as tests/test_distributed.py: a fully sharded run follows the
DDP run's loss curve to 1e-5 and writes the same weights (checkpoint and final model) to 1e-5; a resumed
FSDP run continues the uninterrupted one exactly; a DDP run refuses the FSDP run's checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STUDENT
from safetensors.torch import load_file
from test_distributed import BIN, TRAIN, _losses, torchrun

from kdcache.checkpoint import CheckpointError
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.train import train


@pytest.fixture(scope="module")
def world(ddp_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """test_distributed's teacher, one-process cache and 2-rank DDP run (conftest ``ddp_run``, read only)."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "student.json").write_text(json.dumps(STUDENT))
    return {"root": root, "cache": ddp_run["cache"], "ddp": ddp_run["ddp"]}


def _train_torchrun(world: dict[str, Path], out: Path, *extra: str) -> str:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]
    args = ["--cache", str(world["cache"]), "--out", str(out), "--student", str(world["root"] / "student.json")]
    proc = torchrun(
        "--no-python",
        str(BIN / "kdcache"),
        "train",
        *args,
        "--batch-size",
        "2",
        "--device",
        "cpu",
        *flags,
        *extra,
        cwd=world["root"],
    )
    return proc.stderr


def _log(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), (name, (a[name] - b[name]).abs().max())


def test_fsdp_follows_ddp_to_1e5_writes_the_same_weights_and_resumes(world, monkeypatch) -> None:
    monkeypatch.setenv("KDCACHE_NO_PROGRESS", "1")
    ddp, fsdp = world["ddp"], world["root"] / "fsdp"  # the DDP run: the same flags without --parallel fsdp
    stderr = _train_torchrun(world, fsdp, "--parallel", "fsdp")
    assert "not fused" not in stderr, "the fused head + loss ran on the root's unsharded head weight"
    assert len(_losses(fsdp)) == 6, "rank 0 alone writes the log"
    assert np.allclose(_losses(fsdp), _losses(ddp), rtol=0, atol=1e-5), (_losses(fsdp), _losses(ddp))
    assert np.allclose(_log(fsdp, "grad_norm"), _log(ddp, "grad_norm"), rtol=1e-5, atol=0)
    summary = json.loads((fsdp / "training.json").read_text())
    assert summary["config"]["parallel"] == "fsdp" and summary["world_size"] == 2 and summary["complete"]
    assert summary["num_parameters"] == json.loads((ddp / "training.json").read_text())["num_parameters"]
    # the full weights: each checkpoint and the final model, as the DDP run wrote them (tied head once)
    for rel in ("checkpoints/step-000003/model.safetensors", "checkpoints/step-000006/model.safetensors"):
        _close(load_file(fsdp / rel), load_file(ddp / rel), atol=1e-5)
    _close(load_file(fsdp / "model.safetensors"), load_file(ddp / "model.safetensors"), atol=1e-5)
    state = json.loads((fsdp / "checkpoints/step-000006/state.json").read_text())
    assert "model.layers.0.mlp.up_proj.weight" in state["optimizer"]["state"], "optimizer state keyed by name"

    # lose the last checkpoint and the final model; both ranks resume from step 3 and reshard the full state
    final = load_file(fsdp / "model.safetensors")
    full = _losses(fsdp)
    step6 = fsdp / "checkpoints" / "step-000006"
    for p in step6.iterdir():
        p.unlink()
    step6.rmdir()
    (fsdp / "training.json").unlink()
    stderr = _train_torchrun(world, fsdp, "--parallel", "fsdp", "--resume")
    assert stderr.count("resumed from") == 2, "both ranks resume from the same checkpoint"
    assert np.allclose(_losses(fsdp), full, rtol=0, atol=1e-6)
    _close(load_file(fsdp / "model.safetensors"), final, atol=1e-6)
    assert json.loads((fsdp / "training.json").read_text())["complete"]

    # one process with train.parallel: ddp refuses the sharded run's checkpoint, naming the setting
    cfg = TrainConfig(batch_size=2, student=StudentConfig(**STUDENT), **TRAIN)
    with pytest.raises(CheckpointError, match=r"train\.parallel 'fsdp' \(this run: 'ddp'\)"):
        train(cfg, cache_dir=world["cache"], out_dir=fsdp, resume=True, device="cpu")


def test_parallel_must_be_ddp_or_fsdp() -> None:
    from kdcache.config.base import ConfigError

    with pytest.raises(ConfigError, match="parallel.*must be ddp|fsdp, got 'zero3'"):
        TrainConfig(parallel="zero3")
