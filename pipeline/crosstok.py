"""Cross-tokenizer distillation at load time: one teacher cache, a student with any tokenizer.

A cache row is teacher ids; :func:`kdcache.tokenizer.token_bytes` of the cache's own tokenizer (its
``tokenizer/`` dir) turns them into the exact bytes of the text. :class:`Aligner` re-tokenizes that
text with the student's tokenizer and matches positions by byte offset:

- the row's bytes are cut at the teacher's zero-byte tokens (EOS, BOS: *events*, each mirrored by the
  student's token of the same string or role; trailing padding is dropped) and at bytes that are not
  whole UTF-8 characters (a row that starts or ends inside a character: those bytes get no student
  token); each remaining piece is decoded and encoded by the student on its own;
- a position's *key* is (bytes before it and including its token, events so far). Student position i
  takes teacher position j's target when their keys are equal: the two prefixes are the same text,
  so the teacher's next-token distribution at j is about the same continuation as the student's at i.
  If several student positions share a key (a token that spells only the dummy-prefix space), the
  last one takes it; a piece whose student tokens do not spell it (a normalizer that changes the
  text) aligns nothing. Every other student position gets CE only.

Target convention (``kdcache.losses.kd_loss``): the soft target at position t is the teacher's
distribution of token t + 1, and t's hard label is ``input_ids[t + 1]``, on both sides.

Student rows are ``student_seq_len`` tokens long (:func:`student_row_length`: enough for the longest
of a sample of rows, so a tokenizer that needs more tokens than the teacher for the same text keeps it);
a longer row loses its last tokens (counted as ``student_tokens_cut``). The soft
targets moved onto the student's positions still speak the teacher's vocabulary;
:mod:`kdcache.crossproj` projects them (``train.cross_tokenizer``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache.crossproj import METHODS, build_projection, project_batch_targets
from kdcache.packing import valid_lengths
from kdcache.tokenizer import token_bytes, tokenizer_vocab_size

__all__ = ["METHODS", "Aligner", "CrossTokenizerBatches", "RowAlignment", "student_row_length", "utf8_pieces"]


def utf8_pieces(data: bytes) -> list[tuple[int, int]]:
    """Maximal ``[start, end)`` ranges of ``data`` that decode as UTF-8; bytes of broken characters
    (a row cut inside a character, at either end) lie outside every range."""
    pieces, start = [], 0
    while start < len(data):
        try:
            data[start:].decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start > 0:
                pieces.append((start, start + e.start))
            start += max(e.end, e.start + 1)
            continue
        pieces.append((start, len(data)))
        break
    return pieces


@dataclass(frozen=True)
class RowAlignment:
    """One cache row re-tokenized by the student."""

    student_ids: np.ndarray
    """(n,) int64 student ids, n <= the row length asked for."""
    teacher_pos: np.ndarray
    """(n,) int64: the teacher position whose soft target student position i takes; -1 = CE only."""
    token_spans: np.ndarray
    """(n,) int64: bytes of the row's text each student token covers (0 for events and a dummy prefix):
    the denominator of bits per byte."""
    lost_bytes: int
    """Bytes of the row's text no kept student token covers (broken characters at the edges, cut tokens)."""
    student_tokens_cut: int
    """Student tokens beyond the row length that were dropped."""
    unspelled_tokens: int
    """Student tokens in pieces they did not spell byte for byte (CE only)."""


class Aligner:
    """Teacher rows -> student rows with each student position's teacher position (module docstring)."""

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.student_bytes = token_bytes(student_tokenizer)
        self.student = student_tokenizer
        self.events = event_map(teacher_tokenizer, student_tokenizer, self.teacher_bytes)
        pad = getattr(student_tokenizer, "pad_token_id", None)
        self.pad_id = int(student_tokenizer.eos_token_id if pad is None else pad)

    def align_rows(self, rows: list[np.ndarray], *, max_len: int) -> list[RowAlignment]:
        """Align teacher rows (real tokens only: padding already cut off), keeping at most ``max_len``
        student tokens a row; the student encodes every row's pieces in one batched call."""
        plans = [self._plan(np.asarray(ids, np.int64)) for ids in rows]
        texts = [text for plan in plans for kind, *rest in plan["items"] if kind == "text" for text in [rest[1]]]
        encoded = iter(self.student(texts, add_special_tokens=False)["input_ids"] if texts else [])
        return [self._student_row(plan, encoded, max_len) for plan in plans]

    def _plan(self, ids: np.ndarray) -> dict[str, Any]:
        """A row's teacher keys ({(bytes so far, events so far): position}) and the items the student spells
        in order: ("text", start offset, text, byte length) and ("event", student id, offset)."""
        keys: dict[tuple[int, int], int] = {}
        items: list[tuple] = []
        offset = events = 0
        run_start, run = 0, bytearray()

        def flush() -> None:
            for a, b in utf8_pieces(bytes(run)):
                items.append(("text", run_start + a, run[a:b].decode("utf-8"), b - a))

        for j, t in enumerate(ids.tolist()):
            spelled = self.teacher_bytes[t] if 0 <= t < len(self.teacher_bytes) else b""
            if spelled:
                run += spelled
                offset += len(spelled)
            else:
                flush()
                run_start, run = offset, bytearray()
                events += 1
                items.append(("event", self.events.get(t, self.events.get(-1)), offset))
            keys[(offset, events)] = j
        flush()
        return {"keys": keys, "items": items, "total": offset}

    def _student_row(self, plan: dict[str, Any], encoded: Any, max_len: int) -> RowAlignment:
        ids: list[int] = []
        keys: list[tuple[int, int] | None] = []
        spans: list[int] = []  # text bytes each student token covers (events: 0)
        events = unspelled = 0
        for kind, *rest in plan["items"]:
            if kind == "event":
                student_id, offset = rest
                events += 1
                ids.append(student_id)
                keys.append((offset, events))
                spans.append(0)
                continue
            start, text, _ = rest
            piece_ids = list(next(encoded))
            spelled = [self.student_bytes[i] if i < len(self.student_bytes) else b"" for i in piece_ids]
            joined, raw = b"".join(spelled), text.encode("utf-8")
            shift = 0 if joined == raw else 1 if joined == b" " + raw else None  # 1: the dummy-prefix space
            if shift is None:  # a normalizer changed the text: CE only
                unspelled += len(piece_ids)
                ids += piece_ids
                keys += [None] * len(piece_ids)
                spans += [len(x) for x in spelled]
                continue
            ends = np.maximum(np.cumsum([len(x) for x in spelled]) - shift, 0)  # (n,) end offsets in the piece
            ids += piece_ids
            keys += [(start + int(end), events) for end in ends]
            spans += np.diff(ends, prepend=0).tolist()
        n = min(len(ids), max_len)
        teacher_pos = np.full(n, -1, np.int64)
        for i in range(n):
            key = keys[i]
            if key is not None and (i + 1 == len(keys) or keys[i + 1] != key):  # the last of equal keys
                teacher_pos[i] = plan["keys"].get(key, -1)
        text_bytes = int(sum(spans[:n]))
        return RowAlignment(
            student_ids=np.asarray(ids[:n], np.int64),
            teacher_pos=teacher_pos,
            token_spans=np.asarray(spans[:n], np.int64),
            lost_bytes=max(plan["total"] - text_bytes, 0),
            student_tokens_cut=len(ids) - n,
            unspelled_tokens=unspelled,
        )


def student_row_length(aligner: Aligner, rows: list[np.ndarray], *, slack: float = 1.05, multiple: int = 8) -> int:
    """Student row length for teacher ``rows`` (real tokens only): the longest student row among them,
    times ``slack``, rounded up to a multiple of ``multiple``."""
    longest = max((len(r.student_ids) for r in aligner.align_rows(rows, max_len=1 << 30)), default=1)
    return max(multiple, -(-int(np.ceil(longest * slack)) // multiple) * multiple)


def event_map(teacher_tokenizer: Any, student_tokenizer: Any, teacher_bytes: list[bytes]) -> dict[int, int]:
    """Teacher zero-byte (special) ids -> the student id that stands for them: the student token with the
    same string, else the one with the same role (eos/bos/unk/pad), else the student's EOS (key -1)."""
    student_vocab = student_tokenizer.get_vocab()
    eos = student_tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "train.student_tokenizer: the student tokenizer has no EOS token to stand for the teacher's "
            "document boundaries; save it with an eos_token"
        )
    roles = {}
    for role in ("eos", "bos", "unk", "pad"):
        t, s = (
            getattr(teacher_tokenizer, f"{role}_token_id", None),
            getattr(student_tokenizer, f"{role}_token_id", None),
        )
        if t is not None and s is not None:
            roles.setdefault(int(t), int(s))
    out = {-1: int(eos)}
    for token, t in teacher_tokenizer.get_vocab().items():
        if t < len(teacher_bytes) and not teacher_bytes[t]:
            out[t] = int(student_vocab.get(token, roles.get(t, eos)))
    return out


@dataclass
class _Counts:
    student_tokens: int = 0
    soft_targets: int = 0
    text_bytes: int = 0
    lost_bytes: int = 0
    student_tokens_cut: int = 0
    unspelled_tokens: int = 0
    teacher_mass_cached: float = 0.0
    teacher_mass_kept: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class CrossTokenizerBatches:
    """``apply``: a cache batch (teacher ids and targets) -> the same rows as a student batch.

    Returns ``input_ids`` (B, T) student ids (padding: the student's pad/eos id), ``ce_mask`` (B, T)
    (the next student token is real), ``loss_mask`` (B, T) (aligned to a teacher position that has a
    target), and the targets projected by ``method`` (:mod:`kdcache.crossproj`): top-k / sampled keys
    in student ids for ``exact`` and ``prefix``; ``uld_probs`` (B, T, k) and ``uld_tail`` (B, T) for
    ``uld``. ``report()`` sums what every applied batch kept (thread-safe: the loader thread applies).
    """

    def __init__(
        self,
        teacher_tokenizer: Any,
        student_tokenizer: Any,
        *,
        method: str,
        student_seq_len: int,
        packing: dict[str, Any],
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"train.cross_tokenizer: must be {'|'.join(METHODS)}, got {method!r}")
        self.aligner = Aligner(teacher_tokenizer, student_tokenizer)
        self.method, self.packing, self.seq_len = method, packing, student_seq_len
        self.student_vocab_size = tokenizer_vocab_size(student_tokenizer)
        self.projection = build_projection(
            method,
            teacher_bytes=self.aligner.teacher_bytes,
            student_tokenizer=student_tokenizer,
            student_bytes=self.aligner.student_bytes,
            events=self.aligner.events,
        )
        self.counts = _Counts()

    def apply(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]  # (B, T) teacher ids
        B, T = ids.shape
        lengths = valid_lengths(ids, self.packing).tolist()  # (B,) real teacher tokens per row
        rows = self.aligner.align_rows([ids[b, : lengths[b]].numpy() for b in range(B)], max_len=self.seq_len)
        L = self.seq_len
        student = torch.full((B, L), self.aligner.pad_id, dtype=torch.int64)  # (B, L)
        teacher_pos = torch.full((B, L), -1, dtype=torch.int64)  # (B, L)
        ce_mask = torch.zeros((B, L), dtype=torch.bool)  # (B, L)
        documents = self.packing.get("mode") == "documents"
        for b, row in enumerate(rows):
            n = len(row.student_ids)
            student[b, :n] = torch.from_numpy(row.student_ids)
            # as the same-tokenizer path: under documents packing a row's last real position has no target
            limit = lengths[b] - 1 if documents else T
            has_target = (row.teacher_pos >= 0) & (row.teacher_pos < limit)  # (n,)
            teacher_pos[b, :n] = torch.from_numpy(np.where(has_target, row.teacher_pos, -1))
            ce_mask[b, : max(n - 1, 0)] = True
        loss_mask = teacher_pos >= 0  # (B, L)
        if "loss_mask" in batch:  # the teacher positions' own mask (document padding, train.token_filter)
            loss_mask &= torch.gather(batch["loss_mask"], 1, teacher_pos.clamp_min(0))
        out = {"input_ids": student, "ce_mask": ce_mask, "loss_mask": loss_mask}
        if "seq_index" in batch:
            out["seq_index"] = batch["seq_index"]
        targets, kept, cached = project_batch_targets(
            batch, teacher_pos.clamp_min(0), loss_mask, projection=self.projection
        )
        out.update(targets)
        self._count(rows, int(loss_mask.sum()), kept, cached)
        return out

    def reset(self) -> None:
        """Forget what earlier batches kept (``report`` starts again from zero)."""
        self.counts = _Counts()

    def _count(self, rows: list[RowAlignment], soft: int, kept: float, cached: float) -> None:
        c = self.counts
        with c.lock:
            c.student_tokens += sum(len(r.student_ids) for r in rows)
            c.soft_targets += soft
            c.text_bytes += sum(int(r.token_spans.sum()) for r in rows)
            c.lost_bytes += sum(r.lost_bytes for r in rows)
            c.student_tokens_cut += sum(r.student_tokens_cut for r in rows)
            c.unspelled_tokens += sum(r.unspelled_tokens for r in rows)
            c.teacher_mass_kept += kept
            c.teacher_mass_cached += cached

    def report(self) -> dict[str, Any]:
        """Totals over the batches applied so far: % of student tokens with a soft target, teacher mass
        kept by the projection (of the mass the cache holds at the aligned positions), bytes lost."""
        c = self.counts
        with c.lock:
            return {
                "method": self.method,
                "student_tokens": c.student_tokens,
                "soft_target_fraction": c.soft_targets / max(c.student_tokens, 1),
                "teacher_mass_kept_ratio": c.teacher_mass_kept / c.teacher_mass_cached
                if c.teacher_mass_cached
                else 0.0,
                "teacher_mass_kept": c.teacher_mass_kept / max(c.soft_targets, 1),
                "teacher_mass_cached": c.teacher_mass_cached / max(c.soft_targets, 1),
                "text_bytes": c.text_bytes,
                "lost_byte_fraction": c.lost_bytes / max(c.text_bytes + c.lost_bytes, 1),
                "student_tokens_cut": c.student_tokens_cut,
                "unspelled_tokens": c.unspelled_tokens,
                "projection": self.projection.summary(),
            }
