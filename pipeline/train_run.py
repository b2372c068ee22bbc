"""What a training run writes and reads back: the run record, checkpoints, the per-step log, the
final model and its summary (``training.json``, written last: the run finished).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kdcache import __version__
from kdcache.cache.reader import CacheReader
from kdcache.checkpoint import (
    check_position,
    check_same_run,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    move_previous_run,
    record_run,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kdcache.config.base import to_dict
from kdcache.config.train import TrainConfig
from kdcache.distributed import mean_over_ranks
from kdcache.files import atomic_write_text, fsync_dir, fsync_file
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
    }


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


def start_run(
    out: Path,
    *,
    resume: bool,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    is_main: bool,
    identity: dict[str, Any],
    max_steps: int,
    batches_per_epoch: int,
) -> Position:
    """Restore the newest checkpoint (resume: only one of a run with the same ``identity`` and a step in
    range), or start fresh, moving a previous run aside (never deleting it); drop a stale finish marker."""
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is None:
        if resume:
            log.info("%s: no checkpoint to resume from; starting at step 0", out)
        if is_main:
            move_previous_run(out, "nothing-to-resume" if resume else "started-without-resume")
            record_run(out, identity)
        return Position()
    check_same_run(out, ckpt, identity)
    state, trainer = load_checkpoint(ckpt, model=model)
    check_position(ckpt, trainer, max_steps=max_steps, batches_per_epoch=batches_per_epoch)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    pos = Position(**{k: trainer[k] for k in asdict(Position())})
    if is_main:
        (out / SUMMARY_NAME).unlink(missing_ok=True)
        _truncate_log(out / LOG_NAME, pos.step)
    log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt, pos.step, pos.epoch, pos.batch)
    return pos


def save_state(
    out: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    pos: Position,
    is_main: bool,
) -> None:
    """Called on every rank (the RNG states of all ranks are gathered); rank 0 writes."""
    rng = rng_state()
    if is_main:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
        save_checkpoint(out, step=pos.step, model=unwrap(model), state=state, trainer=asdict(pos))


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


def save_final(model: torch.nn.Module, tokenizer: Any, *, out: Path, summary: dict[str, Any]) -> None:
    """``save_pretrained`` model + tokenizer into ``out`` via a temp dir; ``training.json`` last."""
    tmp = out / ".final.incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
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
