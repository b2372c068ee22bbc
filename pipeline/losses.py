"""Sparse knowledge-distillation losses over cached teacher targets (DESIGN.md section 4).

Pure torch: no I/O, no global state.  Every loss is a mean over token positions of a
per-position term, mixed with hard-label cross-entropy::

    loss = alpha * kd + (1 - alpha) * ce,     kd = tau**2 * mean_t KD_t

Kinds (``KDLossSpec.kind``):

* ``topk_tail`` -- KL between the coarse-grained distributions over the teacher's top-k set K
  plus one "tail" bucket: sum_{i in K} p_i log(p_i/q_i) + p_tail log(p_tail/q_tail).  Exact for
  the coarse-grained distribution; adaptive top-k pads K with masked entries.
* ``topk_renorm`` -- KL between p and q both renormalized over K (the common, biased variant).
* ``sampled`` -- unbiased Monte-Carlo estimate of the *cross-entropy* H(p, q) to the full teacher
  distribution from ids drawn at cache time: -sum_j (c_j / sum c) log q_{s_j}.  It is CE, not KL:
  it differs from KL(p||q) by the teacher entropy, a constant for the student.
* ``ce`` -- hard-label cross-entropy only (alpha is ignored).

Memory: the (B, T, V) logits are flattened to (N, V) and processed ``chunk_tokens`` rows at a
time; a custom autograd function recomputes each chunk in backward (activation checkpointing)
and writes its gradient into one preallocated buffer.  The only full-size float tensor created
besides the logits is that gradient, which backward needs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

KINDS = ("topk_tail", "topk_renorm", "sampled", "ce")
IGNORE_INDEX = -100
LOG_Q_TAIL_FLOOR = -1e4
"""log q_tail is clamped here: a student with (numerically) no mass outside K gets a large,
finite tail penalty instead of inf (q_tail = e^-10000 is far below any fp32 probability)."""


@dataclass(frozen=True)
class KDLossSpec:
    """Which KD loss to compute and how to mix it with hard-label CE."""

    kind: str = "topk_tail"
    """``topk_tail`` | ``topk_renorm`` | ``sampled`` | ``ce`` (hard-label CE only)."""
    alpha: float = 0.5
    """Weight of the KD term: loss = alpha*KD + (1 - alpha)*CE; ignored for ``ce``."""
    temperature: float = 1.0
    """KD temperature tau: student logits / tau, teacher re-tempered, KD scaled by tau**2."""
    chunk_tokens: int = 1024
    """Token positions per chunk; caps the fp32 (chunk, V) working set."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"KDLossSpec.kind: must be one of {'|'.join(KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"KDLossSpec.alpha: must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"KDLossSpec.temperature: must be > 0, got {self.temperature}")
        if self.kind == "sampled" and self.temperature != 1.0:
            raise ValueError(
                f"KDLossSpec.temperature: kind='sampled' supports only temperature=1.0, got {self.temperature}; "
                "samples were drawn from the temperature-1 teacher and cannot be re-tempered. "
                "Use kind='topk_tail' for tau != 1, or cache samples drawn at the temperature you need."
            )
        if self.chunk_tokens <= 0:
            raise ValueError(f"KDLossSpec.chunk_tokens: must be > 0, got {self.chunk_tokens}")


@dataclass(frozen=True)
class LossOutput:
    """Result of :func:`kd_loss`.  ``loss == alpha*kd + (1-alpha)*ce`` (``loss == ce`` for kind ce)."""

    loss: Tensor
    """Scalar training loss, differentiable w.r.t. the logits."""
    kd: Tensor
    """Detached scalar: tau**2 * mean KD over counted positions (0 for kind ``ce``)."""
    ce: Tensor
    """Detached scalar: mean hard-label CE over the B*(T-1) positions that have a next token."""
    n_tokens: int
    """Positions counted in the KD mean (for kind ``ce``: in the CE mean)."""


def dense_kl(teacher_logprobs: Tensor, student_logits: Tensor) -> Tensor:
    """Per-position KL(p_teacher || q_student) with full-vocabulary distributions, (..., V) -> (...).

    ``teacher_logprobs`` are normalized log-probs (-inf allowed); ``student_logits`` are raw.
    Computed in fp32 (or fp64 if an input is fp64).  Materializes (..., V) temporaries, so callers
    with long sequences should pass chunks of positions.
    """
    dtype = _compute_dtype(teacher_logprobs, student_logits)
    logp = teacher_logprobs.to(dtype)  # (..., V)
    logq = F.log_softmax(student_logits.to(dtype), dim=-1)  # (..., V)
    terms = torch.where(logp > -torch.inf, logp.exp() * (logp - logq), 0.0)  # (..., V); 0*log0 = 0
    return terms.sum(-1)


def tempered_topk_targets(
    topk_logprobs: Tensor, topk_mask: Tensor, *, temperature: float, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Teacher log-probs on K and on the tail bucket, re-tempered at ``temperature``.

    Input log-probs are over the full vocab at temperature 1, so p_tail = 1 - sum_K p (clamped at
    0; exactly 0 when K holds all ``vocab_size`` ids).  Tempering raises each of the k+1 buckets
    to 1/tau and renormalizes.  For tau != 1 this is an approximation: the true tempered teacher
    re-weights the tail ids individually, which the cache no longer knows.
    Returns (log p~_K (n, k), -inf at padded entries; log p~_tail (n,), -inf if empty).
    """
    dtype = _compute_dtype(topk_logprobs)
    logp = topk_logprobs.to(dtype).masked_fill(~topk_mask, -torch.inf)  # (n, k)
    mass = logp.double().exp().sum(-1)  # (n,) fp64 so that a tail ~1e-12 survives 1 - mass
    p_tail = (1.0 - mass).clamp_min(0.0)  # (n,)
    p_tail = p_tail.masked_fill(topk_mask.sum(-1) >= vocab_size, 0.0)  # K = whole vocab: no tail
    buckets = torch.cat([logp, p_tail.log().to(dtype).unsqueeze(-1)], dim=-1) / temperature  # (n, k+1)
    buckets = buckets - _masked_logsumexp(buckets, buckets > -torch.inf).unsqueeze(-1)  # (n, k+1)
    return buckets[:, :-1], buckets[:, -1]


def topk_tail_kl(
    student_logprobs: Tensor, topk_ids: Tensor, *, teacher_logp: Tensor, teacher_log_tail: Tensor, topk_mask: Tensor
) -> Tensor:
    """Per-position KL of the (K + tail) coarse-grained distributions, (n, V) student -> (n,).

    ``teacher_logp`` (n, k) / ``teacher_log_tail`` (n,) come from :func:`tempered_topk_targets`.
    log q_tail is a logsumexp over the student's non-K log-probs (never log(1 - sum q)).
    """
    n, vocab = student_logprobs.shape
    fill = torch.finfo(student_logprobs.dtype).min
    ids = topk_ids.masked_fill(~topk_mask, vocab)  # (n, k) padded -> dummy column V
    ext = F.pad(student_logprobs, (0, 1), value=fill)  # (n, V+1); dummy column holds no mass
    logq_k = ext.gather(1, ids)  # (n, k); padded entries read the dummy column
    log_q_tail = ext.scatter(1, ids, fill).logsumexp(-1).clamp_min(LOG_Q_TAIL_FLOOR)  # (n,)
    p = teacher_logp.exp()  # (n, k); 0 at padded entries
    p_tail = teacher_log_tail.exp()  # (n,)
    neg_entropy = _xlogx(p, teacher_logp).sum(-1) + _xlogx(p_tail, teacher_log_tail)  # (n,)
    cross = (p * logq_k).sum(-1) + p_tail * log_q_tail  # (n,)
    return neg_entropy - cross


def topk_renorm_kl(student_logprobs: Tensor, topk_ids: Tensor, *, teacher_logp: Tensor, topk_mask: Tensor) -> Tensor:
    """Per-position KL between teacher and student both renormalized over K, (n, V) -> (n,)."""
    logq_k = student_logprobs.gather(1, topk_ids.masked_fill(~topk_mask, 0))  # (n, k)
    logq_k = logq_k - _masked_logsumexp(logq_k, topk_mask).unsqueeze(-1)  # (n, k) renormalized on K
    logp_k = teacher_logp - _masked_logsumexp(teacher_logp, topk_mask).unsqueeze(-1)  # (n, k); -inf padded
    p = logp_k.exp()  # (n, k)
    return (_xlogx(p, logp_k) - p * logq_k.masked_fill(~topk_mask, 0.0)).sum(-1)


def sampled_ce(student_logprobs: Tensor, sample_ids: Tensor, sample_counts: Tensor) -> Tensor:
    """Per-position Monte-Carlo cross-entropy -sum_j (c_j / sum c) log q_{s_j}, (n, V) -> (n,).

    Unbiased for H(p_teacher, q) when the ids were drawn from p_teacher; it is CE, not KL.
    Entries with count <= 0 are padding; a position with no draws gives 0.
    """
    counts = sample_counts.to(student_logprobs.dtype).clamp_min(0.0)  # (n, S)
    total = counts.sum(-1, keepdim=True)  # (n, 1)
    weights = counts / total.clamp_min(torch.finfo(counts.dtype).tiny)  # (n, S)
    logq_s = student_logprobs.gather(1, sample_ids.masked_fill(counts <= 0, 0))  # (n, S)
    return -(weights * logq_s).sum(-1)


def kd_loss(
    logits: Tensor,
    *,
    input_ids: Tensor,
    spec: KDLossSpec,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    topk_mask: Tensor | None = None,
    sample_ids: Tensor | None = None,
    sample_counts: Tensor | None = None,
    loss_mask: Tensor | None = None,
) -> LossOutput:
    """``alpha * KD + (1 - alpha) * CE`` for student ``logits`` (B, T, V) against cached targets.

    Soft targets (B, T, k) / (B, T, S) exist for all T positions (the teacher's next-token
    distribution at t); the hard label of position t is ``input_ids[:, t+1]``, so CE averages over
    the first T-1 positions.  KD averages over positions where ``loss_mask`` (B, T) is True (and,
    for ``sampled``, that have at least one draw).  ``loss_mask`` does not affect CE.
    ``topk_mask`` (B, T, k) marks real top-k entries (None = all real); padded entries carry no
    probability and get no gradient.  Ids must lie in [0, V).
    """
    _check_inputs(
        logits,
        input_ids=input_ids,
        spec=spec,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        topk_mask=topk_mask,
        sample_ids=sample_ids,
        sample_counts=sample_counts,
        loss_mask=loss_mask,
    )
    batch, seq, vocab = logits.shape
    flat = logits.reshape(batch * seq, vocab)  # (N, V); a view for contiguous logits
    labels = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (N,); last position ignored
    kd_rows = _kd_rows(
        spec, batch=batch, seq=seq, device=logits.device, loss_mask=loss_mask, sample_counts=sample_counts
    )  # (N,) bool
    if spec.kind in ("topk_tail", "topk_renorm") and topk_mask is None:
        topk_mask = torch.ones_like(topk_ids, dtype=torch.bool)
    targets = [
        _flat_rows(t) for t in _target_tensors(spec.kind, topk_ids, topk_logprobs, topk_mask, sample_ids, sample_counts)
    ]  # each (N, ...)
    kd_sum, ce_sum = _ChunkedSums.apply(flat, labels, kd_rows, spec, vocab, *targets)  # (), ()
    n_kd = int(kd_rows.sum()) if spec.kind != "ce" else batch * (seq - 1)
    ce = ce_sum / max(batch * (seq - 1), 1)
    if spec.kind == "ce":
        return LossOutput(loss=ce, kd=torch.zeros_like(ce).detach(), ce=ce.detach(), n_tokens=n_kd)
    kd = kd_sum * spec.temperature**2 / max(n_kd, 1)
    loss = spec.alpha * kd + (1.0 - spec.alpha) * ce
    return LossOutput(loss=loss, kd=kd.detach(), ce=ce.detach(), n_tokens=n_kd)


class _ChunkedSums(torch.autograd.Function):
    """(sum_t KD_t, sum_t CE_t) over all N rows, computed ``spec.chunk_tokens`` rows at a time.

    Hand-rolled activation checkpointing: forward keeps no (chunk, V) intermediates; backward
    recomputes each chunk and writes its gradient straight into one preallocated (N, V) buffer.
    ``torch.utils.checkpoint`` over split chunks gives the same values, but its backward holds every
    chunk's gradient and then their concatenation: two logits-sized tensors instead of one.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        flat: Tensor,
        labels: Tensor,
        kd_rows: Tensor,
        spec: KDLossSpec,
        vocab_size: int,
        *targets: Tensor,
    ) -> tuple[Tensor, Tensor]:
        ctx.spec, ctx.vocab_size = spec, vocab_size
        ctx.save_for_backward(flat, labels, kd_rows, *targets)
        kd_sum = ce_sum = flat.new_zeros((), dtype=_compute_dtype(flat))
        for chunk in _chunks(spec.chunk_tokens, flat, labels, kd_rows, *targets):
            kd_tok, ce_tok = _chunk_terms(*chunk, spec=spec, vocab_size=vocab_size)  # (c,), (c,)
            kd_sum = kd_sum + kd_tok.sum()
            ce_sum = ce_sum + ce_tok.sum()
        return kd_sum, ce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_kd: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        flat, *rest = ctx.saved_tensors
        grad = torch.empty_like(flat)  # (N, V): the one logits-sized tensor, in the logits' dtype
        chunks = _chunks(ctx.spec.chunk_tokens, grad, flat, *rest)
        for grad_chunk, z, *chunk_rest in chunks:
            with torch.enable_grad():
                z = z.detach().requires_grad_()  # (c, V) leaf for the recomputation
                kd_tok, ce_tok = _chunk_terms(z, *chunk_rest, spec=ctx.spec, vocab_size=ctx.vocab_size)
                total = grad_kd * kd_tok.sum() + grad_ce * ce_tok.sum()
                (grad_z,) = torch.autograd.grad(total, z)  # (c, V)
            grad_chunk.copy_(grad_z)
        return grad, *([None] * (len(ctx.needs_input_grad) - 1))


def _chunks(size: int, *tensors: Tensor) -> zip:
    """Row chunks of equal-length tensors: yields tuples of (c, ...) views."""
    return zip(*(t.split(size) for t in tensors), strict=True)


def _chunk_terms(
    logits: Tensor, labels: Tensor, kd_rows: Tensor, *targets: Tensor, spec: KDLossSpec, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Per-position (KD before tau**2, CE) for one chunk of c rows."""
    z = logits.to(_compute_dtype(logits))  # (c, V) fp32 working copy
    logq = F.log_softmax(z, dim=-1)  # (c, V)
    ce_tok = F.nll_loss(logq, labels, ignore_index=IGNORE_INDEX, reduction="none")  # (c,); 0 where ignored
    if spec.kind == "ce":
        return torch.zeros_like(ce_tok), ce_tok
    if spec.temperature != 1.0:
        logq = F.log_softmax(z / spec.temperature, dim=-1)  # (c, V) tempered student
    if spec.kind == "sampled":
        ids, counts = targets
        kd_tok = sampled_ce(logq, ids, counts.masked_fill(~kd_rows.unsqueeze(-1), 0))  # (c,)
    else:
        ids, logprobs, mask = targets
        mask = mask & kd_rows.unsqueeze(-1)  # (c, k); excluded rows carry no teacher weight
        logp, log_tail = tempered_topk_targets(
            logprobs, mask, temperature=spec.temperature, vocab_size=vocab_size
        )  # (c, k), (c,)
        log_tail = log_tail.masked_fill(~kd_rows, -torch.inf)  # (c,)
        if spec.kind == "topk_tail":
            kd_tok = topk_tail_kl(logq, ids, teacher_logp=logp, teacher_log_tail=log_tail, topk_mask=mask)  # (c,)
        else:
            kd_tok = topk_renorm_kl(logq, ids, teacher_logp=logp, topk_mask=mask)  # (c,)
    return torch.where(kd_rows, kd_tok, 0.0), ce_tok


def _kd_rows(
    spec: KDLossSpec,
    *,
    batch: int,
    seq: int,
    device: torch.device,
    loss_mask: Tensor | None,
    sample_counts: Tensor | None,
) -> Tensor:
    """(N,) bool: positions counted in the KD mean."""
    rows = torch.ones(batch * seq, dtype=torch.bool, device=device)  # (N,)
    if loss_mask is not None:
        rows = rows & loss_mask.reshape(-1).to(device=device, dtype=torch.bool)
    if spec.kind == "sampled":
        rows = rows & (sample_counts.reshape(batch * seq, -1) > 0).any(-1)  # (N,) at least one draw
    return rows


def _target_tensors(kind: str, *tensors: Tensor | None) -> list[Tensor]:
    topk_ids, topk_logprobs, topk_mask, sample_ids, sample_counts = tensors
    if kind == "sampled":
        return [sample_ids, sample_counts]
    if kind == "ce":
        return []
    return [topk_ids, topk_logprobs, topk_mask]


def _flat_rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])  # (B, T, ...) -> (N, ...)


def _check_inputs(logits: Tensor, **kw: Tensor | KDLossSpec | None) -> None:
    """Refuse missing or mis-shaped inputs with a message naming the argument."""
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"kd_loss: logits must be a float (B, T, V) tensor, got {tuple(logits.shape)} {logits.dtype}")
    bt = tuple(logits.shape[:2])
    spec = kw.pop("spec")
    required = {
        "topk_tail": ("topk_ids", "topk_logprobs"),
        "topk_renorm": ("topk_ids", "topk_logprobs"),
        "sampled": ("sample_ids", "sample_counts"),
        "ce": (),
    }[spec.kind]
    for name in required:
        if kw[name] is None:
            raise ValueError(f"kd_loss: kind={spec.kind!r} needs {name}; pass the cache's {name} for this batch")
    for name, t in kw.items():
        if t is not None and tuple(t.shape[:2]) != bt:
            raise ValueError(f"kd_loss: {name} has shape {tuple(t.shape)}; expected leading dims (B, T) = {bt}")
    for a, b in (("topk_ids", "topk_logprobs"), ("topk_ids", "topk_mask"), ("sample_ids", "sample_counts")):
        ta, tb = kw[a], kw[b]
        if ta is not None and tb is not None and ta.shape != tb.shape:
            raise ValueError(f"kd_loss: {a} {tuple(ta.shape)} and {b} {tuple(tb.shape)} must have the same shape")
    for name in ("input_ids", "topk_ids", "sample_ids"):
        t = kw[name]
        if t is not None and (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"kd_loss: {name} must be an integer tensor, got {t.dtype}")
    if logits.shape[1] < 2 and spec.kind == "ce":
        raise ValueError("kd_loss: kind='ce' needs T >= 2 (position t predicts input_ids[:, t+1])")


def _masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """logsumexp over the last dim of the True entries; finite (very negative) for all-False rows,
    so neither the value nor the gradient is NaN."""
    return x.masked_fill(~mask, torch.finfo(x.dtype).min).logsumexp(-1)


def _xlogx(p: Tensor, logp: Tensor) -> Tensor:
    """p * log p with 0 * log 0 = 0, given p and its log (which may be -inf)."""
    return torch.where(p > 0, p * logp, 0.0)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (used by the float64 test references)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
