"""pipeline/multi_teacher.py against float64 dense references written the obvious way (per-position
loops over full-vocabulary distributions), values and -- through the loss -- gradients; and the
mixture's error against the TRUE dense mixture of two full teachers, measured."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.losses import KDLossSpec, kd_loss
from kdcache.multi_teacher import (
    COMBINERS,
    combine_batches,
    mix_sampled,
    mix_topk,
    normalized_weights,
    pick_topk,
    position_weights,
)

B, T, V = 2, 5, 23
F64 = torch.float64


def dense_teachers(m: int, *, seed: int = 0, vocab: int = V, scale: float = 3.0) -> list[torch.Tensor]:
    """``m`` full teacher log-prob tensors (B, T, vocab), float64."""
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(B, T, vocab, generator=g, dtype=F64)).log_softmax(-1) for _ in range(m)]


def sparsify(logp: torch.Tensor, k: int, *, ragged: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """What a cache stores: the top-k ids (-inf padded past a random length when ``ragged``) and the exact
    log-mass outside the kept ids."""
    vals, ids = logp.topk(k, dim=-1)  # (B, T, k) descending
    mask = torch.ones_like(ids, dtype=torch.bool)
    if ragged:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, k + 1, logp.shape[:2], generator=g)  # (B, T)
        mask = torch.arange(k) < lengths.unsqueeze(-1)
    kept = torch.zeros_like(logp, dtype=torch.bool)
    for b in range(B):
        for t in range(logp.shape[1]):
            kept[b, t, ids[b, t][mask[b, t]]] = True
    return {
        "topk_ids": ids.masked_fill(~mask, 0),
        "topk_logprobs": vals.masked_fill(~mask, -math.inf),
        "topk_mask": mask,
        "topk_log_tail": logp.masked_fill(kept, -math.inf).logsumexp(-1),
    }


def spread_dense(part: dict[str, torch.Tensor], vocab: int = V) -> torch.Tensor:
    """The teacher the mixture assumes: kept ids as stored, the tail spread uniformly over the others (B, T, V)."""
    out = torch.zeros(B, T, vocab, dtype=F64)
    for b in range(B):
        for t in range(T):
            keep = part["topk_mask"][b, t]
            ids = part["topk_ids"][b, t][keep].tolist()
            rest = vocab - len(ids)
            out[b, t, :] = part["topk_log_tail"][b, t].exp() / rest if rest else 0.0
            for i, lp in zip(ids, part["topk_logprobs"][b, t][keep].tolist(), strict=True):
                out[b, t, i] = math.exp(lp)
    return out


def dense_mixture(dense: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t p_t, static (M,) or per-token (M, B, T) weights, by loops."""
    out = torch.zeros(B, T, dense[0].shape[-1], dtype=F64)
    for b in range(B):
        for t in range(T):
            for m, p in enumerate(dense):
                w = weights[m] if weights.dim() == 1 else weights[m, b, t]
                out[b, t] += w * p[b, t]
    return out


def coarse(dist: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, W) values of the dense ``dist`` at the given ids (0 where masked) and (B, T) the rest's mass."""
    at = dist.gather(-1, ids).masked_fill(~mask, 0.0)
    return at, dist.sum(-1) - at.sum(-1)


def coarse_loss_reference(dist: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor):
    """Mean over positions of KL(p || q) on the partition {ids} + rest, p from the dense ``dist``, by loops."""
    logq = logits.log_softmax(-1)
    total = 0.0
    for b in range(B):
        for t in range(T):
            ids_bt = ids[b, t][mask[b, t]].tolist()
            others = [v for v in range(logits.shape[-1]) if v not in ids_bt]
            for v in ids_bt:
                p = dist[b, t, v]
                total = total + (p * (p.log() - logq[b, t, v]) if p > 0 else 0.0)
            p_rest = dist[b, t, others].sum()
            if others and p_rest > 0:
                total = total + p_rest * (p_rest.log() - logq[b, t, others].logsumexp(0))
    return total / (B * T)


def kd(targets: dict[str, torch.Tensor], logits: torch.Tensor, kind: str = "topk_tail") -> torch.Tensor:
    input_ids = torch.zeros(B, T, dtype=torch.long)
    return kd_loss(logits, input_ids=input_ids, spec=KDLossSpec(kind=kind, alpha=1.0), **targets).loss


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("ks", [(4, 4), (3, 6), (2, 5, 4)])
def test_mixture_equals_the_dense_mixture_of_the_spread_teachers(ks, ragged) -> None:
    dense = dense_teachers(len(ks), seed=len(ks))
    parts = [sparsify(d, k, ragged=ragged, seed=i) for i, (d, k) in enumerate(zip(dense, ks, strict=True))]
    w = normalized_weights([0.5, 0.3, 0.2][: len(ks)])
    out = mix_topk(parts, w, vocab_size=V)
    want = dense_mixture([spread_dense(p) for p in parts], w)
    for b in range(B):
        for t in range(T):
            union = set()
            for p in parts:
                union |= set(p["topk_ids"][b, t][p["topk_mask"][b, t]].tolist())
            got = out["topk_ids"][b, t][out["topk_mask"][b, t]].tolist()
            assert got == sorted(union)  # the union, ascending
    at, rest = coarse(want, out["topk_ids"], out["topk_mask"])
    torch.testing.assert_close(out["topk_logprobs"].exp().masked_fill(~out["topk_mask"], 0.0), at, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["topk_log_tail"].exp(), rest, rtol=1e-10, atol=1e-300)
    assert (out["topk_logprobs"][~out["topk_mask"]] == -math.inf).all() and (
        out["topk_ids"][~out["topk_mask"]] == 0
    ).all()


def test_mixture_through_the_loss_matches_the_dense_loss_values_and_gradients() -> None:
    dense = dense_teachers(2, seed=3)
    parts = [sparsify(dense[0], 5), sparsify(dense[1], 3, ragged=True)]
    w = normalized_weights([0.7, 0.3])
    out = mix_topk(parts, w, vocab_size=V)
    want = dense_mixture([spread_dense(p) for p in parts], w)
    logits = (2 * torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), dtype=F64)).requires_grad_()
    got = kd(out, logits)
    ref = coarse_loss_reference(want, out["topk_ids"], out["topk_mask"], logits)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)


def test_identical_kept_ids_make_the_mixture_exact() -> None:
    """Same K for both teachers (k = V here): no tail id is hidden, the result is the true dense mixture."""
    dense = dense_teachers(2, seed=4)
    parts = [sparsify(d, V) for d in dense]
    w = normalized_weights([0.6, 0.4])
    out = mix_topk(parts, w, vocab_size=V)
    truth = dense_mixture([d.exp() for d in dense], w)
    assert (out["topk_log_tail"] == -math.inf).all()
    torch.testing.assert_close(out["topk_logprobs"].exp(), truth.gather(-1, out["topk_ids"]), rtol=1e-12, atol=0)


def test_mixture_error_against_the_true_dense_mixture_is_measured_and_bounded() -> None:
    """Two full teachers whose top ids differ: their mass on each other's ids hides in their tails. On the
    coarse partition (union + rest) the mixture's error is at most sum_t w_t sum_(v in U minus K_t) |p_t(v) - u_t|,
    u_t the spread tail per id; measured (run with -s to see the figures)."""
    vocab, k = 512, 16
    g = torch.Generator().manual_seed(7)
    half = torch.arange(vocab) < vocab // 2
    shape = (B, T, vocab)
    dense = [
        (3 * torch.randn(*shape, generator=g, dtype=F64) + 4.0 * half).log_softmax(-1),  # favours the low half
        (3 * torch.randn(*shape, generator=g, dtype=F64) + 4.0 * ~half).log_softmax(-1),  # the high half
    ]
    parts = [sparsify(d, k) for d in dense]
    w = normalized_weights([0.5, 0.5])
    out = mix_topk(parts, w, vocab_size=vocab)
    truth = dense_mixture([d.exp() for d in dense], w)
    at_true, rest_true = coarse(truth, out["topk_ids"], out["topk_mask"])
    at_mix = out["topk_logprobs"].exp().masked_fill(~out["topk_mask"], 0.0)
    rest_mix = out["topk_log_tail"].exp()
    tv = 0.5 * ((at_mix - at_true).abs().sum(-1) + (rest_mix - rest_true).abs())  # (B, T)
    p_true = torch.cat([at_true, rest_true.unsqueeze(-1)], -1)
    p_mix = torch.cat([at_mix, rest_mix.unsqueeze(-1)], -1)
    kl = torch.where(p_true > 0, p_true * (p_true.log() - p_mix.log()), 0.0).sum(-1)  # (B, T)
    hidden = torch.zeros(B, T, dtype=F64)  # true mass teacher t puts on union ids outside its own K_t
    bound = torch.zeros(B, T, dtype=F64)
    for t, (d, p) in enumerate(zip(dense, parts, strict=True)):
        in_k = torch.zeros(shape, dtype=torch.bool).scatter(-1, p["topk_ids"], True)
        in_u = torch.zeros(shape, dtype=torch.bool).scatter(-1, out["topk_ids"], out["topk_mask"])
        u = (p["topk_log_tail"].exp() / (vocab - k)).unsqueeze(-1)  # (B, T, 1) the spread tail per id
        hidden += w[t] * d.exp().masked_fill(~(in_u & ~in_k), 0.0).sum(-1)
        bound += w[t] * (d.exp() - u).abs().masked_fill(~(in_u & ~in_k), 0.0).sum(-1)
    assert (tv <= bound + 1e-12).all()
    assert float(tv.mean()) > 0  # the approximation is real here: measured, not zero
    print(
        f"\nmixture vs true dense mixture (V={vocab}, k={k}, disjoint-leaning teachers): coarse TV mean "
        f"{tv.mean():.2e} max {tv.max():.2e}, KL mean {kl.mean():.2e}; hidden tail mass on the union mean "
        f"{hidden.mean():.2e}"
    )


def test_nll_softmax_weights_are_a_per_token_softmax_and_the_mixture_follows_them() -> None:
    dense = dense_teachers(2, seed=5)
    parts = [sparsify(dense[0], 4), sparsify(dense[1], 6)]
    g = torch.Generator().manual_seed(2)
    nll = 3 * torch.rand(2, B, T, generator=g, dtype=F64)
    nll[:, 0, -1] = math.nan  # no next token: static weights
    for p, n in zip(parts, nll, strict=True):
        p["teacher_nll"] = n
    w, tau = normalized_weights([0.8, 0.2]), 0.5
    per_token = position_weights(w, combine="nll_softmax", shape=(B, T), signals=nll, temperature=tau)
    want_w = torch.empty(2, B, T, dtype=F64)
    for b in range(B):
        for t in range(T):
            if math.isnan(nll[0, b, t]):
                want_w[:, b, t] = w
            else:
                e = [w[m] * math.exp(-nll[m, b, t] / tau) for m in range(2)]
                want_w[:, b, t] = torch.tensor([x / sum(e) for x in e])
    torch.testing.assert_close(per_token, want_w, rtol=1e-12, atol=0)
    out = combine_batches(parts, w, combine="nll_softmax", vocab_size=V, temperature=tau)
    want = dense_mixture([spread_dense(p) for p in parts], want_w)
    at, rest = coarse(want, out["topk_ids"], out["topk_mask"])
    torch.testing.assert_close(out["topk_logprobs"].exp().masked_fill(~out["topk_mask"], 0.0), at, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["topk_log_tail"].exp(), rest, rtol=1e-10, atol=0)
    mixed_nll = -(want_w * (-nll).exp()).sum(0).log()  # the mixture's NLL of the next token
    torch.testing.assert_close(out["teacher_nll"], mixed_nll, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("combine", ["min_nll", "min_entropy"])
def test_picks_take_the_chosen_teachers_target_unchanged(combine) -> None:
    dense = dense_teachers(3, seed=6)
    parts = [sparsify(dense[0], 3), sparsify(dense[1], 5, ragged=True), sparsify(dense[2], 4)]
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(3, B, T, generator=g, dtype=F64)
    scores[1, 0, 0] = scores[0, 0, 0]  # a tie: the first listed wins
    scores[2, 0, 0] = 9.0
    scores[:, 1, -1] = math.nan  # no signal anywhere: the first teacher
    scores[0, 1, 0] = math.nan  # one teacher without a signal: never picked there
    key = "teacher_nll" if combine == "min_nll" else "teacher_entropy"
    for p, s in zip(parts, scores, strict=True):
        p[key] = s
    w = normalized_weights([1, 1, 1])
    out = combine_batches(parts, w, combine=combine, vocab_size=V)
    logits = (2 * torch.randn(B, T, V, generator=g, dtype=F64)).requires_grad_()
    per_position = []
    for b in range(B):
        for t in range(T):
            finite = [(float(scores[m, b, t]), m) for m in range(3) if not math.isnan(scores[m, b, t])]
            chosen = min(finite)[1] if finite else 0
            assert float(out[key][b, t]) == float(scores[chosen, b, t]) or not finite
            p = parts[chosen]
            keep, got_keep = p["topk_mask"][b, t], out["topk_mask"][b, t]
            assert out["topk_ids"][b, t][got_keep].tolist() == p["topk_ids"][b, t][keep].tolist()
            assert out["topk_logprobs"][b, t][got_keep].tolist() == p["topk_logprobs"][b, t][keep].tolist()
            assert float(out["topk_log_tail"][b, t]) == float(p["topk_log_tail"][b, t])
            mask = torch.zeros(B, T, dtype=torch.bool)
            mask[b, t] = True
            one = {k: v for k, v in p.items() if k.startswith("topk_")}
            spec = KDLossSpec(kind="topk_tail", alpha=1.0)
            per_position.append(
                kd_loss(logits, input_ids=torch.zeros(B, T, dtype=torch.long), spec=spec, **one, loss_mask=mask).loss
            )
    got = kd({k: v for k, v in out.items() if k.startswith("topk_")}, logits)
    ref = torch.stack(per_position).mean()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(x, logits)[0] for x in (got, ref)), rtol=1e-10, atol=1e-12)


def sampled_part(seed: int, width: int, total: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (B, T, width), generator=g).to(F64)
    counts[..., 0] += 1  # at least one draw kept
    counts = counts * (total / counts.sum(-1, keepdim=True)).floor().clamp_min(1)
    return {
        "sample_ids": torch.randint(0, V, (B, T, width), generator=g),
        "sample_counts": counts,
        "sample_total": torch.full((B, T), float(total), dtype=F64).maximum(counts.sum(-1)),
    }


@pytest.mark.parametrize("per_token", [False, True])
def test_sampled_mixture_is_the_weighted_sum_of_the_teachers_sampled_losses(per_token) -> None:
    parts = [sampled_part(0, 4, 16.0), sampled_part(1, 6, 32.0)]
    w = normalized_weights([0.7, 0.3])
    weights = torch.rand(2, B, T, generator=torch.Generator().manual_seed(4), dtype=F64) if per_token else w
    if per_token:
        weights = weights / weights.sum(0)
    out = mix_sampled(parts, weights)
    logits = (2 * torch.randn(B, T, V, generator=torch.Generator().manual_seed(5), dtype=F64)).requires_grad_()
    got = kd(out, logits, "sampled")
    logq = logits.log_softmax(-1)
    ref = 0.0
    for b in range(B):
        for t in range(T):
            for m, p in enumerate(parts):
                w_bt = weights[m] if weights.dim() == 1 else weights[m, b, t]
                for i, c in zip(p["sample_ids"][b, t].tolist(), p["sample_counts"][b, t].tolist(), strict=True):
                    ref = ref - w_bt * c / p["sample_total"][b, t] * logq[b, t, i]
    ref = ref / (B * T)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(x, logits)[0] for x in (got, ref)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("combine", COMBINERS)
def test_a_positions_target_does_not_depend_on_the_batch_it_is_in(combine) -> None:
    """What keeps torchrun ranks in agreement: combining a global batch equals combining each rank's slice."""
    dense = dense_teachers(2, seed=8)
    parts = [sparsify(dense[0], 4, ragged=True), sparsify(dense[1], 6)]
    signals = torch.rand(2, B, T, generator=torch.Generator().manual_seed(9), dtype=F64)
    for p, s in zip(parts, signals, strict=True):
        p["teacher_nll"], p["teacher_entropy"] = s, s.flip(-1)
        p["input_ids"] = torch.zeros(B, T, dtype=torch.long)
    w = normalized_weights([0.4, 0.6])
    whole = combine_batches(parts, w, combine=combine, vocab_size=V)
    for r in range(B):
        rank = combine_batches(
            [{k: v[r : r + 1] for k, v in p.items()} for p in parts], w, combine=combine, vocab_size=V
        )
        for out, row in ((whole, r), (rank, 0)):
            dense_row = torch.zeros(T, V, dtype=F64).scatter_add(
                -1, out["topk_ids"][row], out["topk_logprobs"][row].exp().masked_fill(~out["topk_mask"][row], 0.0)
            )
            if out is whole:
                want = (dense_row, out["topk_log_tail"][row])
            else:
                torch.testing.assert_close(dense_row, want[0], rtol=0, atol=0)
                torch.testing.assert_close(out["topk_log_tail"][row], want[1], rtol=0, atol=0)


def test_bad_weights_and_missing_signals_are_refused() -> None:
    with pytest.raises(ValueError, match="weights must be finite, >= 0 and not all 0"):
        normalized_weights([0.5, -0.5])
    with pytest.raises(ValueError, match="weights must be finite"):
        normalized_weights([0, 0])
    parts = [sparsify(d, 3) for d in dense_teachers(2)]
    with pytest.raises(ValueError, match="combine='min_nll' needs teacher_nll in every cache's batches"):
        combine_batches(parts, normalized_weights([1, 1]), combine="min_nll", vocab_size=V)
    with pytest.raises(ValueError, match="combine must be one of"):
        position_weights(normalized_weights([1, 1]), combine="vote", shape=(B, T))


def test_a_zero_weight_teacher_is_never_picked_and_adds_nothing_to_the_mixture() -> None:
    dense = dense_teachers(2, seed=10)
    parts = [sparsify(dense[0], 4), sparsify(dense[1], 4)]
    for p, s in zip(parts, (torch.ones(B, T, dtype=F64), torch.zeros(B, T, dtype=F64)), strict=True):
        p["teacher_nll"] = s
    w = normalized_weights([1.0, 0.0])
    picked = pick_topk(
        parts,
        position_weights(
            w, combine="min_nll", shape=(B, T), signals=torch.stack([p["teacher_nll"] for p in parts])
        ).argmax(0),
    )
    assert torch.equal(picked["topk_ids"], parts[0]["topk_ids"])
    mixed = mix_topk(parts, w, vocab_size=V)
    want = spread_dense(parts[0])
    at, rest = coarse(want, mixed["topk_ids"], mixed["topk_mask"])
    torch.testing.assert_close(
        mixed["topk_logprobs"].exp().masked_fill(~mixed["topk_mask"], 0.0), at, rtol=1e-12, atol=0
    )
