"""Teacher logits -> sparse soft targets, as pure tensor functions that run on the logits' device.

Log-softmax is always fp32. Work is chunked over tokens: per chunk one (chunk, V) fp32 log-prob
buffer, plus one (chunk, V) probability buffer while entropy and samples are computed; only
small (tokens, k) / (tokens, S) results leave the loop. Choose ``chunk_tokens`` with
``chunk_tokens_for`` to bound that memory. The logits themselves may be produced chunk by chunk
too (``sparsify_rows``, fed by ``kdcache.teacher.head_logits`` from final hidden states), so the
full (B, T, V) logits never exist; ``sparsify`` is the same loop over a tensor that does.

Sampled targets are deterministic per ``(seed, seq_index, position)``: each sequence draws its
uniforms from its own CPU generator, so results do not depend on batch composition or chunking.
Sampling is by inverse CDF in float64 (uniforms and cumulative sums): in float32 the CDF's
spacing near 1 (6e-8) exceeds most tail probabilities at V = 262k, which then land on the wrong ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch

from kdcache.cache.format import SequenceTargets, TargetLayout

SMALL_KEYS = (
    "topk_ids",
    "topk_logprobs",
    "topk_lengths",
    "topk_log_tail",
    "sample_ids",
    "sample_counts",
    "topk_log_z",
    "teacher_nll",
    "teacher_entropy",
    "byte_lengths",
)
"""Keys of ``sparsify``'s result that become ``SequenceTargets`` fields."""


def chunk_tokens_for(vocab_size: int, *, budget_bytes: int = 256 << 20) -> int:
    """Tokens per chunk so that one (chunk, V) fp32 buffer stays within ``budget_bytes``."""
    return max(1, min(16384, budget_bytes // (4 * vocab_size)))


CHUNK_BUDGET = {"cuda": 256 << 20, "cpu": 16 << 20}
"""Bytes of one (chunk, V) fp32 buffer in the cache stage, by device type. GPUs want big kernels;
CPUs were ~1.5x faster when a chunk's buffer fits in cache (measured at V=4096). A chunk holds
about four such buffers at once (logits, log-probs, probabilities, top-k scratch)."""


def cache_chunk_tokens(vocab_size: int, device_type: str) -> int:
    """Positions per chunk in the cache stage on ``device_type`` (``CHUNK_BUDGET``; other devices as CUDA)."""
    return chunk_tokens_for(vocab_size, budget_bytes=CHUNK_BUDGET.get(device_type, CHUNK_BUDGET["cuda"]))


def sequence_seed(seed: int, seq_index: int) -> int:
    """A 63-bit generator seed for one sequence, stable across platforms and processes."""
    digest = hashlib.sha256(f"kdcache-samples:{int(seed)}:{int(seq_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


DRAW_ROWS = 8
"""Rows per float64 CDF while sampling: the (rows, V) float64 buffer stays small at any chunk size."""


def sample_uniforms(seed: int, seq_indices: torch.Tensor | list[int], seq_len: int, samples: int) -> torch.Tensor:
    """Uniforms in [0, 1) for each sequence, generated on the CPU: (B, T, S) float64 (53 random bits)."""
    out = torch.empty((len(seq_indices), seq_len, samples), dtype=torch.float64)
    for b, index in enumerate(torch.as_tensor(seq_indices).tolist()):
        gen = torch.Generator().manual_seed(sequence_seed(seed, index))
        torch.rand((seq_len, samples), generator=gen, out=out[b])  # (T, S)
    return out


def next_token_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T) int64: the token each position predicts, ``input_ids[:, t + 1]`` (the training
    label convention, ``kdcache.losses.kd_loss``), and -1 at t = T - 1 (no next token in the row)."""
    out = torch.full(input_ids.shape, -1, dtype=torch.int64)
    out[:, :-1] = input_ids[:, 1:]
    return out


def sparsify(
    logits: torch.Tensor,
    *,
    layout: TargetLayout,
    seq_indices: torch.Tensor,
    chunk_tokens: int = 4096,
    next_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Sparse targets of a batch of teacher logits (B, T, V >= layout.vocab_size), on their device.

    Logits past ``layout.vocab_size`` (padding rows of the output embedding) are dropped before the
    softmax; they are divided by ``layout.temperature`` first. Returns small tensors:

    - ``topk_ids`` (B, T, k) int32 and ``topk_logprobs`` (B, T, k) float32, in ascending id order
      (the cache's order); with adaptive top-k (``layout.mass > 0``) entries past ``topk_lengths``
      hold id 0 / -inf
    - ``topk_lengths`` (B, T) int32: entries kept (smallest n whose mass reaches ``layout.mass``, in [1, k])
    - ``topk_log_tail`` (B, T) float32: log of the probability outside the kept ids, summed over
      those ids (no ``1 - mass`` cancellation; -inf when k = V)
    - ``sample_ids`` (B, T, S) int32 ascending unique ids and ``sample_counts`` (B, T, S) int32,
      padded with id 0 / count 0; counts sum to S per position
    - ``topk_log_z`` (B, T, len(layout.temperatures)) float32: L_tau = logsumexp_v(log p_v * tau0 / tau)
      over the full vocabulary, tau0 = ``layout.temperature``, for each stored tau (what the loss takes as
      ``topk_log_z`` at re-tempering factor tau / tau0); only with ``layout.temperatures``
    - ``teacher_nll`` (B, T) float32 (with ``"nll"`` in ``layout.signals``): -log p_1(``next_ids``) in nats
      at tau = 1 (the teacher's own distribution); NaN where ``next_ids`` < 0 (no next token);
      ``next_ids`` (B, T) is required then (``next_token_ids``)
    - ``teacher_entropy`` (B, T) float32 (with ``"entropy"`` in ``layout.signals``): entropy at tau = 1, nats
    - ``entropy`` (B, T) float32 nats at tau0, ``topk_mass`` (B, T) float32 probability of the kept entries
    - ``nonfinite`` (B,) bool: the sequence's logits hold NaN or inf (its other values are meaningless)
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    B, T, V_full = logits.shape
    flat = logits.reshape(B * T, V_full)  # (N, V_full), a view of contiguous logits
    return sparsify_rows(
        lambda rows: flat[rows],
        batch=B,
        device=logits.device,
        layout=layout,
        seq_indices=seq_indices,
        chunk_tokens=chunk_tokens,
        seq_len=T,
        next_ids=next_ids,
    )


LogitRows = Callable[[slice], torch.Tensor]
"""``rows -> (n, V_full)`` logits of flat positions ``rows`` (position b * T + t), V_full >= vocab_size."""


def sparsify_rows(
    logit_rows: LogitRows,
    *,
    batch: int,
    device: torch.device,
    layout: TargetLayout,
    seq_indices: torch.Tensor,
    chunk_tokens: int = 4096,
    seq_len: int | None = None,
    next_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``sparsify`` with logits produced on demand, ``chunk_tokens`` flat positions at a time.

    ``logit_rows(slice(a, b))`` returns the (b - a, V_full) logits of positions a..b-1 of the
    batch flattened to B * T rows; only one chunk of logits exists at a time. Same results as
    ``sparsify`` on the stacked chunks, bit for bit.
    """
    T = layout.seq_len if seq_len is None else seq_len
    V = layout.vocab_size
    if layout.seq_len != T or seq_indices.shape != (batch,):
        raise ValueError(
            f"logits ({batch}, {T}, ...) / seq_indices {tuple(seq_indices.shape)} do not match seq_len {layout.seq_len}"
        )
    N = batch * T
    k, S = layout.top_k, layout.samples
    out: dict[str, torch.Tensor] = {
        "entropy": torch.empty(N, dtype=torch.float32, device=device),
        "topk_mass": torch.empty(N, dtype=torch.float32, device=device),
        "nonfinite": torch.empty(N, dtype=torch.bool, device=device),
    }
    if layout.has_topk:
        out["topk_ids"] = torch.empty((N, k), dtype=torch.int32, device=device)
        out["topk_logprobs"] = torch.empty((N, k), dtype=torch.float32, device=device)
        out["topk_lengths"] = torch.empty(N, dtype=torch.int32, device=device)
        out["topk_log_tail"] = torch.empty(N, dtype=torch.float32, device=device)
    if layout.temperatures:
        out["topk_log_z"] = torch.empty((N, len(layout.temperatures)), dtype=torch.float32, device=device)
    for signal in layout.signals:
        out[f"teacher_{signal}"] = torch.empty(N, dtype=torch.float32, device=device)
    if "nll" in layout.signals:
        if next_ids is None or tuple(next_ids.shape) != (batch, T):
            raise ValueError(f"teacher NLL needs next_ids of shape ({batch}, {T}) (next_token_ids(input_ids))")
        next_ids = next_ids.reshape(N).to(device)
    uniforms = None
    if layout.has_samples:
        uniforms = sample_uniforms(layout.seed, seq_indices, T, S).view(N, S).to(device)  # (N, S) float64
        out["sample_ids"] = torch.empty((N, S), dtype=torch.int32, device=device)
        out["sample_counts"] = torch.empty((N, S), dtype=torch.int32, device=device)
    for start in range(0, N, max(1, chunk_tokens)):
        rows = slice(start, min(N, start + max(1, chunk_tokens)))
        chunk = logit_rows(rows)  # (n, V_full)
        if chunk.ndim != 2 or chunk.shape[0] != rows.stop - rows.start or chunk.shape[1] < V:
            raise ValueError(
                f"logits have {chunk.shape[-1]} entries per token, fewer than the layout's vocab_size {V}"
                if chunk.ndim == 2 and chunk.shape[1] < V
                else f"logit chunk for rows {rows.start}..{rows.stop - 1} has shape {tuple(chunk.shape)}"
            )
        _sparsify_chunk(
            chunk[:, :V],
            layout,
            out,
            rows,
            None if uniforms is None else uniforms[rows],
            None if next_ids is None else next_ids[rows],
        )
        del chunk
    result = {key: value.view(batch, T, *value.shape[1:]) for key, value in out.items() if key != "nonfinite"}
    result["nonfinite"] = out["nonfinite"].view(batch, T).any(dim=1)  # (B,)
    return result


def _sparsify_chunk(
    chunk: torch.Tensor,
    layout: TargetLayout,
    out: dict[str, torch.Tensor],
    rows: slice,
    uniforms: torch.Tensor | None,
    next_ids: torch.Tensor | None,
) -> None:
    """Fill ``out[...][rows]`` from one (n, V) chunk of logits."""
    n = chunk.shape[0]
    logprobs = chunk.to(torch.float32, copy=True)  # (n, V) the one fp32 copy
    if layout.temperature != 1.0:
        logprobs.div_(layout.temperature)
    logprobs.sub_(torch.logsumexp(logprobs, dim=-1, keepdim=True))  # (n, V) log-softmax in place
    # NaN anywhere poisons the logsumexp, +inf gives inf - inf = NaN, -inf stays -inf: a finite row sum means clean.
    out["nonfinite"][rows] = ~torch.isfinite(logprobs.sum(dim=-1))
    kept = None
    if layout.has_topk:
        kept = _top_entries(logprobs, layout)
        out["topk_ids"][rows], out["topk_logprobs"][rows], out["topk_lengths"][rows] = kept[:3]
    probs = logprobs.exp()  # (n, V) second buffer: probabilities, then their CDF
    # Entropy -sum p log p as a batched dot product: no third (n, V) temporary.
    out["entropy"][rows] = -torch.bmm(probs.unsqueeze(1), logprobs.unsqueeze(2)).view(n)
    teacher_signals(logprobs, layout, out, rows, next_ids)  # before the kept ids are masked out of logprobs
    if kept is not None:
        ids, values = kept[3:]  # (n, k) unsorted ids and -inf at kept entries / their log-probs elsewhere
        out["topk_log_tail"][rows] = logprobs.scatter_(1, ids, values).logsumexp(dim=-1)  # kept ids masked out
        out["topk_mass"][rows] = out["topk_logprobs"][rows].exp().sum(dim=-1)
    else:
        out["topk_mass"][rows] = 0.0
    del logprobs
    if uniforms is not None:
        ids = draw(probs, uniforms)  # (n, S)
        out["sample_ids"][rows], out["sample_counts"][rows] = unique_counts(ids)


def teacher_signals(
    logprobs: torch.Tensor,
    layout: TargetLayout,
    out: dict[str, torch.Tensor],
    rows: slice,
    next_ids: torch.Tensor | None,
) -> None:
    """Fill ``topk_log_z`` and ``teacher_<signal>`` at ``rows`` from (n, V) log-probs at tau0 (full vocabulary)."""
    tau0 = layout.temperature
    for j, tau in enumerate(layout.temperatures):
        out["topk_log_z"][rows, j] = torch.logsumexp(logprobs * (tau0 / tau), dim=-1)  # (n,) one (n, V) temporary
    if not layout.signals:
        return
    if tau0 == 1.0:
        logp1, entropy = logprobs, out["entropy"][rows]
    else:  # the teacher's own distribution: log p_1 = log p_tau0 * tau0 - logsumexp(log p_tau0 * tau0)
        logp1 = logprobs * tau0  # (n, V)
        logp1 -= torch.logsumexp(logp1, dim=-1, keepdim=True)
        entropy = -torch.bmm(logp1.exp().unsqueeze(1), logp1.unsqueeze(2)).view(-1)  # (n,)
    if "entropy" in layout.signals:
        out["teacher_entropy"][rows] = entropy
    if "nll" in layout.signals:
        have = next_ids >= 0  # (n,)
        nll = -logp1.gather(1, next_ids.clamp(min=0).unsqueeze(1)).squeeze(1)  # (n,)
        out["teacher_nll"][rows] = torch.where(have, nll, torch.full_like(nll, float("nan")))


def _top_entries(logprobs: torch.Tensor, layout: TargetLayout) -> tuple[torch.Tensor, ...]:
    """Top-k (or adaptive) entries of (n, V) log-probs, ascending by id with padding last.

    Returns ids (n, k) int32, log-probs (n, k) float32 (-inf padded), lengths (n,) int32, and for
    masking the kept ids out of ``logprobs``: the topk ids (n, k) int64 and (n, k) -inf at kept
    entries / the original log-prob at dropped ones.
    """
    k, V = layout.top_k, logprobs.shape[1]
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1, sorted=True)  # (n, k) descending
    if layout.adaptive:
        cum = top_lp.exp().cumsum(dim=-1)  # (n, k)
        lengths = ((cum < layout.mass).sum(dim=-1) + 1).clamp_(max=k)  # (n,)
    else:
        lengths = torch.full((len(top_lp),), k, dtype=torch.int64, device=top_lp.device)
    pad = torch.arange(k, device=top_lp.device)[None, :] >= lengths[:, None]  # (n, k)
    mask_values = top_lp.masked_fill(~pad, float("-inf"))  # (n, k)
    order = torch.where(pad, V + torch.arange(k, device=top_lp.device), top_ids).argsort(dim=-1)  # (n, k) by id
    ids = top_ids.gather(1, order).masked_fill_(pad, 0)  # pad stays last: lengths are a prefix after sorting
    values = top_lp.gather(1, order).masked_fill_(pad, float("-inf"))
    return ids.to(torch.int32), values, lengths.to(torch.int32), top_ids, mask_values


def cumulative(probs: torch.Tensor) -> torch.Tensor:
    """The sampler's CDF of (n, V) probabilities: (n, V) float64 running sums (exact to ~1e-16 at any V)."""
    return torch.cumsum(probs, dim=-1, dtype=torch.float64)  # (n, V)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling in float64: probs (n, V) >= 0, uniforms (n, S) float64 in [0, 1) -> ids (n, S) int64.

    Id i is drawn with probability (cdf[i] - cdf[i-1]) / cdf[V-1], the width of its CDF interval
    (to within 2^-52 per id); an id of probability 0 is never drawn. The float64 CDF is built
    ``DRAW_ROWS`` rows at a time, so it adds (DRAW_ROWS, V) float64 to the chunk's buffers.
    """
    ids = torch.empty(uniforms.shape, dtype=torch.int64, device=probs.device)  # (n, S)
    for start in range(0, probs.shape[0], DRAW_ROWS):
        rows = slice(start, start + DRAW_ROWS)
        cdf = cumulative(probs[rows])  # (r, V) float64
        targets = uniforms[rows].to(torch.float64) * cdf[:, -1:]  # (r, S) scaled by the total: cannot overshoot
        ids[rows] = torch.searchsorted(cdf, targets.contiguous(), right=True)  # first i with cdf[i] > u: skips p = 0
    return ids.clamp_(max=probs.shape[1] - 1)


def unique_counts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: unique ids ascending and their counts, padded to width S with id 0 / count 0.

    ids (n, S) int -> (unique (n, S) int32, counts (n, S) int32)
    """
    ordered, _ = torch.sort(ids, dim=-1)  # (n, S)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = first.cumsum(dim=-1) - 1  # (n, S) group index of each draw
    unique = torch.zeros_like(ordered).scatter_(1, slot, ordered)  # same value written per group
    counts = torch.zeros_like(ordered).scatter_add_(1, slot, torch.ones_like(ordered))
    return unique.to(torch.int32), counts.to(torch.int32)


def to_sequence_targets(
    sparse: dict[str, torch.Tensor], input_ids: np.ndarray, seq_indices: list[int] | np.ndarray
) -> list[SequenceTargets]:
    """CPU results of ``sparsify`` + the batch's input ids (B, T) -> one ``SequenceTargets`` per row."""
    arrays = {key: sparse[key].numpy() for key in SMALL_KEYS if key in sparse}
    if "topk_log_z" in arrays:
        arrays["topk_log_z"] = arrays["topk_log_z"].transpose(0, 2, 1)  # (B, temperatures, T): the column's order
    return [
        SequenceTargets(
            seq_index=int(index), input_ids=np.asarray(input_ids[b]), **{key: value[b] for key, value in arrays.items()}
        )
        for b, index in enumerate(seq_indices)
    ]
