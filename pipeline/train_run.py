"""What a training run writes and reads back: the run record, checkpoints, the per-step log, the
final model and its summary (``training.json``, written last: the run finished).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from kdcache import __version__
from kdcache.cache.reader import CacheReader
from kdcache.checkpoint import (
    RUNTIME_KEYS,
    TRAINER_JSON,
    check_position,
    check_same_run,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    move_previous_run,
    record_run,
    rng_state,
    run_differences,
    save_checkpoint,
    set_rng_state,
)
from kdcache.config.base import to_dict
from kdcache.config.train import TrainConfig
from kdcache.distributed import (
    barrier,
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_optimizer_state,
    mean_over_ranks,
)
from kdcache.files import atomic_write_text, fsync_dir, fsync_file
from kdcache.outputs import BOOKKEEPING, MOVED_TAG, hold_output_dir, moved_aside_name
from kdcache.student import (
    count_parameters,
)
from kdcache.train_data import Position, TrainError

log = logging.getLogger(__name__)


LOG_NAME = "train_log.jsonl"


SUMMARY_NAME = "training.json"


OUTPUT_KIND = "student"
"""The marker kind of a student directory (``kdcache.files``)."""


def is_student_dir(path: Path) -> bool:
    """A student directory written before output markers existed: a train log or kdcache checkpoints."""
    return (path / LOG_NAME).is_file() or bool(list_checkpoints(path))


def run_identity(cfg: TrainConfig, reader: CacheReader, world: int) -> dict[str, Any]:
    """What a run's checkpoints depend on: the settings (but logging/checkpoint cadence and loss chunking,
    which change no number), the world size (the data order) and the cache."""
    return {
        "train": {k: v for k, v in to_dict(cfg).items() if k not in ("log_every", "checkpoint_every", "chunk_tokens")},
        "world_size": world,
        "cache": cache_identity(reader),
        "code": code_fingerprint(),
        "torch": torch.__version__,
    }


def code_fingerprint() -> str:
    """sha256 over kdcache's own source files (path and bytes): a run resumed automatically under
    ``dvc repro`` after a code change (which is why DVC reruns the stage) must not reuse old checkpoints."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_identity(reader: CacheReader) -> dict[str, Any]:
    """What a student learned from: the cache's teacher sha256, tokenizer and corpus fingerprints, targets."""
    m = reader.meta
    return {
        "teacher_sha256": m.teacher.get("sha256"),
        "tokenizer_fingerprint": m.tokenizer.get("fingerprint"),
        "corpus_fingerprint": m.corpus.get("fingerprint"),
        "targets": m.targets,
    }


def write_log(pending: list[tuple[dict[str, Any], torch.Tensor]], log_file: Any) -> dict[str, Any]:
    """Read the pending steps' (loss, kd, ce, grad norm) from the device at once, average loss/kd/ce over
    ranks (one collective), refuse a non-finite loss naming its step, write one line per step; returns
    the last record."""
    values = torch.stack([v for _, v in pending]).double().cpu()  # (steps, 4): the one host sync
    losses = mean_over_ranks(values[:, :3].reshape(-1).tolist())  # (steps * 3,) means over ranks
    for i, (record, _) in enumerate(pending):
        loss, kd, ce = losses[3 * i : 3 * i + 3]
        if not math.isfinite(loss):
            raise TrainError(
                f"loss is {loss} at step {record['step']} (epoch {record['epoch']}); lower train.lr or "
                "check the cache with `kdcache verify`"
            )
        record |= {"loss": loss, "kd": kd, "ce": ce, "grad_norm": float(values[i, 3])}
        if log_file is not None:
            log_file.write(json.dumps({k: record[k] for k in LOG_FIELDS}) + "\n")
    if log_file is not None:
        log_file.flush()
    return pending[-1][0]


LOG_FIELDS = (
    "step",
    "loss",
    "kd",
    "ce",
    "grad_norm",
    "lr",
    "alpha",
    "temperature",
    "tokens_per_s",
    "elapsed",
    "epoch",
    "data_wait_s",
)
"""One train_log.jsonl line per optimizer step; ``data_wait_s``: seconds the step waited for its batches;
``alpha`` / ``temperature``: the step's KD weight (0 for CE alone) and temperature (``train.schedule``)."""


Resume = bool | Literal["auto"]
"""``False``: start fresh (a previous run is moved aside); ``True``: continue the newest checkpoint, refusing
one of another run; ``"auto"`` (the DVC stages): continue it when its run matches, else move it aside."""


def start_run(
    out: Path,
    *,
    resume: Resume,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    is_main: bool,
    identity: dict[str, Any],
    max_steps: int,
    batches_per_epoch: int,
) -> Position:
    """Restore the newest checkpoint (resume: only one of a run with the same ``identity`` and a step in
    range), or start fresh, moving a previous run aside (never deleting it); drop a stale finish marker.

    ``resume="auto"`` resumes exactly when ``resume=True`` would, and otherwise starts fresh, moving the
    previous run aside to ``run.moved-<UTC time>-<why>`` (``changed-train.lr``, ``changed-code``, ...).
    """
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None and resume == "auto":
        why = _why_not_resume(out, ckpt, identity, max_steps=max_steps)
        barrier()  # every rank has looked before rank 0 moves anything
        if why is not None:
            log.warning("%s: not resuming %s (%s): starting fresh", out, ckpt, why)
            ckpt = None
    else:
        why = None if resume else "started-without-resume"
    if ckpt is None:
        if resume and why is None:
            log.info("%s: no checkpoint to resume from; starting at step 0", out)
        if is_main:
            move_previous_run(out, why or "nothing-to-resume")
            record_run(out, identity)
        return Position()
    check_same_run(out, ckpt, identity)
    state, trainer = load_checkpoint(ckpt, model=model)
    check_position(ckpt, trainer, max_steps=max_steps, batches_per_epoch=batches_per_epoch)
    if is_sharded(model):
        load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    pos = Position(**{k: trainer[k] for k in asdict(Position())})
    if is_main:
        (out / SUMMARY_NAME).unlink(missing_ok=True)
        _truncate_log(out / LOG_NAME, pos.step)
    log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt, pos.step, pos.epoch, pos.batch)
    return pos


def _why_not_resume(out: Path, ckpt: Path, identity: dict[str, Any], *, max_steps: int) -> str | None:
    """Why an automatic resume must start fresh instead, as a name part (``changed-train.lr``); None: resume."""
    found = run_differences(out, identity)
    if found is None:
        return "no-run-record"
    if found:
        keys = sorted({key.split(".")[0] if key.split(".")[0] in RUNTIME_KEYS else key for key, _, _ in found})
        return "changed-" + "-".join(keys[:3]) + ("-and-more" if len(keys) > 3 else "")
    try:
        step = int(json.loads((ckpt / TRAINER_JSON).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged: load_checkpoint / check_position name it
    return None if 0 < step <= max_steps else "step-out-of-range"


def save_state(
    out: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    pos: Position,
    is_main: bool,
) -> None:
    """Called on every rank (the RNG states of all ranks are gathered, an FSDP student's shards too); rank 0 writes.

    An FSDP student's checkpoint holds its full weights (the ``model.safetensors`` of a DDP run) and its
    optimizer state gathered and keyed by parameter name (``kdcache.distributed.full_optimizer_state``)."""
    rng = rng_state()
    sharded = is_sharded(model)
    weights = full_model_state(model) if sharded else unwrap(model)
    optim = full_optimizer_state(model, optimizer) if sharded else None
    if is_main:
        optim = optimizer.state_dict() if optim is None else optim
        state = {"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng}
        save_checkpoint(out, step=pos.step, model=weights, state=state, trainer=asdict(pos))


def publish_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Put the final model of the finished run in ``run_dir`` (weights, config and tokenizer files, the log,
    ``training.json`` last) into the student directory ``out_dir``: what the DVC train stages do, so that
    DVC may delete ``out_dir`` before a rerun while the run directory (``persist``) keeps the checkpoints.

    Files that are only ever replaced, never rewritten (the weights), are hard-linked when the filesystem
    allows; the log (appended on resume) is copied. A file of an earlier publication that this run does not
    have is moved aside (``run.moved-<UTC time>-republished/``), never deleted.
    """
    run, out = Path(run_dir), Path(out_dir)
    if not (run / SUMMARY_NAME).is_file():
        raise TrainError(f"{run}: no {SUMMARY_NAME}, so the run has not finished — rerun training to finish it")
    files = [p for p in sorted(run.iterdir()) if p.is_file() and not p.name.startswith(".") and p.name != SUMMARY_NAME]
    with hold_output_dir(out, kind=OUTPUT_KIND, inputs={"training run": run}, legacy=is_student_dir):
        names = {p.name for p in files} | {SUMMARY_NAME}
        stale = [
            p for p in out.iterdir() if p.name not in names and p.name not in BOOKKEEPING and MOVED_TAG not in p.name
        ]
        if stale:
            dest = moved_aside_name(out / "run", "republished")
            dest.mkdir()
            for path in stale:
                os.replace(path, dest / path.name)
            log.warning("%s: moved %d file(s) of an earlier model aside to %s", out, len(stale), dest)
        for path in [*files, run / SUMMARY_NAME]:
            _place(path, out / path.name, link=path.name != LOG_NAME)
        fsync_dir(out)
    log.info("published the final model of %s to %s", run, out)
    return out


def _place(src: Path, dst: Path, *, link: bool) -> None:
    """``dst`` becomes ``src``'s content in one rename: a hard link when ``link`` and possible, else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if not link:
            raise OSError("copy")
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
    os.replace(tmp, dst)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in lines if _logged_step(ln) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line cut short by a crash


def save_final(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    out: Path,
    summary: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """``save_pretrained`` model + tokenizer into ``out`` via a temp dir; ``training.json`` last. ``state_dict``:
    the weights to write instead of the model's own (an FSDP student's, gathered by ``full_model_state``)."""
    tmp = out / ".final.incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    for path in tmp.iterdir():
        fsync_file(path)
        os.replace(path, out / path.name)  # each file whole: a new inode replaces the old one
    tmp.rmdir()
    fsync_dir(out)
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


def run_summary(
    cfg: TrainConfig,
    *,
    pos: Position,
    stop: int,
    reader: CacheReader,
    model: torch.nn.Module,
    dev: torch.device,
    world: int,
    tokens_per_s: float,
    out: Path,
) -> dict[str, Any]:
    last = _last_log_line(out / LOG_NAME)
    manifest = reader.meta
    peak = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if dev.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(dev)
    return {
        "complete": pos.step >= cfg.max_steps,
        "steps": pos.step,
        "max_steps": cfg.max_steps,
        "stopped_at": stop,
        "epochs": pos.epoch + pos.batch / max(reader.num_batches(cfg.batch_size, world), 1),
        "tokens": pos.tokens,
        "final_loss": last.get("loss"),
        "final_kd": last.get("kd"),
        "final_ce": last.get("ce"),
        "tokens_per_s": tokens_per_s,
        "elapsed_s": pos.elapsed,
        "peak_memory_bytes": peak,
        "num_parameters": count_parameters(model),
        "device": str(dev),
        "world_size": world,
        "global_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "cache": {"name": manifest.name, "path": str(reader.path)} | cache_identity(reader),
        "config": to_dict(cfg),
        "kdcache_version": __version__,
    }


def _last_log_line(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
