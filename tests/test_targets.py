"""Sparse targets equal a dense fp32 reference; chunking and batch composition never change them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.cache.format import TargetLayout
from kdcache.cache.rows import decode_row, encode_table
from kdcache.cache.targets import chunk_tokens_for, sample_uniforms, sparsify, to_sequence_targets, unique_counts

B, T, V = 3, 7, 50


def _logits(seed: int = 0, *, width: int = V, batch: int = B) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, T, width), generator=gen) * 3  # (B, T, V)


def _layout(**kw) -> TargetLayout:
    return TargetLayout(**({"kind": "topk", "vocab_size": V, "seq_len": T, "top_k": 8} | kw))


def _run(logits: torch.Tensor, layout: TargetLayout, seqs=None, chunk: int = 4096) -> dict[str, torch.Tensor]:
    seqs = torch.arange(logits.shape[0]) if seqs is None else torch.as_tensor(seqs)
    return sparsify(logits, layout=layout, seq_indices=seqs, chunk_tokens=chunk)


def _by_id(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=-1)
    return ids.gather(-1, order), values.gather(-1, order)


def test_topk_ids_and_logprobs_equal_dense_fp32_log_softmax_in_ascending_id_order():
    logits = _logits()
    out = _run(logits, _layout())
    dense = torch.log_softmax(logits.double(), dim=-1)  # (B, T, V)
    ref_lp, ref_ids = dense.topk(8, dim=-1)
    ref_ids, ref_lp = _by_id(ref_ids, ref_lp)
    assert torch.equal(out["topk_ids"].long(), ref_ids)
    torch.testing.assert_close(out["topk_logprobs"].double(), ref_lp, atol=1e-5, rtol=0)
    assert (out["topk_lengths"] == 8).all()
    assert not out["nonfinite"].any()


def test_log_tail_is_the_mass_outside_the_kept_ids_without_cancellation():
    logits = _logits(11) * 6  # confident positions: tails down to ~1e-12, where 1 - mass in fp32 is 0
    out = _run(logits, _layout(top_k=8))
    dense = torch.log_softmax(logits.double(), dim=-1)  # (B, T, V)
    rest = dense.scatter(-1, out["topk_ids"].long(), float("-inf")).logsumexp(-1)  # (B, T)
    assert rest.min() < -20
    torch.testing.assert_close(out["topk_log_tail"].double(), rest, atol=1e-4, rtol=1e-5)
    everything = _run(_logits(12, width=V), _layout(top_k=V))
    assert torch.isneginf(everything["topk_log_tail"]).all()


def test_topk_mass_is_one_minus_tail_and_entropy_matches_dense():
    logits = _logits(1)
    out = _run(logits, _layout(top_k=5))
    p = torch.softmax(logits.double(), dim=-1)
    top = p.topk(5, dim=-1).values.sum(-1)  # (B, T)
    torch.testing.assert_close(out["topk_mass"].double(), top, atol=1e-5, rtol=0)
    torch.testing.assert_close(1 - out["topk_mass"].double(), 1 - top, atol=1e-5, rtol=0)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(out["entropy"].double(), entropy, atol=1e-4, rtol=0)


def test_temperature_divides_logits_before_log_softmax():
    logits = _logits(2)
    out = _run(logits, _layout(temperature=2.5))
    ref_lp, ref_ids = torch.log_softmax(logits.double() / 2.5, dim=-1).topk(8, dim=-1)
    torch.testing.assert_close(out["topk_logprobs"].double(), _by_id(ref_ids, ref_lp)[1], atol=1e-5, rtol=0)


def test_logits_past_layout_vocab_are_dropped_before_softmax():
    logits = _logits(3, width=V + 14)
    logits[..., V:] = 50.0  # padding rows of the output embedding would dominate if kept
    out = _run(logits, _layout())
    ref_lp, ref_ids = torch.log_softmax(logits[..., :V].double(), dim=-1).topk(8, dim=-1)
    ref_ids, ref_lp = _by_id(ref_ids, ref_lp)
    assert torch.equal(out["topk_ids"].long(), ref_ids)
    torch.testing.assert_close(out["topk_logprobs"].double(), ref_lp, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="fewer than"):
        _run(_logits(width=V - 1), _layout())


def test_adaptive_lengths_are_the_smallest_prefix_reaching_the_mass():
    logits = _logits(4) * torch.linspace(0.2, 2.0, T)[None, :, None]  # flat and peaked positions
    mass = 0.8
    out = _run(logits, _layout(top_k=16, mass=mass))
    p_sorted = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True).values[..., :16]
    cum = p_sorted.cumsum(-1)  # (B, T, 16)
    lengths = out["topk_lengths"].long()
    assert (lengths >= 1).all() and (lengths <= 16).all() and lengths.unique().numel() > 1
    reached = cum.gather(-1, (lengths - 1)[..., None])[..., 0]
    assert ((reached >= mass - 1e-6) | (lengths == 16)).all()
    before = cum.gather(-1, (lengths - 2).clamp(min=0)[..., None])[..., 0]
    assert ((before < mass + 1e-6) | (lengths == 1)).all()
    pad = torch.arange(16)[None, None, :] >= lengths[..., None]
    assert torch.isinf(out["topk_logprobs"][pad]).all() and (out["topk_ids"][pad] == 0).all()
    assert torch.isfinite(out["topk_logprobs"][~pad]).all()
    kept_ids = out["topk_ids"].long()
    assert ((kept_ids[..., 1:] > kept_ids[..., :-1]) | pad[..., 1:]).all()  # ascending ids, padding last
    torch.testing.assert_close(out["topk_mass"].double(), (p_sorted * ~pad).sum(-1), atol=1e-5, rtol=0)
    dense = torch.log_softmax(logits.double(), dim=-1)
    kept = dense.gather(-1, kept_ids).masked_fill(pad, float("-inf")).logsumexp(-1)  # (B, T) kept log-mass
    torch.testing.assert_close(out["topk_log_tail"].double().exp(), 1 - kept.exp(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["topk", "sampled", "both"])
def test_chunked_equals_unchunked(kind):
    layout = _layout(kind=kind, samples=16, mass=0.7 if kind != "sampled" else 0.0, seed=3)
    logits = _logits(5)
    whole = _run(logits, layout, chunk=4096)
    for chunk in (1, 3, 10):
        parts = _run(logits, layout, chunk=chunk)
        assert whole.keys() == parts.keys()
        for key in whole:
            torch.testing.assert_close(parts[key], whole[key], atol=1e-6, rtol=0, msg=f"{key}, chunk {chunk}")


def test_samples_depend_only_on_seed_sequence_and_position():
    layout = _layout(kind="sampled", top_k=0, samples=32, seed=7)
    logits = _logits(6)
    together = _run(logits, layout, seqs=[11, 42, 5], chunk=4)
    alone = _run(logits[1:2].clone(), layout, seqs=[42], chunk=5)
    other_batch = _run(torch.cat([logits[2:3], logits[1:2]]), layout, seqs=[5, 42], chunk=100)
    for key in ("sample_ids", "sample_counts"):
        assert torch.equal(together[key][1], alone[key][0])
        assert torch.equal(together[key][1], other_batch[key][1])
        assert torch.equal(together[key][2], other_batch[key][0])
    reseeded = _run(logits, TargetLayout(**{**layout.__dict__, "seed": 8}), seqs=[11, 42, 5])
    assert not torch.equal(reseeded["sample_ids"], together["sample_ids"])
    assert torch.equal(sample_uniforms(7, [42], T, 32), sample_uniforms(7, [42], T, 32))


def test_sample_counts_sum_to_samples_with_unique_ascending_ids():
    layout = _layout(kind="both", samples=24)
    out = _run(_logits(7), layout)
    ids, counts = out["sample_ids"], out["sample_counts"]
    assert (counts.sum(-1) == 24).all()
    used = counts > 0
    assert (ids[~used] == 0).all()
    n = used.sum(-1)  # (B, T) unique ids per position, stored first
    assert torch.equal(used, torch.arange(24)[None, None, :] < n[..., None])
    diffs = ids[..., 1:] - ids[..., :-1]
    assert (diffs[used[..., 1:]] > 0).all()


def test_sample_frequencies_approach_teacher_probabilities():
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    logits = torch.log(p.clamp(min=1e-30)).expand(1, 64, 6).contiguous()  # (1, 64, 6), last id has p ~ 0
    layout = TargetLayout(kind="sampled", vocab_size=6, seq_len=64, samples=2000, seed=1)
    out = sparsify(logits, layout=layout, seq_indices=torch.tensor([0]))
    freq = torch.zeros(6, dtype=torch.float64)
    freq.scatter_add_(0, out["sample_ids"].reshape(-1).long(), out["sample_counts"].reshape(-1).double())
    n = 64 * 2000
    freq /= n
    tolerance = 5 * torch.sqrt(p.double() * (1 - p.double()) / n) + 1e-12
    assert ((freq - p.double()).abs() <= tolerance).all(), (freq, p)
    assert freq[5] == 0


def test_unique_counts_small_example():
    ids = torch.tensor([[4, 1, 4, 9, 1, 4]])
    unique, counts = unique_counts(ids)
    assert unique.tolist() == [[1, 4, 9, 0, 0, 0]]
    assert counts.tolist() == [[2, 3, 1, 0, 0, 0]]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_logits_flag_only_their_sequence(bad):
    logits = _logits(8)
    logits[1, 3, 17] = bad
    out = _run(logits, _layout(kind="both", samples=4), chunk=5)
    assert out["nonfinite"].tolist() == [False, True, False]


def test_rows_round_trip_through_the_cache_encoding():
    layout = _layout(kind="both", samples=8, mass=0.9)
    logits = _logits(9)
    out = {k: v.cpu() for k, v in _run(logits, layout, seqs=[3, 4, 5]).items()}
    input_ids = np.random.default_rng(0).integers(0, V, size=(B, T))
    rows = to_sequence_targets(out, input_ids, [3, 4, 5])
    table = encode_table(layout, rows)
    for b, row in enumerate(table.to_pylist()):
        back = decode_row(layout, row)
        assert back.seq_index == 3 + b and np.array_equal(back.input_ids, input_ids[b])
        assert np.array_equal(back.topk_lengths, out["topk_lengths"][b].numpy())
        keep = np.isfinite(back.topk_logprobs)
        assert np.array_equal(keep, np.isfinite(out["topk_logprobs"][b].numpy()))
        assert np.array_equal(back.topk_ids[keep], out["topk_ids"][b].numpy()[keep])
        assert np.abs(np.exp(back.topk_logprobs[keep]) - np.exp(out["topk_logprobs"][b].numpy()[keep])).max() < 5e-3
        tail = 1 - np.exp(back.topk_logprobs.astype(np.float64)).sum(-1)  # what the loss derives
        np.testing.assert_allclose(tail, np.exp(out["topk_log_tail"][b].numpy().astype(np.float64)), rtol=2e-3)
        width = back.sample_counts.shape[1]
        assert np.array_equal(back.sample_counts, out["sample_counts"][b, :, :width].numpy())
        assert np.array_equal(back.sample_ids, out["sample_ids"][b, :, :width].numpy())


def test_chunk_tokens_for_bounds_the_fp32_buffer():
    assert chunk_tokens_for(151_936) * 151_936 * 4 <= 256 << 20
    assert chunk_tokens_for(10) == 16384 and chunk_tokens_for(10**9) == 1


def _implied_float32_sampler(probs: torch.Tensor) -> torch.Tensor:
    """The pre-fix sampler's exact id distribution: float32 uniforms are k / 2^24 (torch.rand), so enumerate them
    all through its float32 CDF: (V,) probabilities, float64."""
    grid = torch.arange(1 << 24, dtype=torch.float32) / (1 << 24)  # every float32 uniform torch.rand draws
    cdf = probs.cumsum(dim=-1)  # (V,) float32, as the old sampler summed
    ids = torch.searchsorted(cdf, grid * cdf[-1], right=True).clamp_(max=probs.numel() - 1)  # (2^24,)
    return torch.bincount(ids, minlength=probs.numel()).double() / (1 << 24)


def test_inverse_cdf_sampling_is_exact_to_1e_6_in_total_variation_at_262k_ids():
    from kdcache.cache.targets import cumulative, draw

    V = 262_144
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(1000, generator=gen)
    assert torch.equal(u * (1 << 24), (u * (1 << 24)).round())  # float32 uniforms sit on a 2^-24 grid
    for scale in (1.0, 3.0):  # a flat and a heavy-tailed teacher: tail ids far below the float32 CDF's spacing
        logits = torch.randn(V, generator=gen) * scale  # (V,)
        true = torch.softmax(logits.double(), dim=-1)  # (V,) the teacher's distribution
        logprobs = logits - logits.logsumexp(-1)  # (V,) fp32, as sparsify computes them
        probs = logprobs.exp()  # (V,) what the sampler is given
        cdf = cumulative(probs[None])[0]  # (V,) float64
        # float64 uniforms sit on a 2^-53 grid: each id's interval width is exact to ~2^-52, far below the bound
        implied = torch.diff(cdf, prepend=cdf.new_zeros(1)) / cdf[-1]  # (V,)
        tv_new = 0.5 * (implied - true).abs().sum().item()
        tv_old = 0.5 * (_implied_float32_sampler(probs) - true).abs().sum().item()
        assert tv_new <= 1e-6, tv_new
        assert tv_old > 1e-6, tv_old  # the float32 sampler misplaces tail mass
        uniforms = torch.rand((1, 4096), generator=gen, dtype=torch.float64)
        expected = torch.searchsorted(cdf[None], uniforms * cdf[-1], right=True)  # the intervals above, drawn
        assert torch.equal(draw(probs[None], uniforms), expected)


def test_sample_uniforms_are_float64_with_53_random_bits():
    u = sample_uniforms(0, [1, 2], 64, 16)  # (2, 64, 16)
    assert u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all()
    assert not torch.equal(u * (1 << 24), (u * (1 << 24)).round())  # finer than float32's grid
