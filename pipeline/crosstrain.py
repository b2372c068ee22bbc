"""The trainer's entry to cross-tokenizer distillation (``train.cross_tokenizer``, README "Student with
another tokenizer"): the student's own tokenizer, the batch transform fitted to the cache
(:mod:`kdcache.crosstok`, :mod:`kdcache.crossproj`), the settings it refuses, and its start-up report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdcache.cache.reader import CacheReader
from kdcache.config.base import ConfigError
from kdcache.crossmulti import CrossTeachersBatches
from kdcache.crosstok import Aligner, CrossTokenizerBatches, student_row_length
from kdcache.multi_cache import MultiCacheReader
from kdcache.packing import packing_of, valid_lengths
from kdcache.tokenizer import TokenizerError, load_tokenizer, text_normalization

log = logging.getLogger(__name__)


class CrossTokenizerError(ValueError):
    """The student's tokenizer cannot be loaded or aligned with the cache's."""


def load_student_tokenizer_dir(path: str | Path) -> Any:
    """The student's own tokenizer (``train.student_tokenizer``, else ``train.student.path``): a local
    directory, never the Hub (``kdcache.tokenizer.load_tokenizer`` with ``field="train.student_tokenizer"``);
    a kind whose tokens do not spell bytes is refused here, before training."""
    try:
        return load_tokenizer(path, field="train.student_tokenizer", spells_bytes=True)
    except TokenizerError as e:
        raise CrossTokenizerError(str(e)) from e


MEASURE_ROWS = 256
"""Cache rows aligned at start to fit the student row length and report what the alignment keeps."""


def cross_tokenizer_batches(
    reader: CacheReader, teacher_tokenizer: Any, student_tokenizer: Any, *, method: str
) -> tuple[CrossTokenizerBatches, dict[str, Any]]:
    """The batch transform for ``train.cross_tokenizer: method`` on ``reader``'s cache, its student row
    length fitted to the cache's first ``MEASURE_ROWS`` rows, and what it keeps on them
    (``CrossTokenizerBatches.report``, plus ``student_seq_len`` and ``rows_measured``)."""
    packing = packing_of(reader.meta.corpus)
    cross = CrossTokenizerBatches(
        teacher_tokenizer, student_tokenizer, method=method, student_seq_len=1, packing=packing
    )
    rows = min(len(reader), MEASURE_ROWS)
    first = next(iter(reader.batches(max(rows, 1), seed=0, shuffle=False, drop_last=False)), None)
    if first is not None:
        lengths = valid_lengths(first["input_ids"], packing).tolist()  # (rows,) real tokens per row
        real = [first["input_ids"][b, :n].numpy() for b, n in enumerate(lengths)]
        cross.seq_len = student_row_length(cross.aligner, real)
        cross.apply(first)
    report = cross.report() | {"student_seq_len": cross.seq_len, "rows_measured": rows}
    cross.reset()
    return cross, report


def cross_teachers_batches(
    reader: MultiCacheReader, teacher_tokenizers: list[Any], student_tokenizer: Any, *, method: str
) -> tuple[CrossTeachersBatches, dict[str, Any]]:
    """As :func:`cross_tokenizer_batches` for several caches of teachers with different tokenizers
    (``kdcache.crossmulti``; ``reader``: ``open_caches(..., cross=True)``): the student row length fitted
    to the lead cache's first ``MEASURE_ROWS`` rows, what every teacher keeps on them."""
    if method == "uld":
        raise ConfigError(
            "train.cross_tokenizer=uld with several train.caches: sorted probabilities of different teachers do "
            "not mix; use exact or prefix"
        )
    lead = reader.readers[0]
    packings = [packing_of(r.meta.corpus) for r in reader.readers]
    rows = min(len(lead), MEASURE_ROWS)
    first = next(iter(lead.batches(max(rows, 1), seed=0, shuffle=False, drop_last=False, keys=("input_ids",))), None)
    seq_len = 8
    if first is not None:
        lengths = valid_lengths(first["input_ids"], packings[0]).tolist()  # (rows,) real tokens per row
        aligner = Aligner(teacher_tokenizers[0], student_tokenizer)
        seq_len = student_row_length(aligner, [first["input_ids"][b, :n].numpy() for b, n in enumerate(lengths)])
    cross = CrossTeachersBatches(
        teacher_tokenizers,
        student_tokenizer,
        weights=reader.weights.tolist(),
        method=method,
        student_seq_len=seq_len,
        packings=packings,
    )
    batch = next(iter(reader.batches(max(rows, 1), seed=0, shuffle=False, drop_last=False)), None)
    if batch is not None:
        cross.apply(batch)
    report = cross.report() | {"student_seq_len": seq_len, "rows_measured": rows}
    cross.reset()
    return cross, report


def check_cross_temperature(method: str, *, loss: str, temperature: float, cache_temperature: float) -> None:
    """Projected targets cannot be re-tempered (``exact``/``prefix`` merge and drop teacher entries, so the
    cache's full-vocabulary log-normalizer no longer describes them): a KD loss other than ``topk_renorm``
    trains at the cache's temperature."""
    if method in ("exact", "prefix") and loss not in ("topk_renorm", "ce") and temperature != cache_temperature:
        raise ConfigError(
            f"train.temperature={temperature:g} with train.cross_tokenizer={method}: targets projected to the "
            f"student's vocabulary cannot be re-tempered; train at the cache's temperature {cache_temperature:g} "
            "or use train.loss: topk_renorm"
        )


def log_cross_report(report: dict[str, Any], *, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """One start-up line: what the alignment and the projection keep on the measured rows."""
    norms = (text_normalization(teacher_tokenizer), text_normalization(student_tokenizer))
    log.log(
        logging.WARNING
        if report["soft_target_fraction"] < 0.5 or report["teacher_mass_kept_ratio"] < 0.8
        else logging.INFO,
        "train.cross_tokenizer: %s: on %d cache rows %.1f%% of the student's tokens get a soft target (the rest "
        "CE only), the projection keeps %.1f%% of the cached teacher mass there; student rows of %d tokens "
        "(%.2f%% of the text's bytes cut off); normalizers teacher %s, student %s",
        report["method"],
        report["rows_measured"],
        100 * report["soft_target_fraction"],
        100 * report["teacher_mass_kept_ratio"],
        report["student_seq_len"],
        100 * report["lost_byte_fraction"],
        *norms,
    )
