"""Score token data with the teacher once and write a cache directory (format: ``cache_format``).

Shard ``i`` holds sequences ``[i * rows_per_shard, (i + 1) * rows_per_shard)``; rank ``r`` of
``world_size`` scores the shards with ``i % world_size == r``. Within a shard, batches are
``cfg.batch_size`` consecutive sequences from the shard's start, so a rerun with the same batch
size, dtype and device type writes byte-identical files.

A single background thread encodes and writes shards (``.tmp`` -> fsync -> rename) while the
main thread runs the next forward. Each shard carries its own statistics and a build key in the
Parquet key-value metadata, so a rerun keeps finished shards (after checking they were made with
the same teacher, corpus and settings) and rebuilds the manifest without sidecar files. The
manifest is written last, by rank 0, only when every shard exists.

Crash safety: a ``kill -9`` at any moment leaves only complete shards under final names (a shard
is fsynced as ``.tmp`` and renamed), at most stale ``.tmp`` files that the rerun deletes, and
either the previous manifest or the new one (written the same way). The rerun keeps every
complete shard and writes a cache byte-identical to an uninterrupted run.

Test-only fault injection: with the environment variable ``KDCACHE_FAULT`` set to one of
``during_shard:N`` (after the first batch of shard N reached its ``.tmp``), ``after_shard:N``
(shard N renamed) or ``before_replace:manifest.json`` (the manifest ``.tmp`` is complete), the
process kills itself with SIGKILL at that point (``tests/test_crash.py``). Unset, it costs one
``None`` check per shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from kdcache import __version__
from kdcache.cache.format import (
    MANIFEST_NAME,
    PARQUET_OPTIONS,
    SHARD_PATTERN,
    Manifest,
    SequenceTargets,
    ShardInfo,
    TargetLayout,
    encode_table,
)
from kdcache.cache.targets import chunk_tokens_for, sparsify, to_sequence_targets
from kdcache.config import CacheConfig
from kdcache.fingerprint import sha256_file, sha256_json, tokenizer_fingerprint
from kdcache.teacher import Teacher, teacher_logits
from kdcache.token_data import TokenSplit
from kdcache.tokenizer import load_tokenizer, tokenizer_vocab_size

log = logging.getLogger(__name__)
TOKENIZER_DIR = "tokenizer"
SHARD_META_KEY = b"kdcache.shard"
"""Parquet key-value metadata key holding a shard's JSON statistics and build key."""
_FAULT = os.environ.get("KDCACHE_FAULT") or None
"""Test-only crash point (module docstring); read once at import."""


class CacheWriteError(ValueError):
    """The cache cannot be built: mismatched inputs, foreign files in the output dir, bad teacher
    outputs, or a failed write (disk full, read-only directory) — the message names the file."""


def _fault(point: str) -> None:
    """Test-only: SIGKILL this process if ``KDCACHE_FAULT`` names ``point`` (callers check ``_FAULT`` first)."""
    if point == _FAULT:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_error(path: Path, e: OSError) -> CacheWriteError:
    err = CacheWriteError(
        f"{path}: cannot write ({e.strerror or e}) — free space on that filesystem (or raise the "
        "file-size/quota limit) or choose a writable output directory; finished shards are kept, "
        "rerun to resume"
    )
    err.__cause__ = e
    return err


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


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def build_cache(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    out_dir: str | Path,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
) -> Manifest | None:
    """Score this rank's missing shards into ``out_dir``; rank 0 then writes the manifest.

    ``rank``/``world_size`` default to the initialized ``torch.distributed`` group (else 0/1). Under
    a process group every rank scores its shards, then all ranks meet in one collective (an
    all-reduce of a failure flag, which is also the barrier); rank 0 writes the manifest and
    returns it, other ranks return ``None``. If any rank failed, no rank writes a manifest: the
    failing rank re-raises its error, the others raise ``CacheWriteError``. Without a process group,
    rank 0 returns ``None`` while shards of other ranks are missing (rerun it once they finish).

    Raises ``CacheWriteError`` on mismatched inputs, foreign shards in ``out_dir``, non-finite
    teacher logits with ``on_nan: fail`` or a failed write (naming the file); a failed run leaves
    finished shards in place, no ``.tmp`` file and no new manifest.
    """
    group = _group_rank_world()
    rank = (group[0] if group else 0) if rank is None else rank
    world_size = (group[1] if group else 1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if group and group != (rank, world_size):
        raise ValueError(f"rank/world_size {rank}/{world_size} disagree with the process group's {group[0]}/{group[1]}")
    out = Path(out_dir)
    try:
        header = _manifest_header(teacher, tokens, cfg)
        layout = TargetLayout.from_dict(header["targets"])
        build_key = sha256_json(
            {k: v for k, v in header.items() if k != "tokenizer"}
            | {"teacher": teacher.info["sha256"], "tokenizer": header["tokenizer"]["fingerprint"]}
        )
        ranges = shard_ranges(len(tokens), cfg.rows_per_shard)
        todo = _plan(out, num_shards=len(ranges), build_key=build_key, rank=rank, world_size=world_size)
        if rank == 0:
            header["tokenizer"]["files"] = _save_tokenizer(out, teacher.tokenizer, header["tokenizer"]["fingerprint"])
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
            _any_rank_failed(True)  # let the other ranks through the collective, and stop them sealing
        raise
    if group and _any_rank_failed(False):
        raise CacheWriteError(
            f"{out}: another rank failed (see its error); no manifest written — fix the cause "
            "and rerun: finished shards are kept"
        )
    if rank != 0:
        return None
    manifest = _seal(out, header, build_key=build_key, num_shards=len(ranges), known=written)
    if manifest is None and group:
        raise CacheWriteError(
            f"{out}: every rank finished but shard files are missing here — out_dir must be on "
            "storage shared by all ranks (all nodes)"
        )
    return manifest


def _group_rank_world() -> tuple[int, int] | None:
    """(rank, world_size) of the initialized default process group, else ``None``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def _any_rank_failed(failed: bool) -> bool:
    """All-reduce (MAX) a failure flag over the process group: a barrier that also says if any rank failed."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(failed)], dtype=torch.int64, device=device)  # (1,)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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
        },
        "targets": layout.to_dict()
        | {"batch_size": cfg.batch_size, "rows_per_shard": cfg.rows_per_shard, "compute_dtype": teacher.info["dtype"]},
    }


def _plan(out: Path, *, num_shards: int, build_key: str, rank: int, world_size: int) -> list[int]:
    """This rank's shards still to score. Refuses shards of another cache; removes this rank's stale ``.tmp``."""
    _check_writable(out)
    existing = [p for p in sorted(out.glob("shard-*.parquet")) if SHARD_PATTERN.match(p.name)]
    for path in existing:
        if int(path.name[6:11]) >= num_shards:
            raise CacheWriteError(
                f"{path}: this cache has only {num_shards} shards — the file belongs to another "
                "cache; write to an empty out_dir (or delete the directory)"
            )
    for path in existing:
        read_shard_meta(path, build_key)  # footer only: cheap, and fails before hours of scoring
    mine = [i for i in range(num_shards) if i % world_size == rank]
    for i in mine:
        (out / f"{shard_name(i)}.tmp").unlink(missing_ok=True)
    todo = [i for i in mine if not (out / shard_name(i)).exists()]
    log.info(
        "cache %s: %d shards, rank %d/%d scores %d (%d already done)",
        out,
        num_shards,
        rank,
        world_size,
        len(todo),
        len(mine) - len(todo),
    )
    return todo


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


def _save_tokenizer(out: Path, tokenizer: Any, fingerprint: str) -> dict[str, str]:
    """Save the teacher's tokenizer to ``out/tokenizer/`` (replaced only if it changed); return file sha256s."""
    final, tmp = out / TOKENIZER_DIR, out / f"{TOKENIZER_DIR}.incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save_pretrained(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(tmp, e) from e
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    saved = tokenizer_fingerprint(load_tokenizer(tmp))
    if saved != fingerprint:
        shutil.rmtree(tmp)
        raise CacheWriteError(
            f"the teacher's tokenizer does not round-trip through save_pretrained "
            f"(fingerprint {saved[:12]}… != {fingerprint[:12]}…); the cache could not be self-contained"
        )
    current = {p.name: sha256_file(p) for p in sorted(final.iterdir()) if p.is_file()} if final.is_dir() else None
    if current == files:
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return files


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
    # GPUs want big kernels; CPUs are ~1.5x faster when a chunk's fp32 buffer fits in cache (measured, V=4096).
    chunk = chunk_tokens_for(layout.vocab_size, budget_bytes=(256 << 20) if teacher.device.type == "cuda" else 16 << 20)
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
    logits = teacher_logits(teacher, torch.from_numpy(ids))  # (B, T, V)
    t1 = time.perf_counter()
    sparse = sparsify(logits, layout=layout, seq_indices=torch.from_numpy(seqs), chunk_tokens=chunk)
    del logits
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


def read_shard_meta(path: Path, build_key: str) -> dict[str, Any]:
    """The statistics a shard carries in its Parquet metadata; refuse shards made with other settings."""
    _check_regular_file(path)
    try:
        meta = json.loads(pq.read_metadata(path).metadata[SHARD_META_KEY])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CacheWriteError(
            f"{path}: not a complete kdcache shard ({e}) — delete it and rerun to recompute it"
        ) from e
    if meta.get("build_key") != build_key:
        raise CacheWriteError(
            f"{path}: was written with another teacher, corpus or target settings — write to an "
            "empty out_dir (or delete this directory) instead of mixing caches"
        )
    return meta


def _check_regular_file(path: Path) -> None:
    """Refuse, before opening it, a shard that is a FIFO, device or directory, or a symlink out of its directory."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if not path.resolve().is_relative_to(path.parent.resolve()):
            raise CacheWriteError(
                f"{path}: symlink to {path.resolve()}, outside the cache directory — remove it (the "
                "cache stage writes its own shards; with DVC use `dvc config cache.type copy`)"
            )
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CacheWriteError(f"{path}: not a regular file — remove it and rerun")


def _seal(
    out: Path, header: dict[str, Any], *, build_key: str, num_shards: int, known: dict[int, dict[str, Any]]
) -> Manifest | None:
    """Write the manifest (atomically, last) if every shard exists; return it, else ``None``."""
    shards, metas, missing = [], [], []
    for i in range(num_shards):
        path = out / shard_name(i)
        if i in known:
            meta, size, digest = known[i]["meta"], known[i]["bytes"], known[i]["sha256"]
        elif path.exists():
            meta, size, digest = read_shard_meta(path, build_key), path.stat().st_size, sha256_file(path)
        else:
            missing.append(i)
            continue
        metas.append(meta)
        shards.append(
            ShardInfo(
                file=path.name,
                rows=meta["rows"],
                tokens=meta["tokens"],
                bytes=size,
                sha256=digest,
                first_seq=meta["first_seq"],
            )
        )
    if missing:
        log.info(
            "cache %s: %d shard(s) still missing (%s…); no manifest yet — rerun rank 0 when all ranks finish",
            out,
            len(missing),
            shard_name(missing[0]),
        )
        return None
    tokens = sum(s.tokens for s in shards)
    skipped = sorted(j for m in metas for j in m["skipped"])
    stats = {
        "num_rows": sum(s.rows for s in shards),
        "num_tokens": tokens,
        "mean_entropy": sum(m["entropy_sum"] for m in metas) / max(tokens, 1),
        "mean_topk_mass": sum(m["topk_mass_sum"] for m in metas) / max(tokens, 1),
        "total_bytes": sum(s.bytes for s in shards),
        "bytes_per_token": sum(s.bytes for s in shards) / max(tokens, 1),
        "num_skipped": len(skipped),
        "skipped_sequences": skipped,
    }
    manifest = Manifest(name=out.name, shards=shards, stats=stats, created_by=f"kdcache {__version__}", **header)
    text = manifest.to_json()
    path = out / MANIFEST_NAME
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # left by a kill mid-write
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    log.info(
        "cache %s sealed: %d rows, %d tokens, %.2f bytes/token, mean entropy %.3f nats, top-k mass %.4f",
        out,
        stats["num_rows"],
        tokens,
        stats["bytes_per_token"],
        stats["mean_entropy"],
        stats["mean_topk_mass"],
    )
    return Manifest.load(out)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` via ``path.tmp`` + fsync + rename, then fsync the directory.

    Raises ``CacheWriteError`` naming ``path`` if the write fails (no ``.tmp`` is left behind)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if _FAULT:
            _fault(f"before_replace:{path.name}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_STOP = object()


class ShardWriter:
    """One background thread that encodes batches and writes shards: ``.tmp`` -> fsync -> rename.

    ``write`` and ``finish`` queue work (at most ``max_pending`` items ahead) and re-raise an error
    from the thread. Leaving the ``with`` block normally drains the queue and re-raises a late error;
    leaving it with an exception stops the thread and deletes the unfinished ``.tmp`` file.
    ``written`` maps each finished shard to ``{"meta", "bytes", "sha256"}``.
    """

    def __init__(self, out: Path, layout: TargetLayout, *, max_pending: int = 2) -> None:
        self.out, self.layout = out, layout
        self.written: dict[int, dict[str, Any]] = {}
        self.busy_s = self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdcache-shard-writer", daemon=True)

    def __enter__(self) -> ShardWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._abort.set()
        self._put(_STOP, check=False)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def write(self, shard: int, rows: list[SequenceTargets]) -> None:
        self._put(("rows", shard, rows))

    def finish(self, shard: int, meta: dict[str, Any]) -> None:
        self._put(("finish", shard, meta))

    def _put(self, item: Any, *, check: bool = True) -> None:
        began = time.perf_counter()
        while True:
            if check and self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                return
            try:
                self._queue.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        self.wait_s += time.perf_counter() - began

    def _run(self) -> None:
        writer, tmp, rows, shard = None, None, 0, -1
        try:
            while (item := self._queue.get()) is not _STOP:
                if self._abort.is_set():
                    continue
                began = time.perf_counter()
                kind, shard, payload = item
                if writer is None:
                    tmp = self.out / f"{shard_name(shard)}.tmp"
                    writer, rows = self._open(tmp), 0
                if kind == "rows" and payload:
                    writer.write_table(encode_table(self.layout, payload))
                    if _FAULT and rows == 0:
                        _fault(f"during_shard:{shard}")
                    rows += len(payload)
                elif kind == "finish":
                    meta = payload | {"rows": rows, "tokens": rows * self.layout.seq_len}
                    writer, closing = None, writer
                    self._close(closing, tmp, shard, meta)
                    tmp = None
                self.busy_s += time.perf_counter() - began
        except OSError as e:  # disk full, quota, read-only: name the file
            self._error = _write_error(self.out / shard_name(shard), e)
        except BaseException as e:  # handed to the main thread, which re-raises it
            self._error = e
        finally:
            if tmp is not None:
                with contextlib.suppress(Exception):  # the first error is already recorded
                    if writer is not None:
                        writer.close()
                tmp.unlink(missing_ok=True)

    def _open(self, tmp: Path) -> pq.ParquetWriter:
        return pq.ParquetWriter(tmp, self.layout.schema(), **PARQUET_OPTIONS, write_statistics=["seq_index"])

    def _close(self, writer: pq.ParquetWriter, tmp: Path, shard: int, meta: dict[str, Any]) -> None:
        writer.add_key_value_metadata({SHARD_META_KEY: json.dumps(meta, sort_keys=True)})
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, self.out / shard_name(shard))
        _fsync_dir(self.out)
        self.written[shard] = {"meta": meta, "bytes": size, "sha256": digest}
        if _FAULT:
            _fault(f"after_shard:{shard}")
