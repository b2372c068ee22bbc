"""Checkpoints are atomic: a failed or interrupted save never shadows the previous checkpoint.

Crashes of a real training process (``kill -9`` mid-save, disk full) are in ``test_crash.py``; these
are the in-process edge cases of ``kdcache.checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcache.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)


def _model(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def _save(out: Path, step: int, value: float = 1.0, state: dict | None = None) -> Path:
    return save_checkpoint(
        out, step=step, model=_model(value), state=state or {"rng": rng_state()}, trainer={"epoch": 0, "batch": step}
    )


def test_a_failed_save_leaves_no_partial_dir_and_the_previous_checkpoint_stays_newest(tmp_path):
    _save(tmp_path, 2)
    with pytest.raises(CheckpointError, match="cannot checkpoint object at 's.bad' without pickle"):
        _save(tmp_path, 4, state={"bad": object()})  # fails after the weights were written
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]
    assert latest_checkpoint(tmp_path).name == "step-000002"


def test_directories_missing_a_file_are_not_checkpoints(tmp_path):
    _save(tmp_path, 2)
    partial = tmp_path / "checkpoints" / "step-000009"  # e.g. half copied by rsync, or an older layout
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(
        (tmp_path / "checkpoints" / "step-000002" / "model.safetensors").read_bytes()
    )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    assert latest_checkpoint(tmp_path).name == "step-000002"
    (tmp_path / "checkpoints" / "step-000010").write_text("a file, not a dir")
    assert latest_checkpoint(tmp_path).name == "step-000002"


def test_temp_dirs_left_by_a_crash_are_removed_by_the_next_save(tmp_path):
    _save(tmp_path, 2)
    for name in (".step-000004.incomplete", ".step-000006.incomplete", ".step-000002.old.incomplete"):
        (tmp_path / "checkpoints" / name).mkdir()
        (tmp_path / "checkpoints" / name / "model.safetensors").write_bytes(b"half")
    _save(tmp_path, 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    _save(tmp_path, 2, value=1.0)
    _save(tmp_path, 4, value=1.0)
    _save(tmp_path, 4, value=5.0)  # resumed from an older checkpoint and reached step 4 again
    model = _model(0.0)
    _, trainer = load_checkpoint(latest_checkpoint(tmp_path), model=model)
    assert trainer["step"] == 4 and torch.all(model.weight == 5.0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.parametrize("name", ["model.safetensors", "state.safetensors", "state.json"])
def test_a_truncated_checkpoint_file_is_refused_naming_the_checkpoint(tmp_path, name):
    path = _save(tmp_path, 2)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=f"{path}: cannot load checkpoint .*delete it to resume from the previous"
    ):
        load_checkpoint(path, model=_model(0.0))


def test_only_the_newest_keep_checkpoints_remain(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step=step, model=_model(step), state={}, trainer={}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003", "step-000004"]
