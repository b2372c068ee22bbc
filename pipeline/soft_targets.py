"""Dense soft targets from a cache's sparse teacher data: estimators of the teacher's next-token distribution p.

The KD term of a target t is the cross-entropy H(t, q) = -sum_v t_v log q_v of the student's softmax q; its
logit gradient is (sum_v t_v) q - t, so an estimator t with E[t] = p gives an unbiased gradient of KL(p || q).
These are the readable (n, V) forms, exact in float64, that ``bench/kd_quality_study3.py`` trains with and the
tests check by enumerating every outcome of the draws:

* :func:`sampled_target` -- t = c / S from S draws of p (the ``sampled`` loss of ``kdcache.losses``).
* :func:`label_exact_target` -- the draws plus the teacher's exact probability of the actual next token
  (``teacher_nll``, a v2 signal): t = p_l on the label l, and the draws that missed l share 1 - p_l
  (Rao-Blackwellized on the label; bias p_l^S toward l, from positions where every draw hit l).
* :func:`stratified_target` -- a top-k head plus draws (cache targets ``both``): t = p on K exactly, the tail
  mass p_tail shared by the draws outside K; where none fell outside K, the tail is spread as the student's own
  tail (the ``topk_tail`` gradient there). Draws from p (today's sampler) or from the tail alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


def counts_target(ids: Tensor, weights: Tensor, vocab: int) -> Tensor:
    """(n, S) ids and weights -> (n, V) dense target: each id gets the sum of its weights."""
    out = torch.zeros(ids.shape[0], vocab, dtype=weights.dtype, device=weights.device)
    return out.scatter_add_(1, ids.long(), weights)


def sampled_target(sample_ids: Tensor, sample_counts: Tensor, sample_total: Tensor, vocab: int) -> Tensor:
    """(n, S) ids / counts (0 = padding) of ``sample_total`` (n,) draws from p -> (n, V) t = c / S."""
    total = sample_total.to(torch.float64).clamp_min(1.0).unsqueeze(-1)  # (n, 1)
    return counts_target(sample_ids, sample_counts.to(torch.float64).clamp_min(0.0) / total, vocab)


def label_exact_target(
    sample_ids: Tensor, sample_counts: Tensor, sample_total: Tensor, labels: Tensor, label_logp: Tensor, vocab: int
) -> Tensor:
    """Draws from p plus the exact log p of each position's label -> (n, V) float64 target.

    ``labels`` (n,) the next token (< 0: none), ``label_logp`` (n,) its teacher log-prob (NaN: unknown). With m
    of the S draws away from the label: t_l = p_l and t_v = (1 - p_l) c_v / m elsewhere; m = 0 gives t = e_l
    (what the draws say). Rows without a label or its log-prob get :func:`sampled_target`.
    """
    plain = sampled_target(sample_ids, sample_counts, sample_total, vocab)  # (n, V)
    known = (labels >= 0) & torch.isfinite(label_logp)  # (n,)
    lab = labels.clamp_min(0).long().unsqueeze(-1)  # (n, 1)
    counts = counts_target(sample_ids, sample_counts.to(torch.float64).clamp_min(0.0), vocab)  # (n, V)
    p_lab = label_logp.to(torch.float64).nan_to_num(0.0).exp().clamp(0.0, 1.0)  # (n,)
    others = counts.scatter(1, lab, 0.0)  # (n, V) the draws that missed the label
    m = others.sum(-1, keepdim=True)  # (n, 1)
    exact = others * ((1.0 - p_lab).unsqueeze(-1) / m.clamp_min(1.0))  # (n, V)
    exact = exact.scatter(1, lab, torch.where(m > 0, p_lab.unsqueeze(-1), 1.0))  # (n, V)
    return torch.where(known.unsqueeze(-1), exact, plain)


def stratified_target(
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    topk_mask: Tensor,
    log_tail: Tensor,
    sample_ids: Tensor,
    sample_counts: Tensor,
    student_logits: Tensor,
) -> Tensor:
    """Top-k head (n, k) (+ mask, -inf padded log-probs) and tail log-mass (n,), draws (n, S) -> (n, V) target.

    t = p on K; the tail mass p_tail goes to the draws outside K in proportion to their counts; a row with no
    draw outside K spreads p_tail as the student's own tail, softmax(``student_logits`` (n, V)) restricted to
    the ids outside K (detached: no gradient flows through the target).
    """
    n, vocab = student_logits.shape
    ids = topk_ids.long().masked_fill(~topk_mask, vocab)  # (n, k); column V = padding
    in_k = torch.zeros(n, vocab + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)[:, :vocab]
    head = torch.zeros(n, vocab + 1, dtype=torch.float64, device=ids.device)
    head.scatter_(1, ids, topk_logprobs.to(torch.float64).exp().masked_fill(~topk_mask, 0.0))
    head = head[:, :vocab]  # (n, V) p on K
    draws = counts_target(sample_ids, sample_counts.to(torch.float64).clamp_min(0.0), vocab)  # (n, V)
    draws = draws.masked_fill(in_k, 0.0)  # (n, V) the draws outside K
    m = draws.sum(-1, keepdim=True)  # (n, 1)
    z = student_logits.detach().to(torch.float64).masked_fill(in_k, -torch.inf)  # (n, V)
    own = torch.softmax(z, -1).nan_to_num(0.0)  # (n, V) the student's tail shape (0 rows: empty tail)
    shape = torch.where(m > 0, draws / m.clamp_min(1.0), own)  # (n, V)
    return head + log_tail.to(torch.float64).exp().unsqueeze(-1) * shape


def soft_target_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-row H(t, q) = -sum_v t_v log softmax(logits)_v, (n, V) x (n, V) -> (n,), in the target's dtype."""
    logq = torch.log_softmax(logits.to(target.dtype), -1)  # (n, V)
    return -(torch.where(target > 0, target * logq, 0.0)).sum(-1)
