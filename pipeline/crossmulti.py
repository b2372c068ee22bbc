"""Several teachers with different tokenizers, one student (issue 13 item 5): one text, each teacher's own
tokens, mixed in the student's vocabulary.

The lead teacher's token data fixes the text. Another teacher's token data is the lead's, row by row,
re-tokenized by that teacher (:mod:`kdcache.retokenize`: the bytes each lead row spells and its special
tokens, through :class:`kdcache.crosstok.Aligner`), so its cache covers the same text in the same rows,
in the same order (same row count and shard sizes: the same data order). Rows of two teachers cut the
text in the same places, which two ``kdcache prepare`` runs would not do.

:class:`CrossTeachersBatches` takes the aligned batches of every cache (as ``MultiCacheReader`` zips them)
and sends each teacher's rows to the student through its own
:class:`kdcache.crosstok.CrossTokenizerBatches` (its own byte alignment and projection into the student's
vocabulary). The rows spell the same text, so the student ids are the same from every teacher; that is
checked per row, on the lead's student tokens: a row where another teacher's differ (its re-tokenized
row was cut shorter) takes no target from that teacher (counted). At each student position the projected
targets of the teachers aligned there are mixed with their weights renormalized over those teachers
(per-position weights into ``kdcache.multi_teacher.mix_topk`` / ``mix_sampled``, in the student's
vocabulary: the mixture, its tail as for one tokenizer); a position no teacher aligned with is CE only.
``uld`` is refused: sorted probabilities of different teachers do not mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdcache.crosstok import CrossTokenizerBatches
from kdcache.multi_cache import unzip_parts
from kdcache.multi_teacher import mix_sampled, mix_topk, normalized_weights
from kdcache.tokenizer import tokenizer_vocab_size

__all__ = ["CrossTeachersBatches"]


class CrossTeachersBatches:
    """``apply``: the aligned batches of M caches (teachers of any tokenizers over the same rows of text) ->
    one student batch with the teachers' projected targets mixed (module docstring).

    Returns what :class:`kdcache.crosstok.CrossTokenizerBatches` returns for one teacher (``input_ids``,
    ``ce_mask``, ``loss_mask``, projected ``topk_*`` and/or ``sample_*`` targets); ``loss_mask``: aligned
    with at least one teacher.
    """

    def __init__(
        self,
        teacher_tokenizers: Sequence[Any],
        student_tokenizer: Any,
        *,
        weights: Sequence[float],
        method: str,
        student_seq_len: int,
        packings: Sequence[dict[str, Any]],
    ) -> None:
        if method == "uld":
            raise ValueError(
                "train.cross_tokenizer: uld compares sorted probabilities, which do not mix across teachers; "
                "use exact or prefix with several caches"
            )
        if not len(teacher_tokenizers) == len(weights) == len(packings):
            raise ValueError(f"{len(teacher_tokenizers)} teachers, {len(weights)} weights, {len(packings)} packings")
        self.weights = normalized_weights(weights)  # (M,)
        self.crosses = [
            CrossTokenizerBatches(t, student_tokenizer, method=method, student_seq_len=student_seq_len, packing=p)
            for t, p in zip(teacher_tokenizers, packings, strict=True)
        ]
        self.vocab = tokenizer_vocab_size(student_tokenizer)
        self.rows = self.soft = 0
        self.rows_mismatched = [0] * len(self.crosses)
        self.aligned = [0] * len(self.crosses)

    def apply(self, batch: dict[str, Tensor] | Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``batch``: the caches' batches, or one ``MultiCacheReader(cross=True)`` batch holding them all."""
        parts = unzip_parts(batch, len(self.crosses)) if isinstance(batch, dict) else batch
        outs = [c.apply(p) for c, p in zip(self.crosses, parts, strict=True)]
        lead = outs[0]
        ids, ce_mask = lead["input_ids"], lead["ce_mask"]  # (B, L), (B, L)
        B, L = ids.shape
        n = torch.where(ce_mask.any(1), ce_mask.sum(1) + 1, 0)  # (B,) the lead's student tokens per row
        real = torch.arange(L)[None, :] < n[:, None]  # (B, L)
        avail = []
        for k, out in enumerate(outs):
            same = ((out["input_ids"] == ids) | ~real).all(1)  # (B,) the same student ids as the lead's
            self.rows_mismatched[k] += int((~same).sum())
            a = out["loss_mask"] & ce_mask & same[:, None]  # (B, L)
            self.aligned[k] += int(a.sum())
            avail.append(a)
        self.rows += B
        self.soft += int(torch.stack(avail).any(0).sum())
        avail_t = torch.stack(avail)  # (M, B, L)
        w = self.weights.view(-1, 1, 1) * avail_t  # (M, B, L)
        total = w.sum(0, keepdim=True)  # (1, B, L)
        per_token = torch.where(total > 0, w / total.clamp_min(1e-300), self.weights.view(-1, 1, 1))  # (M, B, L)
        result = {"input_ids": ids, "ce_mask": ce_mask, "loss_mask": avail_t.any(0)}
        if "seq_index" in lead:
            result["seq_index"] = lead["seq_index"]
        if all("topk_ids" in o for o in outs):
            result |= mix_topk(
                [_topk_part(o, a) for o, a in zip(outs, avail, strict=True)], per_token, vocab_size=self.vocab
            )
        if all("sample_ids" in o for o in outs):
            result |= mix_sampled(
                [{k: o[k] for k in ("sample_ids", "sample_counts", "sample_total")} for o in outs], per_token
            )
        return result

    def reset(self) -> None:
        """Forget what earlier batches kept (``report`` starts again from zero)."""
        for c in self.crosses:
            c.reset()
        self.rows = self.soft = 0
        self.rows_mismatched, self.aligned = [0] * len(self.crosses), [0] * len(self.crosses)

    def report(self) -> dict[str, Any]:
        """The lead's ``CrossTokenizerBatches.report`` with ``soft_target_fraction``: the student tokens some
        teacher targets; ``teachers``: each one's report, the rows whose student ids differed from the lead's
        and the share of the student tokens it targets."""
        lead = self.crosses[0].report()
        tokens = max(lead["student_tokens"], 1)
        teachers = [
            c.report() | {"rows_mismatched": m, "soft_target_fraction_used": a / tokens}
            for c, m, a in zip(self.crosses, self.rows_mismatched, self.aligned, strict=True)
        ]
        return lead | {"soft_target_fraction": self.soft / tokens, "teachers": teachers, "rows": self.rows}


def _topk_part(out: dict[str, Tensor], avail: Tensor) -> dict[str, Tensor]:
    """A teacher's projected top-k target, its entries masked where it is not aligned (``avail`` (B, L));
    a missing ``topk_log_tail`` is -inf (the projection kept all the cached mass)."""
    ids = out["topk_ids"]  # (B, L, k)
    mask = out.get("topk_mask", torch.ones_like(ids, dtype=torch.bool)) & avail[..., None]  # (B, L, k)
    tail = out.get("topk_log_tail", torch.full(ids.shape[:2], -torch.inf))  # (B, L)
    return {
        "topk_ids": ids,
        "topk_logprobs": out["topk_logprobs"],
        "topk_mask": mask,
        "topk_log_tail": torch.where(avail, tail, -torch.inf),
    }
