"""Several caches read as one: open them, check that they cover the same token data, and serve aligned
batches whose targets ``kdcache.multi_teacher`` combines on the loader thread.

``MultiCacheReader`` offers what the trainer uses of a ``CacheReader`` (``len``, ``layout``, ``meta``,
``num_batches``, ``batches``, ``iter_sequences``, ``close``, a context manager), so one code path trains
from one cache or several.  The first cache leads: its manifest (teacher, tokenizer, corpus) is the one a
run records, its tokenizer checks the student's, and the vocabulary-mapping coverage is measured on it;
the others are listed in ``meta.targets["multi_teacher"]`` (so a resumed run refuses a changed set).

Alignment.  Batches come from every cache's own ``batches`` with the same arguments; the data order is a
pure function of (seed, epoch, the cache's shard sizes), so caches with the same sequences in the same
shards yield the same rows in the same order.  ``open_caches`` refuses caches that do not cover the same
token data (tokenizer and corpus fingerprints, split, seq_len, sequence count, vocabulary, temperature)
or that cut it into different shards (``cache.rows_per_shard``), naming the field and both values, and
every batch's ``seq_index`` and ``input_ids`` are compared before combining.  The combination is a
function of the cached values and the configured weights only, so every torchrun rank computes the same
targets as a single process would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kdcache.cache.format import Manifest, TargetLayout, missing_feature
from kdcache.cache.prefetch import pin_batch
from kdcache.cache.reader import CacheReader, open_cache
from kdcache.cache.shards import CacheError
from kdcache.config.base import ConfigError
from kdcache.multi_teacher import PICKS, SIGNAL_OF, combine_batches, normalized_weights

__all__ = ["MultiCacheReader", "cache_sources", "open_caches"]

SAME_DATA: tuple[tuple[str, Any], ...] = (
    ("tokenizer.fingerprint", lambda m: m.tokenizer.get("fingerprint")),
    ("corpus.fingerprint", lambda m: m.corpus.get("fingerprint")),
    ("corpus.split", lambda m: m.corpus.get("split")),
    ("corpus.seq_len", lambda m: m.corpus.get("seq_len")),
    ("corpus.num_sequences", lambda m: m.corpus.get("num_sequences")),
    ("targets.vocab_size", lambda m: m.targets.get("vocab_size")),
    ("targets.temperature", lambda m: m.targets.get("temperature")),
    ("sequences cached (stats.num_skipped: sequences dropped for NaN logits)", lambda m: m.num_rows),
)
"""What caches combined per token must share, and how to read it from a manifest."""
SAME_ROWS: tuple[tuple[str, Any], ...] = (
    ("corpus.num_sequences", lambda m: m.corpus.get("num_sequences")),
    ("targets.temperature", lambda m: m.targets.get("temperature")),
    ("sequences cached (stats.num_skipped: sequences dropped for NaN logits)", lambda m: m.num_rows),
)
"""What caches of teachers with different tokenizers over the same rows of text must share (``cross``)."""


def open_caches(
    paths: Sequence[str | Path],
    weights: Sequence[float],
    *,
    combine: str = "mixture",
    combine_temperature: float = 1.0,
    cross: bool = False,
    **open_kwargs: Any,
) -> MultiCacheReader:
    """Open every cache (``open_cache(path, **open_kwargs)``), check them (module docstring) and wrap them.

    ``weights``: one per cache, >= 0, normalized to sum to 1.  ``combine``: a ``kdcache.multi_teacher``
    combiner; ``combine_temperature``: T of ``nll_softmax``.  ``cross``: teachers of different tokenizers
    (``kdcache.crossmulti``): the batches are zipped, not combined (``MultiCacheReader``).
    """
    if len(paths) != len(weights):
        raise CacheError(f"train.caches: {len(paths)} caches but {len(weights)} weights; give one weight per cache")
    readers: list[CacheReader] = []
    try:
        for path in paths:
            readers.append(open_cache(path, **open_kwargs))
        return MultiCacheReader(readers, weights, combine=combine, combine_temperature=combine_temperature, cross=cross)
    except BaseException:
        for r in readers:
            r.close()
        raise


def cache_sources(paths: Sequence[str], weights: str | None) -> list[dict[str, Any]]:
    """``train.caches`` entries from the command line: cache paths and comma-separated weights ("0.7,0.3";
    none: equal weights).  One path without weights gives [] -- the single-cache path."""
    if weights is None:
        return [{"path": p, "weight": 1.0} for p in paths] if len(paths) > 1 else []
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError as e:
        raise ConfigError(f"--weights {weights}: must be comma-separated numbers, e.g. 0.7,0.3") from e
    if len(values) != len(paths):
        raise ConfigError(f"--weights {weights}: one weight per --cache ({len(paths)} caches, {len(values)} weights)")
    return [{"path": p, "weight": w} for p, w in zip(paths, values, strict=True)]


class MultiCacheReader:
    """Aligned batches of several caches, combined (``kdcache.multi_teacher.combine_batches``).

    ``cross``: caches of teachers with different tokenizers over the same rows of text (``kdcache.crossmulti``:
    the other teachers' token data re-tokenized from the lead's). Only the data order is checked here
    (row count, shard sizes, temperature); a batch is the lead's with every other cache's tensors added
    under ``teacher<k>/<key>`` (``CROSS_PREFIX``), for ``kdcache.crossmulti.CrossTeachersBatches`` to
    project and mix in the student's vocabulary (which checks the text row by row)."""

    def __init__(
        self,
        readers: Sequence[CacheReader],
        weights: Sequence[float],
        *,
        combine: str = "mixture",
        combine_temperature: float = 1.0,
        cross: bool = False,
    ) -> None:
        if len(readers) < 1:
            raise CacheError("train.caches: no cache given")
        try:
            self.weights = normalized_weights(weights)  # (M,)
        except ValueError as e:
            raise CacheError(f"train.caches: {e}") from e
        self.readers, self.combine, self.combine_temperature = list(readers), combine, combine_temperature
        self.cross = cross
        if cross and combine != "mixture":
            raise CacheError(
                f"train.combine={combine}: teachers of different tokenizers are mixed per student position; "
                "set train.combine: mixture"
            )
        lead = self.readers[0]
        for other in self.readers[1:]:
            _check_same_data(lead, other, checks=SAME_ROWS if cross else SAME_DATA)
        self.signal = SIGNAL_OF.get(combine)
        for r in self.readers:
            if self.signal is not None and self.signal.removeprefix("teacher_") not in r.layout.signals:
                raise CacheError(
                    missing_feature(r.meta, r.path, f"per-token teacher signal {self.signal!r} (targets.signals)")
                    + f", which train.combine={combine} reads; or set train.combine: mixture"
                )
        self.meta: Manifest = _combined_manifest(self.readers, self.weights.tolist(), combine, combine_temperature)
        self.layout: TargetLayout = self.meta.layout
        self.path = lead.path
        self.temperature = getattr(lead, "temperature", None)

    @property
    def manifest(self) -> dict[str, Any]:
        return dataclasses.asdict(self.meta)

    def __len__(self) -> int:
        return len(self.readers[0])

    def num_batches(self, batch_size: int, world_size: int = 1, *, drop_last: bool = True) -> int:
        return self.readers[0].num_batches(batch_size, world_size, drop_last=drop_last)

    def iter_sequences(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
        """The first cache's sequences (what a vocabulary mapping's coverage is measured on)."""
        return self.readers[0].iter_sequences(start, stop)

    def batches(
        self,
        batch_size: int,
        *,
        keys: Collection[str] | None = None,
        pin_memory: bool = False,
        **kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """``CacheReader.batches`` of every cache with the same arguments, zipped, checked row by row and
        combined.  ``keys`` as there (the combiner's signal is added)."""
        want = None if keys is None else {*keys, *([self.signal] if self.signal else [])}
        streams = [r.batches(batch_size, keys=want, **kwargs) for r in self.readers]
        return self._combined(streams, pin_memory=pin_memory)

    def _combined(self, streams: list[Iterator], *, pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
        try:
            for parts in zip(*streams, strict=True):
                self._check_rows(parts)
                if self.cross:
                    out = zip_parts(parts)
                    yield pin_batch(out) if pin_memory else out
                    continue
                out = combine_batches(
                    parts,
                    self.weights,
                    combine=self.combine,
                    vocab_size=self.layout.vocab_size,
                    temperature=self.combine_temperature,
                )
                yield pin_batch(out) if pin_memory else out
        finally:
            for s in streams:
                close = getattr(s, "close", None)
                if close is not None:
                    close()

    def _check_rows(self, parts: Sequence[dict[str, torch.Tensor]]) -> None:
        lead = parts[0]
        for r, part in zip(self.readers[1:], parts[1:], strict=True):
            for key in ("seq_index",) if self.cross else ("seq_index", "input_ids"):  # cross: other ids, same text
                if not torch.equal(part[key], lead[key]):
                    raise CacheError(
                        f"{r.path}: its batch holds other sequences ({key}) than {self.readers[0].path}'s at the same "
                        "step: the caches are not aligned; rebuild both from the same prepared tokens"
                    )

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> MultiCacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CROSS_PREFIX = "teacher{}/"
"""Key prefix of cache k's tensors (k >= 1) in a ``cross`` batch."""


def zip_parts(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of M caches' batches: the first as is, cache k's keys under ``CROSS_PREFIX.format(k)``."""
    out = dict(parts[0])
    for k, part in enumerate(parts[1:], 1):
        out |= {CROSS_PREFIX.format(k) + key: value for key, value in part.items()}
    return out


def unzip_parts(batch: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """The M batches ``zip_parts`` packed (the keys of the first: those without a ``CROSS_PREFIX``)."""
    prefixes = [CROSS_PREFIX.format(k) for k in range(1, count)]
    lead = {k: v for k, v in batch.items() if not k.startswith("teacher") or "/" not in k}
    return [lead] + [{k[len(p) :]: v for k, v in batch.items() if k.startswith(p)} for p in prefixes]


def _check_same_data(lead: CacheReader, other: CacheReader, *, checks: tuple = SAME_DATA) -> None:
    for what, read in checks:
        a, b = read(lead.meta), read(other.meta)
        if a != b:
            why = (
                "; teachers with different tokenizers combine only through train.cross_tokenizer, over the same "
                "rows of text: make the other teacher's tokens from the lead's with kdcache.retokenize.retokenize_split"
                if what == "tokenizer.fingerprint"
                else ""
            )
            raise CacheError(
                f"train.caches: {other.path} does not cover the same token data as {lead.path}: {what} differs "
                f"({b!r} vs {a!r}); cache every teacher over the same prepared tokens (same tokenizer, corpus and "
                f"split) to combine them{why}"
            )
    a, b = [s.rows for s in lead.meta.shards], [s.rows for s in other.meta.shards]
    if a != b:
        raise CacheError(
            f"train.caches: {other.path} cuts the sequences into other shards than {lead.path} (rows per shard "
            f"{sorted(set(b))} vs {sorted(set(a))}), so their data orders differ; rebuild it with "
            f"cache.rows_per_shard: {a[0]}"
        )


def _combined_manifest(readers: Sequence[CacheReader], weights: list[float], combine: str, temp: float) -> Manifest:
    """The lead cache's manifest with the targets the combination yields and the list of teachers."""
    layouts = [r.layout for r in readers]
    topk, sampled = all(x.has_topk for x in layouts), all(x.has_samples for x in layouts)
    if not (topk or sampled):
        kinds = ", ".join(f"{r.path}: {x.kind}" for r, x in zip(readers, layouts, strict=True))
        raise CacheError(f"train.caches: no target kind is common to all caches ({kinds}); cache them with one kind")
    lead = readers[0].meta
    targets = dict(lead.targets)
    targets["kind"] = "both" if topk and sampled else "topk" if topk else "sampled"
    if topk:
        ks = [x.top_k for x in layouts]
        targets["top_k"] = max(ks) if combine in PICKS else min(sum(ks), layouts[0].vocab_size)
        targets["renormalized"] = any(r.meta.targets.get("renormalized") for r in readers)
    if sampled:
        targets["samples"] = max(x.samples for x in layouts) if combine in PICKS else sum(x.samples for x in layouts)
    temps = [t for t in layouts[0].temperatures if all(t in x.temperatures for x in layouts)]
    targets["temperatures"] = temps if combine in PICKS else []  # a mixture's other-tau normalizer is unknown
    common = [s for s in layouts[0].signals if all(s in x.signals for x in layouts)]
    targets["signals"] = common if combine in PICKS else [s for s in common if s == "nll"]
    targets["multi_teacher"] = {
        "combine": combine,
        "combine_temperature": temp,
        "caches": [
            {"path": str(r.path), "name": r.meta.name, "teacher_sha256": r.meta.teacher.get("sha256"), "weight": w}
            for r, w in zip(readers, weights, strict=True)
        ],
    }
    return dataclasses.replace(lead, targets=targets)
