"""Section ``corpus``: where the text comes from and how it is split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdcache.config.base import check


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and how it is split (params section ``corpus``)."""

    paths: tuple[str, ...] = ()
    """Text/jsonl/parquet files or globs. Empty: the running Python's standard library ``.py`` files."""
    text_field: str = "text"
    """Column holding the document text in jsonl/parquet files."""
    context_field: str | None = None
    """Column holding each document's teacher-only context (context distillation): the teacher sees it before
    the document's rows, the student never does. null = none; jsonl/parquet only; excludes cache.teacher_context."""
    val_fraction: float = 0.05
    """Fraction of documents (chosen by content hash, not position) that go to the val split."""
    max_documents: int = 0
    """Use at most this many documents (by sorted path / row order); 0 = all."""
    errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 bytes: ``strict`` fails naming the file, ``replace`` substitutes U+FFFD."""

    def __post_init__(self) -> None:
        s = "corpus"
        check(0.0 < self.val_fraction < 1.0, s, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        check(self.max_documents >= 0, s, "max_documents", "must be >= 0 (0 = all)")
        check(self.context_field != self.text_field, s, "context_field", "must differ from corpus.text_field")
        check(self.errors in ("strict", "replace"), s, "errors", f"must be 'strict' or 'replace', got {self.errors!r}")
