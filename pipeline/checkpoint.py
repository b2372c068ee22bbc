"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory ``<out>/checkpoints/step-NNNNNN/`` holding

- ``model.safetensors``  the model weights (``safetensors.torch.save_model``: tied weights once);
- ``state.safetensors`` + ``state.json``  optimizer, scheduler and RNG states: any nested
  dict/list/tuple of tensors and JSON scalars is split into a flat ``{path: tensor}`` file and a
  JSON skeleton whose tensors are ``{"__tensor__": path}`` references;
- ``trainer.json``  the loop position (step, epoch, next batch) and counters.

It is written into a hidden temp dir (``.step-NNNNNN.incomplete``), every file and the dir fsynced,
and renamed when complete, so a crash (``kill -9``, power loss after the rename) or a failed write
(disk full) never leaves a directory that looks like a checkpoint: the previous one stays the
newest. Only directories holding all four files count as checkpoints; the newest ``keep`` are kept.

Crash points (``kdcache.files.crash_point``, armed only by tests/faults.py): ``checkpoint_write:N``
(the weights of step N are in the temp dir) and ``checkpoint_replace:N`` (temp dir complete, not
yet renamed).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from kdcache.distributed import all_gather_bytes, is_sharded, load_full_model_state, rank_world
from kdcache.files import InputFileError, atomic_write_text, crash_point, fsync_dir, fsync_file, read_json_file
from kdcache.outputs import BOOKKEEPING, MOVED_TAG, moved_aside_name

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
MODEL_FILE, STATE_FILE, STATE_JSON, TRAINER_JSON = (
    "model.safetensors",
    "state.safetensors",
    "state.json",
    "trainer.json",
)
FILES = (MODEL_FILE, STATE_FILE, STATE_JSON, TRAINER_JSON)
RUN_JSON = "train_run.json"
"""What a run's checkpoints depend on (settings, world size, cache identity), written when it starts."""


class CheckpointError(ValueError):
    """A checkpoint is incomplete, malformed or holds something that cannot be saved without pickle."""


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-ready skeleton and a flat ``{path: tensor}`` dict."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": x.dtype.str}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {"__items__": [[k, enc(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise CheckpointError(
            f"cannot checkpoint {type(x).__name__} at '{path}' without pickle; "
            "only tensors, arrays, dicts, lists, tuples and JSON scalars are supported"
        )

    return enc(obj, "s"), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        key = skeleton["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"{STATE_FILE} lacks tensor '{key}' named in {STATE_JSON}; the checkpoint is damaged")
        return tensors[key]
    if "__ndarray__" in skeleton:
        return np.asarray(skeleton["__ndarray__"], dtype=np.dtype(skeleton["dtype"]))
    if "__items__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__items__"]}
    if "__tuple__" in skeleton:
        return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
    return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}


def rng_state() -> dict[str, Any]:
    """RNG states, checkpointable by :func:`flatten_state`: torch's CPU and current-GPU generators of
    every rank (gathered: a collective, so every rank calls it), numpy's and Python's of this rank."""
    state: dict[str, Any] = {
        "torch": all_gather_bytes(torch.get_rng_state()),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = all_gather_bytes(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states, rank r taking rank r's torch/CUDA generators.

    On more ranks than were saved, rank r takes saved rank ``r % saved`` (logged); a checkpoint of
    another GPU count restores without error. Older checkpoints (one torch state) restore as before.
    """
    rank, _ = rank_world()
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    torch.set_rng_state(_for_rank(state["torch"], rank, "torch"))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_for_rank(state["cuda"], rank, "cuda"))


def _for_rank(saved: Any, rank: int, what: str) -> torch.Tensor:
    """This rank's state from a per-rank list (or the single state of an older checkpoint)."""
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved[0], torch.Tensor) and saved[0].dim() == 1 and rank >= len(saved):
        log.info(
            "rank %d: the checkpoint holds %s RNG states of %d ranks; using rank %d's",
            rank,
            what,
            len(saved),
            rank % len(saved),
        )
    return saved[rank % len(saved)]


def save_checkpoint(
    out_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor],
    state: dict[str, Any],
    trainer: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``<out_dir>/checkpoints/step-NNNNNN`` atomically; prune to the newest ``keep``.

    ``model`` is the module, or its full weights as ``{name: tensor}`` (an FSDP student's, gathered).

    A failed write raises ``CheckpointError`` naming the directory and leaves no partial files;
    the previous checkpoints are untouched.
    """
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.incomplete"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.incomplete"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        if isinstance(model, dict):
            save_file(model, str(tmp / MODEL_FILE))
        else:
            save_model(model, str(tmp / MODEL_FILE))
        crash_point(f"checkpoint_write:{step}")
        skeleton, tensors = flatten_state(state)
        save_file(tensors, str(tmp / STATE_FILE))
        _write_json(tmp / STATE_JSON, skeleton)
        _write_json(tmp / TRAINER_JSON, {**trainer, "step": step})
        for path in tmp.iterdir():
            fsync_file(path)
        fsync_dir(tmp)
        crash_point(f"checkpoint_replace:{step}")
        if final.exists():  # re-saving a step (resumed from an older checkpoint): move the old one aside first
            os.replace(final, root / f".{final.name}.old.incomplete")
        os.replace(tmp, final)
        fsync_dir(root)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out_dir)
        raise CheckpointError(
            f"{final}: cannot write the checkpoint ({getattr(e, 'strerror', None) or e}) — free "
            f"space on that filesystem or choose a writable output directory; the newest complete "
            f"checkpoint is still {previous or 'none'}"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(root / f".{final.name}.old.incomplete", ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    log.info("checkpoint %s", final)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint dirs (all four files present), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and p.is_dir() and all((p / n).is_file() for n in FILES)
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, *, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` (an FSDP student: each rank its shards); return (state, trainer) as saved by
    :func:`save_checkpoint`."""
    path = Path(path)
    missing = [n for n in FILES if not (path / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: missing {', '.join(missing)}; delete this checkpoint dir to resume from the previous one"
        )
    try:
        if is_sharded(model):
            load_full_model_state(model, load_file(str(path / MODEL_FILE)))
        else:
            load_model(model, str(path / MODEL_FILE), strict=True)
        skeleton = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        trainer = json.loads((path / TRAINER_JSON).read_text(encoding="utf-8"))
        state = unflatten_state(skeleton, load_file(str(path / STATE_FILE)))
    except (OSError, RuntimeError, KeyError, SafetensorError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot load checkpoint ({e}); delete it to resume from the previous one") from e
    return state, trainer


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- resuming a run, or moving it aside


def record_run(out_dir: str | Path, identity: dict[str, Any]) -> None:
    """Write what a fresh run's checkpoints depend on (``RUN_JSON``), for ``check_same_run`` on resume."""
    atomic_write_text(Path(out_dir) / RUN_JSON, json.dumps(identity, indent=2, sort_keys=True) + "\n")


RUNTIME_KEYS = ("code", "torch")
"""Identity keys that change no setting but may change numbers (kdcache's source, torch's version): an
explicit resume across them warns; an automatic resume (``dvc repro``) starts fresh instead."""


def run_differences(out_dir: str | Path, identity: dict[str, Any]) -> list[tuple[str, Any, Any]] | None:
    """``(key, this run's value, the recorded value)`` for every difference between ``identity`` and the
    run record (``RUN_JSON``) in ``out_dir``; None when there is no record (written by an older kdcache)."""
    path = Path(out_dir) / RUN_JSON
    if not path.exists():
        return None
    fix = "rerun without --resume to start fresh (the previous run is moved aside, not deleted)"
    try:
        recorded = read_json_file(path, what="the run record", fix=fix)
    except InputFileError as e:
        raise CheckpointError(str(e)) from e
    return _differences(identity, recorded if isinstance(recorded, dict) else {})


def check_same_run(out_dir: str | Path, checkpoint: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` when its run had other settings than ``identity``, naming each
    difference; a difference in ``RUNTIME_KEYS`` alone is logged, not refused (the user asked to resume)."""
    fresh = "rerun without --resume to start fresh (the previous run is moved aside, not deleted)"
    found = run_differences(out_dir, identity)
    if found is None:
        log.warning("%s: no %s (written by an older kdcache): cannot check the run's settings", out_dir, RUN_JSON)
        return
    diffs = [f"{key} {old!r} (this run: {new!r})" for key, new, old in found if key.split(".")[0] not in RUNTIME_KEYS]
    if diffs:
        raise CheckpointError(
            f"{checkpoint}: written by a run with other settings — {'; '.join(diffs)}; resume with the "
            f"run's settings, or {fresh}"
        )
    for key, new, old in found:
        log.warning("%s: resuming across a %s change (%r -> %r): numbers may differ", checkpoint, key, old, new)


def _differences(new: dict[str, Any], old: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(new) | set(old)):
        a, b = new.get(key), old.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def check_position(checkpoint: Path, trainer: dict[str, Any], *, max_steps: int, batches_per_epoch: int) -> None:
    """Refuse a checkpoint whose loop position is missing, malformed or outside this run's range."""
    where = checkpoint / TRAINER_JSON

    def count(key: str) -> int:
        value = trainer.get(key) if isinstance(trainer, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{where}: '{key}' must be a non-negative integer, got {value!r}; {_DAMAGED}")
        return value

    step, batch = count("step"), count("batch")
    count("epoch"), count("tokens")
    if not isinstance(trainer.get("elapsed"), (int, float)):
        raise CheckpointError(f"{where}: 'elapsed' must be a number; {_DAMAGED}")
    if f"step-{step:06d}" != checkpoint.name:
        raise CheckpointError(f"{where}: step {step} but the directory is {checkpoint.name}; {_DAMAGED}")
    if not 0 < step <= max_steps:
        raise CheckpointError(
            f"{where}: step {step} is outside this run's [1, train.max_steps={max_steps}]; resume with the run's "
            "max_steps, or rerun without --resume to start fresh (the previous run is moved aside)"
        )
    if batch >= batches_per_epoch:
        raise CheckpointError(
            f"{where}: next batch {batch} is outside an epoch of {batches_per_epoch} batches (another batch size, "
            f"world size or cache?); {_DAMAGED}"
        )


_DAMAGED = "delete this checkpoint dir to resume from the previous one, or rerun without --resume"


def move_previous_run(out_dir: str | Path, reason: str) -> Path | None:
    """Move everything a previous run left in ``out_dir`` (checkpoints, log, model, notes) into
    ``run.moved-<UTC time>-<reason>/`` inside it — never delete; earlier moved-aside runs stay put."""
    out = Path(out_dir)
    entries = [p for p in sorted(out.iterdir()) if p.name not in BOOKKEEPING and MOVED_TAG not in p.name]
    if not entries:
        return None
    dest = moved_aside_name(out / "run", reason)
    dest.mkdir()
    for path in entries:
        os.replace(path, dest / path.name)
    fsync_dir(out)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log.warning(
        "%s: moved the previous run (%d entries, %.1f MiB) to %s (%s); delete it once you no longer need it",
        out,
        len(entries),
        size / 2**20,
        dest,
        reason,
    )
    return dest
