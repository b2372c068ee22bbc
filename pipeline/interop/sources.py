"""Read other tools' KD datasets row by row into one normalized form (``SourceRow``).

- ``axolotl``: rows with ``input_ids`` and per position ``target_token_ids`` / ``target_logprobs``
  (``target_mask`` is read but not needed: every position with finite log-probs is kept). Entries
  at or below ``PAD_LOGPROB`` (Axolotl pads with -inf or -1e9) are padding. The format has no tail:
  the values are treated as renormalized over the kept ids.
- ``nemo``: NeMo-Aligner ``compute_topk_logits.py`` rows with ``tokens``, ``topk_logits``,
  ``topk_token_ids``, ``log_sum_exp_logits`` and ``index``: log p = logit - log_sum_exp, and the
  tail 1 - sum p is exact up to the stored floats.

Files: a Parquet or JSON-lines file, a directory of .parquet / .jsonl files (natural order: ``x_2``
before ``x_10``),
a glob, or a ``datasets.save_to_disk`` directory. Errors name the file, the row and the fix.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.interop import IMPORT_FORMATS

SOURCES = IMPORT_FORMATS
PAD_LOGPROB = -1e8
"""Source entries with a log-prob at or below this are padding (Axolotl: -inf in datasets, -1e9 in batches)."""
SUFFIXES = (".parquet", ".jsonl", ".json")
DIR_SUFFIXES = (".parquet", ".jsonl")


class SourceError(ValueError):
    """A source dataset does not follow the format it was imported as (names the file, row and fix)."""


@dataclass
class SourceRow:
    """One source sequence, normalized: kept entries per position, ascending by id."""

    where: str  # file:row, for error messages
    input_ids: np.ndarray  # (L,) int64
    ids: list[np.ndarray]  # L arrays of kept ids (ascending; may be empty: no teacher target there)
    logprobs: list[np.ndarray]  # L arrays of float64 log-probs, same order
    log_tail: np.ndarray | None  # (L,) float64 log p_tail (-inf: none); None: unknown (renormalized)
    index: int | None = None  # the source's own row index (nemo)


def source_files(path: str | Path) -> list[Path]:
    """The data files of a source: a file, a directory's data files or a glob's matches, in natural order."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = [Path(p) for p in glob.glob(text)]
    elif Path(text).is_dir():  # its .parquet / .jsonl files; a .json there is metadata (an export's record)
        files = [p for p in Path(text).iterdir() if p.suffix in DIR_SUFFIXES and not p.name.startswith(".")]
    else:
        files = [Path(text)]
    files = sorted((f for f in files if f.suffix in SUFFIXES), key=_natural_key)
    if not files or not all(f.is_file() for f in files):
        raise SourceError(
            f"{path}: no data files found — pass a .parquet or .jsonl file, a directory of them, a glob, "
            "or a datasets.save_to_disk directory"
        )
    return files


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_rows(path: str | Path, source: str) -> Iterator[SourceRow]:
    """Every row of ``path`` read as ``source`` (one of ``SOURCES``), normalized."""
    if source not in SOURCES:
        raise SourceError(f"import --from must be one of {'|'.join(SOURCES)}, got {source!r}")
    normalize = _axolotl_row if source == "axolotl" else _nemo_row
    for where, raw in _raw_rows(Path(path)):
        if not isinstance(raw, dict):
            raise SourceError(f"{where}: a row must be an object/record, got {type(raw).__name__}")
        yield normalize(raw, where)


def _raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir() and (path / "dataset_info.json").is_file():
        import datasets

        ds = datasets.load_from_disk(str(path))
        for i, row in enumerate(ds):
            yield f"{path}:{i}", row
        return
    for file in source_files(path):
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            i = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    yield f"{file}:{i}", row
                    i += 1
            continue
        with open(file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield f"{file}:{i + 1}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{file}:{i + 1}: not a JSON line ({e}); the file is damaged") from e


def _field(raw: dict[str, Any], name: str, where: str, source: str) -> Any:
    if name not in raw or raw[name] is None:
        raise SourceError(
            f"{where}: no '{name}' field (has {sorted(raw)}) — not a {source} KD row; "
            f"check --from ({'|'.join(SOURCES)})"
        )
    return raw[name]


def _positions(ids: Any, values: Any, where: str, *, length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-position id and value lists -> kept (finite, above ``PAD_LOGPROB``) entries, ascending by id."""
    if not isinstance(ids, list) or not isinstance(values, list) or len(ids) != len(values) or len(ids) != length:
        raise SourceError(
            f"{where}: expected one target row per input token ({length}), got {_len(ids)} id rows and "
            f"{_len(values)} value rows — the targets are not aligned with the tokens"
        )
    out_ids, out_values = [], []
    for t, (row_ids, row_values) in enumerate(zip(ids, values, strict=True)):
        i = np.asarray(row_ids if row_ids is not None else [], dtype=np.int64).reshape(-1)
        v = np.asarray(row_values if row_values is not None else [], dtype=np.float64).reshape(-1)
        if i.shape != v.shape:
            raise SourceError(f"{where}, position {t}: {i.size} ids but {v.size} values")
        if np.isnan(v).any() or np.isposinf(v).any():
            raise SourceError(f"{where}, position {t}: NaN or +inf values — the source is damaged")
        keep = v > PAD_LOGPROB
        i, v = i[keep], v[keep]
        order = np.argsort(i, kind="stable")
        i, v = i[order], v[order]
        if i.size > 1 and np.any(np.diff(i) == 0):
            raise SourceError(f"{where}, position {t}: id {int(i[np.diff(i) == 0][0])} appears twice")
        out_ids.append(i)
        out_values.append(v)
    return out_ids, out_values


def _len(x: Any) -> str:
    return str(len(x)) if isinstance(x, list) else type(x).__name__


def _axolotl_row(raw: dict[str, Any], where: str) -> SourceRow:
    input_ids = np.asarray(_field(raw, "input_ids", where, "axolotl"), dtype=np.int64).reshape(-1)
    ids, values = _positions(
        _field(raw, "target_token_ids", where, "axolotl"),
        _field(raw, "target_logprobs", where, "axolotl"),
        where,
        length=input_ids.size,
    )
    return SourceRow(where, input_ids, ids, values, log_tail=None)


def _nemo_row(raw: dict[str, Any], where: str) -> SourceRow:
    tokens = np.asarray(_field(raw, "tokens", where, "nemo"), dtype=np.int64).reshape(-1)
    ids, logits = _positions(
        _field(raw, "topk_token_ids", where, "nemo"),
        _field(raw, "topk_logits", where, "nemo"),
        where,
        length=tokens.size,
    )
    lse = np.asarray(_field(raw, "log_sum_exp_logits", where, "nemo"), dtype=np.float64).reshape(-1)
    if lse.shape != tokens.shape or not np.isfinite(lse).all():
        raise SourceError(f"{where}: log_sum_exp_logits must hold one finite value per token ({tokens.size})")
    logprobs = [v - lse[t] for t, v in enumerate(logits)]
    log_tail = np.empty(tokens.size)
    for t, lp in enumerate(logprobs):
        kept = float(np.exp(lp).sum())
        if kept > 1.0 + 1e-3:
            raise SourceError(
                f"{where}, position {t}: the top-k probabilities sum to {kept:.4f} > 1 — log_sum_exp_logits is "
                "not the log-sum-exp of the full logits (not a NeMo-Aligner compute_topk_logits row)"
            )
        log_tail[t] = math.log1p(-kept) if kept < 1.0 else -math.inf
    index = raw.get("index")
    return SourceRow(where, tokens, ids, logprobs, log_tail, index=int(index) if isinstance(index, int) else None)
