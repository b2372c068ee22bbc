"""Sparse knowledge-distillation losses over cached teacher targets (DESIGN.md section 4).

Pure torch: no I/O, no global state.  Every loss is a mean over token positions of a
per-position term, mixed with hard-label cross-entropy::

    loss = alpha * kd + (1 - alpha) * ce,     kd = s(tau) * mean_t KD_t

with s(tau) = tau**2 for the KL-family kinds (see ``TAU_SQUARED_KINDS``) and 1 otherwise.  The
"coarse partition" is the teacher's top-k set K plus one tail bucket holding all other ids; p and
q are the teacher's and the student's (tempered) distributions on it.  Kinds (``KDLossSpec.kind``),
with the cache targets they accept (top-k: ``cache.targets`` topk|both; sampled: sampled|both):

* ``topk_tail`` (top-k) -- forward KL(p||q) on the coarse partition, exact for it; the default.
* ``topk_renorm`` (top-k) -- KL with p, q renormalized over K; biased (drops the tail), for comparison.
* ``reverse_kl`` (top-k) -- KL(q||p) on the coarse partition; mode-seeking, for small students.
* ``jsd`` (top-k) -- beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q; bounded (GKD).
* ``skew_kl`` (top-k) -- KL(p || beta*p + (1-beta)*q); forward KL with bounded gradients (DistiLLM).
* ``tv`` (top-k) -- total variation 0.5 * sum |p - q| on the coarse partition; bounded, robust.
* ``hard`` (top-k) -- CE on the teacher's argmax id (largest top-k log-prob); cheapest, no soft targets.
* ``sampled`` (sampled) -- unbiased Monte-Carlo CE H(p, q) to the full teacher from cached draws
  (CE, not KL: they differ by the teacher entropy); the choice when the tail matters.
* ``ce`` (none) -- hard-label CE only (alpha ignored); the no-distillation baseline.

Temperature: student logits / tau; the teacher is tempered exactly, which for the tail needs the
cache's full-vocabulary log-normalizer (``topk_log_z``, see :func:`tempered_topk_targets`);
``topk_renorm`` needs none (it cancels); ``sampled`` and ``hard`` take tau = 1 only.

Memory: the (B, T, V) logits are flattened to (N, V) and processed a chunk of rows at a time
(``KDLossSpec.rows_per_chunk``); a custom autograd function recomputes each chunk in backward
(activation checkpointing) and writes its gradient into one preallocated buffer.  The only
full-size float tensor created besides the logits is that gradient, which backward needs anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

TARGET_KEYS: dict[str, tuple[str, ...]] = {
    "topk_tail": ("topk_ids", "topk_logprobs", "topk_mask", "topk_log_tail", "topk_log_z"),
    "topk_renorm": ("topk_ids", "topk_logprobs", "topk_mask"),
    "reverse_kl": ("topk_ids", "topk_logprobs", "topk_mask", "topk_log_tail", "topk_log_z"),
    "jsd": ("topk_ids", "topk_logprobs", "topk_mask", "topk_log_tail", "topk_log_z"),
    "skew_kl": ("topk_ids", "topk_logprobs", "topk_mask", "topk_log_tail", "topk_log_z"),
    "tv": ("topk_ids", "topk_logprobs", "topk_mask", "topk_log_tail", "topk_log_z"),
    "hard": ("topk_ids", "topk_logprobs", "topk_mask"),
    "sampled": ("sample_ids", "sample_counts", "sample_total"),
    "ce": (),
}
"""Batch keys each loss kind reads (the ``kd_loss`` arguments of the same names).  Of these,
``REQUIRED_KEYS`` must be given; the rest are optional, except ``topk_log_z`` at temperature != 1."""
REQUIRED_KEYS = ("topk_ids", "topk_logprobs", "sample_ids", "sample_counts")
KINDS = tuple(TARGET_KEYS)
TAIL_KINDS = tuple(kind for kind, keys in TARGET_KEYS.items() if "topk_log_tail" in keys)
"""Kinds on the coarse partition K + tail: at temperature != 1 they need ``topk_log_z``."""
TAU_SQUARED_KINDS = ("topk_tail", "topk_renorm", "reverse_kl", "jsd", "skew_kl")
"""Kinds whose KD term is scaled by tau**2 (Hinton et al. 2015: their logit gradients shrink as
1/tau**2).  ``tv`` is not (its gradient is sign-based); ``sampled``/``hard`` run at tau = 1."""
DEFAULT_LOSS = {"topk": "topk_tail", "both": "topk_tail", "sampled": "sampled"}
IGNORE_INDEX = -100
LOG_Q_TAIL_FLOOR = -1e4
"""log q_tail is clamped here: a student with (numerically) no mass outside K gets a large,
finite tail penalty instead of inf (q_tail = e^-10000 is far below any fp32 probability)."""
LOG_P_FLOOR = math.log(torch.finfo(torch.float32).tiny)
"""``reverse_kl`` clamps teacher log-probs here (-87.3, the smallest normal fp32): a bucket the
teacher gives 0 (a tail lost to fp32 rounding) costs q*(log q + 87.3) instead of inf."""
WORKING_BUFFERS = 7
"""(chunk, V+1) fp32 buffers alive at once while a chunk's gradient is recomputed: measured 5 (ce,
sampled, hard, topk_renorm) to 6.75 (coarse kinds at tau != 1 with bf16 logits) by tests/test_losses.py."""


def default_loss(cache_targets: str) -> str:
    """The loss kind for ``train.loss: auto``, given the cache's ``cache.targets``."""
    if cache_targets not in DEFAULT_LOSS:
        raise ValueError(
            f"default_loss: cache targets must be one of {'|'.join(DEFAULT_LOSS)}, got {cache_targets!r}; "
            "pass the cache layout's target kind (cache.targets)"
        )
    return DEFAULT_LOSS[cache_targets]


@dataclass(frozen=True)
class KDLossSpec:
    """Which KD loss to compute and how to mix it with hard-label CE."""

    kind: str = "topk_tail"
    """One of ``KINDS`` (see the module docstring); ``auto`` is resolved by :func:`default_loss`."""
    alpha: float = 0.5
    """Weight of the KD term: loss = alpha*KD + (1 - alpha)*CE; ignored for ``ce``."""
    temperature: float = 1.0
    """KD temperature tau: student logits / tau, teacher tempered exactly (see module docstring)."""
    targets_temperature: float = 1.0
    """Temperature the cached targets were computed at (the cache's ``cache.temperature``): the teacher
    is re-tempered by ``temperature / targets_temperature``, so a cache made at tau = 2 trains at
    ``temperature: 2`` exactly as stored (never tempered twice)."""
    beta: float = 0.5
    """Mixture weight of the teacher for ``jsd`` (in (0, 1)) and ``skew_kl`` (in [0, 1); DistiLLM uses 0.1)."""
    chunk_tokens: int = 0
    """Token positions per chunk; 0 = auto: the most that keep the working set within ``chunk_budget_bytes``."""
    chunk_budget_bytes: int = 256 << 20
    """Budget for the auto chunk: ``WORKING_BUFFERS`` float buffers of (chunk, V+1)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"KDLossSpec.kind: must be one of {'|'.join(KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"KDLossSpec.alpha: must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0 or not self.targets_temperature > 0:
            raise ValueError(
                f"KDLossSpec.temperature / targets_temperature: must be > 0, got {self.temperature} / "
                f"{self.targets_temperature}"
            )
        if self.kind in ("sampled", "hard") and self.retemper != 1.0:
            why = (
                f"its ids were drawn from the teacher at temperature {self.targets_temperature}"
                if self.kind == "sampled"
                else "argmax ignores tau"
            )
            raise ValueError(
                f"KDLossSpec.temperature: kind={self.kind!r} supports only the cache's temperature "
                f"{self.targets_temperature}, got {self.temperature} ({why}); for another tau use kind='topk_renorm', "
                "or 'topk_tail' with a cache that stores topk_log_z"
            )
        b = self.beta
        if not {"jsd": 0 < b < 1, "skew_kl": 0 <= b < 1}.get(self.kind, 0 <= b <= 1):
            raise ValueError(
                f"KDLossSpec.beta: must be in (0, 1) for jsd, [0, 1) for skew_kl, [0, 1] otherwise; got {self.beta}"
            )
        if self.chunk_tokens < 0:
            raise ValueError(f"KDLossSpec.chunk_tokens: must be >= 0 (0 = auto), got {self.chunk_tokens}")
        if self.chunk_budget_bytes <= 0:
            raise ValueError(f"KDLossSpec.chunk_budget_bytes: must be > 0, got {self.chunk_budget_bytes}")

    @property
    def retemper(self) -> float:
        """Factor by which the cached teacher targets are re-tempered: ``temperature / targets_temperature``."""
        return self.temperature / self.targets_temperature

    def rows_per_chunk(self, vocab_size: int, itemsize: int = 4) -> int:
        """``chunk_tokens``, or for 0 the most rows (at least 1) whose working set fits the budget."""
        if self.chunk_tokens > 0:
            return self.chunk_tokens
        return max(1, self.chunk_budget_bytes // (WORKING_BUFFERS * itemsize * (vocab_size + 1)))


@dataclass(frozen=True)
class LossOutput:
    """Result of :func:`kd_loss`.  ``loss == alpha*kd + (1-alpha)*ce`` (``loss == ce`` for kind ce)."""

    loss: Tensor
    """Scalar training loss, differentiable w.r.t. the logits."""
    kd: Tensor
    """Detached scalar: s(tau) * mean KD over counted positions (0 for kind ``ce``)."""
    ce: Tensor
    """Detached scalar: mean hard-label CE over the positions counted in CE (see ``ce_mask``)."""
    n_tokens: int
    """Positions counted in the KD mean (for kind ``ce``: in the CE mean)."""
    n_ce_tokens: int = 0
    """Positions counted in the CE mean."""


def dense_kl(teacher_logprobs: Tensor, student_logits: Tensor) -> Tensor:
    """Per-position KL(p_teacher || q_student) with full-vocabulary distributions, (..., V) -> (...).

    ``teacher_logprobs`` are normalized log-probs (-inf allowed); ``student_logits`` are raw.
    Computed in fp32 (or fp64 if an input is fp64).  Materializes (..., V) temporaries, so callers
    with long sequences should pass chunks of positions.
    """
    dtype = _compute_dtype(teacher_logprobs, student_logits)
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
    dtype = _compute_dtype(topk_logprobs)
    logp = topk_logprobs.to(dtype)  # (n, k)
    if temperature != 1.0:
        if log_z is None:
            raise ValueError(_no_log_z_message("tempered_topk_targets", temperature))
        logp, log_tail = logp / temperature - log_z.to(dtype).unsqueeze(-1), None  # (n, k)
    logp = logp.masked_fill(~topk_mask, -torch.inf)  # (n, k)
    if log_tail is None:
        p_tail = (1.0 - logp.double().exp().sum(-1)).clamp_min(0.0)  # (n,) fp64: a tail ~1e-12 survives 1 - mass
        log_tail = p_tail.log()
    log_tail = log_tail.to(dtype).masked_fill(topk_mask.sum(-1) >= vocab_size, -torch.inf)  # (n,)
    return logp, log_tail


def coarse_student_logprobs(logits: Tensor, topk_ids: Tensor, topk_mask: Tensor) -> Tensor:
    """Student log-probs on K + tail, (n, V) logits (already / tau) -> (n, k+1).

    Padded entries hold finfo.min (probability 0, no gradient).  log q_tail is a logsumexp over
    the non-K logits (never log(1 - sum q)), clamped at ``LOG_Q_TAIL_FLOOR``.
    """
    n, vocab = logits.shape
    fill = torch.finfo(logits.dtype).min
    lse = logits.logsumexp(-1, keepdim=True)  # (n, 1)
    logq_k = logits.gather(1, topk_ids.masked_fill(~topk_mask, 0)) - lse  # (n, k)
    in_k = torch.zeros(n, vocab + 1, dtype=torch.bool, device=logits.device)  # (n, V+1); column V = padding
    in_k.scatter_(1, topk_ids.masked_fill(~topk_mask, vocab), True)
    log_q_tail = logits.masked_fill(in_k[:, :vocab], fill).logsumexp(-1, keepdim=True) - lse  # (n, 1)
    return torch.cat([logq_k.masked_fill(~topk_mask, fill), log_q_tail.clamp_min(LOG_Q_TAIL_FLOOR)], dim=-1)


def coarse_divergence(logp: Tensor, logq: Tensor, *, kind: str, beta: float = 0.5) -> Tensor:
    """Per-position divergence ``kind`` between coarse distributions, (n, k+1) log p, log q -> (n,).

    ``logp`` may hold -inf (empty buckets); ``logq`` must be finite (as from
    :func:`coarse_student_logprobs`).  ``kind`` is one of ``TAIL_KINDS``.
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
    raise ValueError(f"coarse_divergence: kind must be one of {'|'.join(TAIL_KINDS)}, got {kind!r}")


def topk_renorm_kl(logits: Tensor, topk_ids: Tensor, *, teacher_logp: Tensor, topk_mask: Tensor) -> Tensor:
    """Per-position KL between teacher and student both renormalized over K, (n, V) -> (n,).

    ``logits`` are the student's (already / tau; log-probs work too), ``teacher_logp`` (n, k)
    any log-weights on K (normalization cancels), so tempering them by 1/tau is exact.
    """
    logq_k = logits.gather(1, topk_ids.masked_fill(~topk_mask, 0))  # (n, k)
    logq_k = logq_k - _masked_logsumexp(logq_k, topk_mask).unsqueeze(-1)  # (n, k) renormalized on K
    logp_k = teacher_logp.masked_fill(~topk_mask, -torch.inf)  # (n, k)
    logp_k = logp_k - _masked_logsumexp(logp_k, topk_mask).unsqueeze(-1)  # (n, k); -inf padded
    p = logp_k.exp()  # (n, k)
    return (_xlogx(p, logp_k) - p * logq_k.masked_fill(~topk_mask, 0.0)).sum(-1)


def hard_ce(logits: Tensor, topk_ids: Tensor, *, topk_logprobs: Tensor, topk_mask: Tensor) -> Tensor:
    """Per-position CE on the teacher's argmax id (the unmasked entry with the largest log-prob), (n,)."""
    best = topk_logprobs.masked_fill(~topk_mask, -torch.inf).argmax(-1, keepdim=True)  # (n, 1)
    ids = topk_ids.masked_fill(~topk_mask, 0).gather(1, best)  # (n, 1)
    return logits.logsumexp(-1) - logits.gather(1, ids).squeeze(-1)


def sampled_ce(logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, sample_total: Tensor | None = None) -> Tensor:
    """Per-position Monte-Carlo cross-entropy -sum_j (c_j / S) log q_{s_j}, (n, V) -> (n,).

    S is ``sample_total`` (n,), the draws made at cache time; without it, sum_j c_j.  Unbiased
    for H(p_teacher, q) when the ids were drawn from p_teacher -- with S, also when some draws
    were dropped (unmapped ids): renormalizing over the kept draws would bias it.  Entries with
    count <= 0 are padding; a position with no draws gives 0.
    """
    counts = sample_counts.to(logits.dtype).clamp_min(0.0)  # (n, S)
    total = counts.sum(-1) if sample_total is None else sample_total.to(logits.dtype)  # (n,)
    weights = counts / total.clamp_min(torch.finfo(counts.dtype).tiny).unsqueeze(-1)  # (n, S)
    logq_s = logits.gather(1, sample_ids.masked_fill(counts <= 0, 0)) - logits.logsumexp(-1, keepdim=True)  # (n, S)
    return -(weights * logq_s).sum(-1)


def kd_loss(
    logits: Tensor,
    *,
    input_ids: Tensor,
    spec: KDLossSpec,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    topk_mask: Tensor | None = None,
    topk_log_tail: Tensor | None = None,
    topk_log_z: Tensor | None = None,
    sample_ids: Tensor | None = None,
    sample_counts: Tensor | None = None,
    sample_total: Tensor | None = None,
    loss_mask: Tensor | None = None,
    ce_mask: Tensor | None = None,
) -> LossOutput:
    """``alpha * KD + (1 - alpha) * CE`` for student ``logits`` (B, T, V) against cached targets.

    Soft targets exist for all T positions (the teacher's next-token distribution at t); the hard
    label of position t is ``input_ids[:, t+1]``.  Targets, per kind (``TARGET_KEYS``):
    ``topk_ids``/``topk_logprobs`` (B, T, k) and ``topk_mask`` (B, T, k) bool (None = all real;
    padded entries carry no probability and get no gradient); ``topk_log_tail`` (B, T): log of
    the teacher mass outside the unmasked entries (a caller that masks real entries must fold
    their mass in); ``topk_log_z`` (B, T): logsumexp_v(log p_v / r) at the re-tempering factor r = ``spec.retemper``,
    read only at tau != 1; ``sample_ids``/``sample_counts`` (B, T, S); ``sample_total`` (B, T):
    draws made per position at cache time.  KD averages over positions where ``loss_mask``
    (B, T) is True and, for ``sampled``, draws were made (``sample_total`` > 0; without it, at
    least one kept); for ``hard``, a top-k entry exists.  CE averages over positions t < T-1
    where ``ce_mask`` (B, T) is True (None = all) and the label is not -100.  Ids lie in [0, V).
    """
    targets = dict(
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        topk_mask=topk_mask,
        topk_log_tail=topk_log_tail,
        topk_log_z=topk_log_z,
        sample_ids=sample_ids,
        sample_counts=sample_counts,
        sample_total=sample_total,
    )
    _check_inputs(logits, input_ids=input_ids, spec=spec, loss_mask=loss_mask, ce_mask=ce_mask, **targets)
    batch, seq, vocab = logits.shape
    targets = _target_tensors(spec.kind, targets)  # name -> (N, ...)
    flat = logits.reshape(batch * seq, vocab)  # (N, V); a view for contiguous logits
    labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T); last has no label
    if ce_mask is not None:
        labels = labels.masked_fill(~ce_mask.to(device=labels.device, dtype=torch.bool), IGNORE_INDEX)
    labels = labels.reshape(-1).to(logits.device)  # (N,)
    kd_rows = _kd_rows(spec.kind, targets, loss_mask=loss_mask, n=batch * seq, device=logits.device)  # (N,) bool
    kd_sum, ce_sum = _ChunkedSums.apply(flat, labels, kd_rows, spec, tuple(targets), *targets.values())
    n_ce = int((labels != IGNORE_INDEX).sum())
    ce = ce_sum / max(n_ce, 1)
    if spec.kind == "ce":
        return LossOutput(loss=ce, kd=torch.zeros_like(ce).detach(), ce=ce.detach(), n_tokens=n_ce, n_ce_tokens=n_ce)
    n_kd = int(kd_rows.sum())
    kd = kd_sum * (spec.temperature**2 if spec.kind in TAU_SQUARED_KINDS else 1.0) / max(n_kd, 1)
    loss = spec.alpha * kd + (1.0 - spec.alpha) * ce
    return LossOutput(loss=loss, kd=kd.detach(), ce=ce.detach(), n_tokens=n_kd, n_ce_tokens=n_ce)


class _ChunkedSums(torch.autograd.Function):
    """(sum_t KD_t, sum_t CE_t) over all N rows, computed ``spec.rows_per_chunk`` rows at a time.

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
        names: tuple[str, ...],
        *targets: Tensor,
    ) -> tuple[Tensor, Tensor]:
        ctx.spec, ctx.names = spec, names
        ctx.save_for_backward(flat, labels, kd_rows, *targets)
        kd_sum = ce_sum = flat.new_zeros((), dtype=_compute_dtype(flat))
        for z, lab, kd_r, *chunk in _chunks(_rows_per_chunk(spec, flat), flat, labels, kd_rows, *targets):
            kd_tok, ce_tok = _chunk_terms(z, lab, kd_r, dict(zip(names, chunk, strict=True)), spec=spec)  # (c,), (c,)
            kd_sum = kd_sum + kd_tok.sum()
            ce_sum = ce_sum + ce_tok.sum()
        return kd_sum, ce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_kd: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        flat, *rest = ctx.saved_tensors
        grad = torch.empty_like(flat)  # (N, V): the one logits-sized tensor, in the logits' dtype
        for grad_chunk, z, lab, kd_r, *chunk in _chunks(_rows_per_chunk(ctx.spec, flat), grad, flat, *rest):
            with torch.enable_grad():
                z = z.detach().requires_grad_()  # (c, V) leaf for the recomputation
                chunk_targets = dict(zip(ctx.names, chunk, strict=True))
                kd_tok, ce_tok = _chunk_terms(z, lab, kd_r, chunk_targets, spec=ctx.spec)  # (c,), (c,)
                total = grad_kd * kd_tok.sum() + grad_ce * ce_tok.sum()
                (grad_z,) = torch.autograd.grad(total, z)  # (c, V)
            grad_chunk.copy_(grad_z)
        return grad, *([None] * (len(ctx.needs_input_grad) - 1))


def _rows_per_chunk(spec: KDLossSpec, flat: Tensor) -> int:
    return spec.rows_per_chunk(flat.shape[-1], torch.finfo(_compute_dtype(flat)).bits // 8)


def _chunks(size: int, *tensors: Tensor) -> zip:
    """Row chunks of equal-length tensors: yields tuples of (c, ...) views."""
    return zip(*(t.split(size) for t in tensors), strict=True)


def _chunk_terms(
    logits: Tensor, labels: Tensor, kd_rows: Tensor, targets: dict[str, Tensor], *, spec: KDLossSpec
) -> tuple[Tensor, Tensor]:
    """Per-position (KD before s(tau), CE) for one chunk of c rows; no (c, V) log-softmax buffer."""
    z = logits.to(_compute_dtype(logits))  # (c, V) fp32 working copy (a no-op for fp32 logits)
    lse = z.logsumexp(-1)  # (c,)
    picked = z.gather(1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (c,)
    ce_tok = torch.where(labels != IGNORE_INDEX, lse - picked, 0.0)  # (c,)
    if spec.kind == "ce":
        return torch.zeros_like(ce_tok), ce_tok
    kd_tok = _kd_terms(z, targets, kd_rows, spec=spec)  # (c,)
    return torch.where(kd_rows, kd_tok, 0.0), ce_tok


def _kd_terms(z: Tensor, t: dict[str, Tensor], kd_rows: Tensor, *, spec: KDLossSpec) -> Tensor:
    """Per-position KD term of one chunk, (c, V) fp32 student logits -> (c,); excluded rows are
    sanitized first so NaN targets there reach neither the value nor the gradient."""
    rows = kd_rows.unsqueeze(-1)  # (c, 1)
    if spec.kind == "sampled":
        total = t.get("sample_total")
        total = None if total is None else torch.where(kd_rows, total.to(z.dtype), 1.0)  # (c,)
        return sampled_ce(z, t["sample_ids"], t["sample_counts"].to(z.dtype).masked_fill(~rows, 0.0), total)
    ids, mask = t["topk_ids"], t["topk_mask"] & rows  # (c, k), (c, k)
    logprobs = t["topk_logprobs"].to(z.dtype).masked_fill(~mask, -torch.inf)  # (c, k)
    if spec.kind == "hard":
        return hard_ce(z, ids, topk_logprobs=logprobs, topk_mask=mask)
    tau, retemper = spec.temperature, spec.retemper  # student at tau; cached teacher re-tempered by retemper
    zt = z / tau if tau != 1.0 else z  # (c, V) tempered student
    if spec.kind == "topk_renorm":
        return topk_renorm_kl(zt, ids, teacher_logp=logprobs / retemper, topk_mask=mask)
    log_tail, log_z = t.get("topk_log_tail"), t.get("topk_log_z")
    log_tail = None if log_tail is None else torch.where(kd_rows, log_tail.to(z.dtype), -torch.inf)  # (c,)
    log_z = None if log_z is None else torch.where(kd_rows, log_z.to(z.dtype), 0.0)  # (c,)
    vocab = z.shape[-1]
    logp, logp_tail = tempered_topk_targets(
        logprobs, mask, temperature=retemper, vocab_size=vocab, log_tail=log_tail, log_z=log_z
    )  # (c, k), (c,)
    logp = torch.cat([logp, logp_tail.unsqueeze(-1)], dim=-1)  # (c, k+1)
    return coarse_divergence(logp, coarse_student_logprobs(zt, ids, mask), kind=spec.kind, beta=spec.beta)


def _kd_rows(kind: str, targets: dict[str, Tensor], *, loss_mask: Tensor | None, n: int, device) -> Tensor:
    """(N,) bool: positions counted in the KD mean."""
    rows = torch.ones(n, dtype=torch.bool, device=device)  # (N,)
    if loss_mask is not None:
        rows = rows & loss_mask.reshape(-1).to(device=device, dtype=torch.bool)
    if kind == "sampled" and "sample_total" in targets:
        total = targets["sample_total"]  # (N,)
        rows = rows & (total > 0)  # positions where draws were made (possibly all dropped since)
        kept = targets["sample_counts"].clamp_min(0).sum(-1)  # (N,)
        if bool((rows & (kept > total)).any()):
            raise ValueError(
                "kd_loss: sample_counts sum to more than sample_total at some position; "
                "sample_total must be the number of draws made at cache time (cache.samples)"
            )
    elif kind == "sampled":
        rows = rows & (targets["sample_counts"] > 0).any(-1)  # (N,) at least one draw
    elif kind == "hard":
        rows = rows & targets["topk_mask"].any(-1)  # (N,) at least one top-k entry
    return rows


def _target_tensors(kind: str, given: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """The given targets ``kind`` reads, flattened to (N, ...); ``topk_mask`` defaults to all True."""
    out = {name: given[name] for name in TARGET_KEYS[kind] if given[name] is not None}
    if "topk_mask" in TARGET_KEYS[kind] and "topk_mask" not in out:
        out["topk_mask"] = torch.ones_like(out["topk_ids"], dtype=torch.bool)
    if "topk_mask" in out:
        out["topk_mask"] = out["topk_mask"].to(torch.bool)
    return {name: t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]) for name, t in out.items()}  # (N, ...)


def _check_inputs(logits: Tensor, *, spec: KDLossSpec, **kw: Tensor | None) -> None:
    """Refuse missing or mis-shaped inputs with a message naming the argument."""
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"kd_loss: logits must be a float (B, T, V) tensor, got {tuple(logits.shape)} {logits.dtype}")
    bt = tuple(logits.shape[:2])
    for name in TARGET_KEYS[spec.kind]:
        if name in REQUIRED_KEYS and kw[name] is None:
            raise ValueError(f"kd_loss: kind={spec.kind!r} needs {name}; pass the cache's {name} for this batch")
    if spec.kind in TAIL_KINDS and spec.retemper != 1.0 and kw["topk_log_z"] is None:
        raise ValueError(_no_log_z_message(f"kd_loss: kind={spec.kind!r}", spec.temperature))
    per_position = ("input_ids", "loss_mask", "ce_mask", "topk_log_tail", "topk_log_z", "sample_total")
    for name, t in kw.items():
        if t is not None and (tuple(t.shape[:2]) != bt or (name in per_position and t.dim() != 2)):
            want = "(B, T)" if name in per_position else "leading dims (B, T)"
            raise ValueError(f"kd_loss: {name} has shape {tuple(t.shape)}; expected {want} = {bt}")
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


def _no_log_z_message(where: str, temperature: float) -> str:
    return (
        f"{where} at temperature {temperature} needs topk_log_z, the teacher's log-normalizer "
        f"logsumexp_v(log p_v / {temperature}) over the full vocabulary, and the cache has no log-normalizer "
        "at that temperature (the tail of the tempered teacher cannot be known without it); train at "
        "temperature 1, use kind='topk_renorm' (needs no tail), or rebuild the cache with that temperature stored"
    )


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
