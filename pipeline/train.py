"""The student training loop: cached soft targets -> sparse KD loss -> AdamW; checkpoints; resume.

Data order depends only on ``cfg.seed`` and the epoch (the cache reader's batching), so a KD run
and its CE baseline see the same batches, and a resumed run continues exactly where the
checkpoint left off: its per-step losses equal an uninterrupted run's.

Under ``torchrun`` (a process group initialized by the caller, see ``kdcache.distributed``) the
model is wrapped in DDP and rank r reads the r-th slice of every global batch (``batch_size``
sequences per rank): each rank's loss is a mean over its own, equally many tokens and DDP averages
gradients, so 2 ranks x batch b follow the same loss curve as 1 rank x batch 2b. The logged loss is
the mean over ranks; rank 0 alone writes the log, the checkpoints and the final model.

Output directory::

    out_dir/checkpoints/step-NNNNNN/   resumable state (kdcache.checkpoint), newest 2 kept
    out_dir/train_log.jsonl            one JSON line per optimizer step
    out_dir/config.json, model.safetensors, tokenizer files   the final student (from_pretrained)
    out_dir/training.json              written last: the run finished
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from kdcache import __version__
from kdcache.cache.format import TOKENIZER_DIR
from kdcache.cache.prefetch import Prefetcher, pin_batch
from kdcache.cache.reader import CacheReader, open_cache
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
from kdcache.config.base import ConfigError, to_dict
from kdcache.config.train import TrainConfig
from kdcache.devices import resolve_device
from kdcache.distributed import any_rank_failed, barrier, check_same_on_all_ranks, mean_over_ranks, rank_world
from kdcache.files import atomic_write_text, fsync_dir, fsync_file
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.lm_head import LMHead, final_hidden_states, fused_head
from kdcache.losses import (
    REQUIRED_KEYS,
    TAIL_KINDS,
    TARGET_KEYS,
    KDLossSpec,
    default_loss,
    kd_loss,
    kd_loss_from_hidden,
)
from kdcache.optim import lr_scheduler, make_optimizer
from kdcache.outputs import hold_output_dir
from kdcache.packing import packing_of, target_mask
from kdcache.student import (
    VocabMap,
    build_student,
    build_vocab_map,
    count_parameters,
    load_student_tokenizer,
    mapping_coverage,
)
from kdcache.tokenizer import tokenizer_vocab_size

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "training.json"
OUTPUT_KIND = "student"
"""The marker kind of a student directory (``kdcache.files``)."""
MAPPING_SAMPLE = 256
"""Cache sequences read at start to measure how much teacher mass a vocabulary mapping keeps."""


class TrainError(ValueError):
    """Training cannot start or continue with these inputs."""


@dataclass
class Position:
    """Where the loop stands: optimizer steps done and the next (epoch, batch) to read."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens: int = 0
    elapsed: float = 0.0


def train(
    cfg: TrainConfig,
    *,
    cache_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    progress: bool = False,
    max_steps: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a student on the cache at ``cache_dir``; write checkpoints, a log and the final model.

    ``out_dir`` must be new or a student directory kdcache made (``kdcache.files``: anything else is
    refused — ``overwrite`` moves it aside — and so is the cache or the pretrained student itself);
    the job holds its lock until it returns (rank 0 for all ranks under torchrun).
    ``resume`` continues from the newest checkpoint in ``out_dir`` (a fresh start if there is none),
    refusing one whose run had other settings or whose step is out of range; without ``resume`` a
    previous run there is moved aside to ``run.moved-<UTC time>-started-without-resume/``, never deleted.
    ``max_steps`` stops early at that step (the LR schedule still spans ``cfg.max_steps``), as if
    interrupted; the model is saved but ``training.json`` records ``complete: false``.
    Returns the summary written to ``training.json``.
    """
    rank, world = rank_world()
    with hold_output_dir(
        out_dir,
        kind=OUTPUT_KIND,
        inputs={"cache": cache_dir, "pretrained student": cfg.student.path},
        overwrite=overwrite,
        legacy=is_student_dir,
        leader=rank == 0,
        sync=any_rank_failed if world > 1 else None,
    ):
        return _train(
            cfg,
            cache_dir=cache_dir,
            out=Path(out_dir),
            resume=resume,
            device=device,
            progress=progress,
            max_steps=max_steps,
        )


def is_student_dir(path: Path) -> bool:
    """A student directory written before output markers existed: a train log or kdcache checkpoints."""
    return (path / LOG_NAME).is_file() or bool(list_checkpoints(path))


def run_identity(cfg: TrainConfig, reader: CacheReader, world: int) -> dict[str, Any]:
    """What a run's checkpoints depend on: the settings (but logging/checkpoint cadence and loss chunking,
    which change no number), the world size (the data order) and the cache."""
    m = reader.meta
    return {
        "train": {k: v for k, v in to_dict(cfg).items() if k not in ("log_every", "checkpoint_every", "chunk_tokens")},
        "world_size": world,
        "cache": {
            "teacher_sha256": m.teacher.get("sha256"),
            "tokenizer_fingerprint": m.tokenizer.get("fingerprint"),
            "corpus_fingerprint": m.corpus.get("fingerprint"),
            "targets": m.targets,
        },
    }


def _train(
    cfg: TrainConfig,
    *,
    cache_dir: str | Path,
    out: Path,
    resume: bool,
    device: str,
    progress: bool,
    max_steps: int | None,
) -> dict[str, Any]:
    """``train`` in its claimed and locked output directory."""
    rank, world = rank_world()
    dev = resolve_device(device)
    reader, student_tok, vmap, mapping = _open_inputs(cfg, cache_dir)
    spec = loss_spec(cfg, reader, cache_dir=cache_dir)
    torch.manual_seed(cfg.seed)
    vocab = reader.layout.vocab_size if vmap is None else tokenizer_vocab_size(student_tok)
    model = build_student(cfg.student, vocab_size=vocab, seq_len=reader.layout.seq_len, tokenizer=student_tok).to(dev)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(
        optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    pos = _start(
        out,
        resume=resume,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        is_main=rank == 0,
        identity=run_identity(cfg, reader, world),
        max_steps=cfg.max_steps,
        batches_per_epoch=reader.num_batches(cfg.batch_size, world),
    )
    check_same_on_all_ranks(pos.step, what=f"the checkpoint step to resume from in {out}")
    stop = cfg.max_steps if max_steps is None else min(max_steps, cfg.max_steps)
    wrapped = _maybe_ddp(model, dev, world)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    session_start, session_tokens = time.perf_counter(), pos.tokens
    with reader:
        _loop(
            cfg,
            stop=stop,
            pos=pos,
            model=wrapped,
            optimizer=optimizer,
            scheduler=scheduler,
            spec=spec,
            reader=reader,
            dev=dev,
            out=out,
            rank=rank,
            world=world,
            vmap=vmap,
            progress=progress,
        )
        session_s = time.perf_counter() - session_start
        summary = _summary(
            cfg,
            pos=pos,
            stop=stop,
            reader=reader,
            model=model,
            dev=dev,
            world=world,
            tokens_per_s=(pos.tokens - session_tokens) / max(session_s, 1e-9),
            out=out,
        )
    summary["vocab_map"], summary["loss"] = mapping, asdict(spec)
    if rank == 0:
        save_final(model, student_tok, out=out, summary=summary)
    barrier()  # every rank returns once the final model is on disk
    log.info(
        "trained %d steps: %.0f tokens/s, peak %s",
        pos.step,
        summary["tokens_per_s"],
        ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in summary["peak_memory_bytes"].items()),
    )
    return summary


def _open_inputs(cfg: TrainConfig, cache_dir: str | Path) -> tuple[CacheReader, Any, VocabMap | None, dict | None]:
    """Open the cache; the student's tokenizer; a vocabulary mapping (and its coverage) if they differ."""
    cache_tok = load_cache_tokenizer(cache_dir)
    student_tok = load_student_tokenizer(cfg.student, cache_tokenizer=cache_tok, vocab_map=cfg.vocab_map)
    reader = open_cache(cache_dir, expect_tokenizer=tokenizer_fingerprint(cache_tok))
    if tokenizer_fingerprint(student_tok) == tokenizer_fingerprint(cache_tok):
        return reader, student_tok, None, None
    student_vocab = tokenizer_vocab_size(student_tok)
    vmap = build_vocab_map(
        cache_tok, student_tok, cache_vocab_size=reader.layout.vocab_size, student_vocab_size=student_vocab
    )
    report = mapping_coverage(vmap, reader.iter_sequences(0, MAPPING_SAMPLE))
    kept = report.get("teacher_mass_kept_ratio", report.get("draws_kept", 1.0))
    log.log(
        logging.WARNING if kept < 0.9 else logging.INFO,
        "train.vocab_map: exact: %d of %d cache ids map to the student's vocabulary; on %d cached positions "
        "the mapping keeps %.1f%% of the cached teacher mass (%s) and %.1f%% of input tokens (the rest become "
        "the student's unk/eos token)",
        report["ids_mapped"],
        report["cache_vocab_size"],
        report["positions_measured"],
        100 * kept,
        f"{report['teacher_mass_kept']:.4f} of {report['teacher_mass_cached']:.4f} per position"
        if "teacher_mass_kept" in report
        else "sampled draws",
        100 * report["input_tokens_mapped"],
    )
    return reader, student_tok, vmap, report


def load_cache_tokenizer(cache_dir: str | Path) -> Any:
    path = Path(cache_dir) / TOKENIZER_DIR
    if not path.is_dir():
        raise TrainError(
            f"{path}: the cache has no tokenizer/ directory (the teacher's tokenizer, saved by the "
            "cache stage); rebuild or re-pull the cache"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def loss_spec(cfg: TrainConfig, reader: CacheReader, *, cache_dir: str | Path) -> KDLossSpec:
    """The loss for ``cfg`` (``auto``: the one matching the cache), refusing one the cache's targets cannot feed."""
    layout = reader.layout
    renormalized = bool(reader.meta.targets.get("renormalized"))  # imported top-k without a tail
    kind = ("topk_renorm" if renormalized else default_loss(layout.kind)) if cfg.loss == "auto" else cfg.loss
    if renormalized and kind in TAIL_KINDS:
        tool = reader.meta.targets.get("source", {}).get("tool", "another tool")
        raise ConfigError(
            f"train.loss={kind} needs the teacher's tail mass, but {cache_dir} holds renormalized top-k targets "
            f"(targets.renormalized, imported from {tool}: no tail); set train.loss: topk_renorm (or hard, or auto)"
        )
    needs = {k[: k.index("_")] for k in TARGET_KEYS[kind] if k in REQUIRED_KEYS}  # {"topk"} / {"sample"} / {}
    if ("topk" in needs and not layout.has_topk) or ("sample" in needs and not layout.has_samples):
        other = "sampled" if "topk" in needs else "topk_tail"
        raise ConfigError(
            f"train.loss={kind} needs {'top-k' if 'topk' in needs else 'sampled'} targets but {cache_dir} holds "
            f"'{layout.kind}' targets; set train.loss: auto (here: {default_loss(layout.kind)}) or {other}, "
            "or rebuild the cache with matching cache.targets"
        )
    try:
        return KDLossSpec(
            kind=kind,
            alpha=cfg.alpha,
            temperature=cfg.temperature,
            targets_temperature=layout.temperature,
            beta=cfg.beta,
            chunk_tokens=cfg.chunk_tokens,
        )
    except ValueError as e:
        raise ConfigError(f"train: {e}") from e


def batch_stream(
    reader: CacheReader,
    batch_size: int,
    *,
    seed: int,
    pos: Position,
    rank: int,
    world: int,
    keys: tuple[str, ...] | None = None,
) -> Iterator[tuple[tuple[int, int], dict[str, torch.Tensor]]]:
    """Batches from ``pos`` on, rolling over epochs; yields ((epoch, batch) after this one, batch).

    ``keys``: the target tensors the loss needs (the reader decodes only those)."""
    per_epoch = reader.num_batches(batch_size, world)
    if per_epoch < 1:
        raise TrainError(
            f"cache has {len(reader)} sequences, fewer than one batch of {batch_size} x {world} rank(s); "
            "lower train.batch_size or cache more sequences"
        )
    epoch, start = pos.epoch, pos.batch
    while True:
        batches = reader.batches(
            batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world, start_batch=start, keys=keys
        )
        try:
            for index, batch in enumerate(batches, start):
                yield ((epoch, index + 1) if index + 1 < per_epoch else (epoch + 1, 0)), batch
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        epoch, start = epoch + 1, 0


def _loop(
    cfg: TrainConfig,
    *,
    stop: int,
    pos: Position,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    spec: KDLossSpec,
    reader: CacheReader,
    dev: torch.device,
    out: Path,
    rank: int,
    world: int,
    vmap: VocabMap | None,
    progress: bool,
) -> None:
    """Steps until ``stop``. Batches come from a ``Prefetcher`` thread (vocabulary mapping and pinning done
    there); step statistics stay on the device and are read -- one host sync, one collective -- when a
    log line, a checkpoint or the last step is due, then written one JSON line per step."""
    from tqdm.auto import tqdm

    head, why = fused_head(model)
    if head is None:
        log.info("student head not fused (%s): the loss computes its full (B, T, V) logits", why)
    stream = Prefetcher(
        batch_stream(
            reader, cfg.batch_size, seed=cfg.seed, pos=pos, rank=rank, world=world, keys=TARGET_KEYS[spec.kind]
        ),
        depth=PREFETCH_BATCHES,
        transform=functools.partial(
            _prepare_batch, vmap=vmap, pin=dev.type == "cuda", packing=packing_of(reader.meta.corpus)
        ),
    )
    bar = tqdm(total=stop, initial=pos.step, desc="train", unit="step", disable=not progress or rank != 0)
    log_file = open(out / LOG_NAME, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    pending: list[tuple[dict[str, Any], torch.Tensor]] = []  # steps whose numbers are still on the device
    try:
        while pos.step < stop:
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            stats = _step(cfg, model=model, head=head, optimizer=optimizer, spec=spec, stream=stream, pos=pos, dev=dev)
            scheduler.step()
            dt = time.perf_counter() - t0
            tokens = stats["tokens"] * world
            pos.step, pos.tokens, pos.elapsed = pos.step + 1, pos.tokens + tokens, pos.elapsed + dt
            record = {"step": pos.step, "lr": lr, "tokens_per_s": tokens / max(dt, 1e-9), "elapsed": pos.elapsed}
            record |= {"epoch": pos.epoch, "data_wait_s": stats["data_wait_s"]}
            pending.append((record, stats["values"]))
            checkpoint = pos.step % cfg.checkpoint_every == 0 or pos.step == stop
            if pos.step % cfg.log_every == 0 or checkpoint:
                last = _write_log(pending, log_file)
                pending.clear()
                bar.set_postfix(loss=f"{last['loss']:.3f}")
                if pos.step % cfg.log_every == 0:
                    log.info(
                        "step %d loss %.4f kd %.4f ce %.4f lr %.2e %.0f tok/s, waited %.3f s for data",
                        pos.step,
                        last["loss"],
                        last["kd"],
                        last["ce"],
                        lr,
                        last["tokens_per_s"],
                        last["data_wait_s"],
                    )
            bar.update(1)
            if checkpoint:  # every rank: RNG states are gathered
                _checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, pos=pos, is_main=rank == 0)
    finally:
        stream.close()
        bar.close()
        if log_file is not None:
            log_file.close()


PREFETCH_BATCHES = 4
"""Batches the loader thread assembles ahead of the trainer."""


def _prepare_batch(
    item: tuple[tuple[int, int], dict[str, torch.Tensor]],
    *,
    vmap: VocabMap | None,
    pin: bool,
    packing: dict[str, Any] | None = None,
) -> tuple[tuple[int, int], dict[str, torch.Tensor]]:
    """On the loader thread: mask document padding (``documents`` packing: a position whose next token is
    padding is neither a KD nor a CE target), map the batch to the student's vocabulary, pin it for CUDA."""
    position, batch = item
    if packing is not None and packing.get("mode") == "documents":
        real = torch.nn.functional.pad(target_mask(batch["input_ids"], packing), (0, 1), value=False)  # (B, T)
        batch = {**batch, "loss_mask": real, "ce_mask": real}
    if vmap is not None:
        batch = vmap.apply(batch)
    return position, pin_batch(batch) if pin else batch


def _write_log(pending: list[tuple[dict[str, Any], torch.Tensor]], log_file: Any) -> dict[str, Any]:
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


LOG_FIELDS = ("step", "loss", "kd", "ce", "grad_norm", "lr", "tokens_per_s", "elapsed", "epoch", "data_wait_s")
"""One train_log.jsonl line per optimizer step; ``data_wait_s``: seconds the step waited for its batches."""


def _step(
    cfg: TrainConfig,
    *,
    model: torch.nn.Module,
    head: LMHead | None,
    optimizer: torch.optim.Optimizer,
    spec: KDLossSpec,
    stream: Iterator,
    pos: Position,
    dev: torch.device,
) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; advances ``pos`` to the next batch.

    With a fused ``head`` the student runs without its LM head and the loss computes the logits chunk
    by chunk (``kd_loss_from_hidden``); otherwise ``kd_loss`` on the full logits. Under DDP gradients
    are averaged over ranks on the last micro-batch only (``no_sync`` before). Returns ``values``, a
    device tensor (loss, kd, ce averaged over micro-batches, gradient norm) -- read nothing back here:
    no host sync -- the tokens of this rank and the seconds spent waiting for batches.
    """
    optimizer.zero_grad(set_to_none=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    sums = torch.zeros(3, dtype=torch.float32 if dev.type == "mps" else torch.float64, device=dev)  # loss, kd, ce
    tokens, waited = 0, 0.0
    for micro in range(cfg.grad_accum):
        start = time.perf_counter()
        (pos.epoch, pos.batch), batch = next(stream)
        waited += time.perf_counter() - start
        input_ids = batch["input_ids"].to(dev, non_blocking=True)  # (B, T)
        keys = (*TARGET_KEYS[spec.kind], "ce_mask", "loss_mask")
        targets = {k: batch[k].to(dev, non_blocking=True) for k in keys if k in batch}
        sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with amp:
                if head is not None:
                    hidden = final_hidden_states(model, input_ids)  # (B, T, H)
                    out = kd_loss_from_hidden(hidden, head, input_ids=input_ids, spec=spec, **targets)
                else:
                    logits = model(input_ids=input_ids).logits  # (B, T, V)
            if head is None:
                out = kd_loss(logits, input_ids=input_ids, spec=spec, **targets)
            (out.loss / cfg.grad_accum).backward()
        sums += torch.stack([out.loss.detach(), out.kd, out.ce]).to(sums.dtype) / cfg.grad_accum
        tokens += input_ids.numel()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # a device scalar: no sync
    optimizer.step()
    values = torch.cat([sums, grad_norm.detach().reshape(1).to(sums)])  # (4,)
    return {"values": values, "tokens": tokens, "data_wait_s": waited}


def _start(
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


def _checkpoint(
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
        save_checkpoint(out, step=pos.step, model=_unwrap(model), state=state, trainer=asdict(pos))


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


def _summary(
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
        "cache": {
            "name": manifest.name,
            "teacher_sha256": manifest.teacher.get("sha256"),
            "tokenizer_fingerprint": manifest.tokenizer.get("fingerprint"),
            "corpus_fingerprint": manifest.corpus.get("fingerprint"),
            "targets": manifest.targets,
        },
        "config": to_dict(cfg),
        "kdcache_version": __version__,
    }


def _last_log_line(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def _maybe_ddp(model: torch.nn.Module, dev: torch.device, world: int) -> torch.nn.Module:
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
