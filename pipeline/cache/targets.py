"""Teacher logits -> sparse soft targets, as pure tensor functions that run on the logits' device.

Softmax is always fp32. Work is chunked over tokens: per chunk one (chunk, V) fp32 logit buffer
(the head's own output when ``sparsify_rows`` may overwrite it, else a copy), processed in groups of
rows (``group_rows``: L2-sized on a CPU) that each add a probability buffer and a product temporary;
only small (tokens, k) / (tokens, S) results leave the loop. Choose ``chunk_tokens`` with
``chunk_tokens_for`` to bound that memory. The logits themselves may be produced chunk by chunk
too (``sparsify_rows``, fed by ``kdcache.teacher.head_logits`` from final hidden states), so the
full (B, T, V) logits never exist; ``sparsify`` is the same loop over a tensor that does.

Sampled targets are deterministic per ``(seed, seq_index, position)``: each sequence draws its
uniforms from its own CPU generator, so results do not depend on batch composition or chunking.
Sampling is by inverse CDF over integer weights floor(p * 2^51) summed exactly in float64 (``draw``): in
float32 the CDF's spacing near 1 (6e-8) exceeds most tail probabilities at V = 262k, which then land on the
wrong ids; exact integer sums also make the draws independent of summation order, hence of device and chunking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from kdcache.cache.format import SequenceTargets, TargetLayout
from kdcache.cache.sampling import (  # noqa: F401 (re-exported: generate, tests)
    SAMPLE_BLOCK,
    block_sums,
    cumulative,
    draw,
    draw_blocks,
    sample_uniforms,
    sequence_seed,
    unique_counts,
)

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
    writable: bool = False,
) -> dict[str, torch.Tensor]:
    """``sparsify`` with logits produced on demand, ``chunk_tokens`` flat positions at a time.

    ``logit_rows(slice(a, b))`` returns the (b - a, V_full) logits of positions a..b-1 of the
    batch flattened to B * T rows; only one chunk of logits exists at a time. Same results as
    ``sparsify`` on the stacked chunks, bit for bit. ``writable``: each chunk is a fresh tensor
    (``kdcache.teacher.logit_rows``' are) that sparsify may overwrite instead of copying.
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
    with torch.inference_mode():  # the head's chunks are inference tensors, overwritten in place when writable
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
                writable=writable,
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
    *,
    writable: bool = False,
) -> None:
    """Fill ``out[...][rows]`` from one (n, V) chunk of logits: the full-vocabulary passes ``group_rows`` rows
    at a time, the samples' small per-draw work once per chunk (``writable``: the chunk is a fresh fp32 tensor
    this may overwrite, else it is copied once)."""
    own = writable and chunk.dtype == torch.float32 and chunk.is_contiguous()
    x = chunk if own else chunk.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # (n, V)
    if layout.temperature != 1.0:
        x.div_(layout.temperature)
    n, V = x.shape
    e = torch.empty_like(x) if uniforms is not None else None  # (n, V) exp(x - max) kept for the draws
    sums = x.new_empty(n, -(-V // SAMPLE_BLOCK)) if uniforms is not None else None  # (n, blocks)
    step = group_rows(V, x.device.type, n)
    with one_thread_on_cpu(x.device.type):
        for a in range(0, n, step):
            b = min(n, a + step)
            _sparsify_group(
                x[a:b],
                layout,
                out,
                slice(rows.start + a, rows.start + b),
                None if next_ids is None else next_ids[a:b],
                e=None if e is None else e[a:b],
                sums=None if sums is None else sums[a:b],
            )
        if uniforms is not None:
            out["sample_ids"][rows], out["sample_counts"][rows] = unique_counts(draw_blocks(e, sums, uniforms))


@contextmanager
def one_thread_on_cpu(device_type: str) -> Iterator[None]:
    """On a CPU, this thread's intra-op threads set to 1 inside (restored after): the row groups' many small ops
    would each pay an OpenMP barrier, which costs milliseconds when other jobs share the cores (measured: 4x
    slower at 2 threads than 1 on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    if device_type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


GROUP_BYTES = {"cpu": 1 << 20}
"""Bytes of one (rows, V) fp32 buffer per full-vocabulary step, by device type: on a CPU a group's (rows, V)
buffers stay in the core's L2 cache (~2x faster than chunk-sized passes at V=4096); other devices take the
whole chunk in one step (big kernels)."""


def group_rows(vocab_size: int, device_type: str, chunk_rows: int) -> int:
    """Rows per full-vocabulary step within a chunk (``GROUP_BYTES``; at least 8: per-op overhead at large V)."""
    budget = GROUP_BYTES.get(device_type)
    return chunk_rows if budget is None else min(chunk_rows, max(8, budget // (4 * vocab_size)))


def _sparsify_group(
    x: torch.Tensor,
    layout: TargetLayout,
    out: dict[str, torch.Tensor],
    rows: slice,
    next_ids: torch.Tensor | None,
    *,
    e: torch.Tensor | None = None,
    sums: torch.Tensor | None = None,
) -> None:
    """Fill ``out[...][rows]`` (all but the samples) from (r, V) fp32 logits / tau0, overwritten in place;
    with ``e`` ((r, V)) and ``sums`` ((r, blocks)) also keep exp(x - max) and its block sums for ``draw_blocks``.

    One max, one exp and one product pass give everything at tau0: with xs = x - max (<= 0), e = exp(xs),
    Z = sum e: log p = xs - log Z and entropy = log Z - sum e * xs / Z (two non-negative terms: no
    cancellation). A NaN or +-inf logit makes sum e * xs NaN (NaN, inf - inf, or 0 * -inf), which flags
    the row, as a non-finite log-prob sum did.
    """
    r = x.shape[0]
    xs = x.sub_(x.amax(dim=-1, keepdim=True))  # (r, V) shifted logits, max 0
    e = torch.exp(xs, out=e)  # (r, V) unnormalized probabilities, max 1
    summed = e if sums is None else block_sums(e, out=sums)  # with samples, Z from their block sums: a pass fewer
    z = summed.sum(dim=-1, keepdim=True)  # (r, 1) in [1, V]
    log_z = z.log()  # (r, 1)
    dot = (e * xs).sum(dim=-1).div_(z.view(r))  # (r,) sum p * xs <= 0; one (r, V) temporary
    out["nonfinite"][rows] = ~torch.isfinite(dot)
    out["entropy"][rows] = log_z.view(r) - dot
    teacher_signals(xs, log_z, layout, out, rows, next_ids)
    del e
    if not layout.has_topk:
        out["topk_mass"][rows] = 0.0
        return
    ids, values, lengths, top_ids, mask = _top_entries(xs, log_z, layout)
    out["topk_ids"][rows], out["topk_logprobs"][rows], out["topk_lengths"][rows] = ids, values, lengths
    out["topk_mass"][rows] = values.exp().sum(dim=-1)
    # The kept ids masked out of xs (the last use of xs): log of the mass outside them, no 1 - mass cancellation.
    out["topk_log_tail"][rows] = xs.scatter_(1, top_ids, mask).logsumexp(dim=-1) - log_z.view(r)


def teacher_signals(
    xs: torch.Tensor,
    log_z: torch.Tensor,
    layout: TargetLayout,
    out: dict[str, torch.Tensor],
    rows: slice,
    next_ids: torch.Tensor | None,
) -> None:
    """Fill ``topk_log_z`` and ``teacher_<signal>`` at ``rows`` from (r, V) logits at tau0 shifted to max 0 and
    their (r, 1) log-normalizer (full vocabulary; log p_tau0 = xs - log_z)."""
    tau0, r = layout.temperature, xs.shape[0]
    for j, tau in enumerate(layout.temperatures):  # logsumexp_v(log p_v * f) = logsumexp_v(xs_v * f) - f * log_z
        f = tau0 / tau
        out["topk_log_z"][rows, j] = torch.logsumexp(xs * f, dim=-1) - f * log_z.view(r)  # (r,) one (r, V) temporary
    if not layout.signals:
        return
    if tau0 == 1.0:
        x1, log_z1, entropy = xs, log_z, out["entropy"][rows]
    else:  # the teacher's own distribution: logits xs * tau0, still max 0
        x1 = xs * tau0  # (r, V)
        e1 = x1.exp()  # (r, V)
        z1 = e1.sum(dim=-1, keepdim=True)  # (r, 1)
        log_z1 = z1.log()
        entropy = log_z1.view(r) - e1.mul_(x1).sum(dim=-1).div_(z1.view(r))  # (r,)
        del e1
    if "entropy" in layout.signals:
        out["teacher_entropy"][rows] = entropy
    if "nll" in layout.signals:
        have = next_ids >= 0  # (r,)
        nll = log_z1.view(r) - x1.gather(1, next_ids.clamp(min=0).unsqueeze(1)).squeeze(1)  # (r,)
        out["teacher_nll"][rows] = torch.where(have, nll, torch.full_like(nll, float("nan")))


def _top_entries(xs: torch.Tensor, log_z: torch.Tensor, layout: TargetLayout) -> tuple[torch.Tensor, ...]:
    """Top-k (or adaptive) entries of (r, V) shifted logits (log-probs ``xs - log_z``), ascending by id with
    padding last.

    Returns ids (r, k) int32, log-probs (r, k) float32 (-inf padded), lengths (r,) int32, and for
    masking the kept ids out of ``xs``: the topk ids (r, k) int64 and (r, k) -inf at kept
    entries / the original shifted logit at dropped ones.
    """
    k, V = layout.top_k, xs.shape[1]
    top_x, top_ids = torch.topk(xs, k, dim=-1, sorted=True)  # (r, k) descending
    top_lp = top_x - log_z  # (r, k)
    if layout.adaptive:
        cum = top_lp.exp().cumsum(dim=-1)  # (r, k)
        lengths = ((cum < layout.mass).sum(dim=-1) + 1).clamp_(max=k)  # (r,)
    else:
        lengths = torch.full((len(top_lp),), k, dtype=torch.int64, device=top_lp.device)
    pad = torch.arange(k, device=top_lp.device)[None, :] >= lengths[:, None]  # (r, k)
    mask_values = top_x.masked_fill(~pad, float("-inf"))  # (r, k)
    order = torch.where(pad, V + torch.arange(k, device=top_lp.device), top_ids).argsort(dim=-1)  # (r, k) by id
    ids = top_ids.gather(1, order).masked_fill_(pad, 0)  # pad stays last: lengths are a prefix after sorting
    values = top_lp.gather(1, order).masked_fill_(pad, float("-inf"))
    return ids.to(torch.int32), values, lengths.to(torch.int32), top_ids, mask_values


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
