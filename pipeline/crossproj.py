"""Teacher soft targets -> a student vocabulary (``train.cross_tokenizer``), on positions
:mod:`kdcache.crosstok` aligned.

Methods (teacher id t spells bytes ``b_t``, :func:`kdcache.tokenizer.token_bytes`):

- ``exact``: t -> the student token spelling exactly ``b_t``; teacher mass on tokens the student lacks
  moves to the tail (``topk_log_tail``: ``topk_tail`` counts it there, ``topk_renorm`` renormalizes
  over the rest), sampled draws of them are dropped (``sample_total`` keeps the draws made, as
  ``kdcache.student.VocabMap`` does). Special (zero-byte) ids map as the alignment mirrors them.
- ``prefix``: t -> the first token of the student's own encoding of ``b_t`` (when that encoding spells
  ``b_t`` exactly; otherwise, e.g. a dummy-prefix space or bytes that are not whole characters, the
  longest student token that is a byte prefix of ``b_t``). Several teacher ids may land on one student
  id: their mass is merged. The student's next token then agrees with the teacher's next token on its
  first bytes, which is what a byte-aligned position can promise.
- ``uld``: no mapping (Boizard et al. 2024, Universal Logit Distillation): the loss compares the
  teacher's probabilities sorted in decreasing order with the student's, ``sum_r |p_(r) - q_(r)|``.
  With a top-k cache the teacher is known on its k largest entries plus one tail bucket, so
  :func:`uld_loss` sums the first k ranks and ``|tail_p - tail_q|`` (exact ULD when k covers the
  vocabulary; otherwise a lower bound of it, by the triangle inequality on the tail ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.losses import KDLossSpec, LossOutput, kd_loss

METHODS = ("exact", "prefix", "uld")


@dataclass(frozen=True)
class Projection:
    """``to_student`` (V_teacher,) int64: student id of each teacher id, -1 = none (None for ``uld``)."""

    method: str
    to_student: np.ndarray | None
    student_vocab_size: int

    def map(self, ids: np.ndarray) -> np.ndarray:
        """Student ids of teacher ``ids`` (any shape); -1 where none, and for ids past the tokenizer's id
        space (a model vocabulary padded beyond it)."""
        table = self.to_student
        inside = ids < table.size
        return np.where(inside, table[np.where(inside, ids, 0)], -1)

    def summary(self) -> dict[str, Any]:
        if self.to_student is None:
            return {"method": self.method}
        mapped = self.to_student >= 0
        return {
            "method": self.method,
            "teacher_ids": int(mapped.size),
            "teacher_ids_mapped": int(mapped.sum()),
            "student_ids_hit": int(np.unique(self.to_student[mapped]).size),
        }


def build_projection(
    method: str, *, teacher_bytes: list[bytes], student_tokenizer: Any, student_bytes: list[bytes], events: dict
) -> Projection:
    """The teacher -> student id table for ``method`` (module docstring); ``events``: the alignment's
    zero-byte teacher id -> student id map (``kdcache.crosstok.event_map``)."""
    if method not in METHODS:
        raise ValueError(f"train.cross_tokenizer: must be {'|'.join(METHODS)}, got {method!r}")
    size = len(student_bytes)
    if method == "uld":
        return Projection(method, None, size)
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(student_bytes):
        if b:
            by_bytes.setdefault(b, i)
    table = np.full(len(teacher_bytes), -1, np.int64)
    for t, b in enumerate(teacher_bytes):
        table[t] = by_bytes.get(b, -1) if b else events.get(t, -1)
    if method == "prefix":
        todo = [t for t, b in enumerate(teacher_bytes) if b and table[t] < 0]
        firsts = first_student_tokens([teacher_bytes[t] for t in todo], student_tokenizer, student_bytes, by_bytes)
        table[todo] = firsts
    return Projection(method, table, size)


def first_student_tokens(
    pieces: list[bytes], student_tokenizer: Any, student_bytes: list[bytes], by_bytes: dict[bytes, int]
) -> list[int]:
    """For each byte string, the first token of the student's encoding of it when that encoding spells it
    exactly, else the longest student token that is a byte prefix of it (-1 if none)."""
    out = [-1] * len(pieces)
    texts = {n: p.decode("utf-8") for n, p in enumerate(pieces) if _is_utf8(p)}
    encoded = student_tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"] if texts else []
    for n, ids in zip(texts, encoded, strict=True):
        if ids and b"".join(student_bytes[i] for i in ids) == pieces[n]:
            out[n] = int(ids[0])
    longest = max((len(b) for b in by_bytes), default=0)
    for n, piece in enumerate(pieces):
        for m in range(min(longest, len(piece)), 0, -1) if out[n] < 0 else ():
            if piece[:m] in by_bytes:
                out[n] = by_bytes[piece[:m]]
                break
    return out


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def merge_by_row(ids: np.ndarray, weights: np.ndarray, *, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``weights`` (N, k) float64 of equal ``ids`` (N, k) within each row; ids < 0 are dropped.

    Returns (N, k') ids and summed weights, each row's distinct ids first (ascending), then padding
    (id 0, weight 0); k' = the most distinct ids in a row (at least 1)."""
    N = ids.shape[0]
    keep = ids >= 0  # (N, k)
    rows = np.broadcast_to(np.arange(N)[:, None], ids.shape)[keep]
    keys, inverse = np.unique(rows * vocab_size + ids[keep], return_inverse=True)
    summed = np.bincount(inverse, weights=weights[keep], minlength=keys.size)  # (U,)
    key_rows, key_ids = keys // vocab_size, keys % vocab_size
    per_row = np.bincount(key_rows, minlength=N)  # (N,)
    width = max(int(per_row.max(initial=0)), 1)
    slot = np.arange(keys.size) - np.concatenate([[0], np.cumsum(per_row)[:-1]])[key_rows]
    out_ids, out_w = np.zeros((N, width), np.int64), np.zeros((N, width), np.float64)
    out_ids[key_rows, slot], out_w[key_rows, slot] = key_ids, summed
    return out_ids, out_w


def _gather(x: Tensor, pos: Tensor) -> Tensor:
    """x (B, T, ...) at positions pos (B, T') along dim 1 -> (B, T', ...)."""
    index = pos.reshape(*pos.shape, *([1] * (x.dim() - 2))).expand(*pos.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def project_batch_targets(
    batch: dict[str, Tensor], pos: Tensor, aligned: Tensor, *, projection: Projection
) -> tuple[dict[str, Tensor], float, float]:
    """The teacher targets of ``batch`` at teacher positions ``pos`` (B, T) for the student positions,
    projected by ``projection``. Returns (targets, teacher mass kept, teacher mass cached), both masses
    summed over the ``aligned`` (B, T) positions (sampled targets: fractions of the draws)."""
    mask = aligned.numpy()
    if "topk_ids" in batch:
        ids, logp = _gather(batch["topk_ids"], pos), _gather(batch["topk_logprobs"], pos)  # (B, T, k)
        real = _gather(batch["topk_mask"], pos) if "topk_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
        tail = _gather(batch["topk_log_tail"], pos) if "topk_log_tail" in batch else None  # (B, T)
        p = np.where(real.numpy(), np.exp(logp.numpy().astype(np.float64)), 0.0)  # (B, T, k)
        cached = float(p.sum(-1)[mask].sum())
        if projection.to_student is None:
            tail_p = torch.exp(tail.double()) if tail is not None else (1.0 - torch.from_numpy(p.sum(-1))).clamp_min(0)
            return uld_targets(torch.from_numpy(p), tail_p), cached, cached
        targets, kept = _project_topk(ids.numpy(), p, tail, projection)
        return targets, float(kept[mask].sum()), cached
    if "sample_ids" in batch:
        ids, counts = _gather(batch["sample_ids"], pos), _gather(batch["sample_counts"], pos)  # (B, T, S)
        total = _gather(batch["sample_total"], pos) if "sample_total" in batch else counts.sum(-1)  # (B, T)
        share = (counts.double() / total.double().clamp_min(1)[..., None]).numpy()  # (B, T, S)
        cached = float(share.sum(-1)[mask].sum())
        if projection.to_student is None:
            return uld_targets(torch.from_numpy(share), torch.zeros(pos.shape, dtype=torch.float64)), cached, cached
        B, T, S = ids.shape
        mapped = projection.map(ids.numpy()).reshape(B * T, S)
        merged_ids, merged_counts = merge_by_row(
            mapped, counts.numpy().astype(np.float64).reshape(B * T, S), vocab_size=projection.student_vocab_size
        )
        kept = (merged_counts.sum(-1).reshape(B, T) / total.double().clamp_min(1).numpy())[mask].sum()
        out = {
            "sample_ids": torch.from_numpy(merged_ids.reshape(B, T, -1)),
            "sample_counts": torch.from_numpy(merged_counts.reshape(B, T, -1).astype(np.float32)),
            "sample_total": total.float(),
        }
        return out, float(kept), cached
    return {}, 0.0, 0.0


def _project_topk(
    ids: np.ndarray, p: np.ndarray, log_tail: Tensor | None, projection: Projection
) -> tuple[dict[str, Tensor], np.ndarray]:
    B, T, k = ids.shape
    mapped = projection.map(ids).reshape(B * T, k)  # (N, k)
    flat_p = p.reshape(B * T, k)
    merged_ids, merged_p = merge_by_row(mapped, flat_p, vocab_size=projection.student_vocab_size)  # (N, k')
    dropped = np.where(mapped < 0, flat_p, 0.0).sum(-1)  # (N,) mass on ids the student lacks
    old_tail = np.exp(log_tail.numpy().astype(np.float64)).reshape(-1) if log_tail is not None else 0.0
    with np.errstate(divide="ignore"):
        log_p = np.where(merged_p > 0, np.log(merged_p), -np.inf)
        new_tail = np.log(old_tail + dropped)  # (N,)
    targets = {
        "topk_ids": torch.from_numpy(merged_ids.reshape(B, T, -1)),
        "topk_logprobs": torch.from_numpy(log_p.reshape(B, T, -1).astype(np.float32)),
        "topk_mask": torch.from_numpy((merged_p > 0).reshape(B, T, -1)),
    }
    if log_tail is not None or dropped.any():
        targets["topk_log_tail"] = torch.from_numpy(new_tail.reshape(B, T).astype(np.float32))
    return targets, merged_p.sum(-1).reshape(B, T)


def uld_targets(probs: Tensor, tail: Tensor) -> dict[str, Tensor]:
    """``uld_probs`` (B, T, k): the teacher's cached probabilities sorted in decreasing order (padding 0),
    ``uld_tail`` (B, T): its mass outside them, ``uld_mask`` (B, T, k): the real entries."""
    sorted_p = probs.sort(dim=-1, descending=True).values  # (B, T, k)
    real = torch.arange(probs.shape[-1])[None, None, :] < (probs > 0).sum(-1, keepdim=True)  # (B, T, k)
    return {"uld_probs": sorted_p.float(), "uld_tail": tail.float(), "uld_mask": real}


def uld_loss(
    logits: Tensor, *, uld_probs: Tensor, uld_tail: Tensor, uld_mask: Tensor, loss_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Sorted-probability (ULD) distance between the student's ``logits`` (B, T, V) and the teacher's
    sorted probabilities, summed over the teacher's real ranks plus the tail bucket (module docstring).

    Returns (mean over ``loss_mask`` (B, T) positions, the count of those positions); fp32 math."""
    q = torch.softmax(logits.float(), dim=-1)  # (B, T, V)
    k = uld_probs.shape[-1]
    top = q.topk(min(k, q.shape[-1]), dim=-1).values  # (B, T, min(k, V)), decreasing
    if top.shape[-1] < k:
        top = torch.nn.functional.pad(top, (0, k - top.shape[-1]))  # (B, T, k): the student has fewer ids
    real = uld_mask.to(top.device)
    top = top * real  # (B, T, k): the student's ranks beyond the teacher's real ones join its tail
    q_tail = (1.0 - top.sum(-1)).clamp_min(0)  # (B, T)
    per_position = (uld_probs.to(top) - top).abs().sum(-1) + (uld_tail.to(top) - q_tail).abs()  # (B, T)
    mask = loss_mask.to(top.device)
    count = mask.sum()
    return (per_position * mask).sum() / count.clamp_min(1), count


def uld_output(logits: Tensor, *, input_ids: Tensor, spec: KDLossSpec, batch: dict[str, Tensor]) -> LossOutput:
    """The trainer's loss for ``train.cross_tokenizer: uld``: ``(1 - alpha) * CE + alpha * ULD`` as a
    ``kdcache.losses.LossOutput`` (``kd`` = the ULD term; needs the full (B, T, V) ``logits``)."""
    dev = logits.device
    masks = {k: batch[k].to(dev, non_blocking=True) for k in ("ce_mask", "loss_mask") if k in batch}
    ce = kd_loss(logits, input_ids=input_ids, spec=replace(spec, kind="ce"), ce_mask=masks.get("ce_mask"))
    uld, count = uld_loss(
        logits,
        **{k: batch[k].to(dev, non_blocking=True) for k in ("uld_probs", "uld_tail", "uld_mask")},
        loss_mask=masks["loss_mask"],
    )
    loss = (1 - spec.alpha) * ce.loss + spec.alpha * uld
    return LossOutput(loss=loss, kd=uld.detach(), ce=ce.ce, kd_count=count, ce_count=ce.ce_count)
