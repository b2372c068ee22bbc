"""The student training loop: cached soft targets -> sparse KD loss -> AdamW; checkpoints; resume.

Data order depends only on ``cfg.seed`` and the epoch (the cache reader's batching), so a KD run
and its CE baseline see the same batches, and a resumed run continues exactly where the
checkpoint left off: its per-step losses equal an uninterrupted run's. The loss schedule
(``train.schedule``: a CE-only warm-up, then alpha and temperature ramps) is a pure function of the
step too (:func:`step_spec`), so a resumed run continues it exactly.

Under ``torchrun`` (a process group initialized by the caller, see ``kdcache.distributed``) the
model is wrapped in DDP and rank r reads the r-th slice of every global batch (``batch_size``
sequences per rank): each rank's loss is a mean over its own, equally many tokens and DDP averages
gradients, so 2 ranks x batch b follow the same loss curve as 1 rank x batch 2b. The logged loss is
the mean over ranks; rank 0 alone writes the log, the checkpoints and the final model.

Output directory::

    out_dir/checkpoints/step-NNNNNN/   resumable state (kdcache.checkpoint), newest 2 kept
    out_dir/train_log.jsonl            one JSON line per optimizer step (with that step's alpha and temperature)
    out_dir/config.json, model.safetensors, tokenizer files   the final student (from_pretrained)
    out_dir/training.json              written last: the run finished
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from kdcache.cache.format import TargetLayout
from kdcache.cache.prefetch import Prefetcher
from kdcache.cache.reader import CacheReader
from kdcache.config.base import ConfigError
from kdcache.config.train import ANY_TEMPERATURE_LOSSES, RampConfig, TrainConfig
from kdcache.crossproj import uld_output
from kdcache.devices import resolve_device
from kdcache.distributed import (
    any_rank_failed,
    barrier,
    check_same_on_all_ranks,
    clip_grad_norm,
    full_model_state,
    is_sharded,
    rank_world,
    shard_student,
)
from kdcache.features import FeatureTap, attach_features, detach_feature_map
from kdcache.lm_head import LMHead, final_hidden_states, fused_head
from kdcache.losses import (
    TAIL_KINDS,
    TARGET_KEYS,
    KDLossSpec,
    kd_loss,
    kd_loss_from_hidden,
)
from kdcache.optim import lr_scheduler, make_optimizer
from kdcache.outputs import hold_output_dir
from kdcache.packing import packing_of
from kdcache.student import (
    VocabMap,
    build_student,
)
from kdcache.tokenizer import tokenizer_vocab_size
from kdcache.train_data import (
    PREFETCH_BATCHES,
    Position,
    batch_keys,
    batch_stream,
    loss_spec,
    open_inputs,
    prepare_batch,
)
from kdcache.train_run import (
    LOG_NAME,
    OUTPUT_KIND,
    Resume,
    is_student_dir,
    run_identity,
    run_summary,
    save_final,
    save_state,
    start_run,
    write_log,
)

log = logging.getLogger(__name__)


def train(
    cfg: TrainConfig,
    *,
    cache_dir: str | Path,
    out_dir: str | Path,
    resume: Resume = False,
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
    previous run there is moved aside to ``run.moved-<UTC time>-started-without-resume/``, never deleted;
    ``resume="auto"`` (the DVC stages) resumes a matching run and moves any other aside, naming why.
    ``max_steps`` stops early at that step (the LR schedule still spans ``cfg.max_steps``), as if
    interrupted; the model is saved but ``training.json`` records ``complete: false``.
    Returns the summary written to ``training.json``.
    """
    rank, world = rank_world()
    with hold_output_dir(
        out_dir,
        kind=OUTPUT_KIND,
        inputs={"cache": cache_dir, "pretrained student": cfg.student.path}
        | {f"train.caches[{i}]": c.path for i, c in enumerate(cfg.caches)},
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


def _train(
    cfg: TrainConfig,
    *,
    cache_dir: str | Path,
    out: Path,
    resume: Resume,
    device: str,
    progress: bool,
    max_steps: int | None,
) -> dict[str, Any]:
    """``train`` in its claimed and locked output directory."""
    rank, world = rank_world()
    dev = resolve_device(device)
    reader, student_tok, vmap, mapping = open_inputs(cfg, cache_dir)
    spec = loss_spec(cfg, reader, cache_dir=cache_dir)
    check_schedule(cfg, spec, reader.layout, cache_dir=cache_dir)
    torch.manual_seed(cfg.seed)
    vocab = reader.layout.vocab_size if vmap is None else tokenizer_vocab_size(student_tok)
    model = build_student(cfg.student, vocab_size=vocab, seq_len=reader.layout.seq_len, tokenizer=student_tok)
    tap = attach_features(cfg, model, reader.layout, cache_dir=cache_dir, world=world)  # None: no feature loss
    fsdp = cfg.parallel == "fsdp" and world > 1  # sharded before the optimizer sees its parameters
    model = shard_student(model, dev) if fsdp else model.to(dev)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(
        optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    pos = start_run(
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
            tap=tap,
        )
        if tap is not None:  # the feature map is trained and checkpointed, never exported (kdcache.features)
            tap.close()
            detach_feature_map(model)
        session_s = time.perf_counter() - session_start
        summary = run_summary(
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
    weights = full_model_state(model, tied_once=False) if is_sharded(model) else None  # every rank: a collective
    if rank == 0:
        save_final(model, student_tok, out=out, summary=summary, state_dict=weights)
    barrier()  # every rank returns once the final model is on disk
    log.info(
        "trained %d steps: %.0f tokens/s, peak %s",
        pos.step,
        summary["tokens_per_s"],
        ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in summary["peak_memory_bytes"].items()),
    )
    return summary


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
    tap: FeatureTap | None = None,
) -> None:
    """Steps until ``stop``. Batches come from a ``Prefetcher`` thread (vocabulary mapping and pinning done
    there); step statistics stay on the device and are read -- one host sync, one collective -- when a
    log line, a checkpoint or the last step is due, then written one JSON line per step."""
    from tqdm.auto import tqdm

    head, why = fused_head(model)
    if cfg.cross_tokenizer == "uld":  # kdcache.crossproj.uld_loss sorts the student's whole distribution
        head, why = None, "train.cross_tokenizer: uld needs the full logits"
    if head is None:
        log.info("student head not fused (%s): the loss computes its full (B, T, V) logits", why)
    stream = Prefetcher(
        batch_stream(
            reader,
            cfg.batch_size,
            seed=cfg.seed,
            pos=pos,
            rank=rank,
            world=world,
            keys=(*batch_keys(cfg, spec), *(tap.keys if tap else ())),
        ),
        depth=PREFETCH_BATCHES,
        transform=functools.partial(
            prepare_batch,
            vmap=vmap,
            pin=dev.type == "cuda",
            packing=packing_of(reader.meta.corpus),
            token_filter=cfg.token_filter,
        ),
    )
    bar = tqdm(total=stop, initial=pos.step, desc="train", unit="step", disable=not progress or rank != 0)
    log_file = open(out / LOG_NAME, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    pending: list[tuple[dict[str, Any], torch.Tensor]] = []  # steps whose numbers are still on the device
    try:
        while pos.step < stop:
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            now = step_spec(spec, cfg, pos.step)
            stats = _step(
                cfg, model=model, head=head, optimizer=optimizer, spec=now, stream=stream, pos=pos, dev=dev, tap=tap
            )
            scheduler.step()
            dt = time.perf_counter() - t0
            tokens = stats["tokens"] * world
            pos.step, pos.tokens, pos.elapsed = pos.step + 1, pos.tokens + tokens, pos.elapsed + dt
            record = {"step": pos.step, "lr": lr, "tokens_per_s": tokens / max(dt, 1e-9), "elapsed": pos.elapsed}
            record |= {"epoch": pos.epoch, "data_wait_s": stats["data_wait_s"]}
            record |= {"alpha": 0.0 if now.kind == "ce" else now.alpha, "temperature": now.temperature}
            pending.append((record, stats["values"]))
            checkpoint = pos.step % cfg.checkpoint_every == 0 or pos.step == stop
            if pos.step % cfg.log_every == 0 or checkpoint:
                last = write_log(pending, log_file)
                pending.clear()
                bar.set_postfix(loss=f"{last['loss']:.3f}")
                if pos.step % cfg.log_every == 0:
                    log.info(
                        "step %d loss %.4f kd %.4f ce %.4f lr %.2e alpha %.3g tau %.3g %.0f tok/s, data wait %.3f s",
                        pos.step,
                        last["loss"],
                        last["kd"],
                        last["ce"],
                        lr,
                        last["alpha"],
                        last["temperature"],
                        last["tokens_per_s"],
                        last["data_wait_s"],
                    )
            bar.update(1)
            if checkpoint:  # every rank: RNG states are gathered
                save_state(out, model=model, optimizer=optimizer, scheduler=scheduler, pos=pos, is_main=rank == 0)
    finally:
        stream.close()
        bar.close()
        if log_file is not None:
            log_file.close()


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
    tap: FeatureTap | None = None,
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
                    if is_sharded(model):  # the root is unsharded from its forward to its backward: the full head
                        head = fused_head(model)[0]
                    out = kd_loss_from_hidden(hidden, head, input_ids=input_ids, spec=spec, **targets)
                else:
                    logits = model(input_ids=input_ids).logits  # (B, T, V)
            if head is None and "uld_probs" in batch:  # train.cross_tokenizer: uld
                out = uld_output(logits, input_ids=input_ids, spec=spec, batch=batch)
            elif head is None:
                out = kd_loss(logits, input_ids=input_ids, spec=spec, **targets)
            if tap is not None:  # + train.feature_weight x the feature loss (kdcache.features)
                out = tap.add_to(out, batch, dev)
            (out.loss / cfg.grad_accum).backward()
        sums += torch.stack([out.loss.detach(), out.kd, out.ce]).to(sums.dtype) / cfg.grad_accum
        tokens += input_ids.numel()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = clip_grad_norm(model.parameters(), clip)  # a device scalar: no sync
    optimizer.step()
    values = torch.cat([sums, grad_norm.detach().reshape(1).to(sums)])  # (4,)
    return {"values": values, "tokens": tokens, "data_wait_s": waited}


def step_spec(spec: KDLossSpec, cfg: TrainConfig, step: int) -> KDLossSpec:
    """The loss of optimizer step ``step`` (0-based): hard-label CE alone for the first
    ``schedule.ce_warmup_steps`` steps, then ``spec`` with alpha and temperature on their ramps, which run
    from ``train.alpha`` / ``train.temperature`` at the first KD step to their ``end`` at step max_steps - 1."""
    warmup = cfg.schedule.ce_warmup_steps
    if step < warmup:
        return spec if spec.kind == "ce" else replace(spec, kind="ce")
    span = cfg.max_steps - 1 - warmup
    progress = min((step - warmup) / span, 1.0) if span > 0 else 0.0
    return replace(
        spec,
        alpha=ramp_value(cfg.schedule.alpha, cfg.alpha, progress),
        temperature=ramp_value(cfg.schedule.temperature, cfg.temperature, progress),
    )


def ramp_value(ramp: RampConfig, start: float, progress: float) -> float:
    """A ramp's value at ``progress`` in [0, 1] of its span: constant ``start``; linear
    ``start + (end - start) * progress``; cosine ``end + (start - end) * (1 + cos(pi * progress)) / 2``."""
    if ramp.kind == "constant" or ramp.end is None:
        return start
    if ramp.kind == "linear":
        return start + (ramp.end - start) * progress
    return ramp.end + (start - ramp.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule(cfg: TrainConfig, spec: KDLossSpec, layout: TargetLayout, *, cache_dir: str | Path) -> None:
    """Refuse, before step 1, a moving temperature the resolved loss cannot take with this cache's targets."""
    ramp = cfg.schedule.temperature
    if ramp.kind == "constant" or ramp.end == cfg.temperature or spec.kind in ANY_TEMPERATURE_LOSSES:
        return
    moves = f"train.schedule.temperature: kind {ramp.kind} moves tau from {cfg.temperature} to {ramp.end}, but"
    fix = "keep temperature.kind: constant, or set train.loss: topk_renorm (any tau)"
    if spec.kind in TAIL_KINDS:
        stored = ", ".join(f"{t:g}" for t in sorted({layout.temperature, *layout.temperatures}))
        raise ConfigError(
            f"{moves} train.loss={spec.kind} re-tempers the cached teacher only at the temperatures {cache_dir} "
            f"stores log-normalizers for: {stored}; {fix}"
        )
    only = f"takes only the cache's temperature {layout.temperature:g}"
    raise ConfigError(f"{moves} train.loss={spec.kind} {only}; {fix}")


def _maybe_ddp(model: torch.nn.Module, dev: torch.device, world: int) -> torch.nn.Module:
    if world == 1 or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
