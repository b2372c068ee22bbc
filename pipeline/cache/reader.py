"""Stage two's loader: validate a cache on open, stage and memory-map its shards, serve batches.

``open_cache`` checks the manifest and every shard file (names, links, sizes; sha256 with
``verify="full"``) before anything is read; shards are staged and mapped by ``staging``
(staging dir: see there) and the next ones are staged in a background thread while batches are
served. Batches can be assembled off the training thread by DataLoader worker processes
(``batches(..., workers=n)``) or by ``kdcache.cache.prefetch.Prefetcher`` (a thread).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from threading import Lock
from typing import Any, Literal

import numpy as np
import torch

from kdcache.cache.format import CacheFormatError, Manifest, TargetLayout
from kdcache.cache.gather import assemble
from kdcache.cache.hidden_format import load_projection
from kdcache.cache.mapped import MappedShard
from kdcache.cache.prefetch import pin_batch
from kdcache.cache.rows import unpack_row
from kdcache.cache.shards import CacheError, check_shard_file, sha_error
from kdcache.cache.staging import clean_stale, default_max_bytes, default_staging_dir, load_shard
from kdcache.fingerprint import sha256_file

__all__ = ["CacheError", "CacheReader", "open_cache"]
log = logging.getLogger(__name__)

MAX_MAPPED = 16
"""Mapped shards kept open (LRU) beyond the current shuffle window and prefetch; remapping is cheap."""


def open_cache(
    path: str | Path,
    *,
    staging_dir: str | Path | None = None,
    verify: Literal["size", "full"] = "size",
    expect_tokenizer: str | None = None,
    prefetch: int = 2,
    staging_max_bytes: int | None = None,
    temperature: float | None = None,
) -> CacheReader:
    """Validate a cache (manifest, shard names, files, sizes; sha256 too with ``verify="full"``) and open it.

    ``staging_dir``: where staged copies go (default: node-local scratch, see ``kdcache.cache.staging``).
    ``expect_tokenizer``: the student's tokenizer fingerprint; a different one is refused.
    ``prefetch``: shards staged ahead in a background thread while batches are served.
    ``staging_max_bytes``: bound on the staging dir (LRU eviction; default ``$KDCACHE_STAGING_MAX_GB``).
    ``temperature``: the training temperature tau; batches then carry ``topk_log_z`` at tau when the cache
    stores it (``targets.temperatures``; see ``CacheReader.log_z_index``).
    """
    return CacheReader(
        path,
        staging_dir=staging_dir,
        verify=verify,
        expect_tokenizer=expect_tokenizer,
        prefetch=prefetch,
        staging_max_bytes=staging_max_bytes,
        temperature=temperature,
    )


class CacheReader:
    """Memory-mapped access to a cache: ``len``, ``reader[i]``, ``batches(...)``. Pickles by path."""

    def __init__(
        self,
        path: str | Path,
        *,
        staging_dir: str | Path | None = None,
        verify: Literal["size", "full"] = "size",
        expect_tokenizer: str | None = None,
        prefetch: int = 2,
        staging_max_bytes: int | None = None,
        temperature: float | None = None,
    ) -> None:
        if verify not in ("size", "full"):
            raise ValueError(f"verify must be 'size' or 'full', got {verify!r}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.path = Path(path)
        self.staging_max_bytes = default_max_bytes() if staging_max_bytes is None else staging_max_bytes
        self._args = {
            "staging_dir": staging_dir,
            "expect_tokenizer": expect_tokenizer,
            "prefetch": prefetch,
            "staging_max_bytes": self.staging_max_bytes,
            "temperature": temperature,
        }
        self.temperature = temperature
        try:
            self.meta = Manifest.load(self.path)
        except CacheFormatError as e:
            raise CacheError(str(e)) from e
        self.layout: TargetLayout = self.meta.layout
        if not self.meta.shards or self.meta.num_rows == 0:
            raise CacheError(f"{self.path / 'manifest.json'}: the cache holds no sequences; rerun the cache stage")
        self._check_tokenizer(expect_tokenizer)
        self.projection: np.ndarray | None = None  # hidden-state targets' (H, dim) projection, when stored
        if self.layout.hidden:  # a projection that is not the one the targets were made with is refused
            try:
                self.projection = load_projection(self.path, self.layout.hidden)  # (H, dim) float32
            except CacheFormatError as e:
                raise CacheError(str(e)) from e
        self._files = [check_shard_file(self.path, s) for s in self.meta.shards]
        if verify == "full":
            for f, s in zip(self._files, self.meta.shards, strict=True):
                if (digest := sha256_file(f)) != s.sha256:
                    raise sha_error(f, digest, s.sha256)
        self.staging_dir = Path(staging_dir) if staging_dir is not None else default_staging_dir()
        clean_stale(self.staging_dir)
        self.prefetch = prefetch
        self._offsets = np.cumsum([0] + [s.rows for s in self.meta.shards], dtype=np.int64)  # (S+1,)
        self._mapped: OrderedDict[int, MappedShard] = OrderedDict()
        self._futures: dict[int, Future[MappedShard]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = Lock()
        self._capacity = MAX_MAPPED

    def _check_tokenizer(self, expect: str | None) -> None:
        """``expect`` is the student's tokenizer fingerprint. (Whether the cache's own ``tokenizer/`` matches
        its manifest is a different question: ``kdcache.train_data.load_cache_tokenizer`` asks it.)"""
        have = self.meta.tokenizer.get("fingerprint")
        if expect is not None and expect != have:
            raise CacheError(
                f"{self.path / 'manifest.json'}: the student's tokenizer (fingerprint {expect}) differs from the "
                f"cache's (manifest tokenizer.fingerprint {have}); train with the cache's tokenizer "
                f"({self.path / 'tokenizer'}/) or set train.vocab_map: exact"
            )

    def log_z_index(self, temperature: float | None) -> int | None:
        """Index into ``targets.temperatures`` of ``temperature`` (None: not stored, or no top-k targets)."""
        temps = self.layout.temperatures
        return temps.index(temperature) if temperature is not None and temperature in temps else None

    # -- pickling: by path, so DataLoader workers reopen cheaply (staged files are reused)
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), **self._args, "staging_dir": str(self.staging_dir)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("path"), verify="size", **state)  # type: ignore[misc]

    @property
    def manifest(self) -> dict[str, Any]:
        return asdict(self.meta)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sequence at position ``i`` (storage order), decoded like ``rows.decode_row``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n}")
        i %= n
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        row = self._shard(s).row(i - int(self._offsets[s]))
        return unpack_row(self.layout, row.pop("seq_index"), row.pop("input_ids"), row).as_dict()  # new arrays

    def iter_sequences(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
        """``reader[i]`` for i in [start, stop), staging the next shards ahead."""
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop):
            if i == start or i in self._offsets:  # entering a shard: stage the next ones
                self._prefetch_from(int(np.searchsorted(self._offsets, i, side="right")), list(range(len(self._files))))
            yield self[i]

    # -- epoch order and batches
    def num_batches(self, batch_size: int, world_size: int = 1, *, drop_last: bool = True) -> int:
        """Global batches (``batch_size * world_size`` sequences each) in one epoch."""
        global_batch = batch_size * world_size
        return len(self) // global_batch if drop_last else -(-len(self) // global_batch)

    def epoch_order(self, seed: int, epoch: int, *, window: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """(sequence positions (N,), shard order (S,)) of an epoch: a pure function of (seed, epoch, window).

        The shard order is permuted, cut into windows of ``window`` consecutive shards, and the rows
        of each window are permuted together. A full permutation would touch every shard from the
        first batch on (all must be staged before training starts); shard-local shuffling
        (``window=1``) fills each batch from one shard, i.e. one neighbourhood of the corpus. A
        window of a few shards mixes neighbourhoods while keeping only window + prefetch shards
        live; ``window >= num shards`` is a full shuffle.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        rng = np.random.default_rng([seed, epoch])
        shards = rng.permutation(len(self._files))
        parts = []
        for w in range(0, len(shards), window):
            rows = np.concatenate([np.arange(self._offsets[s], self._offsets[s + 1]) for s in shards[w : w + window]])
            parts.append(rows[rng.permutation(len(rows))])
        return np.concatenate(parts), shards

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
        window: int = 4,
        keys: Collection[str] | None = None,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of each global batch of an epoch, from global batch ``start_batch`` on.

        Global batch g is ``batch_size * world_size`` consecutive sequences of ``epoch_order`` (storage
        order when ``shuffle=False``); rank r takes the r-th of ``world_size`` contiguous slices, so
        2 ranks x b see exactly the data of 1 rank x 2b, and ``start_batch`` resumes mid-epoch
        without decoding what came before. Each sequence is used at most once per epoch. With
        ``drop_last`` the final ``N mod (batch_size * world_size)`` sequences of the order are
        dropped (different ones each epoch); without it the final partial global batch is split
        into near-equal contiguous slices (``np.array_split``) and every rank yields its slice,
        possibly empty, so all ranks take the same number of steps.

        Yields CPU tensors: ``input_ids`` (B, T) int64, ``seq_index`` (B,) int64; with top-k
        ``topk_ids`` (B, T, k) int64, ``topk_logprobs`` (B, T, k) float32, ``topk_log_tail`` (B, T)
        float32 (the stored log tail mass, -inf when k = V) and ``topk_mask`` (B, T, k) bool; with
        samples ``sample_ids`` (B, T, S) int64, ``sample_counts`` (B, T, S) float32, S = the
        batch's most unique draws at a position, and ``sample_total`` (B, T) float32, the draws made.
        Padded entries (adaptive top-k, fewer unique draws) hold id 0, log-prob -inf and count 0, as
        ``reader[i]`` does. v2 caches add ``topk_log_z`` (B, T) float32 at the reader's ``temperature`` (when
        stored), ``teacher_nll`` / ``teacher_entropy`` (B, T) float32 (NaN: no next token in the row) and
        ``byte_lengths`` (B, T) int32, each where the cache holds it, and ``hidden_<L>`` (B, T, dim) float32 (codes x
        scale) for each stored teacher layer L (``layout.hidden``). ``keys`` limits which target
        tensors are decoded (e.g. ``kdcache.losses.TARGET_KEYS[kind]``; ``input_ids`` and
        ``seq_index`` always come); None decodes every kind the cache holds.

        ``workers`` > 0 assembles batches in that many DataLoader worker processes (same batches, same
        order); ``pin_memory`` returns them in pinned memory (CUDA hosts), so ``.to(device,
        non_blocking=True)`` overlaps the copy with compute.
        """
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        total = self.num_batches(batch_size, world_size, drop_last=drop_last)
        if not 0 <= start_batch <= total:
            raise ValueError(
                f"start_batch {start_batch} outside [0, {total}] for batch_size {batch_size} x "
                f"{world_size} rank(s) over {len(self)} sequences"
            )
        if shuffle:
            order, shard_seq = self.epoch_order(seed, epoch, window=window)
        else:
            order, shard_seq = np.arange(len(self)), np.arange(len(self._files))
        self._capacity = max(MAX_MAPPED, window + self.prefetch + 1)
        plan = _EpochPlan(self, order, shard_seq, batch_size=batch_size, rank=rank, world_size=world_size, keys=keys)
        steps = range(start_batch, total)
        if workers == 0:
            batches = (plan[g] for g in steps)
            return (pin_batch(b) for b in batches) if pin_memory else batches  # arguments checked above
        from torch.utils.data import DataLoader, Subset

        return iter(
            DataLoader(Subset(plan, steps), batch_size=None, num_workers=workers, pin_memory=pin_memory)
        )  # workers reopen nothing: forked, they keep the mapped reader (``_after_fork``)

    def _assemble(self, idx: np.ndarray, want: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
        """Gather and decode sequences ``idx`` (global positions) from their mapped shards (``gather.assemble``)."""
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1  # (B,)
        parts = [
            (self._shard(int(s)), sel, idx[sel] - self._offsets[s])
            for s in np.unique(shard_of)
            for sel in [np.flatnonzero(shard_of == s)]
        ]
        out = assemble(parts, self.layout, want, log_z=self.log_z_index(self.temperature), where=str(self.path))
        return {k: torch.from_numpy(v) for k, v in out.items()}

    # -- staging, mapping, prefetch
    def _after_fork(self) -> None:
        if self._pid != os.getpid():  # forked (e.g. a DataLoader worker): the parent's thread and lock are gone
            self._pool, self._futures, self._lock, self._pid = None, {}, Lock(), os.getpid()

    def _executor(self) -> ThreadPoolExecutor:
        self._after_fork()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-stage")
        return self._pool

    def _prefetch_from(self, pos: int, shard_seq: list[int]) -> None:
        if self.prefetch == 0:
            return
        pool = self._executor()
        with self._lock:
            for s in shard_seq[pos : pos + self.prefetch]:
                s = int(s)
                if s not in self._mapped and s not in self._futures:
                    self._futures[s] = pool.submit(self._load, s)

    def _shard(self, s: int) -> MappedShard:
        self._after_fork()
        with self._lock:
            if (shard := self._mapped.get(s)) is not None:
                self._mapped.move_to_end(s)
                return shard
            future = self._futures.pop(s, None)
        shard = future.result() if future is not None else self._load(s)
        with self._lock:
            self._mapped[s] = shard
            while len(self._mapped) > self._capacity:
                self._mapped.popitem(last=False)  # drops the mapping once no batch refers to it
        return shard

    def _load(self, s: int) -> MappedShard:
        return load_shard(
            self._files[s], self.meta.shards[s], self.layout, self.staging_dir, max_bytes=self.staging_max_bytes
        )

    def close(self) -> None:
        """Stop prefetching and drop mappings (arrays already handed out stay valid)."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._futures = None, {}
        self._mapped.clear()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EpochPlan:
    """One epoch's global batches as a map-style dataset: ``plan[g]`` is this rank's share of global batch g
    (assembled in the calling process, which stages ahead what the global batch reaches)."""

    def __init__(
        self,
        reader: CacheReader,
        order: np.ndarray,
        shard_seq: np.ndarray,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        keys: Collection[str] | None,
    ) -> None:
        self.reader, self.order, self.shard_seq = reader, order, [int(s) for s in shard_seq]
        self.rank, self.world_size, self.global_batch = rank, world_size, batch_size * world_size
        self.want = None if keys is None else frozenset(keys)
        self.rank_of = np.empty(len(shard_seq), np.int64)
        self.rank_of[shard_seq] = np.arange(len(shard_seq))  # position of each shard in the epoch's shard order

    def __len__(self) -> int:
        return len(self.order) // self.global_batch

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        reader = self.reader
        rows = self.order[g * self.global_batch : (g + 1) * self.global_batch]
        reached = self.rank_of[np.searchsorted(reader._offsets, rows, side="right") - 1].max()
        reader._prefetch_from(int(reached) + 1, self.shard_seq)  # every rank stages what the global batch needs
        return reader._assemble(np.array_split(rows, self.world_size)[self.rank], self.want)
