"""Evaluate a model whose tokenizer is not the teacher's (a ``train.cross_tokenizer`` student, or its CE
baseline), on the teacher's val split.

Each val row (teacher ids) is re-tokenized by the model's own tokenizer through the byte alignment the
trainer uses (:class:`kdcache.crosstok.Aligner`: the same text, the same special tokens), and the model
reads its own tokens. What is measured:

- **CE, top-1 accuracy, calibration** on the model's own next tokens (nats per *model* token: compare
  them only between models of one tokenizer);
- **bits per byte**, the tokenizer-neutral measure: the NLL of each next token that spells text, summed,
  over ln 2 times the bytes those tokens spell (special tokens: neither sum). A row's first token is never
  predicted, so each model's byte count differs by its first tokens' bytes (``num_bytes`` per model);
- **KL(teacher || model) and top-1 agreement** at the *aligned* positions only (a model position whose
  prefix is the same text as a teacher position's, :mod:`kdcache.crosstok`): the teacher's full
  distribution there is projected onto the model's vocabulary as in training
  (:func:`kdcache.crossproj.build_projection`: the ``exact`` or ``prefix`` table of the model's
  ``training.json``; ``prefix`` for a ``uld`` student or a model without a record), and compared on the
  partition the projection induces: each student id some teacher id lands on, plus one bucket for the
  rest (the teacher's unmapped mass against the model's mass on every id no teacher id lands on) -- the
  dense form of what ``topk_tail`` trains on. Agreement: the model's top-1 is the projected teacher's
  most probable student id. ``kl_coverage`` is the share of scored model positions that are aligned.

Rows longer than the model's ``max_position_embeddings`` in its own tokens lose their last tokens
(``student_tokens_cut``, and their bytes in ``lost_byte_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.crossproj import build_projection
from kdcache.crosstok import Aligner
from kdcache.evaluate_metrics import CHUNK_POSITIONS, Tally
from kdcache.tokenizer import tokenizer_vocab_size

PROJECTIONS = ("exact", "prefix")
"""Projections KL and agreement use; a ``uld`` student (no mapping in training) is measured with ``prefix``."""


def projection_for(record: dict[str, Any] | None) -> str:
    """The projection a model's ``training.json`` trained with: ``vocab_map.method`` when it is one of
    ``PROJECTIONS``, ``exact`` for an id-mapped ``train.vocab_map: exact`` student, else ``prefix``."""
    vocab_map = (record or {}).get("vocab_map")
    if not isinstance(vocab_map, dict):
        return "prefix"
    method = vocab_map.get("method")
    return method if method in PROJECTIONS else "prefix" if method else "exact"


@dataclass(frozen=True)
class CrossModel:
    """How a model of another tokenizer reads the teacher's rows and sees the teacher's distributions."""

    aligner: Aligner
    method: str
    vocab: int
    """The model tokenizer's id space (logit rows past it are dropped)."""
    index: torch.Tensor
    """(V_teacher,) int64: the model id each teacher id projects to; ``vocab`` = the rest bucket."""
    outside: torch.Tensor
    """(vocab,) bool: model ids no teacher id projects to (the rest bucket's model side)."""
    max_len: int
    fingerprint: str


def cross_model(
    teacher_tokenizer: Any, tokenizer: Any, *, method: str, max_len: int, fingerprint: str, device: torch.device
) -> CrossModel:
    """Align ``tokenizer`` (the model's) with the teacher's and build the ``method`` projection; raises
    ``kdcache.tokenizer.UnsupportedTokenizerError`` for tokens that do not spell bytes."""
    if method not in PROJECTIONS:
        raise ValueError(f"cross-tokenizer projection must be {'|'.join(PROJECTIONS)}, got {method!r}")
    aligner = Aligner(teacher_tokenizer, tokenizer)
    vocab = tokenizer_vocab_size(tokenizer)
    projection = build_projection(
        method,
        teacher_bytes=aligner.teacher_bytes,
        student_tokenizer=tokenizer,
        student_bytes=aligner.student_bytes,
        events=aligner.events,
    )
    table = np.where(projection.to_student >= 0, projection.to_student, vocab)  # (V_teacher,)
    outside = np.ones(vocab, bool)
    outside[table[table < vocab]] = False
    return CrossModel(
        aligner=aligner,
        method=method,
        vocab=vocab,
        index=torch.from_numpy(table).to(device),
        outside=torch.from_numpy(outside).to(device),
        max_len=max_len,
        fingerprint=fingerprint,
    )


@dataclass(frozen=True)
class AlignedBatch:
    """A teacher batch read by a model of another tokenizer."""

    ids: torch.Tensor
    """(B, L) the model's ids (padding: its pad/eos id)."""
    spans: torch.Tensor
    """(B, L) text bytes each model token spells (0: special tokens, padding)."""
    teacher_pos: torch.Tensor
    """(B, L) the aligned teacher position of each model position, -1 if none."""
    scored: torch.Tensor
    """(B, L-1) bool: model position t has a real next token t + 1."""
    tokens_cut: int
    lost_bytes: int
    text_bytes: int


def align_batch(cm: CrossModel, rows: list[np.ndarray], *, device: torch.device) -> AlignedBatch:
    """The model's reading of teacher ``rows`` (each row's real tokens only: padding cut off)."""
    aligned = cm.aligner.align_rows(rows, max_len=cm.max_len)
    L = max([2, *(len(r.student_ids) for r in aligned)])
    B = len(rows)
    ids = torch.full((B, L), cm.aligner.pad_id, dtype=torch.int64)  # (B, L)
    spans = torch.zeros((B, L), dtype=torch.int64)  # (B, L)
    teacher_pos = torch.full((B, L), -1, dtype=torch.int64)  # (B, L)
    scored = torch.zeros((B, L - 1), dtype=torch.bool)  # (B, L-1)
    for b, (row, r) in enumerate(zip(rows, aligned, strict=True)):
        n = len(r.student_ids)
        ids[b, :n] = torch.from_numpy(r.student_ids)
        spans[b, :n] = torch.from_numpy(r.token_spans)
        # the teacher's last real position predicts past the row, as in training (kdcache.crosstok)
        teacher_pos[b, :n] = torch.from_numpy(np.where(r.teacher_pos < len(row) - 1, r.teacher_pos, -1))
        scored[b, : max(n - 1, 0)] = True
    return AlignedBatch(
        ids=ids.to(device),
        spans=spans.to(device),
        teacher_pos=teacher_pos.to(device),
        scored=scored.to(device),
        tokens_cut=sum(r.student_tokens_cut for r in aligned),
        lost_bytes=sum(r.lost_bytes for r in aligned),
        text_bytes=sum(int(r.token_spans.sum()) for r in aligned),
    )


def projected_kl(
    logp: torch.Tensor, logq: torch.Tensor, *, index: torch.Tensor, outside: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(projected teacher || model) per position on the projection's partition (module docstring).

    ``logp`` (c, V_t) teacher log-probs, ``logq`` (c, V) model log-probs (fp32), ``index`` (V_t,) the model id
    of each teacher id (V: the rest bucket), ``outside`` (V,) the model ids no teacher id lands on. Returns
    (kl (c,), the projected teacher's top-1 model id (c,), the teacher mass the projection keeps (c,)).
    When every model id is some teacher id's image, the model has no mass for the rest bucket: the kept
    mass is renormalized instead."""
    c, V = logq.shape
    P = torch.zeros((c, V + 1), dtype=logp.dtype, device=logp.device)  # (c, V + 1)
    P.scatter_add_(1, index.expand(c, -1), logp.exp())
    kept = P[:, :V].sum(-1)  # (c,)
    if bool(outside.any()):
        log_rest = torch.logsumexp(logq[:, outside], dim=-1, keepdim=True)  # (c, 1)
    else:
        P = torch.cat([P[:, :V] / kept.clamp_min(1e-30)[:, None], torch.zeros_like(P[:, :1])], dim=-1)
        log_rest = torch.zeros_like(logq[:, :1])  # (c, 1) unused: the bucket holds no teacher mass
    log_q = torch.cat([logq, log_rest], dim=-1)  # (c, V + 1)
    terms = torch.where(P > 0, P * (P.clamp_min(1e-30).log() - log_q), 0.0)  # (c, V + 1)
    return terms.sum(-1), P[:, :V].argmax(-1), kept


@torch.inference_mode()
def score_cross(
    tally: Tally, cm: CrossModel, logits: torch.Tensor, teacher_logits: torch.Tensor, a: AlignedBatch
) -> None:
    """Add one batch: the model's ``logits`` (B, L, V') on ``a.ids``, the teacher's ``teacher_logits``
    (B, T, V_t) on the teacher's rows; fp32 in chunks of positions."""
    B, L = a.ids.shape
    keep = a.scored.reshape(-1)  # (B*(L-1),)
    flat = logits[:, :-1, : cm.vocab].reshape(-1, cm.vocab)[keep]  # (N, V)
    labels = a.ids[:, 1:].reshape(-1)[keep]  # (N,)
    spans = a.spans[:, 1:].reshape(-1)[keep]  # (N,)
    pos = a.teacher_pos[:, :-1].reshape(-1)[keep]  # (N,) aligned teacher position or -1
    rows = torch.arange(B, device=a.ids.device)[:, None].expand(B, L - 1).reshape(-1)[keep]  # (N,)
    for s in range(0, flat.shape[0], CHUNK_POSITIONS):
        chunk = slice(s, s + CHUNK_POSITIONS)
        logq = F.log_softmax(flat[chunk].float(), dim=-1)  # (c, V)
        pred = tally.add_own_tokens(logq, labels[chunk], spans[chunk])
        aligned = pos[chunk] >= 0  # (c,)
        if not bool(aligned.any()):
            continue
        t_logits = teacher_logits[rows[chunk][aligned], pos[chunk][aligned]]  # (a, V_t)
        logp = F.log_softmax(t_logits.float(), dim=-1)  # (a, V_t)
        kl, top, kept = projected_kl(logp, logq[aligned], index=cm.index, outside=cm.outside)
        tally.kl += float(kl.sum())
        tally.agree += int((top == pred[aligned]).sum())
        tally.kl_n += int(aligned.sum())
        tally.cross["mass_kept"] += float(kept.sum())
    tally.cross["tokens_cut"] += a.tokens_cut
    tally.cross["lost_bytes"] += a.lost_bytes
    tally.cross["text_bytes"] += a.text_bytes


def cross_tally(cm: CrossModel, *, bins: int) -> Tally:
    """A fresh tally for a model of another tokenizer."""
    counts = {"mass_kept": 0.0, "tokens_cut": 0, "lost_bytes": 0, "text_bytes": 0}
    return Tally(bins=bins, cross={"projection": cm.method, "tokenizer_fingerprint": cm.fingerprint, **counts})
