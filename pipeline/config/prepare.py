"""Section ``prepare``: tokenizing and packing the corpus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdcache.config.base import check


@dataclass(frozen=True)
class PrepareConfig:
    """Tokenize and pack the corpus (section ``prepare``)."""

    seq_len: int = 256
    """Tokens per packed sequence (each document: the tokenizer's special tokens, its text, EOS)."""
    packing: Literal["documents", "stream"] = "documents"
    """``documents``: every row starts at a document start (a long document continues in the next
    rows) and the rest of its last row is padding, masked from losses and metrics, so the teacher
    never attends across a document boundary. ``stream``: documents are concatenated and cut into
    rows, which then start mid-document and span documents (no padding)."""
    max_train_sequences: int = 0
    """Keep at most this many train sequences (0 = all)."""
    max_val_sequences: int = 0
    """Keep at most this many val sequences (0 = all)."""

    def __post_init__(self) -> None:
        check(self.seq_len >= 2, "prepare", "seq_len", "must be >= 2")
        check(
            self.packing in ("documents", "stream"),
            "prepare",
            "packing",
            f"must be 'documents' or 'stream', got {self.packing!r}",
        )
        check(self.max_train_sequences >= 0, "prepare", "max_train_sequences", "must be >= 0")
        check(self.max_val_sequences >= 0, "prepare", "max_val_sequences", "must be >= 0")
