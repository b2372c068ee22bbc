"""``import_cache``: turn an Axolotl or NeMo-Aligner KD dataset into a verified kdcache cache.

Two passes over the source: the first checks every row and learns the shape (rows, longest row,
largest k) and the corpus fingerprint; the second writes shards through the cache writer
(``ShardWriter`` -> ``seal``: tmp -> fsync -> rename, manifest last), then ``verify_cache`` runs.

What the manifest says about an imported cache (beyond the usual sections):

- ``teacher``: ``identity: "unknown"``, ``sha256: "unknown"`` -- neither format names its teacher.
- ``targets.renormalized``: true when the source has no tail (Axolotl): the stored top-k log-probs
  sum to 1 over the kept ids and the tail is unknown (stored empty). Losses on the coarse
  partition K + tail (``kdcache.losses.TAIL_KINDS``: topk_tail, reverse_kl, jsd, skew_kl, tv)
  would read that as "no mass outside K" and must be refused; ``topk_renorm`` and ``hard`` are right.
  NeMo rows carry ``log_sum_exp_logits``, so their tails are reconstructed and this is false.
- ``targets.source``: the tool, the files with their sha256, how positions without a teacher
  target were filled (``placeholder_positions``: one entry, the next token, log-prob 0 -- a single
  entry carries no KD signal under ``topk_renorm``), and whether seq_index renumbers the source.
- ``corpus.packing``: ``documents`` with the pad id: rows shorter than ``seq_len`` are right-padded,
  and ``kdcache.packing.token_mask`` recovers which positions are real.
- Variable lengths (rows, or k per position) make the layout adaptive; its ``mass`` is then
  nominal (``NOMINAL_MASS``): the lengths are the source's, not a mass threshold.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.cache.format import MANIFEST_NAME, MAX_TOP_K, SequenceTargets, TargetLayout
from kdcache.cache.signals import byte_spans
from kdcache.cache.writer import CACHE_KIND, CacheWriteError, ShardWriter, build_key_of, is_cache_dir, save_tokenizer
from kdcache.cache.writer import seal as seal_cache
from kdcache.fingerprint import sha256_file, tokenizer_fingerprint
from kdcache.interop.sources import SOURCES, SourceError, SourceRow, read_rows, source_files
from kdcache.outputs import hold_output_dir
from kdcache.packing import pad_id_for
from kdcache.tokenizer import load_tokenizer, tokenizer_vocab_size

log = logging.getLogger(__name__)
NOMINAL_MASS = 0.999999
"""``targets.mass`` of an imported cache whose per-position lengths vary (see the module docstring)."""
BATCH_ROWS = 64


@dataclass
class SourceShape:
    """What the first pass learns about a source."""

    rows: int = 0
    max_len: int = 0
    max_k: int = 0
    ragged: bool = False  # some position keeps fewer than max_k entries, or rows differ in length
    renumbered: bool = False  # the source's own indices are not 0..N-1 in order
    tokens: int = 0  # source tokens (before padding)
    empty: int = 0  # source positions without any kept entry
    min_len: int = 1 << 62
    digest: Any = field(default_factory=hashlib.sha256)


def import_cache(
    source: str | Path,
    *,
    fmt: str,
    out: str | Path,
    tokenizer: str | Path,
    seq_len: int | None = None,
    temperature: float = 1.0,
    split: str = "train",
    rows_per_shard: int = 512,
    overwrite: bool = False,
) -> Path:
    """Import ``source`` (``fmt``: one of ``SOURCES``) as a kdcache cache in ``out``; returns ``out``.

    ``tokenizer``: the directory of the tokenizer the source's ids come from (saved into the cache and
    fingerprinted). ``seq_len``: the cache's row length (default: the longest source row; shorter
    rows are right-padded, longer ones refused). ``temperature``: the temperature the source's
    log-probs were made at (recorded; neither format stores it). The result passes ``kdcache verify``.
    """
    if fmt not in SOURCES:
        raise SourceError(f"import --from must be one of {'|'.join(SOURCES)}, got {fmt!r}")
    tok = load_tokenizer(tokenizer)
    vocab, pad_id = tokenizer_vocab_size(tok), pad_id_for(tok)
    shape = scan_source(source, fmt, vocab_size=vocab)
    T = shape.max_len if seq_len is None else seq_len
    if shape.max_len > T or T < 2:
        raise SourceError(
            f"{source}: --seq-len {T} is shorter than its longest row ({shape.max_len}); omit it or raise it"
        )
    spans, table = byte_spans(tok)  # byte_lengths when the tokenizer spells text; no teacher signals to import
    layout = TargetLayout(
        kind="topk",
        vocab_size=vocab,
        seq_len=T,
        top_k=shape.max_k,
        mass=NOMINAL_MASS if shape.ragged or shape.min_len < T else 0.0,
        temperature=temperature,
        max_token_bytes=spans["max_token_bytes"] if spans else 0,
    )
    header = _header(source, fmt, tok, layout, shape, pad_id=pad_id, rows_per_shard=rows_per_shard, split=split)
    header["tokenizer"] |= {"bytes": spans} if spans else {}
    out = Path(out)
    inputs = {"source": source, "tokenizer": tokenizer}
    with hold_output_dir(
        out, kind=CACHE_KIND, inputs=inputs, overwrite=overwrite, legacy=is_cache_dir, check=_refuse_existing
    ):
        header["tokenizer"]["files"] = save_tokenizer(out, tok, header["tokenizer"]["fingerprint"])
        written = _write_shards(
            source, fmt, out, layout, header, pad_id=pad_id, rows_per_shard=rows_per_shard, spans=table
        )
        manifest = seal_cache(out, header, build_key=build_key_of(header), num_shards=len(written), known=written)
    from kdcache.cache.verify import verify_cache

    if manifest is None or (problems := verify_cache(out)):
        raise CacheWriteError(f"{out}: the imported cache does not verify: {problems if manifest else 'not sealed'}")
    log.info("imported %s (%s): %d rows of %d tokens, top-%d, into %s", source, fmt, shape.rows, T, layout.top_k, out)
    return out


def scan_source(source: str | Path, fmt: str, *, vocab_size: int) -> SourceShape:
    """First pass: check every row (ids in range, aligned targets) and learn the source's shape."""
    shape = SourceShape()
    for row in read_rows(source, fmt):
        counts = [len(i) for i in row.ids]
        if row.input_ids.size < 1 or max(counts, default=0) > MAX_TOP_K:
            raise SourceError(f"{row.where}: empty row, or more than {MAX_TOP_K} entries at a position")
        _check_ids(row, vocab_size)
        shape.ragged |= bool(shape.max_k and max(counts) != shape.max_k) or min(counts) != max(counts)
        shape.max_k = max(shape.max_k, max(counts))
        shape.max_len = max(shape.max_len, row.input_ids.size)
        shape.min_len = min(shape.min_len, row.input_ids.size)
        shape.tokens += row.input_ids.size
        shape.empty += counts.count(0)
        shape.renumbered |= row.index is not None and row.index != shape.rows
        shape.digest.update(np.int64(row.input_ids.size).tobytes() + row.input_ids.astype("<i4").tobytes())
        shape.rows += 1
    if shape.rows == 0 or shape.max_k == 0:
        raise SourceError(f"{source}: holds no rows with teacher targets; check the path and --from")
    return shape


def _check_ids(row: SourceRow, vocab: int) -> None:
    top = max([int(row.input_ids.max())] + [int(i[-1]) for i in row.ids if i.size])
    low = min([int(row.input_ids.min())] + [int(i[0]) for i in row.ids if i.size])
    if top >= vocab or low < 0:
        raise SourceError(
            f"{row.where}: token ids outside [0, {vocab}) of the --tokenizer — pass the tokenizer the source "
            "was made with"
        )


def _refuse_existing(out: Path) -> None:
    if (out / MANIFEST_NAME).exists() or any(out.glob("shard-*.parquet")):
        raise CacheWriteError(f"{out}: already holds a cache; import writes a new one — choose another directory")


def _header(
    source: str | Path,
    fmt: str,
    tok: Any,
    layout: TargetLayout,
    shape: SourceShape,
    *,
    pad_id: int,
    rows_per_shard: int,
    split: str,
) -> dict[str, Any]:
    """The manifest's teacher, tokenizer, corpus and targets sections of an imported cache."""
    T, renormalized = layout.seq_len, fmt == "axolotl"
    files = {} if Path(source).is_dir() and (Path(source) / "dataset_info.json").is_file() else None
    files = files if files is not None else {str(f): sha256_file(f) for f in source_files(source)}
    shape.digest.update(f"seq_len={T},pad_id={pad_id}".encode())
    return {
        "teacher": {"identity": "unknown", "path": None, "sha256": "unknown", "files": {}, "dtype": "unknown"},
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tok),
            "vocab_size": layout.vocab_size,
            "model_vocab_size": layout.vocab_size,
        },
        "corpus": {
            "fingerprint": shape.digest.hexdigest(),
            "split": split,
            "seq_len": T,
            "num_sequences": shape.rows,
            "num_tokens": shape.rows * T,
            "packing": {"mode": "documents", "eos_id": int(tok.eos_token_id), "pad_id": int(pad_id)},
        },
        "targets": layout.to_dict()
        | {
            "batch_size": None,
            "rows_per_shard": rows_per_shard,
            "compute_dtype": "unknown",
            "renormalized": renormalized,
            "source": {
                "tool": fmt,
                "path": str(source),
                "files": files,
                "tail": "unknown: values renormalized over the kept ids" if renormalized else "1 - sum exp(log-prob)",
                "lengths": "variable (the source's)" if layout.adaptive else "fixed",
                "entropy": "stats.mean_entropy is the stored distribution's (kept ids + tail bucket): a lower bound",
                "placeholder": "positions without a teacher target hold one entry: the next token, log-prob 0",
                "placeholder_positions": shape.empty + shape.rows * T - shape.tokens,
                "seq_index": "source row order" + (" (the source's own indices differ)" if shape.renumbered else ""),
            },
        },
    }


def _write_shards(
    source: str | Path,
    fmt: str,
    out: Path,
    layout: TargetLayout,
    header: dict[str, Any],
    *,
    pad_id: int,
    rows_per_shard: int,
    spans: np.ndarray | None = None,
) -> dict[int, dict[str, Any]]:
    """Second pass: rows -> ``SequenceTargets`` -> shards of ``rows_per_shard`` rows; returns the writer's
    record of each shard (size, sha256, statistics). ``spans``: (vocab,) byte length of each token id."""
    key, meta, batch = build_key_of(header), None, []
    with ShardWriter(out, layout) as writer:
        for seq, row in enumerate(read_rows(source, fmt)):
            if meta is None or seq // rows_per_shard != meta["shard"]:
                if meta is not None:
                    writer.write(meta["shard"], batch)
                    writer.finish(meta["shard"], meta)
                meta, batch = _shard_meta(key, seq // rows_per_shard, first_seq=seq), []
            targets, _ = to_sequence_targets(row, seq, layout, pad_id=pad_id)
            if spans is not None:
                targets.byte_lengths = spans[targets.input_ids]  # (T,) bytes each input token spells
            meta["entropy_sum"] += _entropy(targets)
            meta["topk_mass_sum"] += float(-np.expm1(targets.topk_log_tail).sum())
            batch.append(targets)
            if len(batch) == BATCH_ROWS:
                writer.write(meta["shard"], batch)
                batch = []
        if meta is not None:
            writer.write(meta["shard"], batch)
            writer.finish(meta["shard"], meta)
    return writer.written


def _shard_meta(build_key: str, shard: int, *, first_seq: int) -> dict[str, Any]:
    """The statistics a shard carries in its footer (``kdcache.cache.writer``), before its rows are added."""
    return {
        "build_key": build_key,
        "shard": shard,
        "first_seq": first_seq,
        "entropy_sum": 0.0,
        "topk_mass_sum": 0.0,
        "skipped": [],
    }


def to_sequence_targets(
    row: SourceRow, seq_index: int, layout: TargetLayout, *, pad_id: int
) -> tuple[SequenceTargets, int]:
    """A source row -> kdcache targets of ``layout.seq_len`` positions, and how many positions were filled.

    Rows are right-padded with ``pad_id``; a position without entries (padding, or none in the source)
    gets one entry, the next token with log-prob 0, and an empty tail.
    """
    T, K, L = layout.seq_len, layout.top_k, row.input_ids.size
    input_ids = np.full(T, pad_id, np.int64)
    input_ids[:L] = row.input_ids
    ids, logprobs = np.zeros((T, K), np.int64), np.full((T, K), -np.inf)
    lengths, log_tail = np.ones(T, np.int64), np.full(T, -np.inf)
    filled = 0
    for t in range(T):
        if t < L and row.ids[t].size:
            n = row.ids[t].size
            ids[t, :n], logprobs[t, :n], lengths[t] = row.ids[t], row.logprobs[t], n
            if row.log_tail is not None:
                log_tail[t] = row.log_tail[t]
        else:
            ids[t, 0], logprobs[t, 0] = input_ids[t + 1] if t + 1 < T else pad_id, 0.0
            filled += 1
    if not layout.adaptive and np.any(lengths != K):
        raise SourceError(f"{row.where}: positions with fewer than k={K} entries in a fixed-k import")
    targets = SequenceTargets(
        seq_index=seq_index,
        input_ids=input_ids,
        topk_ids=ids,
        topk_logprobs=logprobs,
        topk_lengths=lengths if layout.adaptive else None,
        topk_log_tail=log_tail,
    )
    return targets, filled


def _entropy(t: SequenceTargets) -> float:
    """Entropy of the stored distribution (the kept entries, holding 1 - p_tail, plus the tail as one bucket),
    summed over positions: a lower bound on the teacher's entropy; 0 at filled positions."""
    lq = t.topk_logprobs - np.logaddexp.reduce(t.topk_logprobs, axis=-1, keepdims=True)  # (T, K) renormalized
    log_kept = np.log1p(-np.exp(t.topk_log_tail))  # (T,) log(1 - p_tail)
    with np.errstate(invalid="ignore"):
        inside = -np.where(np.isfinite(lq), np.exp(lq) * (lq + log_kept[:, None]), 0.0).sum(axis=-1)  # (T,)
        outside = np.where(np.isfinite(t.topk_log_tail), -np.exp(t.topk_log_tail) * t.topk_log_tail, 0.0)  # (T,)
    return float((np.exp(log_kept) * inside + outside).sum())
