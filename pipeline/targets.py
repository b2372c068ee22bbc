"""Teacher logits -> sparse soft targets, as pure tensor functions that run on the logits' device.

Log-softmax is always fp32. Work is chunked over tokens: per chunk one (chunk, V) fp32 log-prob
buffer, plus one (chunk, V) probability/CDF buffer while entropy and samples are computed; only
small (tokens, k) / (tokens, S) results leave the loop. Choose ``chunk_tokens`` with
``chunk_tokens_for`` to bound that memory.

Sampled targets are deterministic per ``(seed, seq_index, position)``: each sequence draws its
uniforms from its own CPU generator, so results do not depend on batch composition or chunking.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.cache_format import SequenceTargets, TargetLayout

SMALL_KEYS = ("topk_ids", "topk_logprobs", "topk_lengths", "sample_ids", "sample_counts")
"""Keys of ``sparsify``'s result that become ``SequenceTargets`` fields."""


def chunk_tokens_for(vocab_size: int, *, budget_bytes: int = 256 << 20) -> int:
    """Tokens per chunk so that one (chunk, V) fp32 buffer stays within ``budget_bytes``."""
    return max(1, min(16384, budget_bytes // (4 * vocab_size)))


def sequence_seed(seed: int, seq_index: int) -> int:
    """A 63-bit generator seed for one sequence, stable across platforms and processes."""
    digest = hashlib.sha256(f"kdcache-samples:{int(seed)}:{int(seq_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_uniforms(seed: int, seq_indices: torch.Tensor | list[int], seq_len: int, samples: int) -> torch.Tensor:
    """Uniforms in [0, 1) for each sequence, generated on the CPU: (B, T, S) float32."""
    out = torch.empty((len(seq_indices), seq_len, samples), dtype=torch.float32)
    for b, index in enumerate(torch.as_tensor(seq_indices).tolist()):
        gen = torch.Generator().manual_seed(sequence_seed(seed, index))
        torch.rand((seq_len, samples), generator=gen, out=out[b])  # (T, S)
    return out


def sparsify(logits: torch.Tensor, *, layout: TargetLayout, seq_indices: torch.Tensor,
             chunk_tokens: int = 4096) -> dict[str, torch.Tensor]:
    """Sparse targets of a batch of teacher logits (B, T, V >= layout.vocab_size), on their device.

    Logits past ``layout.vocab_size`` (padding rows of the output embedding) are dropped before the
    softmax; they are divided by ``layout.temperature`` first. Returns small tensors:

    - ``topk_ids`` (B, T, k) int32 and ``topk_logprobs`` (B, T, k) float32, descending; with
      adaptive top-k (``layout.mass > 0``) entries past ``topk_lengths`` hold id 0 / -inf
    - ``topk_lengths`` (B, T) int32: entries kept (smallest n whose mass reaches ``layout.mass``, in [1, k])
    - ``sample_ids`` (B, T, S) int32 ascending unique ids and ``sample_counts`` (B, T, S) int32,
      padded with id 0 / count 0; counts sum to S per position
    - ``entropy`` (B, T) float32 nats, ``topk_mass`` (B, T) float32 probability of the kept entries
    - ``nonfinite`` (B,) bool: the sequence's logits hold NaN or inf (its other values are meaningless)
    """
    B, T, V_full = logits.shape
    V = layout.vocab_size
    if V_full < V:
        raise ValueError(f"logits have {V_full} entries per token, fewer than the layout's vocab_size {V}")
    if layout.seq_len != T or seq_indices.shape != (B,):
        raise ValueError(f"logits {tuple(logits.shape)} / seq_indices {tuple(seq_indices.shape)} do not match "
                         f"seq_len {layout.seq_len}")
    device, N = logits.device, B * T
    flat = logits.reshape(N, V_full)  # (N, V_full), a view of contiguous logits
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
    uniforms = None
    if layout.has_samples:
        uniforms = sample_uniforms(layout.seed, seq_indices, T, S).view(N, S).to(device)  # (N, S)
        out["sample_ids"] = torch.empty((N, S), dtype=torch.int32, device=device)
        out["sample_counts"] = torch.empty((N, S), dtype=torch.int32, device=device)
    for start in range(0, N, max(1, chunk_tokens)):
        rows = slice(start, min(N, start + chunk_tokens))
        _sparsify_chunk(flat[rows, :V], layout, out, rows, None if uniforms is None else uniforms[rows])
    result = {key: value.view(B, T, *value.shape[1:]) for key, value in out.items() if key != "nonfinite"}
    result["nonfinite"] = out["nonfinite"].view(B, T).any(dim=1)  # (B,)
    return result


def _sparsify_chunk(chunk: torch.Tensor, layout: TargetLayout, out: dict[str, torch.Tensor], rows: slice,
                    uniforms: torch.Tensor | None) -> None:
    """Fill ``out[...][rows]`` from one (n, V) chunk of logits."""
    n = chunk.shape[0]
    logprobs = chunk.to(torch.float32, copy=True)  # (n, V) the one fp32 copy
    if layout.temperature != 1.0:
        logprobs.div_(layout.temperature)
    logprobs.sub_(torch.logsumexp(logprobs, dim=-1, keepdim=True))  # (n, V) log-softmax in place
    # NaN anywhere poisons the logsumexp, +inf gives inf - inf = NaN, -inf stays -inf: a finite row sum means clean.
    out["nonfinite"][rows] = ~torch.isfinite(logprobs.sum(dim=-1))
    kept_mass = None
    if layout.has_topk:
        top_lp, top_ids = torch.topk(logprobs, layout.top_k, dim=-1, sorted=True)  # (n, k) descending
        top_p = top_lp.exp()  # (n, k)
        if layout.adaptive:
            cum = top_p.cumsum(dim=-1)  # (n, k)
            lengths = ((cum < layout.mass).sum(dim=-1) + 1).clamp_(max=layout.top_k)  # (n,)
            pad = torch.arange(layout.top_k, device=chunk.device)[None, :] >= lengths[:, None]  # (n, k)
            top_lp = top_lp.masked_fill(pad, float("-inf"))
            top_ids = top_ids.masked_fill(pad, 0)
            top_p = top_p.masked_fill(pad, 0.0)
        else:
            lengths = torch.full((n,), layout.top_k, dtype=torch.int64, device=chunk.device)
        out["topk_ids"][rows] = top_ids.to(torch.int32)
        out["topk_logprobs"][rows] = top_lp
        out["topk_lengths"][rows] = lengths.to(torch.int32)
        kept_mass = top_p.sum(dim=-1)  # (n,)
    probs = logprobs.exp()  # (n, V) second buffer: probabilities, then their CDF
    # Entropy -sum p log p as a batched dot product: no third (n, V) temporary.
    out["entropy"][rows] = -torch.bmm(probs.unsqueeze(1), logprobs.unsqueeze(2)).view(n)
    del logprobs
    out["topk_mass"][rows] = kept_mass if kept_mass is not None else torch.zeros(n, device=chunk.device)
    if uniforms is not None:
        ids = _draw(probs.cumsum_(dim=-1), uniforms)  # (n, S)
        out["sample_ids"][rows], out["sample_counts"][rows] = unique_counts(ids)


def _draw(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: cdf (n, V) fp32 non-decreasing, uniforms (n, S) in [0, 1) -> ids (n, S) int64."""
    targets = uniforms * cdf[:, -1:]  # (n, S) scaled by the total, so rounding of the CDF's end cannot overshoot
    ids = torch.searchsorted(cdf, targets.contiguous(), right=True)  # first i with cdf[i] > u: skips p = 0
    return ids.clamp_(max=cdf.shape[1] - 1)


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


def to_sequence_targets(sparse: dict[str, torch.Tensor], input_ids: np.ndarray,
                        seq_indices: list[int] | np.ndarray) -> list[SequenceTargets]:
    """CPU results of ``sparsify`` + the batch's input ids (B, T) -> one ``SequenceTargets`` per row."""
    arrays = {key: sparse[key].numpy() for key in SMALL_KEYS if key in sparse}
    return [SequenceTargets(seq_index=int(index), input_ids=np.asarray(input_ids[b]),
                            **{key: value[b] for key, value in arrays.items()})
            for b, index in enumerate(seq_indices)]
