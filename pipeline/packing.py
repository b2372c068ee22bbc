"""Packing documents into fixed-length rows, and which positions of a packed row are real tokens.

Every document is ``prefix + text ids + suffix + [EOS]``: the special tokens the tokenizer's own
rules put around a text (``special_tokens_around``; BOS for Llama-3 and Gemma, nothing for GPT-2),
and EOS unless the suffix already ends with it.

``prepare.packing`` chooses how documents become rows of ``seq_len`` ids:

- ``documents`` (default): every document starts a new row; a long one continues in the rows
  after it; its last row is filled with ``pad_id`` (the tokenizer's pad token, else EOS). A causal
  teacher therefore never attends across a document boundary: a position sees only its own
  document (and, in a continuation row, none of the document's earlier rows). Padding costs on
  average half a row per document, and must be masked by whoever scores next-token predictions
  (``target_mask``); a last row holding one token has nothing to predict and is dropped.
- ``stream``: documents are concatenated and cut into rows (the incomplete last row is dropped):
  no padding, but rows start mid-document and span documents.

The token manifest records ``packing: {"mode", "eos_id", "prefix", "suffix"[, "pad_id"]}``; token
data without the record is ``stream``. Padding is recovered from the ids alone: it is the trailing
run of ``pad_id`` after a row's last other id; when ``pad_id`` is EOS, the first EOS of that run is
the document's own and counts as real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODES = ("documents", "stream")


class PackingError(ValueError):
    """The tokenizer or the packing mode cannot pack documents as asked."""


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's own rules put before and after a text (``add_special_tokens=True``).

    E.g. ``([bos], [])`` for Llama-3 and Gemma, ``([], [])`` for GPT-2. Found by encoding a probe
    with and without special tokens; the probe is decoded from ordinary (non-special) ids so that
    it contains no special id itself (an unknown word could encode as one). A tokenizer that puts
    special tokens inside the text is refused.
    """
    probe = _probe_text(tokenizer)
    plain = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise PackingError(
        f"the tokenizer puts special tokens inside a text ({full} for {probe!r}, {plain} without them); "
        "prepare supports tokenizers that add them before or after a document only — use another tokenizer"
    )


def _probe_text(tokenizer: Any) -> str:
    """A short text made of ordinary tokens from the middle of the id space (falls back to plain words)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else 0
    ordinary = []
    for i in range(size // 3, min(size, size // 3 + 64)):
        if i not in special and tokenizer.convert_ids_to_tokens(i) is not None:
            ordinary.append(i)
        if len(ordinary) == 3:
            text = tokenizer.decode(ordinary, skip_special_tokens=True).strip()
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []
            if ids and not special.intersection(ids):
                return text
            break
    return "kdcache probe text"


BOS_REQUIRED = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})
"""Model types trained with BOS at every document start, whose outputs degrade badly without it."""


def check_bos_rule(tokenizer: Any, model_dir: str | Path) -> None:
    """Refuse a tokenizer that adds no BOS when the model in ``model_dir`` (its config.json) requires one."""
    config = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # a tokenizer-only directory: nothing to compare with
    bos = getattr(tokenizer, "bos_token_id", None)
    if model_type in BOS_REQUIRED and (bos is None or bos not in special_tokens_around(tokenizer)[0]):
        raise PackingError(
            f"{config}: model_type {model_type!r} needs BOS at every document start, but the tokenizer in "
            f"{model_dir} adds none — use the model's own tokenizer files (with add_bos_token: true in "
            "tokenizer_config.json)"
        )


def pad_id_for(tokenizer: Any) -> int:
    """The id that fills rows under ``packing: documents``: the tokenizer's pad token, else EOS."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(tokenizer.eos_token_id if pad is None else pad)


def packing_record(tokenizer: Any, mode: str) -> dict[str, Any]:
    """What the token manifest says about packing (read back by ``packing_of``)."""
    prefix, suffix = special_tokens_around(tokenizer)
    record: dict[str, Any] = {"mode": mode, "eos_id": int(tokenizer.eos_token_id), "prefix": prefix, "suffix": suffix}
    if mode == "documents":
        record["pad_id"] = pad_id_for(tokenizer)
    return record


def row_packer(mode: str, *, seq_len: int, pad_id: int) -> StreamRows:
    """A packer for ``mode``: ``add(ids, document_end=...)`` piece by piece, then ``rows(limit)``."""
    if mode not in MODES:
        raise PackingError(f"prepare.packing must be one of {'|'.join(MODES)}, got {mode!r}")
    return DocumentRows(seq_len, pad_id) if mode == "documents" else StreamRows(seq_len)


class StreamRows:
    """Concatenate documents and cut full rows; the incomplete remainder is dropped."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len, self.count = seq_len, 0
        self._done: list[np.ndarray] = []
        self._carry = np.zeros(0, dtype=np.int32)

    def add(self, ids: np.ndarray, *, document_end: bool) -> None:
        """Append a piece of a document (``document_end``: its last piece)."""
        flat = np.concatenate([self._carry, ids])  # (n,)
        full = flat.size // self.seq_len
        self._done.append(flat[: full * self.seq_len].reshape(full, self.seq_len))  # (full, T)
        self._carry = flat[full * self.seq_len :]
        self.count += full

    def rows(self, limit: int = 0) -> np.ndarray:
        """The packed rows (N, T) int32, at most ``limit`` (0 = all)."""
        out = np.concatenate(self._done) if self._done else np.zeros((0, self.seq_len), dtype=np.int32)
        return out[:limit] if limit else out


class DocumentRows(StreamRows):
    """Each document from a new row; its last row padded with ``pad_id`` (a one-token last row is dropped)."""

    def __init__(self, seq_len: int, pad_id: int) -> None:
        super().__init__(seq_len)
        self.pad_id = pad_id

    def add(self, ids: np.ndarray, *, document_end: bool) -> None:
        super().add(ids, document_end=document_end)
        if not document_end:
            return
        if self._carry.size >= 2:
            row = np.full((1, self.seq_len), self.pad_id, dtype=np.int32)  # (1, T)
            row[0, : self._carry.size] = self._carry
            self._done.append(row)
            self.count += 1
        self._carry = np.zeros(0, dtype=np.int32)


def packing_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The token manifest's packing record; ``{"mode": "stream"}`` when it has none (older token data)."""
    packing = manifest.get("packing")
    return packing if isinstance(packing, dict) and packing.get("mode") in MODES else {"mode": "stream"}


def valid_lengths(ids: torch.Tensor, packing: dict[str, Any]) -> torch.Tensor:
    """Real tokens at the start of each row: ids (B, T) -> (B,) int64; T everywhere for ``stream`` packing."""
    B, T = ids.shape
    if packing.get("mode") != "documents":
        return torch.full((B,), T, dtype=torch.int64, device=ids.device)
    pad, eos = int(packing["pad_id"]), int(packing["eos_id"])
    real = ids != pad  # (B, T)
    last = T - 1 - real.flip(1).int().argmax(dim=1)  # (B,) index of the last non-pad id
    lengths = torch.where(real.any(dim=1), last + 1, 0)  # (B,)
    if pad == eos:
        lengths = (lengths + 1).clamp_(max=T)  # the first trailing EOS ends the document
    return lengths


def token_mask(ids: torch.Tensor, packing: dict[str, Any]) -> torch.Tensor:
    """(B, T) bool: True where the position holds a document token, False on padding."""
    lengths = valid_lengths(ids, packing)  # (B,)
    return torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]


def target_mask(ids: torch.Tensor, packing: dict[str, Any]) -> torch.Tensor:
    """(B, T - 1) bool: position t counts in a next-token loss or metric iff token t + 1 is real."""
    return token_mask(ids, packing)[:, 1:]
