"""Sampled targets: per-sequence uniforms and an inverse-CDF sampler exact to ~1e-6 in total variation at any V.

Uniforms come from one CPU generator per sequence (``sample_uniforms``), so draws depend on (seed, sequence,
position) alone. ``draw`` inverts a two-level CDF: float32 sums of ``SAMPLE_BLOCK``-id blocks, run through in
float64, then float64 running sums inside the drawn block; no (n, V) float64 buffer (``kdcache.cache.targets``
computes the block sums in its own pass over the probabilities and calls ``draw_blocks``).
"""

from __future__ import annotations

import hashlib

import torch


def sequence_seed(seed: int, seq_index: int) -> int:
    """A 63-bit generator seed for one sequence, stable across platforms and processes."""
    digest = hashlib.sha256(f"kdcache-samples:{int(seed)}:{int(seq_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_uniforms(seed: int, seq_indices: torch.Tensor | list[int], seq_len: int, samples: int) -> torch.Tensor:
    """Uniforms in [0, 1) for each sequence, generated on the CPU: (B, T, S) float64 (53 random bits)."""
    out = torch.empty((len(seq_indices), seq_len, samples), dtype=torch.float64)
    for b, index in enumerate(torch.as_tensor(seq_indices).tolist()):
        gen = torch.Generator().manual_seed(sequence_seed(seed, index))
        torch.rand((seq_len, samples), generator=gen, out=out[b])  # (T, S)
    return out


SAMPLE_BLOCK = 16
"""Ids per block of the two-level inverse CDF (``draw``); 16 was fastest at V=4096 (8, 16, 32, 64 measured)."""


def block_sums(probs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, V) float32 >= 0 -> (n, ceil(V / SAMPLE_BLOCK)) float32 sums of consecutive ``SAMPLE_BLOCK``-id blocks."""
    n, V = probs.shape
    full = V // SAMPLE_BLOCK
    out = probs.new_empty(n, -(-V // SAMPLE_BLOCK)) if out is None else out
    torch.sum(probs[:, : full * SAMPLE_BLOCK].view(n, full, SAMPLE_BLOCK), dim=-1, out=out[:, :full])
    if full < out.shape[1]:
        torch.sum(probs[:, full * SAMPLE_BLOCK :], dim=-1, out=out[:, full])
    return out


def cumulative(probs: torch.Tensor) -> torch.Tensor:
    """The CDF ``draw`` inverts, of (n, V) probabilities: (n, V) float64, unnormalized (its last entry is the total).

    Blocks of ``SAMPLE_BLOCK`` ids get their float32 sums s_b (relative error < ~1e-6 each, so the implied
    distribution is within ~1e-6 total variation of ``probs`` at any V, an id of probability 0 gets no mass),
    summed in float64; within a block, ids share s_b in proportion to their float64 running sums.
    """
    n, V = probs.shape
    sums = block_sums(probs).double()  # (n, nb)
    before = torch.nn.functional.pad(sums.cumsum(dim=-1)[:, :-1], (1, 0))  # (n, nb) running sum before each block
    parts = [probs[:, a : a + SAMPLE_BLOCK].double().cumsum(dim=-1) for a in range(0, V, SAMPLE_BLOCK)]
    within = torch.cat([c / c[:, -1:].clamp(min=1e-300) for c in parts], dim=1)  # (n, V) share of its block
    block = torch.arange(V, device=probs.device) // SAMPLE_BLOCK  # (V,)
    return before[:, block] + sums[:, block] * within


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of ``cumulative(probs)``: probs (n, V) >= 0 (any positive multiple per row), uniforms
    (n, S) float64 in [0, 1) -> ids (n, S) int64. See ``draw_blocks``."""
    return draw_blocks(probs, block_sums(probs), uniforms)


def draw_blocks(probs: torch.Tensor, sums: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``draw`` given the block sums of ``probs`` (``block_sums``): no (n, V) float64 work.

    Two levels: the float64 running sum of the (n, V / SAMPLE_BLOCK) float32 block sums finds each draw's
    block (first running sum above u * total), then the float64 running sum within that block its id
    (first above the target's share of the block). Each level has float64 spacing (~1e-16), so an id's
    chance is its ``cumulative`` interval to ~1e-15; in float32 the CDF's spacing near 1 (6e-8) exceeded
    most tail probabilities at V = 262k. An id of probability 0 is never drawn. The result depends on
    each row alone: not on the rows per call, nor on chunking.
    """
    n, V = probs.shape
    B, nb, S = SAMPLE_BLOCK, sums.shape[1], uniforms.shape[1]
    cdf = sums.cumsum(dim=-1, dtype=torch.float64)  # (n, nb)
    total = cdf[:, -1:]  # (n, 1)
    targets = torch.minimum(uniforms.to(torch.float64) * total, total.nextafter(total.new_zeros(()))).contiguous()
    j = torch.searchsorted(cdf, targets, right=True).clamp_(max=nb - 1)  # (n, S) first block cdf above the target
    before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)), 0.0)  # (n, S) cdf before the block
    ids = (j * B).unsqueeze(-1) + torch.arange(B, device=j.device)  # (n, S, B) the block's ids
    inner = probs.gather(1, ids.view(n, S * B).clamp(max=V - 1)).view(n, S, B)  # (n, S, B)
    within = inner.masked_fill_(ids >= V, 0.0).cumsum(dim=-1, dtype=torch.float64)  # (n, S, B) block's own cdf
    mass = within[..., -1:]  # (n, S, 1)
    share = (targets - before).div_(sums.gather(1, j).double()).unsqueeze(-1)  # (n, S, 1) target's share of block
    at = torch.minimum(share.clamp_(min=0.0) * mass, mass.nextafter(mass.new_zeros(())))  # (n, S, 1) below mass
    i = (within <= at).sum(dim=-1).clamp_(max=B - 1)  # (n, S) first entry above it
    return (j * B + i).clamp_(max=V - 1)


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
