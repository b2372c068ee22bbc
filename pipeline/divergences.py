"""The divergences of the KD loss menu on sparse targets: the math, on small tensors (DESIGN.md section 4).

A student enters only through a few numbers per position -- its logits at the target ids, its
log-normalizer and, for the coarse partition K + tail, the log-normalizer over the ids outside K --
so ``kdcache.fused_loss`` can compute a chunk's values and gradients without any (c, V) temporaries
but the softmax it needs.  The ``(n, V)``-logits functions (``coarse_student_logprobs``,
``topk_renorm_kl``, ``hard_ce``, ``sampled_ce``, ``dense_kl``) are the readable references.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

IGNORE_INDEX = -100
COARSE_KINDS = ("topk_tail", "reverse_kl", "jsd", "skew_kl", "tv")
"""Kinds that compare the coarse distributions on K + one tail bucket (``coarse_divergence``)."""
LOG_Q_TAIL_FLOOR = -1e4
"""log q_tail is clamped here: a student with (numerically) no mass outside K gets a large,
finite tail penalty instead of inf (q_tail = e^-10000 is far below any fp32 probability)."""
LOG_P_FLOOR = math.log(torch.finfo(torch.float32).tiny)
"""``reverse_kl`` clamps teacher log-probs here (-87.3, the smallest normal fp32): a bucket the
teacher gives 0 (a tail lost to fp32 rounding) costs q*(log q + 87.3) instead of inf."""


def dense_kl(teacher_logprobs: Tensor, student_logits: Tensor) -> Tensor:
    """Per-position KL(p_teacher || q_student) with full-vocabulary distributions, (..., V) -> (...).

    ``teacher_logprobs`` are normalized log-probs (-inf allowed); ``student_logits`` are raw.
    Computed in fp32 (or fp64 if an input is fp64).  Materializes (..., V) temporaries, so callers
    with long sequences should pass chunks of positions.
    """
    dtype = compute_dtype(teacher_logprobs, student_logits)
    logp = teacher_logprobs.to(dtype)  # (..., V)
    logq = torch.log_softmax(student_logits.to(dtype), dim=-1)  # (..., V)
    terms = torch.where(logp > -torch.inf, logp.exp() * (logp - logq), 0.0)  # (..., V); 0*log0 = 0
    return terms.sum(-1)


def tempered_topk_targets(
    topk_logprobs: Tensor,
    topk_mask: Tensor,
    *,
    temperature: float,
    vocab_size: int,
    log_tail: Tensor | None = None,
    log_z: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher log-probs on K and on the tail bucket at ``temperature``: (n, k) -inf padded, (n,).

    At tau = 1 the tail is ``log_tail`` (the cache's exact tail log-mass) or, without it,
    log(1 - sum_K p) in fp64 (a tail below fp32 rounding of the log-probs, ~1e-7, is lost).  At
    tau != 1, ``log_z`` (n,) = logsumexp_v(log p_v / tau) over the full vocabulary is required;
    then p_i = exp(log p_i / tau - log_z) on K and the tail is 1 - sum_K p_i (both exact).
    The tail is -inf (empty) where K holds all ``vocab_size`` ids.  1 - sum_K resolves a tail
    only to ~1e-16 absolute (fp64; ~1e-7 with an fp32 ``log_z``): at tau < 1 a tiny tempered tail
    is known to that precision, which ``reverse_kl`` (q_tail * log p_tail) feels.
    """
    dtype = compute_dtype(topk_logprobs)
    logp = topk_logprobs.to(dtype)  # (n, k)
    if temperature != 1.0:
        if log_z is None:
            raise ValueError(no_log_z_message("tempered_topk_targets", temperature))
        logp, log_tail = logp / temperature - log_z.to(dtype).unsqueeze(-1), None  # (n, k)
    logp = logp.masked_fill(~topk_mask, -torch.inf)  # (n, k)
    if log_tail is None:
        p_tail = (1.0 - logp.double().exp().sum(-1)).clamp_min(0.0)  # (n,) fp64: a tail ~1e-12 survives 1 - mass
        log_tail = p_tail.log()
    log_tail = log_tail.to(dtype).masked_fill(topk_mask.sum(-1) >= vocab_size, -torch.inf)  # (n,)
    return logp, log_tail


def coarse_logprobs(logits_k: Tensor, topk_mask: Tensor, *, log_norm: Tensor, log_rest: Tensor) -> Tensor:
    """Student log-probs on K + tail from its logits at K (n, k), its log-normalizer (n,) and the
    log-normalizer over the ids outside K (n,) -> (n, k+1).

    Padded entries hold finfo.min (probability 0, no gradient); log q_tail is clamped at ``LOG_Q_TAIL_FLOOR``.
    """
    fill = torch.finfo(logits_k.dtype).min
    logq_k = (logits_k - log_norm.unsqueeze(-1)).masked_fill(~topk_mask, fill)  # (n, k)
    log_q_tail = (log_rest - log_norm).clamp_min(LOG_Q_TAIL_FLOOR)  # (n,)
    return torch.cat([logq_k, log_q_tail.unsqueeze(-1)], dim=-1)


def coarse_student_logprobs(logits: Tensor, topk_ids: Tensor, topk_mask: Tensor) -> Tensor:
    """Student log-probs on K + tail, (n, V) logits (already / tau) -> (n, k+1): the reference form of
    ``coarse_logprobs``, with log q_tail a logsumexp over the non-K logits (never log(1 - sum q))."""
    n, vocab = logits.shape
    in_k = torch.zeros(n, vocab + 1, dtype=torch.bool, device=logits.device)  # (n, V+1); column V = padding
    in_k.scatter_(1, topk_ids.masked_fill(~topk_mask, vocab), True)
    fill = torch.finfo(logits.dtype).min  # not -inf: an empty tail (K = V) keeps a finite value and gradient
    log_rest = logits.masked_fill(in_k[:, :vocab], fill).logsumexp(-1)  # (n,)
    logits_k = logits.gather(1, topk_ids.masked_fill(~topk_mask, 0))  # (n, k)
    return coarse_logprobs(logits_k, topk_mask, log_norm=logits.logsumexp(-1), log_rest=log_rest)


def coarse_divergence(logp: Tensor, logq: Tensor, *, kind: str, beta: float = 0.5) -> Tensor:
    """Per-position divergence ``kind`` between coarse distributions, (n, k+1) log p, log q -> (n,).

    ``logp`` may hold -inf (empty buckets); ``logq`` must be finite (as from
    :func:`coarse_logprobs`).  ``kind`` is one of ``COARSE_KINDS``.
    """
    p, q = logp.exp(), logq.exp()  # (n, k+1)
    if kind == "topk_tail":
        return (_xlogx(p, logp) - p * logq).sum(-1)
    if kind == "reverse_kl":
        return torch.where(q > 0, q * (logq - logp.clamp_min(LOG_P_FLOOR)), 0.0).sum(-1)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    log_beta = math.log(beta) if beta > 0 else -math.inf
    log_m = torch.logaddexp(logp + log_beta, logq + math.log1p(-beta))  # (n, k+1) log(beta*p + (1-beta)*q)
    kl_p_m = (_xlogx(p, logp) - p * log_m).sum(-1)  # (n,) KL(p || m)
    if kind == "skew_kl":
        return kl_p_m
    if kind == "jsd":
        kl_q_m = torch.where(q > 0, q * (logq - log_m), 0.0).sum(-1)  # (n,) KL(q || m)
        return beta * kl_p_m + (1.0 - beta) * kl_q_m
    raise ValueError(f"coarse_divergence: kind must be one of {'|'.join(COARSE_KINDS)}, got {kind!r}")


def renorm_kl(logits_k: Tensor, *, teacher_logp: Tensor, topk_mask: Tensor) -> Tensor:
    """Per-position KL between teacher and student both renormalized over K, from the student's
    logits at K (n, k) (already / tau) and any teacher log-weights on K (n, k) -> (n,)."""
    logq_k = logits_k - masked_logsumexp(logits_k, topk_mask).unsqueeze(-1)  # (n, k) renormalized on K
    logp_k = teacher_logp.masked_fill(~topk_mask, -torch.inf)  # (n, k)
    logp_k = logp_k - masked_logsumexp(logp_k, topk_mask).unsqueeze(-1)  # (n, k); -inf padded
    p = logp_k.exp()  # (n, k)
    return (_xlogx(p, logp_k) - p * logq_k.masked_fill(~topk_mask, 0.0)).sum(-1)


def topk_renorm_kl(logits: Tensor, topk_ids: Tensor, *, teacher_logp: Tensor, topk_mask: Tensor) -> Tensor:
    """``renorm_kl`` from (n, V) logits (already / tau; log-probs work too): normalization cancels,
    so tempering the teacher log-weights by 1/tau is exact."""
    logits_k = logits.gather(1, topk_ids.masked_fill(~topk_mask, 0))  # (n, k)
    return renorm_kl(logits_k, teacher_logp=teacher_logp, topk_mask=topk_mask)


def argmax_entry(topk_logprobs: Tensor, topk_mask: Tensor) -> Tensor:
    """(n, 1) index into K of the teacher's argmax: the unmasked entry with the largest log-prob."""
    return topk_logprobs.masked_fill(~topk_mask, -torch.inf).argmax(-1, keepdim=True)


def hard_ce(logits: Tensor, topk_ids: Tensor, *, topk_logprobs: Tensor, topk_mask: Tensor) -> Tensor:
    """Per-position CE on the teacher's argmax id (the unmasked entry with the largest log-prob), (n,)."""
    ids = topk_ids.masked_fill(~topk_mask, 0).gather(1, argmax_entry(topk_logprobs, topk_mask))  # (n, 1)
    return logits.logsumexp(-1) - logits.gather(1, ids).squeeze(-1)


def sampled_weights(sample_counts: Tensor, sample_total: Tensor | None, dtype: torch.dtype) -> Tensor:
    """(n, S) weights c_j / S of the cached draws (0 for padding, count <= 0); S = ``sample_total`` or sum_j c_j."""
    counts = sample_counts.to(dtype).clamp_min(0.0)  # (n, S)
    total = counts.sum(-1) if sample_total is None else sample_total.to(dtype)  # (n,)
    return counts / total.clamp_min(torch.finfo(dtype).tiny).unsqueeze(-1)  # (n, S)


def sampled_ce(logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, sample_total: Tensor | None = None) -> Tensor:
    """Per-position Monte-Carlo cross-entropy -sum_j (c_j / S) log q_{s_j}, (n, V) -> (n,).

    S is ``sample_total`` (n,), the draws made at cache time; without it, sum_j c_j.  Unbiased
    for H(p_teacher, q) when the ids were drawn from p_teacher -- with S, also when some draws
    were dropped (unmapped ids): renormalizing over the kept draws would bias it.  Entries with
    count <= 0 are padding; a position with no draws gives 0.
    """
    weights = sampled_weights(sample_counts, sample_total, logits.dtype)  # (n, S)
    logq_s = logits.gather(1, sample_ids.masked_fill(sample_counts <= 0, 0)) - logits.logsumexp(-1, keepdim=True)
    return -(weights * logq_s).sum(-1)  # logq_s: (n, S)


def no_log_z_message(where: str, temperature: float) -> str:
    return (
        f"{where} at temperature {temperature} needs topk_log_z, the teacher's log-normalizer "
        f"logsumexp_v(log p_v / {temperature}) over the full vocabulary, and the cache has no log-normalizer "
        "at that temperature (the tail of the tempered teacher cannot be known without it); train at "
        "temperature 1, use kind='topk_renorm' (needs no tail), or rebuild the cache with that temperature stored"
    )


def masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """logsumexp over the last dim of the True entries; finite (very negative) for all-False rows,
    so neither the value nor the gradient is NaN."""
    return x.masked_fill(~mask, torch.finfo(x.dtype).min).logsumexp(-1)


def _xlogx(p: Tensor, logp: Tensor) -> Tensor:
    """p * log p with 0 * log 0 = 0, given p and its log (which may be -inf)."""
    return torch.where(p > 0, p * logp, 0.0)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (used by the float64 test references)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
