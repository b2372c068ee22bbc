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

Memory and time: the (B, T, V) logits are flattened to (N, V) and processed a chunk of rows at a
time (``KDLossSpec.rows_per_chunk``) by ``kdcache.fused_loss``: one softmax pass per chunk gives the
KD and CE values and their gradient (computed in forward, scaled in backward), written straight
into one (N, V) gradient buffer -- the only full-size float tensor created besides the logits.
:func:`kd_loss_from_hidden` goes further: it takes the student's final hidden states and its LM
head and computes each chunk's logits itself, so no (N, V) tensor exists at all.  Neither syncs
with the host (counts stay on the device), except the ``sample_total`` check on CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdcache.divergences import (
    COARSE_KINDS,
    IGNORE_INDEX,
    LOG_P_FLOOR,
    LOG_Q_TAIL_FLOOR,
    coarse_divergence,
    coarse_student_logprobs,
    compute_dtype,
    dense_kl,
    hard_ce,
    no_log_z_message,
    sampled_ce,
    tempered_topk_targets,
    topk_renorm_kl,
)
from kdcache.fused_loss import ChunkedHeadLoss, ChunkedLogitsLoss
from kdcache.lm_head import LMHead

__all__ = [
    "DEFAULT_LOSS",
    "IGNORE_INDEX",
    "KINDS",
    "LOG_P_FLOOR",
    "LOG_Q_TAIL_FLOOR",
    "REQUIRED_KEYS",
    "TAIL_KINDS",
    "TARGET_KEYS",
    "TAU_SQUARED_KINDS",
    "WORKING_BUFFERS",
    "KDLossSpec",
    "LMHead",
    "LossOutput",
    "coarse_divergence",
    "coarse_student_logprobs",
    "default_loss",
    "dense_kl",
    "hard_ce",
    "kd_loss",
    "kd_loss_from_hidden",
    "sampled_ce",
    "tempered_topk_targets",
    "topk_renorm_kl",
]

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
assert set(TAIL_KINDS) == set(COARSE_KINDS)
MAX_AUTO_ROWS = 1024
"""Rows per auto chunk at most: the per-row math keeps ~20 (rows, k+1) tensors alive for its gradient
(16 MiB at 4096 rows x k = 64, a tenth of a V = 4096 step), and more rows save nothing."""
WORKING_BUFFERS = 3
"""The most (chunk, V+1) fp32 buffers a chunk allocates besides the one gradient (``kdcache.fused_loss.workspaces``
counts them per call, and the auto chunk is sized by that count): a logits copy (low-precision logits; the
head's logits), the tempered softmax (coarse kinds at tau != 1) and a soft-cap derivative (fused head);
measured by tests/test_losses.py and tests/test_fused_head.py."""


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
    """Token positions per chunk; 0 = auto: the most that keep the working set within ``chunk_budget_bytes``,
    at most ``MAX_AUTO_ROWS``."""
    chunk_budget_bytes: int = 256 << 20
    """Budget for the auto chunk: the (chunk, V+1) float buffers the loss allocates (``WORKING_BUFFERS`` at most)."""

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

    def rows_per_chunk(self, vocab_size: int, itemsize: int = 4, buffers: int = WORKING_BUFFERS) -> int:
        """``chunk_tokens``, or for 0 the most rows (at least 1) whose working set -- ``buffers`` (rows, V+1)
        buffers (the loss passes the count it allocates, at least 1) -- fits the budget."""
        if self.chunk_tokens > 0:
            return self.chunk_tokens
        return max(1, min(MAX_AUTO_ROWS, self.chunk_budget_bytes // (max(1, buffers) * itemsize * (vocab_size + 1))))


@dataclass(frozen=True)
class LossOutput:
    """Result of :func:`kd_loss`.  ``loss == alpha*kd + (1-alpha)*ce`` (``loss == ce`` for kind ce).

    The counts stay on the loss's device (reading ``n_tokens`` / ``n_ce_tokens`` waits for it)."""

    loss: Tensor
    """Scalar training loss, differentiable w.r.t. the logits (or the hidden states and the head)."""
    kd: Tensor
    """Detached scalar: s(tau) * mean KD over counted positions (0 for kind ``ce``)."""
    ce: Tensor
    """Detached scalar: mean hard-label CE over the positions counted in CE (see ``ce_mask``)."""
    kd_count: Tensor
    """Integer scalar: positions counted in the KD mean (for kind ``ce``: in the CE mean)."""
    ce_count: Tensor
    """Integer scalar: positions counted in the CE mean."""

    @property
    def n_tokens(self) -> int:
        """Positions counted in the KD mean (for kind ``ce``: in the CE mean)."""
        return int(self.kd_count)

    @property
    def n_ce_tokens(self) -> int:
        """Positions counted in the CE mean."""
        return int(self.ce_count)


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
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"kd_loss: logits must be a float (B, T, V) tensor, got {tuple(logits.shape)} {logits.dtype}")
    masks = dict(loss_mask=loss_mask, ce_mask=ce_mask)
    _check_inputs(tuple(logits.shape[:2]), input_ids=input_ids, spec=spec, **masks, **targets)
    batch, seq, vocab = logits.shape
    labels, kd_rows, targets, weights, counts = _prepare(
        spec, targets, input_ids=input_ids, loss_mask=loss_mask, ce_mask=ce_mask, device=logits.device
    )
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    flat = logits.reshape(batch * seq, vocab)  # (N, V); a view for contiguous logits
    loss, kd_sum, ce_sum = ChunkedLogitsLoss.apply(
        flat, weights.to(compute_dtype(flat)), labels, kd_rows, spec, want_grad, tuple(targets), *targets.values()
    )
    return _output(spec, loss, kd_sum, ce_sum, counts)


def kd_loss_from_hidden(
    hidden: Tensor,
    head: LMHead,
    *,
    input_ids: Tensor,
    spec: KDLossSpec,
    loss_mask: Tensor | None = None,
    ce_mask: Tensor | None = None,
    **targets: Tensor | None,
) -> LossOutput:
    """:func:`kd_loss` of the logits ``head`` computes from the student's final hidden states ``hidden``
    (B, T, H), without materializing them: each chunk of token rows gets its logits, loss and
    gradient in one pass (``kdcache.fused_loss.ChunkedHeadLoss``).  The gradient reaches ``hidden``,
    ``head.weight`` (for a tied head: the input embedding, added to its other gradient) and
    ``head.bias``.  Targets as for :func:`kd_loss`; ids lie in [0, V), V = ``head.weight.shape[0]``.
    """
    unknown = set(targets) - set(_TARGET_NAMES)
    if unknown:
        raise TypeError(f"kd_loss_from_hidden: unknown target arguments {sorted(unknown)}; see TARGET_KEYS")
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"kd_loss_from_hidden: hidden must be a float (B, T, H) tensor, got {tuple(hidden.shape)}")
    weight, bias = head.weight, head.bias
    bad_bias = bias is not None and bias.shape != weight.shape[:1]
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or bad_bias:
        raise ValueError(
            f"kd_loss_from_hidden: head weight {tuple(weight.shape)} (and bias) do not fit hidden states of width "
            f"{hidden.shape[-1]}; pass the student's output layer: weight (V, H), bias (V,) or None"
        )
    given = {name: targets.get(name) for name in _TARGET_NAMES}
    masks = dict(loss_mask=loss_mask, ce_mask=ce_mask)
    _check_inputs(tuple(hidden.shape[:2]), input_ids=input_ids, spec=spec, **masks, **given)
    batch, seq, width = hidden.shape
    labels, kd_rows, flat_targets, weights, counts = _prepare(
        spec, given, input_ids=input_ids, loss_mask=loss_mask, ce_mask=ce_mask, device=hidden.device
    )
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    loss, kd_sum, ce_sum = ChunkedHeadLoss.apply(
        hidden.reshape(batch * seq, width),
        weight,
        bias,
        weights.to(compute_dtype(hidden, weight)),
        labels,
        kd_rows,
        spec,
        head.softcap,
        want_grad,
        tuple(flat_targets),
        *flat_targets.values(),
    )
    return _output(spec, loss, kd_sum, ce_sum, counts)


_TARGET_NAMES = tuple(dict.fromkeys(name for keys in TARGET_KEYS.values() for name in keys))


def _prepare(
    spec: KDLossSpec,
    given: dict[str, Tensor | None],
    *,
    input_ids: Tensor,
    loss_mask: Tensor | None,
    ce_mask: Tensor | None,
    device: torch.device,
) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor, Tensor]:
    """(labels (N,), KD rows (N,) bool, targets name -> (N, ...), (w_kd, w_ce) fp64, (n_kd, n_ce) int64);
    loss = w_kd * sum KD + w_ce * sum CE.  All on ``device``, no host sync."""
    batch, seq = input_ids.shape
    targets = _target_tensors(spec.kind, given)  # name -> (N, ...)
    labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T); last has no label
    if ce_mask is not None:
        labels = labels.masked_fill(~ce_mask.to(device=labels.device, dtype=torch.bool), IGNORE_INDEX)
    labels = labels.reshape(-1).to(device)  # (N,)
    kd_rows = _kd_rows(spec.kind, targets, loss_mask=loss_mask, n=batch * seq, device=device)  # (N,) bool
    n_ce = (labels != IGNORE_INDEX).sum()
    n_kd = n_ce if spec.kind == "ce" else kd_rows.sum()
    counts = torch.stack([n_kd, n_ce])  # (2,) int64
    scale = spec.temperature**2 if spec.kind in TAU_SQUARED_KINDS else 1.0
    alpha = 0.0 if spec.kind == "ce" else spec.alpha
    means = 1.0 / counts.clamp_min(1).to(torch.float64)  # (2,)
    weights = torch.stack([alpha * scale * means[0], (1.0 - alpha) * means[1]])  # (2,)
    return labels, kd_rows, targets, weights, counts


def _output(spec: KDLossSpec, loss: Tensor, kd_sum: Tensor, ce_sum: Tensor, counts: Tensor) -> LossOutput:
    """The means from the sums: kd = s(tau) * sum / n_kd, ce = sum / n_ce."""
    means = 1.0 / counts.clamp_min(1).to(kd_sum.dtype)  # (2,)
    scale = spec.temperature**2 if spec.kind in TAU_SQUARED_KINDS else 1.0
    kd = torch.zeros_like(kd_sum) if spec.kind == "ce" else kd_sum * scale * means[0]
    ce = (ce_sum * means[1]).detach()
    return LossOutput(loss=loss, kd=kd.detach(), ce=ce, kd_count=counts[0], ce_count=counts[1])


def _kd_rows(kind: str, targets: dict[str, Tensor], *, loss_mask: Tensor | None, n: int, device) -> Tensor:
    """(N,) bool: positions counted in the KD mean."""
    rows = torch.ones(n, dtype=torch.bool, device=device)  # (N,)
    if loss_mask is not None:
        rows = rows & loss_mask.reshape(-1).to(device=device, dtype=torch.bool)
    if kind == "sampled" and "sample_total" in targets:
        total = targets["sample_total"]  # (N,)
        rows = rows & (total > 0)  # positions where draws were made (possibly all dropped since)
        kept = targets["sample_counts"].clamp_min(0).sum(-1)  # (N,)
        if total.device.type == "cpu" and bool((rows & (kept > total)).any()):  # elsewhere: the reader checks
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


def _check_inputs(bt: tuple[int, ...], *, spec: KDLossSpec, **kw: Tensor | None) -> None:
    """Refuse missing or mis-shaped inputs with a message naming the argument; ``bt`` = (B, T)."""
    for name in TARGET_KEYS[spec.kind]:
        if name in REQUIRED_KEYS and kw[name] is None:
            raise ValueError(f"kd_loss: kind={spec.kind!r} needs {name}; pass the cache's {name} for this batch")
    if spec.kind in TAIL_KINDS and spec.retemper != 1.0 and kw["topk_log_z"] is None:
        raise ValueError(no_log_z_message(f"kd_loss: kind={spec.kind!r}", spec.temperature))
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
    if bt[1] < 2 and spec.kind == "ce":
        raise ValueError("kd_loss: kind='ce' needs T >= 2 (position t predicts input_ids[:, t+1])")
