"""What the student trainer reads: the cache (opened and checked against the student's tokenizer),
the loss its targets can feed, and the stream of batches (data order a pure function of the seed and
the epoch; padding masked and vocabularies mapped on the loader thread).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from kdcache.cache.format import MANIFEST_NAME, TOKENIZER_DIR, missing_feature
from kdcache.cache.prefetch import pin_batch
from kdcache.cache.reader import CacheReader, open_cache
from kdcache.config.base import ConfigError
from kdcache.config.token_filter import TokenFilterConfig
from kdcache.config.train import TrainConfig
from kdcache.crosstok import CrossTokenizerBatches
from kdcache.crosstrain import (
    check_cross_temperature,
    cross_teachers_batches,
    cross_tokenizer_batches,
    load_student_tokenizer_dir,
    log_cross_report,
)
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.losses import (
    REQUIRED_KEYS,
    TAIL_KINDS,
    TARGET_KEYS,
    KDLossSpec,
    default_loss,
)
from kdcache.multi_cache import open_caches
from kdcache.packing import target_mask
from kdcache.student import (
    VocabMap,
    build_vocab_map,
    load_student_tokenizer,
    mapping_coverage,
)
from kdcache.token_filter import apply_token_filter, signal_key
from kdcache.tokenizer import tokenizer_vocab_size

log = logging.getLogger(__name__)


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


def open_inputs(
    cfg: TrainConfig, cache_dir: str | Path
) -> tuple[CacheReader, Any, VocabMap | CrossTokenizerBatches | None, dict | None]:
    """Open the cache; the student's tokenizer; a vocabulary mapping (and its coverage) if they differ
    (``train.cross_tokenizer``: the transform that re-tokenizes each row, and what it keeps)."""
    if cfg.caches:  # several teachers (kdcache.multi_cache): the first cache leads (tokenizer, data order)
        cache_dir = cfg.caches[0].path
    cache_tok = load_cache_tokenizer(cache_dir)
    if cfg.cross_tokenizer != "none":
        return open_cross_tokenizer(cfg, cache_dir, cache_tok)
    student_tok = load_student_tokenizer(cfg.student, cache_tokenizer=cache_tok, vocab_map=cfg.vocab_map)
    if cfg.caches:
        paths, weights = [c.path for c in cfg.caches], [c.weight for c in cfg.caches]
        reader = open_caches(
            paths,
            weights,
            combine=cfg.combine,
            combine_temperature=cfg.combine_temperature,
            temperature=cfg.temperature,
        )
    else:
        reader = open_cache(cache_dir, temperature=cfg.temperature)
    check_cache_tokenizer(reader, cache_tok, cache_dir=cache_dir)
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


def open_cross_tokenizer(
    cfg: TrainConfig, cache_dir: str | Path, cache_tok: Any
) -> tuple[CacheReader, Any, CrossTokenizerBatches, dict]:
    """``train.cross_tokenizer``: the student's own tokenizer re-tokenizes each row (``kdcache.crosstok``);
    several ``train.caches``: teachers of any tokenizers over the same rows of text (``kdcache.crossmulti``)."""
    if cfg.feature_weight > 0:
        raise ConfigError(
            "train.cross_tokenizer: feature distillation reads the teacher's positions, which the student's "
            "do not match; set train.feature_weight: 0"
        )
    student_tok = load_student_tokenizer_dir(cfg.student_tokenizer or cfg.student.path)
    if len(cfg.caches) > 1:
        paths = [c.path for c in cfg.caches]
        caches = open_caches(
            paths, [c.weight for c in cfg.caches], combine=cfg.combine, cross=True, temperature=cfg.temperature
        )
        toks = [load_cache_tokenizer(p) for p in paths]
        for r, tok, p in zip(caches.readers, toks, paths, strict=True):
            check_cache_tokenizer(r, tok, cache_dir=p)
        tau = caches.layout.temperature
        check_cross_temperature(cfg.cross_tokenizer, loss=cfg.loss, temperature=cfg.temperature, cache_temperature=tau)
        crossing, report = cross_teachers_batches(caches, toks, student_tok, method=cfg.cross_tokenizer)
        log_cross_report(report, teacher_tokenizer=toks[0], student_tokenizer=student_tok)
        return caches, student_tok, crossing, report
    reader = open_cache(cache_dir, temperature=cfg.temperature)
    check_cache_tokenizer(reader, cache_tok, cache_dir=cache_dir)
    tau = reader.layout.temperature
    check_cross_temperature(cfg.cross_tokenizer, loss=cfg.loss, temperature=cfg.temperature, cache_temperature=tau)
    cross, report = cross_tokenizer_batches(reader, cache_tok, student_tok, method=cfg.cross_tokenizer)
    log_cross_report(report, teacher_tokenizer=cache_tok, student_tokenizer=student_tok)
    return reader, student_tok, cross, report


def check_cache_tokenizer(reader: CacheReader, cache_tok: Any, *, cache_dir: str | Path) -> None:
    """The cache's own ``tokenizer/`` must be the one its manifest records (a cache-internal check, not
    about the student): a mismatch means a damaged or hand-edited cache."""
    have, recorded = tokenizer_fingerprint(cache_tok), reader.meta.tokenizer.get("fingerprint")
    if have != recorded:
        raise TrainError(
            f"{Path(cache_dir) / TOKENIZER_DIR}/: the cache's own tokenizer files load to fingerprint {have}, but "
            f"{Path(cache_dir) / MANIFEST_NAME} records tokenizer.fingerprint {recorded} — the cache is damaged or "
            f"was edited by hand; run `kdcache verify {cache_dir}` and pull (or rebuild) the cache again"
        )


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
    check_cache_features(cfg, reader, kind=kind, cache_dir=cache_dir)
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


def check_cache_features(cfg: TrainConfig, reader: CacheReader, *, kind: str, cache_dir: str | Path) -> None:
    """Refuse settings the cache cannot serve: a tail loss at a temperature whose log-normalizer it does not
    store (``targets.temperatures``), a token filter on a cache without teacher signals (``targets.signals``)."""
    layout = reader.layout
    tau = cfg.temperature
    if kind in TAIL_KINDS and layout.has_topk and tau != layout.temperature and tau not in layout.temperatures:
        stored = ", ".join(f"{t:g}" for t in (layout.temperature, *layout.temperatures))
        raise ConfigError(
            f"train.temperature={tau:g} with train.loss={kind}: {Path(cache_dir) / MANIFEST_NAME} "
            f"stores the teacher's log-normalizer only at temperature(s) {stored} (cache.temperature, "
            "cache.temperatures), and re-tempering top-k + tail is exact only there; train at one of them, "
            f"use train.loss: topk_renorm (any temperature), or rebuild the cache with cache.temperatures: [{tau:g}]"
        )
    by = cfg.token_filter.by
    if by != "none" and by not in layout.signals and kind != "ce":  # ce: no KD term to filter
        raise ConfigError(f"train.token_filter.by={by}: " + missing_feature(reader.meta, cache_dir, f"teacher_{by}"))


def batch_keys(cfg: TrainConfig, spec: KDLossSpec) -> tuple[str, ...]:
    """Batch keys the trainer needs from the reader: the loss's targets and the token filter's signal."""
    key = signal_key(cfg.token_filter) if spec.kind != "ce" else None
    return (*TARGET_KEYS[spec.kind], *([key] if key else []))


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


PREFETCH_BATCHES = 4
"""Batches the loader thread assembles ahead of the trainer."""


def prepare_batch(
    item: tuple[tuple[int, int], dict[str, torch.Tensor]],
    *,
    vmap: VocabMap | CrossTokenizerBatches | None,
    pin: bool,
    packing: dict[str, Any] | None = None,
    token_filter: TokenFilterConfig | None = None,
) -> tuple[tuple[int, int], dict[str, torch.Tensor]]:
    """On the loader thread: mask document padding (``documents`` packing: a position whose next token is
    padding is neither a KD nor a CE target), keep KD only where ``token_filter`` says (``kdcache.token_filter``),
    map the batch to the student's vocabulary, pin it for CUDA."""
    position, batch = item
    if packing is not None and packing.get("mode") == "documents":
        real = torch.nn.functional.pad(target_mask(batch["input_ids"], packing), (0, 1), value=False)  # (B, T)
        batch = {**batch, "loss_mask": real, "ce_mask": real}
    if token_filter is not None:
        batch = apply_token_filter(batch, token_filter)  # narrows loss_mask only: CE keeps every position
    if vmap is not None:
        batch = vmap.apply(batch)
    return position, pin_batch(batch) if pin else batch
