"""``build_cache``: score token data with the teacher once and write a cache (format: ``format``).

The one build path, used by ``kdcache cache`` and the DVC stage alike. Shard ``i`` holds sequences
``[i * rows_per_shard, (i + 1) * rows_per_shard)``; rank ``r`` of ``world_size`` scores the
shards with ``i % world_size == r``. Within a shard, batches are ``cfg.batch_size`` consecutive
sequences from the shard's start, so a rerun with the same batch size, dtype and device type
writes byte-identical files. The teacher runs on this thread; ``writer.ShardWriter`` encodes and
writes on another. A rerun resumes: finished shards are kept after checking (from their footers)
that the same teacher, corpus and settings made them, and a directory whose manifest says
otherwise is refused before any work.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache.format import MANIFEST_NAME, SHARD_PATTERN, Manifest, SequenceTargets, TargetLayout
from kdcache.cache.targets import cache_chunk_tokens, sparsify_rows, to_sequence_targets
from kdcache.cache.writer import (
    CACHE_KIND,
    CacheWriteError,
    ShardWriter,
    build_key_of,
    is_cache_dir,
    read_shard_meta,
    save_tokenizer,
    seal,
    shard_name,
)
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.devices import runtime_key, use_deterministic_algorithms
from kdcache.distributed import (
    agree_on_finished,
    any_rank_failed,
    gather_file_digests,
    group_rank_world,
    process_group,
)
from kdcache.files import hold_output_dir
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.packing import packing_of
from kdcache.teacher import Teacher, load_teacher, logit_rows, teacher_hidden
from kdcache.token_data import TokenSplit, open_tokens
from kdcache.tokenizer import tokenizer_vocab_size

log = logging.getLogger(__name__)


class CacheDirError(CacheWriteError):
    """The output directory already holds a cache made from other inputs or settings."""


def target_layout(cfg: CacheConfig, *, vocab_size: int, seq_len: int) -> TargetLayout:
    """The cache layout for ``cfg``; fields that do not apply to the chosen kind are zeroed."""
    topk = cfg.targets in ("topk", "both")
    sampled = cfg.targets in ("sampled", "both")
    return TargetLayout(
        kind=cfg.targets,
        vocab_size=vocab_size,
        seq_len=seq_len,
        top_k=cfg.top_k if topk else 0,
        mass=cfg.mass if topk else 0.0,
        samples=cfg.samples if sampled else 0,
        temperature=cfg.temperature,
        seed=cfg.seed if sampled else 0,
    )


def default_cache_name(teacher_info: dict[str, Any], tokens: TokenSplit, layout: TargetLayout) -> str:
    """A content-addressed directory name: same teacher, corpus and targets -> same name.

    e.g. ``3f2a9c1b-77d0e4a2-train-top32``, ``…-train-top64m0.99-t2``, ``…-val-top32-s16seed0``.
    """
    parts = []
    if layout.has_topk:
        parts.append(f"top{layout.top_k}" + (f"m{layout.mass:g}" if layout.adaptive else ""))
    if layout.has_samples:
        parts.append(f"s{layout.samples}seed{layout.seed}")
    if layout.temperature != 1.0:
        parts.append(f"t{layout.temperature:g}")
    return "-".join([teacher_info["sha256"][:8], tokens.fingerprint[:8], tokens.split, *parts])


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
    barrier, which may wait for hours.
    """
    if cfg.deterministic:
        use_deterministic_algorithms()
    with process_group("gloo", device=teacher_cfg.device, timeout_s=CACHE_TIMEOUT_S) as (rank, world):
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


def cache_dir_for(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    out_dir: str | Path | None = None,
    cache_root: str | Path = "cache",
) -> Path:
    """``out_dir``, or ``cache_root / default_cache_name(...)`` when it is None."""
    if out_dir is not None:
        return Path(out_dir)
    layout = target_layout(cfg, vocab_size=tokenizer_vocab_size(teacher.tokenizer), seq_len=tokens.seq_len)
    return Path(cache_root) / default_cache_name(teacher.info, tokens, layout)


def check_cache_dir(out: Path, header: dict[str, Any], *, content_named: bool) -> None:
    """Refuse to resume into ``out`` if its manifest was made by another teacher, corpus or settings."""
    if not (out / MANIFEST_NAME).exists():
        return  # shards without a manifest are checked one by one (``read_shard_meta``)
    m = Manifest.load(out)
    want = {
        "teacher.sha256": header["teacher"]["sha256"],
        "corpus.fingerprint": header["corpus"]["fingerprint"],
        "corpus.split": header["corpus"]["split"],
        **{f"targets.{k}": v for k, v in header["targets"].items()},
    }
    have = {
        "teacher.sha256": m.teacher.get("sha256"),
        "corpus.fingerprint": m.corpus.get("fingerprint"),
        "corpus.split": m.corpus.get("split"),
        **{f"targets.{k}": v for k, v in m.targets.items()},
    }
    diffs = [f"{key} {have.get(key)!r} (this run: {value!r})" for key, value in want.items() if have.get(key) != value]
    if diffs:
        fix = (
            "pass --out DIR to write elsewhere, or delete the directory if its cache is no longer needed"
            if content_named
            else "choose another output directory (--out, or paths.cache in params.yaml), or omit --out "
            "to write to a directory named after the teacher, corpus and settings (under --cache-root)"
        )
        raise CacheDirError(
            f"{out / MANIFEST_NAME}: this directory holds a cache made by a different teacher, corpus "
            f"or settings — {'; '.join(diffs)}; refusing to write into it: {fix}"
        )


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

    Raises ``CacheWriteError`` on mismatched inputs, foreign shards in ``out_dir``, non-finite
    teacher logits with ``on_nan: fail`` or a failed write (naming the file); a failed run leaves
    finished shards in place, no ``.tmp`` file and no new manifest.
    """
    group = group_rank_world()
    out = cache_dir_for(teacher, tokens, cfg, out_dir=out_dir, cache_root=cache_root)
    header = _manifest_header(teacher, tokens, cfg)
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
        header = _manifest_header(teacher, tokens, cfg)
        check_cache_dir(out, header, content_named=content_named)
        layout = TargetLayout.from_dict(header["targets"])
        build_key = build_key_of(header)
        done = _finished_shards(out, num_shards=len(ranges), build_key=build_key)
    except Exception:
        if group:
            agree_on_finished(None, len(ranges))  # lets the other ranks through the collective, and stops them
        raise
    if group:  # every rank listed before any rank writes: all deal the same missing shards
        done = agree_on_finished(done, len(ranges))
        if done is None:
            raise CacheWriteError(f"{out}: another rank failed before scoring (see its error); nothing was written")
    todo = _deal(done, rank=rank, world_size=world_size, dynamic=bool(group))
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
        for i in todo + finished:  # left by a killed run; nobody writes a finished shard's .tmp any more
            (out / f"{shard_name(i)}.tmp").unlink(missing_ok=True)
        if rank == 0:
            header["tokenizer"]["files"] = save_tokenizer(out, teacher.tokenizer, header["tokenizer"]["fingerprint"])
        written = _score_shards(
            teacher,
            tokens,
            cfg,
            layout=layout,
            out=out,
            shards=[(i, *ranges[i]) for i in todo],
            build_key=build_key,
            progress=progress,
        )
    except Exception:
        if group:
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


def _manifest_header(teacher: Teacher, tokens: TokenSplit, cfg: CacheConfig) -> dict[str, Any]:
    """Check the inputs fit together; the manifest's teacher/tokenizer/corpus/targets sections."""
    if tokens.split != cfg.split:
        raise CacheWriteError(f"cache.split is {cfg.split!r} but the token split passed is {tokens.split!r}")
    fingerprint = tokenizer_fingerprint(teacher.tokenizer)
    if tokens.tokenizer_fingerprint != fingerprint:
        raise CacheWriteError(
            f"token data was made with tokenizer {tokens.tokenizer_fingerprint[:12]}… but teacher "
            f"{teacher.info['path']} has tokenizer {fingerprint[:12]}… — rerun prepare with this teacher's tokenizer"
        )
    vocab = tokenizer_vocab_size(teacher.tokenizer)
    if tokens.vocab_size > teacher.vocab_size:
        raise CacheWriteError(
            f"token data declares vocab_size {tokens.vocab_size} > the teacher's "
            f"{teacher.vocab_size} logits — rerun prepare with this teacher's tokenizer"
        )
    layout = target_layout(cfg, vocab_size=vocab, seq_len=tokens.seq_len)
    return {
        "teacher": dict(teacher.info),
        "tokenizer": {"fingerprint": fingerprint, "vocab_size": vocab, "model_vocab_size": teacher.vocab_size},
        "corpus": {
            "fingerprint": tokens.fingerprint,
            "split": tokens.split,
            "seq_len": tokens.seq_len,
            "num_sequences": len(tokens),
            "num_tokens": len(tokens) * tokens.seq_len,
            "packing": packing_of(tokens.manifest),
        },
        "targets": layout.to_dict()
        | {
            "batch_size": cfg.batch_size,
            "rows_per_shard": cfg.rows_per_shard,
            "compute_dtype": teacher.info["dtype"],
            "runtime": runtime_key(teacher.device, teacher.dtype, teacher.model),
        },
    }


def _finished_shards(out: Path, *, num_shards: int, build_key: str) -> list[bool]:
    """Which shards exist, after refusing shards of another cache (footers only: cheap, before hours of work)."""
    _check_writable(out)
    existing = [p for p in sorted(out.glob("shard-*.parquet")) if SHARD_PATTERN.match(p.name)]
    for path in existing:
        if int(path.name[6:11]) >= num_shards:
            raise CacheWriteError(
                f"{path}: this cache has only {num_shards} shards — the file belongs to another "
                "cache; write to an empty out_dir (or delete the directory)"
            )
    for path in existing:
        read_shard_meta(path, build_key)
    return [(out / shard_name(i)).exists() for i in range(num_shards)]


def _deal(done: list[bool], *, rank: int, world_size: int, dynamic: bool) -> list[int]:
    """This rank's shards to score. In a process group (``dynamic``) the missing shards, agreed by all
    ranks, are dealt round-robin, so a resume after a partial failure keeps every rank busy; without
    one (ranks run one by one) the deal is fixed, shard i to rank i % world_size."""
    if dynamic:
        return [i for i in range(len(done)) if not done[i]][rank::world_size]
    return [i for i in range(len(done)) if i % world_size == rank and not done[i]]


def _check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written there, before hours of scoring."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".kdcache-probe-"):
            pass
    except OSError as e:
        raise CacheWriteError(
            f"{out}: the cache directory is not writable ({e.strerror or e}) — choose a writable "
            "output directory (--out / the stage's out) or fix its permissions"
        ) from e


def _score_shards(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    layout: TargetLayout,
    out: Path,
    shards: list[tuple[int, int, int]],
    build_key: str,
    progress: bool,
) -> dict[int, dict[str, Any]]:
    """Run the teacher over ``shards`` ((index, start, end)) and hand batches to the background writer."""
    from tqdm.auto import tqdm

    timer = {"forward": 0.0, "sparsify": 0.0, "host": 0.0}
    total = sum(end - start for _, start, end in shards) * tokens.seq_len
    chunk = cache_chunk_tokens(layout.vocab_size, teacher.device.type)  # bounds the (chunk, V) buffers
    began = time.perf_counter()
    with (
        ShardWriter(out, layout) as writer,
        tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, desc="cache") as bar,
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
                rows = _score_batch(teacher, tokens, cfg, layout=layout, seqs=seqs, chunk=chunk, meta=meta, timer=timer)
                writer.write(index, rows)
                bar.update(len(seqs) * tokens.seq_len)
            skipped = set(meta["skipped"])
            meta["first_seq"] = next((s for s in range(start, end) if s not in skipped), start)
            writer.finish(index, meta)
    elapsed = time.perf_counter() - began
    if total:
        log.info(
            "scored %d tokens in %.1f s (%.0f tokens/s): forward %.1f s, sparsify %.1f s, host %.1f s, "
            "writer busy %.2f s, waited on writer %.2f s",
            total,
            elapsed,
            total / elapsed,
            timer["forward"],
            timer["sparsify"],
            timer["host"],
            writer.busy_s,
            writer.wait_s,
        )
    return writer.written


def _score_batch(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    layout: TargetLayout,
    seqs: np.ndarray,
    chunk: int,
    meta: dict[str, Any],
    timer: dict[str, float],
) -> list[SequenceTargets]:
    """Forward + sparsify one batch; drop (``skip``) or refuse (``fail``) sequences with non-finite logits."""
    ids = np.asarray(tokens.ids[seqs[0] : seqs[-1] + 1], dtype=np.int64)  # (B, T)
    if ids.max(initial=0) >= layout.vocab_size or ids.min(initial=0) < 0:
        raise CacheWriteError(
            f"token split {tokens.split!r}: sequences {seqs[0]}..{seqs[-1]} hold ids outside "
            f"[0, {layout.vocab_size}) — rerun prepare with this teacher's tokenizer"
        )
    t0 = time.perf_counter()
    hidden = teacher_hidden(teacher, torch.from_numpy(ids))  # (B, T, H): the full (B, T, V) logits never exist
    t1 = time.perf_counter()
    sparse = sparsify_rows(
        logit_rows(teacher, hidden),  # LM head + soft-cap per chunk of `chunk` positions, sparsified in turn
        batch=len(seqs),
        device=hidden.device,
        layout=layout,
        seq_indices=torch.from_numpy(seqs),
        chunk_tokens=chunk,
    )
    del hidden
    sparse = {key: value.cpu() for key, value in sparse.items()}  # the one device->host copy (small tensors)
    t2 = time.perf_counter()  # on CUDA the forward is async: its time lands in "sparsify", which waits for it
    bad = sparse.pop("nonfinite").numpy()  # (B,)
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
    kept = {key: value[torch.from_numpy(keep)] for key, value in sparse.items()}
    rows = to_sequence_targets(kept, ids[keep], seqs[keep])
    timer["forward"] += t1 - t0
    timer["sparsify"] += t2 - t1
    timer["host"] += time.perf_counter() - t2
    return rows
