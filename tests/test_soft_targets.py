"""kdcache.soft_targets: each estimator's expectation over every outcome of the draws, in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdcache.losses import KDLossSpec, kd_loss
from kdcache.soft_targets import label_exact_target, sampled_target, soft_target_ce, stratified_target

P = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05], dtype=torch.float64)  # teacher at one position, V = 5


def outcomes(p: torch.Tensor, draws: int):
    """Every multiset of ``draws`` iid draws from p: (probability, ids (S,), counts (S,)) padded with count 0."""
    for combo in itertools.combinations_with_replacement(range(len(p)), draws):
        ids = sorted(set(combo))
        counts = [combo.count(i) for i in ids]
        prob = math.factorial(draws) * math.prod(
            float(p[i]) ** c / math.factorial(c) for i, c in zip(ids, counts, strict=True)
        )
        pad = draws - len(ids)
        yield prob, torch.tensor([ids + [0] * pad]), torch.tensor([counts + [0] * pad])


def expectation(build, p: torch.Tensor, draws: int) -> torch.Tensor:
    total = torch.zeros(len(p), dtype=torch.float64)
    for prob, ids, counts in outcomes(p, draws):
        total += prob * build(ids, counts)[0]
    return total


@pytest.mark.parametrize("draws", [1, 3])
def test_sampled_target_is_unbiased(draws):
    got = expectation(lambda i, c: sampled_target(i, c, torch.tensor([draws]), len(P)), P, draws)
    torch.testing.assert_close(got, P, rtol=0, atol=1e-15)


@pytest.mark.parametrize("label", [0, 3])
def test_label_exact_target_bias_is_p_label_to_the_s(label):
    S, lab = 3, torch.tensor([label])
    build = lambda i, c: label_exact_target(i, c, torch.tensor([S]), lab, P[label].log().reshape(1), len(P))  # noqa: E731
    want = P + P[label] ** S * (torch.nn.functional.one_hot(lab[0], len(P)).double() - P)
    torch.testing.assert_close(expectation(build, P, S), want, rtol=0, atol=1e-15)
    one = build(torch.tensor([[1, 2, 0]]), torch.tensor([[2, 1, 0]]))[0]  # draws 1, 1, 2: label exact, rest shared
    assert float(one[label]) == pytest.approx(float(P[label]), abs=1e-15) and float(one.sum()) == pytest.approx(
        1.0, abs=1e-15
    )


def test_label_exact_target_falls_back_without_label():
    ids, counts, total = torch.tensor([[1, 2], [0, 4]]), torch.tensor([[2, 1], [1, 0]]), torch.tensor([3, 1])
    got = label_exact_target(ids, counts, total, torch.tensor([-1, 2]), torch.tensor([0.0, math.nan]), 5)
    torch.testing.assert_close(got, sampled_target(ids, counts, total, 5))


@pytest.mark.parametrize("tail_only", [False, True])
def test_stratified_target_expectation(tail_only):
    """Head exact; tail unbiased except where no draw left K (probability p_K^S, tail-only draws: never)."""
    S, k = 3, 2
    K, logits = torch.tensor([[0, 1]]), torch.tensor([[0.3, -1.0, 0.5, 2.0, -0.2]], dtype=torch.float64)
    tail = P.clone()
    tail[:k] = 0
    source = tail / tail.sum() if tail_only else P
    log_tail = P[k:].sum().log().reshape(1)

    def build(ids, counts):
        return stratified_target(
            K, P[:k].log()[None], torch.ones(1, k, dtype=torch.bool), log_tail, ids, counts, logits
        )

    own = torch.softmax(logits[0].masked_fill(torch.arange(5) < k, -torch.inf), -1)  # the student's tail shape
    p_none = 0.0 if tail_only else float(P[:k].sum()) ** S
    want = P + p_none * P[k:].sum() * (own - tail / tail.sum())
    torch.testing.assert_close(expectation(build, source, S), want, rtol=0, atol=1e-15)


def test_soft_target_ce_matches_sampled_kd_loss_value_and_gradient():
    torch.manual_seed(0)
    B, T, V, S = 2, 5, 37, 4
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T, S))
    counts = torch.randint(0, 3, (B, T, S))
    counts[..., 0] = 1
    total = counts.sum(-1) + 1  # one draw dropped per position: S counts the draws made
    input_ids = torch.randint(0, V, (B, T))
    out = kd_loss(
        logits,
        input_ids=input_ids,
        spec=KDLossSpec(kind="sampled", alpha=1.0),
        sample_ids=ids,
        sample_counts=counts,
        sample_total=total,
    )
    (g_fused,) = torch.autograd.grad(out.loss, logits)
    flat = logits.reshape(-1, V)
    target = sampled_target(ids.reshape(-1, S), counts.reshape(-1, S), total.reshape(-1), V)
    ref = soft_target_ce(flat, target).mean()
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-12, atol=1e-12)
    q = torch.softmax(flat.detach(), -1)  # the gradient is (sum t) q - t per row
    torch.testing.assert_close(g_ref.reshape(-1, V) * B * T, target.sum(-1, keepdim=True) * q - target)
