"""Several teachers, one student: combine the aligned batches of several caches into one target.

Pure torch, no I/O: every function takes the batches of M caches over the same sequences (as
``CacheReader.batches`` yields them) and returns one batch in the same format, so every loss in
``kdcache.losses`` consumes the result unchanged.  Combiners (``COMBINERS``):

* ``mixture`` -- the weighted mixture m = sum_t w_t p_t of the teachers' distributions, on the union
  U of their kept ids plus one tail bucket (below).
* ``min_nll`` -- per token, the one teacher with the lowest NLL of the actual next token (FuseLLM's
  MinCE); its own target, unchanged.
* ``min_entropy`` -- per token, the teacher with the lowest entropy (the most confident one).
* ``nll_softmax`` -- the mixture with per-token weights w_t(x) = softmax_t(log w_t - NLL_t(x) / T):
  the static weights are the prior, teachers that predicted the next token better count more.

The per-token NLL and entropy are the teacher signals a v2 cache stores (batch keys ``teacher_nll``,
``teacher_entropy``: (B, T) float, nats at tau = 1, NaN at the last position where there is no next
token).  A position where a signal is NaN in any teacher falls back to the static weights
(``mixture``/``nll_softmax``) or to the first teacher with the smallest finite score (picks; all
NaN: the first teacher).  Ties go to the teacher listed first.

**The mixture's tail.**  Teacher t stores p_t on its kept ids K_t and its tail mass tau_t =
p_t(V minus K_t); how that tail is spread over the ids is unknown, and a union id v in U outside
K_t -- another teacher's top id -- lies inside it.  Two ways to stay honest about that:

(A) *spread each tail uniformly*, p~_t(v) = tau_t / |V minus K_t| for v outside K_t, and take the
    mixture of these p~_t: on U, m(v) = sum_t w_t (p_t(v) if v in K_t else tau_t / |V minus K_t|),
    and the rest bucket V minus U holds sum_t w_t tau_t |V minus U| / |V minus K_t|.  This is an
    ordinary (ids, log-probs, log tail) target on the partition U + rest, so the fused ``topk_tail``
    loss -- and every other coarse divergence, tempering by ``topk_renorm``, ``hard`` -- runs
    unchanged, in one pass over the vocabulary, exactly as for one teacher.
(B) *keep each teacher's tail as its own bucket*: the loss sum_t w_t KL(p_t || q) on each
    teacher's partition K_t + tail_t.  Exact per teacher (cross-entropy is linear in the target,
    so its gradient is that of the true mixture's cross-entropy whenever the buckets are exact) but
    the buckets overlap (V minus K_1 and V minus K_2 share ids), so it is not one target: it needs a
    new loss evaluating q on M different tails -- M passes over the vocabulary -- and it does not
    extend to the non-linear divergences (reverse KL, JSD, TV of a mixture are not mixtures of them).

We implement (A).  Its only approximation is the uniform spread of tau_t on U minus K_t: a
teacher's true mass on another teacher's top ids is usually larger than its average tail id, so
(A) moves that mass from U to the rest bucket; the error is bounded by the teachers' tail mass on
the union, sum_t w_t p_t(U minus K_t) (measured against the true dense mixture in
``tests/test_multi_teacher.py`` and on the demo teachers in ``bench/multi_teacher.py``).  With
identical K_t, or with k = V, (A) is exact.

**Sampled targets.**  The sampled loss is the Monte-Carlo cross-entropy sum_j (c_j / S) (-log q);
cross-entropy is linear in the target, so the mixture's is sum_t w_t sum_j (c_tj / S_t) (-log q):
the teachers' draws concatenated, counts scaled by w_t S / S_t with S = sum_t S_t the new
``sample_total``.  Unbiased for H(m, q) -- no approximation; a pick keeps the chosen teacher's draws.

**Multi-process.**  A position's combined target is a function of the caches' contents at that
position and the configured weights only -- not of the rank, the world size or the batch it is in --
so every torchrun rank computes the same targets as one process would (tested: combining a global
batch equals combining its rank slices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

COMBINERS = ("mixture", "min_nll", "min_entropy", "nll_softmax")
"""``train.combine`` choices (module docstring)."""
SIGNAL_OF = {"min_nll": "teacher_nll", "nll_softmax": "teacher_nll", "min_entropy": "teacher_entropy"}
"""The per-token teacher signal (batch key) each combiner reads; ``mixture`` reads none."""
PICKS = ("min_nll", "min_entropy")
"""Combiners that take one teacher's target per token."""
TOPK_KEYS = ("topk_ids", "topk_logprobs", "topk_mask", "topk_log_tail")
SAMPLE_KEYS = ("sample_ids", "sample_counts", "sample_total")


def normalized_weights(weights: Sequence[float]) -> Tensor:
    """(M,) float64 weights summing to 1; refuses negative, non-finite or all-zero weights."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)  # (M,)
    if w.numel() == 0 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"teacher weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return w / w.sum()


def position_weights(
    weights: Tensor,
    *,
    combine: str,
    shape: tuple[int, ...],
    signals: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token teacher weights (M, *shape) float64, summing to 1 over M (one-hot for the picks).

    ``weights`` (M,) static weights summing to 1; ``signals`` (M, *shape) the per-token signal the
    combiner reads (``SIGNAL_OF``): NLL for ``min_nll``/``nll_softmax``, entropy for ``min_entropy``;
    unused by ``mixture``.  ``temperature`` is T of ``nll_softmax``.
    """
    if combine not in COMBINERS:
        raise ValueError(f"combine must be one of {'|'.join(COMBINERS)}, got {combine!r}")
    log_w = weights.to(torch.float64).log().view(-1, *([1] * len(shape))).expand(-1, *shape)  # (M, *shape)
    if combine == "mixture":
        return log_w.exp()
    if signals is None or tuple(signals.shape) != (weights.shape[0], *shape):
        want, got = (weights.shape[0], *shape), None if signals is None else tuple(signals.shape)
        raise ValueError(f"combine={combine!r} needs the teachers' {SIGNAL_OF[combine]} {want}, got {got}")
    s = signals.to(torch.float64)  # (M, *shape)
    if combine == "nll_softmax":
        if not temperature > 0:
            raise ValueError(f"nll_softmax temperature must be > 0, got {temperature}")
        known = ~torch.isnan(s).any(0, keepdim=True)  # (1, *shape): else the static weights
        scores = torch.where(known, log_w - s / temperature, log_w)  # (M, *shape); NLL = inf -> weight 0
        hopeless = (scores == -torch.inf).all(0, keepdim=True)  # every teacher gave the token probability 0
        return torch.where(hopeless, log_w, scores).softmax(0)
    # picks: the smallest score among teachers with weight > 0; ties and all-NaN -> the first such teacher
    score = torch.where(torch.isnan(s) | (log_w == -torch.inf), torch.inf, s)  # (M, *shape)
    first = int(torch.nonzero(weights > 0)[0, 0])
    choice = torch.where((score == torch.inf).all(0), first, score.argmin(0))  # (*shape)
    return torch.nn.functional.one_hot(choice, s.shape[0]).movedim(-1, 0).to(torch.float64)  # (M, *shape)


def mix_topk(parts: Sequence[dict[str, Tensor]], weights: Tensor, *, vocab_size: int) -> dict[str, Tensor]:
    """The mixture of M top-k targets, each tail spread uniformly over its non-kept ids (docstring, (A)).

    ``parts``: per teacher ``topk_ids`` (B, T, k_t), ``topk_logprobs`` (B, T, k_t) (-inf padded),
    ``topk_mask`` (B, T, k_t) bool (optional: all real), ``topk_log_tail`` (B, T) (log of the mass
    outside the unmasked entries; -inf for none).  ``weights`` (M, B, T) per-token weights summing
    to 1 (or (M,)).  Returns the same keys: the union's ids in ascending order, padded to the
    batch's largest union (id 0, log-prob -inf, mask False), their mixture log-probs and the rest
    bucket's log-mass, in the dtype of the first teacher's log-probs (computed in float64).
    """
    first = parts[0]["topk_logprobs"]
    batch, seq = first.shape[:2]
    n, dev = batch * seq, first.device
    w = weights.to(device=dev, dtype=torch.float64).reshape(len(parts), -1).expand(len(parts), n)  # (M, N)
    base = torch.zeros(n, dtype=torch.float64, device=dev)  # (N,) sum_t w_t u_t: every teacher's per-id tail
    ids_all, contrib_all, log_rest_terms = [], [], []
    for t, part in enumerate(parts):
        ids = part["topk_ids"].reshape(n, -1)  # (N, k_t)
        mask = _mask(part).reshape(n, -1)  # (N, k_t)
        p = part["topk_logprobs"].reshape(n, -1).to(torch.float64).exp().masked_fill(~mask, 0.0)  # (N, k_t)
        log_tail = part["topk_log_tail"].reshape(n).to(torch.float64)  # (N,)
        room = (vocab_size - mask.sum(-1)).to(torch.float64)  # (N,) ids outside K_t
        log_u = torch.where(room > 0, log_tail - room.log(), -torch.inf)  # (N,) log tau_t / |V \ K_t|
        u = log_u.exp()  # (N,)
        base += w[t] * u
        contrib_all.append(torch.where(mask, w[t].unsqueeze(-1) * (p - u.unsqueeze(-1)), 0.0))  # (N, k_t)
        ids_all.append(ids.masked_fill(~mask, vocab_size))  # (N, k_t); padding sorts last
        log_rest_terms.append((w[t].log() + log_u, room))
    ids_cat = torch.cat(ids_all, -1)  # (N, K) K = sum_t k_t
    contrib = torch.cat(contrib_all, -1)  # (N, K)
    sorted_ids, order = ids_cat.sort(-1)  # (N, K)
    contrib = contrib.gather(-1, order)  # (N, K)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)  # (N, K) first entry of each distinct id
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = new.cumsum(-1) - 1  # (N, K) index of each entry's distinct id
    values = torch.zeros_like(contrib).scatter_add_(-1, group, contrib)  # (N, K) summed per distinct id
    uids = torch.full_like(sorted_ids, vocab_size).scatter_(-1, group, sorted_ids)  # (N, K)
    keep = uids < vocab_size  # (N, K) real union ids, left-aligned
    size = keep.sum(-1)  # (N,) |U|
    width = max(int(size.max()), 1) if n else 1
    keep, uids, values = keep[:, :width], uids[:, :width], values[:, :width]
    mixed = (base.unsqueeze(-1) + values).clamp_min(0.0)  # (N, W); >= 0 up to rounding
    log_m = torch.where(keep, mixed.log(), -torch.inf)  # (N, W)
    rest = (vocab_size - size).to(torch.float64)  # (N,) |V \ U|
    terms = [
        torch.where((rest > 0) & (room > 0), log_wu + rest.log(), -torch.inf) for log_wu, room in log_rest_terms
    ]  # each (N,): log w_t tau_t |V \ U| / |V \ K_t|
    log_tail = torch.stack(terms).logsumexp(0)  # (N,)
    dtype = first.dtype
    return {
        "topk_ids": uids.masked_fill(~keep, 0).reshape(batch, seq, width),
        "topk_logprobs": log_m.to(dtype).reshape(batch, seq, width),
        "topk_mask": keep.reshape(batch, seq, width),
        "topk_log_tail": log_tail.to(dtype).reshape(batch, seq),
    }


def pick_topk(parts: Sequence[dict[str, Tensor]], choice: Tensor) -> dict[str, Tensor]:
    """Per token, teacher ``choice`` (B, T)'s top-k target unchanged, padded to the widest k (id 0,
    log-prob -inf, mask False); ``topk_log_z`` too when every teacher has it (exact: one teacher's)."""
    width = max(p["topk_ids"].shape[-1] for p in parts)

    def padded(x: Tensor, fill: float | bool) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=fill)  # (B, T, W)

    out = {
        "topk_ids": _gather(torch.stack([padded(p["topk_ids"], 0) for p in parts]), choice),
        "topk_logprobs": _gather(torch.stack([padded(p["topk_logprobs"], -torch.inf) for p in parts]), choice),
        "topk_mask": _gather(torch.stack([padded(_mask(p), False) for p in parts]), choice),
    }  # each (B, T, W)
    for key in ("topk_log_tail", "topk_log_z"):
        if all(key in p for p in parts):
            out[key] = _gather(torch.stack([p[key] for p in parts]), choice)  # (B, T)
    return out


def mix_sampled(parts: Sequence[dict[str, Tensor]], weights: Tensor) -> dict[str, Tensor]:
    """The mixture of M sampled targets: draws concatenated, counts scaled so that the sampled loss's
    weights c / S become w_t c_tj / S_t (docstring).  ``parts``: ``sample_ids``/``sample_counts``
    (B, T, S_t), ``sample_total`` (B, T); ``weights`` (M, B, T) or (M,).  A teacher with no draws at
    a position (S_t = 0) contributes nothing there."""
    totals = torch.stack([p["sample_total"].to(torch.float64) for p in parts])  # (M, B, T)
    w = weights.to(device=totals.device, dtype=torch.float64)
    w = w.view(-1, 1, 1) if w.dim() == 1 else w  # (M, B, T) or broadcastable
    total = totals.sum(0)  # (B, T) the new S
    scale = torch.where(totals > 0, w * total / totals.clamp_min(1e-300), 0.0)  # (M, B, T)
    dtype = parts[0]["sample_counts"].dtype
    counts = [p["sample_counts"].to(torch.float64) * scale[t].unsqueeze(-1) for t, p in enumerate(parts)]
    return {
        "sample_ids": torch.cat([p["sample_ids"] for p in parts], -1),  # (B, T, sum S_t)
        "sample_counts": torch.cat(counts, -1).to(dtype),  # (B, T, sum S_t)
        "sample_total": total.to(parts[0]["sample_total"].dtype),  # (B, T)
    }


def combine_batches(
    parts: Sequence[dict[str, Tensor]],
    weights: Tensor,
    *,
    combine: str,
    vocab_size: int,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """One batch from M aligned batches (same sequences, same order): ``input_ids``/``seq_index`` and any
    masks from the first, the combined top-k targets when every part has them, the combined sampled
    targets when every part has them, and the combined teacher's ``teacher_nll`` where it is exact
    (-log sum_t w_t e^-NLL_t: the mixture's NLL of the next token; for picks the chosen teacher's) and
    ``teacher_entropy`` for picks (a mixture's entropy is not determined by the teachers').

    ``weights`` (M,) static weights summing to 1 (``normalized_weights``); ``combine`` in ``COMBINERS``.
    """
    if len(parts) != weights.shape[0]:
        raise ValueError(f"combine_batches: {len(parts)} batches but {weights.shape[0]} weights")
    signal = SIGNAL_OF.get(combine)
    if signal is not None and not all(signal in p for p in parts):
        raise ValueError(f"combine={combine!r} needs {signal} in every cache's batches; use combine: mixture")
    head = parts[0]
    out = {k: v for k, v in head.items() if not k.startswith(("topk_", "sample_", "teacher_"))}
    shape = tuple(next(head[k] for k in ("input_ids", "topk_ids", "sample_ids") if k in head).shape[:2])  # (B, T)
    signals = torch.stack([p[signal] for p in parts]) if signal is not None else None  # (M, B, T)
    per_token = position_weights(weights, combine=combine, shape=shape, signals=signals, temperature=temperature)
    choice = per_token.argmax(0) if combine in PICKS else None  # (B, T)
    if all("topk_ids" in p for p in parts):
        out |= pick_topk(parts, choice) if choice is not None else mix_topk(parts, per_token, vocab_size=vocab_size)
    if all("sample_ids" in p for p in parts):
        out |= mix_sampled(parts, per_token)
    for key in ("teacher_nll", "teacher_entropy"):
        if not all(key in p for p in parts):
            continue
        stacked = torch.stack([p[key] for p in parts])  # (M, B, T)
        if choice is not None:
            out[key] = _gather(stacked, choice)
        elif key == "teacher_nll":  # the mixture's NLL of the next token; NaN where a teacher's is NaN
            out[key] = (-(per_token.log() - stacked.to(torch.float64)).logsumexp(0)).to(stacked.dtype)
    return out


def _mask(part: dict[str, Tensor]) -> Tensor:
    mask = part.get("topk_mask")
    return torch.ones_like(part["topk_ids"], dtype=torch.bool) if mask is None else mask.to(torch.bool)


def _gather(stacked: Tensor, choice: Tensor) -> Tensor:
    """``stacked`` (M, B, T, ...) -> (B, T, ...) taking teacher ``choice`` (B, T) at each position."""
    index = choice.view(1, *choice.shape, *([1] * (stacked.dim() - 3)))  # (1, B, T, 1...)
    index = index.expand(1, *stacked.shape[1:])
    return stacked.gather(0, index).squeeze(0)
