"""The cache build's inner loop: teacher forwards on the calling thread, sparsification overlapped with them.

``score_shards`` runs the teacher body over each batch (``forward_batch``) and hands the final hidden states
to a sparsify lane (``SparsifyLane``): the LM head, sparse targets, the host-side checks and the hand-off to
the background ``ShardWriter`` (``finish_batch``) run there while the next batch's forward runs here. With
CUDA the lane's kernels go to a second stream, waiting on an event recorded after the forward, so they
overlap the next forward on the GPU; on a CPU they run on a worker thread given the cores the forward's
intra-op threads leave free (serially when there are none: the forward already keeps every core busy).
Results do not depend on the overlap: every batch is sparsified from the same hidden states by the same
functions, and the lane hands batches to the writer in order, so the files are byte-identical.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache.format import SIGNALS, SequenceTargets, TargetLayout
from kdcache.cache.hidden import forward_with_layers, project_quantize
from kdcache.cache.signals import add_signal_stats, shard_signal_stats
from kdcache.cache.targets import cache_chunk_tokens, next_token_ids, sparsify_rows, to_sequence_targets
from kdcache.cache.writer import CacheWriteError, DiscardWriter, ShardWriter
from kdcache.config.cache import CacheConfig
from kdcache.teacher import Teacher, context_hidden, logit_rows
from kdcache.token_data import TokenSplit

log = logging.getLogger(__name__)

SPARSIFY_THREADS: int | None = None
"""Intra-op threads of the CPU sparsify worker; None: the cores the forward leaves free (``spare_cores``).
Set per thread (OpenMP), so the forward keeps its own count."""


def spare_cores() -> int:
    """Cores this process may use beyond the forward's intra-op threads (``torch.get_num_threads()``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores - torch.get_num_threads())


class SparsifyLane:
    """Runs ``finish(batch)`` jobs in submission order, one at a time, overlapped with the caller's next forward.

    ``enabled=False``: each job runs at once on the calling thread (what a lockstep build needs: its
    collectives stay on one thread). ``submit`` first waits for the previous job (re-raising its error), so at
    most one batch is being sparsified while the next is forwarded. On CUDA the jobs run on a second stream.
    On a CPU the worker thread only pays where the forward leaves cores idle: with no spare core
    (``spare_cores``, e.g. torch's default of one thread per core) jobs run serially; with some (the forward
    limited by ``torch.set_num_threads`` / OMP_NUM_THREADS) the worker takes them (``SPARSIFY_THREADS``).
    """

    def __init__(self, device: torch.device, *, enabled: bool = True) -> None:
        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.threads = SPARSIFY_THREADS or spare_cores()
        self.enabled = enabled and (self.cuda or device.type == "cpu" and self.threads > 0)
        self.stream = torch.cuda.Stream(device=device) if self.enabled and self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kdcache-sparsify") if self.enabled else None
        self.pending: Future | None = None
        self.wait_s = 0.0

    def submit(self, job: Callable[[], None], tensors: list[torch.Tensor]) -> None:
        """Run ``job`` (which reads ``tensors``, made by this thread's forward) after the previous one."""
        self.drain()
        if self.pool is None:
            job()
            return
        ready = None
        if self.stream is not None:  # the job's kernels wait for the forward, not for this thread
            ready = torch.cuda.Event()
            ready.record()
            for t in tensors:
                t.record_stream(self.stream)  # the allocator keeps their memory until the side stream is done
        self.pending = self.pool.submit(self._run, job, ready)

    def _run(self, job: Callable[[], None], ready: Any) -> None:
        if self.stream is None:
            torch.set_num_threads(self.threads)  # this thread's OpenMP team only
            job()
            return
        torch.cuda.set_device(self.device)  # the current device is per thread
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            job()  # its .cpu() copies wait for this stream only

    def drain(self) -> None:
        """Wait for the running job; re-raise its error."""
        if self.pending is not None:
            began = time.perf_counter()
            pending, self.pending = self.pending, None
            try:
                pending.result()
            finally:
                self.wait_s += time.perf_counter() - began

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> SparsifyLane:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.drain()
        finally:
            self.close()


def score_shards(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    layout: TargetLayout,
    spans: np.ndarray | None,
    out: Path,
    shards: list[tuple[int, int, int]],
    build_key: str,
    progress: bool,
    context: tuple[int, ...] = (),
    projection: torch.Tensor | None = None,
    write: bool = True,
    after_batch: Callable[[], None] | None = None,
    overlap: bool = True,
) -> dict[int, dict[str, Any]]:
    """Run the teacher over ``shards`` ((index, start, end)) and hand batches to the background writer
    (``write``: else drop them), calling ``after_batch`` after each batch (and its shard's finish).

    ``overlap``: sparsify each batch while the next one's forward runs (``SparsifyLane``); a build with
    ``after_batch`` (lockstep) runs one batch at a time on this thread.
    """
    from tqdm.auto import tqdm

    timer = {"forward": 0.0, "sparsify": 0.0, "host": 0.0}
    total = sum(end - start for _, start, end in shards) * tokens.seq_len
    chunk = cache_chunk_tokens(layout.vocab_size, teacher.device.type)  # bounds the (chunk, V) buffers
    began = time.perf_counter()
    with (
        ShardWriter(out, layout) if write else DiscardWriter() as writer,
        tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, desc="cache") as bar,
        SparsifyLane(teacher.device, enabled=overlap and after_batch is None) as lane,
    ):
        for index, start, end in shards:
            meta = {
                "build_key": build_key,
                "shard": index,
                "first_seq": start,
                "entropy_sum": 0.0,
                "topk_mass_sum": 0.0,
                "skipped": [],
            }
            for b0 in range(start, end, cfg.batch_size):
                seqs = np.arange(b0, min(end, b0 + cfg.batch_size))
                ids, hidden, features = forward_batch(teacher, tokens, layout, seqs, context, projection, timer)
                finish = partial(
                    finish_batch,
                    teacher,
                    tokens,
                    cfg,
                    layout,
                    seqs,
                    ids,
                    hidden,
                    features,
                    chunk,
                    meta,
                    timer,
                    spans,
                )
                last = b0 + cfg.batch_size >= end  # the shard's last batch: finish the shard after it
                job = partial(_finish_and_write, writer, (index, start, end), last, meta, finish)
                lane.submit(job, [hidden, *features.values()])
                del hidden, features
                bar.update(len(seqs) * tokens.seq_len)
                if after_batch:
                    after_batch()
    elapsed = time.perf_counter() - began
    if total:
        log.info(
            "scored %d tokens in %.1f s (%.0f tokens/s): forward %.1f s, sparsify %.1f s, host %.1f s "
            "(overlapped: %s, forward waited on sparsify %.2f s), writer busy %.2f s, waited on writer %.2f s",
            total,
            elapsed,
            total / elapsed,
            timer["forward"],
            timer["sparsify"],
            timer["host"],
            lane.enabled,
            lane.wait_s,
            writer.busy_s,
            writer.wait_s,
        )
    return writer.written


def _finish_and_write(
    writer: Any, shard: tuple[int, int, int], last: bool, meta: dict[str, Any], finish: Callable[[], list]
) -> None:
    """``finish()`` one batch of shard (index, start, end), write its rows and, after its ``last`` batch, finish
    the shard with its ``meta`` (``first_seq``: its first sequence not skipped)."""
    index, start, end = shard
    writer.write(index, finish())
    if last:
        skipped = set(meta["skipped"])
        meta["first_seq"] = next((s for s in range(start, end) if s not in skipped), start)
        writer.finish(index, meta)


def forward_batch(
    teacher: Teacher,
    tokens: TokenSplit,
    layout: TargetLayout,
    seqs: np.ndarray,
    context: tuple[int, ...],
    projection: torch.Tensor | None,
    timer: dict[str, float],
) -> tuple[np.ndarray, torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher body over one batch: ((B, T) ids, (B, T, H) final hidden states, the projected and quantized
    ``layout.hidden`` layers by column name (with ``bad_<name>`` (B,) flags), all on the teacher's device)."""
    ids = np.asarray(tokens.ids[seqs[0] : seqs[-1] + 1], dtype=np.int64)  # (B, T)
    if ids.max(initial=0) >= layout.vocab_size or ids.min(initial=0) < 0:
        raise CacheWriteError(
            f"token split {tokens.split!r}: sequences {seqs[0]}..{seqs[-1]} hold ids outside "
            f"[0, {layout.vocab_size}) — rerun prepare with this teacher's tokenizer"
        )
    if getattr(tokens, "contexts", None) is not None:  # corpus.context_field: each row's own teacher context
        context = tokens.contexts.for_rows(seqs)
    t0 = time.perf_counter()
    features: dict[str, torch.Tensor] = {}
    if layout.hidden and projection is not None:  # one forward: the LM head's input and the tapped layers
        hidden, states = forward_with_layers(teacher, torch.from_numpy(ids), layout.hidden.layers, context)
        for (name, scale_name), state in zip(layout.hidden.columns().items(), states, strict=True):
            features[name], features[scale_name], features[f"bad_{name}"] = project_quantize(state, projection)
        del states
    else:
        hidden = context_hidden(teacher, torch.from_numpy(ids), context)  # (B, T, H) the rows' positions
    timer["forward"] += time.perf_counter() - t0  # on CUDA the forward is async: its time lands in "sparsify"
    return ids, hidden, features


def finish_batch(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    layout: TargetLayout,
    seqs: np.ndarray,
    ids: np.ndarray,
    hidden: torch.Tensor,
    features: dict[str, torch.Tensor],
    chunk: int,
    meta: dict[str, Any],
    timer: dict[str, float],
    spans: np.ndarray | None = None,
) -> list[SequenceTargets]:
    """LM head + sparsify one batch's hidden states, then drop (``skip``) or refuse (``fail``) sequences with
    non-finite logits (or hidden states) and add the batch to the shard's ``meta`` statistics."""
    t1 = time.perf_counter()
    sparse = sparsify_rows(
        logit_rows(teacher, hidden),  # LM head + soft-cap per chunk of `chunk` positions, sparsified in turn
        batch=len(seqs),
        device=hidden.device,
        layout=layout,
        seq_indices=torch.from_numpy(seqs),
        chunk_tokens=chunk,
        next_ids=next_token_ids(torch.from_numpy(ids)),
        writable=True,  # the head's chunks are fresh tensors
    )
    sparse = {key: value.cpu() for key, value in sparse.items()}  # the one device->host copy (small tensors)
    t2 = time.perf_counter()
    bad = sparse.pop("nonfinite").numpy()  # (B,)
    features = {key: value.cpu().numpy() for key, value in features.items()}
    for key in [k for k in features if k.startswith("bad_")]:
        bad = bad | features.pop(key)
    if bad.any():
        names = seqs[bad].tolist()
        if cfg.on_nan == "fail":
            raise CacheWriteError(
                f"teacher produced NaN/inf logits for sequence(s) {names} of split {tokens.split!r} "
                "— check the teacher weights and dtype (float16 overflows: use bfloat16 or "
                "float32), or set cache.on_nan: skip to drop them"
            )
        log.warning("dropping sequence(s) %s: teacher logits are NaN/inf (cache.on_nan: skip)", names)
        meta["skipped"].extend(names)
    keep = ~bad
    meta["entropy_sum"] += float(sparse["entropy"].numpy()[keep].sum(dtype=np.float64))
    meta["topk_mass_sum"] += float(sparse["topk_mass"].numpy()[keep].sum(dtype=np.float64))
    signals = [sparse[f"teacher_{s}"].numpy()[keep] if f"teacher_{s}" in sparse else None for s in SIGNALS]
    add_signal_stats(meta, shard_signal_stats(*signals))
    if spans is not None:
        sparse["byte_lengths"] = torch.from_numpy(spans[ids])  # (B, T) bytes each input token spells
    kept = {key: value[torch.from_numpy(keep)] for key, value in sparse.items()}
    rows = to_sequence_targets(kept, ids[keep], seqs[keep])
    features = {key: value[keep] for key, value in features.items()}
    for r, row in enumerate(rows):
        row.hidden = {key: value[r] for key, value in features.items()} if features else None
    timer["sparsify"] += t2 - t1
    timer["host"] += time.perf_counter() - t2
    return rows
