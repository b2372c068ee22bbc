"""``build_cache``: score token data with the teacher once and write a cache (format: ``format``).

The one build path, used by ``kdcache cache`` and the DVC stage alike. Shard ``i`` holds sequences
``[i * rows_per_shard, (i + 1) * rows_per_shard)``; rank ``r`` of ``world_size`` scores the
shards with ``i % world_size == r`` (a tensor-parallel teacher: every rank every shard, in lockstep,
rank 0 writing them; ``kdcache.cache.lockstep``). Within a shard, batches are ``cfg.batch_size`` consecutive
sequences from the shard's start, so a rerun with the same batch size, dtype and device type
writes byte-identical files. The teacher runs on this thread, sparsification overlapped with it
(``kdcache.cache.scoring``: a worker thread on CPU, a second stream on CUDA); ``writer.ShardWriter``
encodes and writes on another thread. A rerun resumes: finished shards are kept after checking (from their footers)
that the same teacher, corpus and settings made them, and a directory whose manifest says
otherwise is refused before any work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kdcache.cache.format import Manifest, TargetLayout
from kdcache.cache.hidden import hidden_targets
from kdcache.cache.hidden_format import save_projection
from kdcache.cache.identity import cache_dir_for, check_cache_dir, manifest_header
from kdcache.cache.lockstep import RankFailed, stop_if_a_rank_failed, tensor_parallel
from kdcache.cache.scoring import score_shards
from kdcache.cache.signals import byte_spans
from kdcache.cache.writer import (
    CACHE_KIND,
    CacheWriteError,
    build_key_of,
    finished_shards,
    is_cache_dir,
    save_tokenizer,
    seal,
    shard_name,
)
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.devices import use_deterministic_algorithms
from kdcache.distributed import (
    agree_on_finished,
    any_rank_failed,
    gather_file_digests,
    group_rank_world,
    process_group,
)
from kdcache.outputs import hold_output_dir
from kdcache.teacher import Teacher, load_teacher
from kdcache.teacher_context import TeacherContext, cache_context
from kdcache.token_data import TokenSplit, open_tokens

log = logging.getLogger(__name__)


def shard_ranges(num_sequences: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """``[start, end)`` sequence ranges of every shard; the last may be short."""
    return [(s, min(num_sequences, s + rows_per_shard)) for s in range(0, num_sequences, rows_per_shard)]


CACHE_TIMEOUT_S = 24 * 3600.0
"""Process-group timeout for a cache build: ranks that finish early wait this long at the final barrier."""


def cache_corpus(
    teacher_cfg: TeacherConfig,
    cfg: CacheConfig,
    *,
    tokens_dir: str | Path,
    out_dir: str | Path | None = None,
    cache_root: str | Path = "cache",
    progress: bool = False,
    overwrite: bool = False,
) -> Path | None:
    """Load the teacher and the token split, then ``build_cache`` — under torchrun on every rank.

    What ``kdcache cache`` and the DVC stage run. Returns the cache directory on rank 0, ``None``
    on other ranks. The process group is gloo even on GPUs: its only collective is the final
    barrier, which may wait for hours. A ``teacher.tp_plan`` teacher needs nccl on GPUs (its layers
    all-reduce every forward) and scores in lockstep on all ranks (``build_cache``).
    """
    if cfg.deterministic:
        use_deterministic_algorithms()
    backend = "auto" if teacher_cfg.tp_plan else "gloo"  # tensor parallel: nccl on GPUs, for the DTensors
    with process_group(backend, device=teacher_cfg.device, timeout_s=CACHE_TIMEOUT_S) as (rank, world):
        teacher, tokens = load_teacher(teacher_cfg), open_tokens(tokens_dir, cfg.split)
        build_cache(
            teacher,
            tokens,
            cfg,
            out_dir=out_dir,
            cache_root=cache_root,
            rank=rank,
            world_size=world,
            progress=progress and rank == 0,
            overwrite=overwrite,
        )
        return cache_dir_for(teacher, tokens, cfg, out_dir=out_dir, cache_root=cache_root) if rank == 0 else None


def build_cache(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    out_dir: str | Path | None = None,
    cache_root: str | Path = "cache",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
    overlap: bool = True,
) -> Manifest | None:
    """Score this rank's missing shards into the cache directory; rank 0 then writes the manifest.

    The directory is ``out_dir``, or ``cache_root/<content-derived name>`` (``default_cache_name``)
    when ``out_dir`` is None. It must be new or a cache kdcache made (``kdcache.files``: a directory
    holding anything else is refused — ``overwrite`` moves it aside — and so is an ``out_dir`` that
    is or holds the teacher or the token data). A cache whose manifest was made by another teacher,
    corpus or settings is refused (``CacheDirError``; ``overwrite`` moves it aside) before any work.
    The job holds the directory's lock until it returns (under a process group rank 0 takes it for
    all ranks): a second job writing the same directory is refused, naming the holder's pid.

    ``rank``/``world_size`` default to the initialized ``torch.distributed`` group (else 0/1). Under
    a process group every rank scores its shards, then all ranks meet in one collective (an
    all-reduce of a failure flag, which is also the barrier); rank 0 writes the manifest and
    returns it, other ranks return ``None``. If any rank failed, no rank writes a manifest: the
    failing rank re-raises its error, the others raise ``CacheWriteError``. Without a process group,
    rank 0 returns ``None`` while shards of other ranks are missing (rerun it once they finish);
    such ranks, each its own job, must run one after another (concurrent jobs: use torchrun).

    A tensor-parallel teacher (``teacher.tp_plan``: DTensor weights) makes all ranks one replica: every
    rank runs every batch of every missing shard in the same order, rank 0 alone writes shards and
    manifest, the others drop their rows. The ranks all-reduce a failure flag after every batch, so a
    rank's write error stops the others there, not in a forward's collective. The TP group must be
    the whole world (TP x data parallel is refused).

    ``overlap``: sparsify each batch while the next batch's forward runs (``kdcache.cache.scoring``); the files
    are the same either way.

    Raises ``CacheWriteError`` on mismatched inputs, foreign shards in ``out_dir``, non-finite
    teacher logits with ``on_nan: fail`` or a failed write (naming the file); a failed run leaves
    finished shards in place, no ``.tmp`` file and no new manifest.
    """
    group = group_rank_world()
    out = cache_dir_for(teacher, tokens, cfg, out_dir=out_dir, cache_root=cache_root)
    context = cache_context(cfg, teacher, tokens)  # cache.teacher_context, or corpus.context_field per row
    header = manifest_header(teacher, tokens, cfg, teacher_context=context and context.record)
    with hold_output_dir(
        out,
        kind=CACHE_KIND,
        inputs={"teacher": teacher.info["path"], "token data": tokens.path},
        overwrite=overwrite,
        legacy=is_cache_dir,
        check=lambda path: check_cache_dir(path, header, content_named=out_dir is None),
        leader=not group or group[0] == 0,
        sync=any_rank_failed if group else None,
    ):
        return _build_cache(
            teacher,
            tokens,
            cfg,
            out_dir=out,
            content_named=out_dir is None,
            rank=rank,
            world_size=world_size,
            progress=progress,
            context=context,
            overlap=overlap,
        )


def _build_cache(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    out_dir: Path,
    content_named: bool,
    rank: int | None,
    world_size: int | None,
    progress: bool,
    context: TeacherContext | None = None,
    overlap: bool = True,
) -> Manifest | None:
    """``build_cache`` in its claimed and locked directory ``out_dir``."""
    group = group_rank_world()
    rank = (group[0] if group else 0) if rank is None else rank
    world_size = (group[1] if group else 1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if group and group != (rank, world_size):
        raise ValueError(f"rank/world_size {rank}/{world_size} disagree with the process group's {group[0]}/{group[1]}")
    out = out_dir
    ranges = shard_ranges(len(tokens), cfg.rows_per_shard)
    try:
        header = manifest_header(teacher, tokens, cfg, teacher_context=context and context.record)
        check_cache_dir(out, header, content_named=content_named)
        layout = TargetLayout.from_dict(header["targets"], tokenizer=header["tokenizer"])
        build_key = build_key_of(header)
        done = finished_shards(out, num_shards=len(ranges), build_key=build_key)
        lockstep = tensor_parallel(teacher, world_size, out)  # every rank scores every missing shard, rank 0 writes
    except Exception:
        if group:
            agree_on_finished(None, len(ranges))  # lets the other ranks through the collective, and stops them
        raise
    if group:  # every rank listed before any rank writes: all deal the same missing shards
        done = agree_on_finished(done, len(ranges))
        if done is None:
            raise CacheWriteError(f"{out}: another rank failed before scoring (see its error); nothing was written")
    todo = _deal(done, rank=rank, world_size=world_size, dynamic=bool(group), lockstep=lockstep)
    writes = rank == 0 or not lockstep
    log.info(
        "cache %s: %d shards, %d already done, rank %d/%d scores %d",
        out,
        len(ranges),
        sum(done),
        rank,
        world_size,
        len(todo),
    )
    try:
        finished = [i for i, d in enumerate(done) if d] if rank == 0 else []
        for i in (todo if writes else []) + finished:  # left by a killed run; nobody writes them any more
            (out / f"{shard_name(i)}.tmp").unlink(missing_ok=True)
        if rank == 0:
            header["tokenizer"]["files"] = save_tokenizer(out, teacher.tokenizer, header["tokenizer"]["fingerprint"])
        hidden = hidden_targets(cfg, teacher, tokens)  # (spec, (H, dim) projection) or None
        if rank == 0 and hidden:
            save_projection(out, hidden[1])
        written = score_shards(
            teacher,
            tokens,
            cfg,
            layout=layout,
            spans=byte_spans(teacher.tokenizer)[1] if layout.max_token_bytes else None,
            out=out,
            shards=[(i, *ranges[i]) for i in todo],
            build_key=build_key,
            progress=progress,
            context=context.ids if context else (),
            projection=torch.from_numpy(hidden[1]).to(teacher.device) if hidden else None,
            write=writes,
            after_batch=stop_if_a_rank_failed if lockstep else None,
            overlap=overlap,
        )
    except Exception as e:
        if group and not isinstance(e, RankFailed):  # a RankFailed rank has met the failing one already
            any_rank_failed(True)  # let the other ranks through the collective, and stop them sealing
        raise
    if group and any_rank_failed(False):
        raise CacheWriteError(
            f"{out}: another rank failed (see its error); no manifest written — fix the cause "
            "and rerun: finished shards are kept"
        )
    if group:  # rank 0 seals with every rank's (sha256, size): no re-hashing of other ranks' shards
        mine = {i: (w["sha256"], w["bytes"]) for i, w in written.items()}
        digests = gather_file_digests(mine, len(ranges))
        written = {i: {"sha256": d, "bytes": n} for i, (d, n) in digests.items()} | written
    if rank != 0:
        return None
    manifest = seal(out, header, build_key=build_key, num_shards=len(ranges), known=written)
    if manifest is None and group:
        raise CacheWriteError(
            f"{out}: every rank finished but shard files are missing here — out_dir must be on "
            "storage shared by all ranks (all nodes)"
        )
    return manifest


def _deal(done: list[bool], *, rank: int, world_size: int, dynamic: bool, lockstep: bool = False) -> list[int]:
    """This rank's shards to score. In a process group (``dynamic``) the missing shards, agreed by all
    ranks, are dealt round-robin, so a resume after a partial failure keeps every rank busy; without
    one (ranks run one by one) the deal is fixed, shard i to rank i % world_size. ``lockstep``
    (a tensor-parallel teacher): every rank scores every missing shard."""
    if lockstep:
        return [i for i in range(len(done)) if not done[i]]
    if dynamic:
        return [i for i in range(len(done)) if not done[i]][rank::world_size]
    return [i for i in range(len(done)) if i % world_size == rank and not done[i]]
