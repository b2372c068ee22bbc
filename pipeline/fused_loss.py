"""Chunked KD + hard-label CE, fused: one softmax pass per chunk of token rows gives the loss and its
gradient; optionally with the LM head inside, so the (N, V) logits never exist (DESIGN.md section 4).

Per chunk of c rows the loss menu (``kdcache.divergences``) sees the student only through its
logits at the target ids (K, the draws, the label: (c, m) gathered values), its log-normalizer
log Z and, for the coarse kinds, log Z_rest = logsumexp over the ids outside K. Hence

    d loss / d z_j = g * exp(z_j - log Z_rest)      for j outside the target ids,
                     + sparse terms at the target ids,

with g = d loss / d log Z_rest (log Z for kinds without a tail bucket). The per-row and sparse
derivatives come from autograd on the small gathered tensors; the only (c, V) work is the softmax
over the ids outside K, computed in place where the gradient goes, in cache-sized row blocks: K set
to -inf, shifted by the max of the rest, so log Z_rest is exact even where K holds all but e^-1000
of the mass (never log(1 - sum_K q)). The CE normalizer is logaddexp(log Z_rest, logsumexp(z_K));
at tau != 1 a second buffer holds the tempered softmax of the rest.

Gradients are computed in the forward pass (the values need the same softmax); backward only
scales them by the incoming gradient. ``ChunkedLogitsLoss`` takes (N, V) logits and returns one
(N, V) gradient; ``ChunkedHeadLoss`` takes hidden states (N, H) and the head (V, H) and computes each
chunk's logits itself: z = cap * tanh((h W^T + b) / cap) with optional bias and soft-cap.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from kdcache.divergences import (
    COARSE_KINDS,
    IGNORE_INDEX,
    argmax_entry,
    coarse_divergence,
    coarse_logprobs,
    compute_dtype,
    masked_logsumexp,
    renorm_kl,
    sampled_weights,
    tempered_topk_targets,
)


class KDLossSpec(Protocol):
    """What the chunk kernel reads of a ``kdcache.losses.KDLossSpec`` (kept apart: losses imports this module)."""

    kind: str
    temperature: float
    beta: float

    @property
    def retemper(self) -> float: ...

    def rows_per_chunk(self, vocab_size: int, itemsize: int = 4, buffers: int = 3) -> int: ...


def kd_temperature(spec: KDLossSpec) -> float:
    """The temperature the student's logits are divided by in the KD term (``sampled`` and ``hard`` use 1)."""
    return spec.temperature if spec.kind in (*COARSE_KINDS, "topk_renorm") else 1.0


def workspaces(spec: KDLossSpec, *, owned: bool, softcap: bool = False) -> int:
    """(c, V) compute-dtype buffers a chunk allocates: its own logits copy unless the gradient buffer is
    the workspace, the tempered softmax of the rest (coarse kinds at tau != 1), the soft-cap derivative."""
    tempered = spec.kind in COARSE_KINDS and kd_temperature(spec) != 1.0
    return int(owned) + int(tempered) + int(softcap)


BLOCK_BYTES = 1 << 20
"""Row blocks of about this size run the (c, V) passes back to back while the block is in cache (L2):
the scatters at random ids then hit cache, and each pass costs cache, not DRAM, bandwidth."""


def chunk_terms(
    src: Tensor,
    work: Tensor,
    *,
    labels: Tensor,
    kd_rows: Tensor,
    targets: dict[str, Tensor],
    spec: KDLossSpec,
    weights: Tensor | None,
    spare: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(sum of KD terms before s(tau), sum of CE terms) over one chunk of c rows.

    ``src`` (c, V) compute-dtype logits, read only unless it is ``work``; ``work`` (c, V) is
    overwritten and, with ``weights`` = (w_kd, w_ce), holds d(w_kd * KD + w_ce * CE)/dz afterwards;
    ``spare`` (c, V) is needed by coarse kinds at tau != 1.
    """
    coarse, tau = spec.kind in COARSE_KINDS, kd_temperature(spec)
    ids, ok = _target_ids(spec.kind, targets, kd_rows)  # (c, m) ids (0 where padded), real entries
    lab = labels.clamp_min(0).unsqueeze(-1)  # (c, 1)
    k_ids = _OnK.of(ids, ok, work.dtype) if coarse else None
    step = max(2, BLOCK_BYTES // (work.shape[-1] * work.element_size()))
    blocks = [slice(i, i + step) for i in range(0, work.shape[0], step)]
    parts = []
    for b in blocks:  # gather each block's target logits while it is in cache, before it is overwritten
        gathered = src[b].gather(1, lab[b]).squeeze(-1), src[b].gather(1, ids[b])  # (b,), (b, m)
        k_b, spare_b = None if k_ids is None else k_ids[b], None if spare is None else spare[b]
        parts.append((*gathered, *_softmax_rest(src[b], work[b], spare_b, k_b, tau)))
    z_lab, z_ids, shift, s = (torch.cat([p[i] for p in parts]) for i in range(4))  # (c,), (c, m), (c,), (c,)
    log_base = shift + s.log()  # (c,) log Z_rest (coarse kinds) or log Z; -inf when the rest is empty
    leaves = [log_base, z_lab, z_ids]
    if coarse and tau != 1.0:
        s_t = torch.cat([p[4] for p in parts])  # (c,)
        leaves.append(shift / tau + s_t.log())  # (c,) log Z_rest of z / tau
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(weights is not None) for t in leaves]
        kd_tok, ce_tok = _row_terms(
            *leaves, labels=labels, kd_rows=kd_rows, ok=ok, targets=targets, spec=spec, vocab=work.shape[-1]
        )
        if weights is not None:
            total = weights[0] * kd_tok.sum() + weights[1] * ce_tok.sum()
            g_base, g_lab, g_ids, *g_rest_t = torch.autograd.grad(total, leaves, materialize_grads=True)
    if weights is not None:
        coef = (g_base / s.clamp_min(1.0)).unsqueeze(-1)  # (c, 1); s >= 1 unless the rest is empty (work = 0)
        coef_t = (g_rest_t[0] / (tau * s_t.clamp_min(1.0))).unsqueeze(-1) if g_rest_t else None  # d/dz of z / tau
        for b in blocks:
            w = work[b].mul_(coef[b])  # (cb, V)
            if coef_t is not None and spare is not None:
                w.add_(spare[b].mul_(coef_t[b]))
            w.scatter_add_(1, ids[b], g_ids[b]).scatter_add_(1, lab[b], g_lab[b].unsqueeze(-1))  # 0 for padding
    return kd_tok.detach().sum(), ce_tok.detach().sum()


class _OnK:
    """Writes at each row's real ids K, in place, by ``scatter_reduce`` with values neutral for padding
    (padding points at id 0): no write conflicts, and no per-row branches."""

    def __init__(self, ids: Tensor, lowest: Tensor, zero_max: Tensor, zero_min: Tensor) -> None:
        self.ids, self.lowest, self.zero_max, self.zero_min = ids, lowest, zero_max, zero_min  # (c, m) each

    @classmethod
    def of(cls, ids: Tensor, ok: Tensor, dtype: torch.dtype) -> _OnK:
        inf = torch.tensor(torch.inf, dtype=dtype, device=ids.device)
        zero = torch.zeros((), dtype=dtype, device=ids.device)
        return cls(ids, torch.where(ok, -inf, inf), torch.where(ok, zero, -inf), torch.where(ok, zero, inf))

    def __getitem__(self, rows: slice) -> _OnK:
        return _OnK(self.ids[rows], self.lowest[rows], self.zero_max[rows], self.zero_min[rows])

    def to_minus_inf(self, buf: Tensor) -> Tensor:
        return buf.scatter_reduce_(1, self.ids, self.lowest, "amin")

    def from_minus_inf_to_zero(self, buf: Tensor) -> Tensor:
        return buf.scatter_reduce_(1, self.ids, self.zero_max, "amax")

    def from_one_to_zero(self, buf: Tensor) -> Tensor:
        return buf.scatter_reduce_(1, self.ids, self.zero_min, "amin")


def _softmax_rest(
    src: Tensor, work: Tensor, spare: Tensor | None, k_ids: _OnK | None, tau: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One row block: ``work`` = exp(z - shift) on the ids outside K (0 on K), and for coarse kinds at
    tau != 1 ``spare`` = exp((z - shift) / tau) likewise; returns shift (b,), sum (b,), tempered sum or None.

    K is set to -inf for the max of the rest, then to 0 before exp (exp of -inf is slow on CPU)."""
    if k_ids is None:
        shift = _finite(src.amax(-1, keepdim=True))  # (b, 1)
        torch.sub(src, shift, out=work).exp_()  # (b, V)
        return shift.squeeze(-1), work.sum(-1), None
    if work is not src:
        work.copy_(src)
    shift = _finite(k_ids.to_minus_inf(work).amax(-1, keepdim=True))  # (b, 1) max of the rest
    k_ids.from_minus_inf_to_zero(work.sub_(shift))  # (b, V) z - shift, 0 on K
    s_t = None
    if spare is not None and tau != 1.0:
        s_t = k_ids.from_one_to_zero(torch.mul(work, 1.0 / tau, out=spare).exp_()).sum(-1)  # (b,)
    return shift.squeeze(-1), k_ids.from_one_to_zero(work.exp_()).sum(-1), s_t


def _finite(shift: Tensor) -> Tensor:
    """Row shifts with -inf (an empty rest: K = V) replaced by 0, so exp(-inf - shift) = 0."""
    return torch.where(shift > -torch.inf, shift, 0.0)


def _target_ids(kind: str, t: dict[str, Tensor], kd_rows: Tensor) -> tuple[Tensor, Tensor]:
    """(c, m) ids whose logits the kind reads (0 where padded or excluded) and (c, m) bool real entries."""
    rows = kd_rows.unsqueeze(-1)  # (c, 1)
    if kind == "ce":
        empty = torch.zeros(kd_rows.shape[0], 0, dtype=torch.long, device=kd_rows.device)  # (c, 0)
        return empty, empty.bool()
    if kind == "sampled":
        ids, ok = t["sample_ids"], (t["sample_counts"] > 0) & rows  # (c, S)
    else:
        ids, ok = t["topk_ids"], t["topk_mask"] & rows  # (c, k)
    return ids.masked_fill(~ok, 0), ok


def _row_terms(
    log_base: Tensor,
    z_lab: Tensor,
    z_ids: Tensor,
    log_rest_t: Tensor | None = None,
    *,
    labels: Tensor,
    kd_rows: Tensor,
    ok: Tensor,
    targets: dict[str, Tensor],
    spec: KDLossSpec,
    vocab: int,
) -> tuple[Tensor, Tensor]:
    """Per-row (KD, CE), (c,) each, from the gathered student quantities of ``chunk_terms``."""
    coarse = spec.kind in COARSE_KINDS
    log_z = torch.logaddexp(log_base, masked_logsumexp(z_ids, ok)) if coarse else log_base  # (c,) full normalizer
    ce_tok = torch.where(labels != IGNORE_INDEX, log_z - z_lab, 0.0)  # (c,)
    if spec.kind == "ce":
        return torch.zeros_like(ce_tok), ce_tok
    kd_tok = _kd_terms(log_z, log_base, z_ids, log_rest_t, kd_rows=kd_rows, ok=ok, t=targets, spec=spec, vocab=vocab)
    return torch.where(kd_rows, kd_tok, 0.0), ce_tok


def _kd_terms(
    log_z: Tensor,
    log_base: Tensor,
    z_ids: Tensor,
    log_rest_t: Tensor | None,
    *,
    kd_rows: Tensor,
    ok: Tensor,
    t: dict[str, Tensor],
    spec: KDLossSpec,
    vocab: int,
) -> Tensor:
    """Per-row KD term (c,); excluded rows are sanitized first so NaN targets there reach neither the
    value nor the gradient."""
    dtype, rows = z_ids.dtype, kd_rows.unsqueeze(-1)  # rows: (c, 1)
    if spec.kind == "sampled":
        total = t.get("sample_total")
        total = None if total is None else torch.where(kd_rows, total.to(dtype), 1.0)  # (c,)
        weights = sampled_weights(t["sample_counts"].to(dtype).masked_fill(~rows, 0.0), total, dtype)  # (c, S)
        return -(weights * (z_ids - log_z.unsqueeze(-1))).sum(-1)
    logprobs = t["topk_logprobs"].to(dtype).masked_fill(~ok, -torch.inf)  # (c, k)
    if spec.kind == "hard":
        return log_z - z_ids.gather(1, argmax_entry(logprobs, ok)).squeeze(-1)
    tau = kd_temperature(spec)
    z_t = z_ids / tau if tau != 1.0 else z_ids  # (c, k) tempered student logits at K
    if spec.kind == "topk_renorm":
        return renorm_kl(z_t, teacher_logp=logprobs / spec.retemper, topk_mask=ok)
    log_tail, log_norm_z = t.get("topk_log_tail"), t.get("topk_log_z")
    log_tail = None if log_tail is None else torch.where(kd_rows, log_tail.to(dtype), -torch.inf)  # (c,)
    log_norm_z = None if log_norm_z is None else torch.where(kd_rows, log_norm_z.to(dtype), 0.0)  # (c,)
    logp, logp_tail = tempered_topk_targets(
        logprobs, ok, temperature=spec.retemper, vocab_size=vocab, log_tail=log_tail, log_z=log_norm_z
    )  # (c, k), (c,)
    if log_rest_t is None:  # tau = 1: the student's coarse normalizers are the CE ones
        log_rest_t, log_z_t = log_base, log_z
    else:
        log_z_t = torch.logaddexp(log_rest_t, masked_logsumexp(z_t, ok))  # (c,)
    logq = coarse_logprobs(z_t, ok, log_norm=log_z_t, log_rest=log_rest_t)  # (c, k+1)
    return coarse_divergence(torch.cat([logp, logp_tail.unsqueeze(-1)], -1), logq, kind=spec.kind, beta=spec.beta)


def _chunk_targets(targets: dict[str, Tensor], sl: slice) -> dict[str, Tensor]:
    return {name: t[sl] for name, t in targets.items()}  # name -> (c, ...)


class ChunkedLogitsLoss(torch.autograd.Function):
    """(loss, sum KD, sum CE) of (N, V) logits, ``rows`` rows at a time; loss = w_kd * KD + w_ce * CE.

    The one (N, V) tensor it creates is the gradient, in the logits' dtype (for fp32/fp64 logits also
    the workspace); low-precision logits get one (rows, V) fp32 workspace.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        flat: Tensor,
        weights: Tensor,
        labels: Tensor,
        kd_rows: Tensor,
        spec: KDLossSpec,
        want_grad: bool,
        names: tuple[str, ...],
        *targets: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, vocab = flat.shape
        dtype = compute_dtype(flat)
        owned = not want_grad or flat.dtype != dtype  # else the gradient buffer is the workspace
        buffers = workspaces(spec, owned=owned)
        rows = min(max(n, 1), spec.rows_per_chunk(vocab, torch.finfo(dtype).bits // 8, buffers))
        grad = torch.empty_like(flat) if want_grad else None  # (N, V)
        own = flat.new_empty((rows, vocab), dtype=dtype) if owned else None  # (rows, V)
        tempered = workspaces(spec, owned=False) > 0
        spare = flat.new_empty((rows, vocab), dtype=dtype) if tempered else None  # (rows, V)
        named = dict(zip(names, targets, strict=True))
        kd_sum = ce_sum = flat.new_zeros((), dtype=dtype)
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            chunk = flat[sl]  # (c, V)
            c = chunk.shape[0]
            work = grad[sl] if own is None else own[:c]  # (c, V)
            src = chunk if chunk.dtype == dtype else work.copy_(chunk)
            kd, ce = chunk_terms(
                src,
                work,
                labels=labels[sl],
                kd_rows=kd_rows[sl],
                targets=_chunk_targets(named, sl),
                spec=spec,
                weights=weights if want_grad else None,
                spare=None if spare is None else spare[:c],
            )
            if grad is not None and own is not None:
                grad[sl].copy_(work)
            kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
        ctx.grads = (grad,)
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return weights[0] * kd_sum + weights[1] * ce_sum, kd_sum, ce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = _take_grads(ctx, grad_loss)
        return grad, *([None] * (len(ctx.needs_input_grad) - 1))


class ChunkedHeadLoss(torch.autograd.Function):
    """``ChunkedLogitsLoss`` of head(hidden) without the (N, V) logits: each chunk's logits are computed
    (and soft-capped) into a (rows, V) workspace; the gradients of the hidden states (N, H), the weight
    (V, H) and the bias (V,) are accumulated chunk by chunk in fp32 (fp64 for fp64 inputs).

    Under autocast (CUDA) the head's matmuls run in the autocast dtype, the softmax math in fp32.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        weights: Tensor,
        labels: Tensor,
        kd_rows: Tensor,
        spec: KDLossSpec,
        softcap: float | None,
        want_grad: bool,
        names: tuple[str, ...],
        *targets: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        device = hidden.device.type
        dtype = compute_dtype(hidden, weight)
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
        (n, _), vocab = hidden.shape, weight.shape[0]
        buffers = workspaces(spec, owned=True, softcap=softcap is not None)
        rows = min(max(n, 1), spec.rows_per_chunk(vocab, torch.finfo(dtype).bits // 8, buffers))
        need_h, need_w, need_b = (want_grad and need for need in ctx.needs_input_grad[:3])
        with torch.autocast(device, enabled=False):
            w, b = weight.to(mm), None if bias is None else bias.to(dtype)  # (V, H), (V,)
            buf = hidden.new_empty((rows, vocab), dtype=dtype)  # (rows, V) logits, then their gradient
            spare = hidden.new_empty((rows, vocab), dtype=dtype) if workspaces(spec, owned=False) else None
            capped = hidden.new_empty((rows, vocab), dtype=dtype) if softcap else None  # d cap(x) / dx
            grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
            grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None  # (V, H)
            grad_b = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_b else None  # (V,)
            named = dict(zip(names, targets, strict=True))
            kd_sum = ce_sum = hidden.new_zeros((), dtype=dtype)
            for start in range(0, n, rows):
                sl = slice(start, start + rows)
                h = hidden[sl].to(mm)  # (c, H)
                z = _head_logits(h, w, b, out=buf[: h.shape[0]], softcap=softcap, capped=capped)  # (c, V)
                kd, ce = chunk_terms(
                    z,
                    z,
                    labels=labels[sl],
                    kd_rows=kd_rows[sl],
                    targets=_chunk_targets(named, sl),
                    spec=spec,
                    weights=weights if want_grad else None,
                    spare=None if spare is None else spare[: h.shape[0]],
                )
                kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
                if want_grad:
                    if capped is not None:
                        z.mul_(capped[: h.shape[0]])  # (c, V) d loss / d (h W^T + b)
                    _accumulate(z, h, w, sl=sl, grad_h=grad_h, grad_w=grad_w, grad_b=grad_b)
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),  # type: ignore[union-attr]
        )
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return weights[0] * kd_sum + weights[1] * ce_sum, kd_sum, ce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        grads = _take_grads(ctx, grad_loss)
        return *grads, *([None] * (len(ctx.needs_input_grad) - 3))


def _head_logits(
    h: Tensor, w: Tensor, b: Tensor | None, *, out: Tensor, softcap: float | None, capped: Tensor | None
) -> Tensor:
    """(c, V) logits into ``out``; with a soft-cap, ``capped`` gets its derivative 1 - tanh^2."""
    if h.dtype == out.dtype:
        torch.mm(h, w.t(), out=out)
    else:
        out.copy_(h @ w.t())  # autocast dtype -> fp32
    if b is not None:
        out.add_(b)
    if softcap is not None and capped is not None:
        out.div_(softcap).tanh_()
        c = out.shape[0]
        torch.mul(out, out, out=capped[:c]).neg_().add_(1.0)  # (c, V) 1 - tanh^2
        out.mul_(softcap)
    return out


def _accumulate(
    g: Tensor,
    h: Tensor,
    w: Tensor,
    *,
    sl: slice,
    grad_h: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """Add one chunk's logit gradient ``g`` (c, V) to the gradients of h (c, H), W (V, H) and b (V,)."""
    gm = g if g.dtype == w.dtype else g.to(w.dtype)  # (c, V) in the matmul dtype
    if grad_h is not None:
        if grad_h.dtype == gm.dtype:
            torch.mm(gm, w, out=grad_h[sl])  # (c, H)
        else:
            grad_h[sl] = gm @ w
    if grad_w is not None:
        if grad_w.dtype == gm.dtype:
            grad_w.addmm_(gm.t(), h)  # (V, H)
        else:
            grad_w.add_(gm.t() @ h)
    if grad_b is not None:
        grad_b.addmv_(g.t(), g.new_ones(g.shape[0]))  # (V,) += column sums, no (V,) temporary


def _take_grads(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients computed in forward, scaled in place by the incoming gradient (once)."""
    grads = getattr(ctx, "grads", None)
    if grads is None or all(g is None for g in grads):
        raise RuntimeError(
            "kd_loss: backward through the fused loss ran twice or the loss was computed without grad; "
            "compute the loss again for a second backward (it frees its gradients after the first)"
        )
    ctx.grads = None
    return tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
