"""pipeline/losses.py against dense references written the obvious way (full softmax, explicit
sums, float64, loops over positions and buckets)."""

from __future__ import annotations

import inspect
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kdcache.fused_loss import workspaces
from kdcache.losses import (
    KINDS,
    TAIL_KINDS,
    TARGET_KEYS,
    TAU_SQUARED_KINDS,
    WORKING_BUFFERS,
    KDLossSpec,
    default_loss,
    dense_kl,
    kd_loss,
    tempered_topk_targets,
)

B, T, V = 2, 6, 13
BIG_V = 32_768
F64 = torch.float64
TOPK_KINDS = tuple(kind for kind in KINDS if "topk_ids" in TARGET_KEYS[kind])  # TAIL_KINDS, topk_renorm, hard
KD_KINDS = tuple(kind for kind in KINDS if kind != "ce")


def make_case(*, k: int, seed: int = 0, dtype: torch.dtype = F64, vocab: int = V, batch: int = B, seq: int = T):
    """Student logits (batch, seq, vocab) with grad, full teacher log-probs, its top-k and the tail
    log-mass a cache stores (logsumexp over the ids outside K, -inf when K is the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(batch, seq, vocab, generator=g, dtype=F64)).requires_grad_()
    teacher = (3 * torch.randn(batch, seq, vocab, generator=g, dtype=F64)).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return dict(
        logits=logits,
        teacher=teacher,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs.to(dtype),
        topk_log_tail=teacher.scatter(-1, topk_ids, -torch.inf).logsumexp(-1),
        input_ids=input_ids,
    )


def log_z(teacher, tau):
    """logsumexp_v(log p_v / tau) over the full vocabulary: what a cache stores per temperature."""
    return (teacher / tau).logsumexp(-1)


def run(case, spec, **extra):
    """kd_loss on a case's top-k targets; tail kinds at tau != 1 get the exact log-normalizer."""
    kw = {name: case[name] for name in ("input_ids", "topk_ids", "topk_logprobs")}
    if spec.kind in TAIL_KINDS and spec.temperature != 1.0:
        kw["topk_log_z"] = log_z(case["teacher"], spec.temperature)
    return kd_loss(case["logits"], spec=spec, **(kw | extra))


def ref_divergence(kind, P, Q, beta=0.5):
    """The divergence `kind` between two bucket distributions, term by term (0 log 0 = 0)."""
    total = P.new_zeros(())
    for p, q in zip(P, Q, strict=True):
        m = beta * p + (1 - beta) * q
        kl_p_q = p * torch.log(p / q) if p > 0 else 0.0
        kl_q_p = q * torch.log(q / p) if q > 0 else 0.0
        kl_p_m = p * torch.log(p / m) if p > 0 else 0.0
        kl_q_m = q * torch.log(q / m) if q > 0 else 0.0
        total = (
            total
            + {
                "topk_tail": kl_p_q,
                "reverse_kl": kl_q_p,
                "skew_kl": kl_p_m,
                "jsd": beta * kl_p_m + (1 - beta) * kl_q_m,
                "tv": 0.5 * (p - q).abs(),
            }[kind]
        )
    return total


def ref_kd(kind, teacher, logits, keep, *, tau=1.0, beta=0.5):
    """Per-position KD of `kind` (before tau**2) from the dense tempered teacher and student:
    softmax(log p / tau) and softmax(z / tau) summed over the buckets keep[n] (K) + the rest."""
    vocab = teacher.shape[-1]
    out = []
    for logp, z, ids in zip(teacher.reshape(-1, vocab), logits.reshape(-1, vocab), keep, strict=True):
        p, q = torch.softmax(logp / tau, -1), torch.softmax(z / tau, -1)
        if kind == "hard":
            out.append(-torch.log_softmax(z, -1)[max(ids, key=lambda i: logp[i])])
        elif kind == "topk_renorm":
            out.append(ref_divergence("topk_tail", p[ids] / p[ids].sum(), q[ids] / q[ids].sum()) if ids else 0 * z[0])
        else:
            rest = torch.ones(vocab, dtype=torch.bool)
            rest[ids] = False
            P = torch.cat([p[ids], p[rest].sum().reshape(1)])  # (k+1,)
            Q = torch.cat([q[ids], q[rest].sum().reshape(1)])  # (k+1,)
            out.append(ref_divergence(kind, P, Q, beta))
    return torch.stack(out)


def kd_scale(kind, tau):
    return tau**2 if kind in TAU_SQUARED_KINDS else 1.0


def ref_ce(logits, input_ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def topk_keep(case):
    return case["topk_ids"].reshape(-1, case["topk_ids"].shape[-1]).tolist()


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def grad(loss, logits):
    return torch.autograd.grad(loss, logits)[0]


# --- the loss menu against dense references ------------------------------------------------------


def test_topk_tail_with_k_equal_vocab_equals_dense_kl_values_and_grads():
    case = make_case(k=V)
    out = run(case, KDLossSpec(alpha=1.0))
    logq = case["logits"].log_softmax(-1)
    dense = (case["teacher"].exp() * (case["teacher"] - logq)).sum(-1).mean()
    assert_close(out.loss, dense)
    assert_close(grad(out.loss, case["logits"]), grad(dense, case["logits"]))
    assert_close(dense_kl(case["teacher"], case["logits"]).mean(), dense)
    assert out.n_tokens == B * T


def test_topk_tail_with_k_equal_vocab_ignores_rounding_tail_of_float32_targets():
    case = make_case(k=V, dtype=torch.float32)  # sum exp != 1 in fp32: the empty tail must get no mass
    out = run(case, KDLossSpec(alpha=1.0))
    dense = dense_kl(case["teacher"], case["logits"]).mean()
    torch.testing.assert_close(out.loss, dense, rtol=1e-5, atol=1e-6)


def test_dense_kl_is_zero_for_identical_distributions_and_handles_zero_teacher_probs():
    logits = torch.tensor([[0.0, 1.0, -2.0]], dtype=F64)
    assert_close(dense_kl(logits.log_softmax(-1), logits), torch.zeros(1, dtype=F64))
    teacher = torch.tensor([[0.0, -torch.inf, -torch.inf]], dtype=F64)  # p = one-hot
    assert_close(dense_kl(teacher, logits), -logits.log_softmax(-1)[:, 0])


KIND_TAU = [(kind, tau) for kind in TOPK_KINDS for tau in (1.0, 0.5) if kind != "hard" or tau == 1.0]


@pytest.mark.parametrize(("kind", "tau"), KIND_TAU)
@pytest.mark.parametrize("k", [1, 3, V - 1])
def test_topk_kinds_equal_dense_reference_mixed_with_ce_values_and_grads(kind, tau, k):
    case = make_case(k=k, seed=k)
    out = run(case, KDLossSpec(kind=kind, alpha=0.7, temperature=tau, beta=0.3))
    kd = kd_scale(kind, tau) * ref_kd(kind, case["teacher"], case["logits"], topk_keep(case), tau=tau, beta=0.3).mean()
    ce = ref_ce(case["logits"], case["input_ids"])
    ref = 0.7 * kd + 0.3 * ce
    # At tau < 1 the tempered tail can be ~1e-9 of the K mass: 1 - sum_K resolves it to ~1e-16
    # absolute, i.e. ~1e-7 relative, and reverse_kl's q_tail * log p_tail feels that.
    tol = 1e-6 if kind == "reverse_kl" and tau < 1 else 1e-10
    assert_close(out.loss, ref, tol)
    assert_close(out.kd, kd.detach(), tol)
    assert_close(out.ce, ce.detach())
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]), tol)
    assert out.n_tokens == B * T and out.n_ce_tokens == B * (T - 1)


@pytest.mark.parametrize("kind", TOPK_KINDS)
def test_topk_kinds_at_32k_vocab_with_the_stored_tail_equal_dense_reference(kind):
    case = make_case(k=8, vocab=BIG_V, batch=1, seq=4)
    assert (case["topk_log_tail"].exp() > 0.1).all()  # a real tail
    out = run(case, KDLossSpec(kind=kind, alpha=1.0), topk_log_tail=case["topk_log_tail"])
    ref = ref_kd(kind, case["teacher"], case["logits"], topk_keep(case)).mean()
    assert_close(out.loss, ref)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


def test_kinds_vanish_for_a_student_equal_to_the_teacher():
    case = make_case(k=3)
    case["logits"] = case["teacher"].detach().clone()
    for kind in (*TAIL_KINDS, "topk_renorm"):
        for tau in (1.0, 2.0):
            assert abs(run(case, KDLossSpec(kind=kind, alpha=1.0, temperature=tau)).loss.item()) < 1e-12, (kind, tau)


# --- stored tail ---------------------------------------------------------------------------------


def test_stored_tail_reaches_the_loss_where_float32_recomputation_loses_it():
    """p_tail = 1e-9 spread over 32k ids: 1 - sum_K p from fp32 top-k log-probs is rounding noise
    (~1e-8), while the cache's stored tail log-mass is exact; the student's tail gradient shows it."""
    n, vocab, ids = 3, BIG_V, torch.tensor([0, 1])
    teacher_logits = torch.full((1, n, vocab), math.log(1e-9 * (1 + math.exp(-1)) / (vocab - 2)), dtype=F64)
    teacher_logits[..., 0], teacher_logits[..., 1] = 0.0, torch.tensor([-1.0, -1.1, -1.2])
    teacher = teacher_logits.log_softmax(-1)  # (1, n, V); tail mass 1e-9
    topk_ids = ids.expand(1, n, 2)
    lp32 = teacher[..., :2].float()  # what the cache stores
    tail32 = teacher[..., 2:].logsumexp(-1).float()  # (1, n)
    logits = torch.full((1, n, vocab), -40.0, dtype=F64)  # q_tail ~ 1e-13: the tail term matters
    logits[..., 0], logits[..., 1] = 0.0, 0.5
    logits.requires_grad_()
    P = torch.cat([lp32.double().exp(), tail32.double().exp().unsqueeze(-1)], -1).reshape(n, 3)  # (n, 3)
    q = logits.softmax(-1).reshape(n, vocab)
    Q = torch.stack([q[:, 0], q[:, 1], q[:, 2:].sum(-1)], -1)  # (n, 3)
    ref = torch.stack([ref_divergence("topk_tail", p_row, q_row) for p_row, q_row in zip(P, Q, strict=True)]).mean()
    spec = KDLossSpec(alpha=1.0)
    stored = kd_loss(
        logits, input_ids=topk_ids[..., 0], spec=spec, topk_ids=topk_ids, topk_logprobs=lp32, topk_log_tail=tail32
    )
    recomputed = kd_loss(logits, input_ids=topk_ids[..., 0], spec=spec, topk_ids=topk_ids, topk_logprobs=lp32)
    ref_tail_grad = grad(ref, logits)[..., 2:].sum(-1)  # (1, n) = (q_tail - p_tail) / n
    assert_close(stored.loss, ref)
    torch.testing.assert_close(grad(stored.loss, logits)[..., 2:].sum(-1), ref_tail_grad, rtol=1e-9, atol=0)
    mask = torch.ones(n, 2, dtype=torch.bool)
    lost = tempered_topk_targets(lp32.reshape(n, 2), mask, temperature=1.0, vocab_size=vocab)[1].exp()  # (n,)
    assert ((lost - 1e-9).abs() > 5e-10).all(), lost  # the recomputed tail is rounding noise
    assert not torch.allclose(grad(recomputed.loss, logits)[..., 2:].sum(-1), ref_tail_grad, rtol=0.5, atol=0)
    assert abs(recomputed.loss.item() - ref.item()) > 1e-9


# --- temperature ---------------------------------------------------------------------------------

ZIPF_V, ZIPF_K = 151_665, 64


def zipf_teacher():
    """(1, 151665) log-probs p_r ~ r^-1.225: the top 64 ids leave p_tail = 0.304."""
    return (-1.225 * torch.arange(1, ZIPF_V + 1, dtype=F64).log()).log_softmax(-1).unsqueeze(0)


@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_tempered_targets_with_log_z_equal_the_dense_tempered_teachers_coarse_distribution(tau):
    teacher = zipf_teacher()
    lp, ids = teacher.topk(ZIPF_K, -1)  # (1, k)
    mask = torch.ones_like(ids, dtype=torch.bool)
    dense = (teacher / tau).log_softmax(-1)  # (1, V): the tempered teacher
    dense_tail = dense.scatter(-1, ids, -torch.inf).logsumexp(-1).exp()  # (1,)
    logp, log_tail = tempered_topk_targets(lp, mask, temperature=tau, vocab_size=ZIPF_V, log_z=log_z(teacher, tau))
    assert_close(logp.exp(), dense.gather(-1, ids).exp())
    assert_close(log_tail.exp(), dense_tail)
    logp32, log_tail32 = tempered_topk_targets(  # as a cache stores them: fp32
        lp.float(), mask, temperature=tau, vocab_size=ZIPF_V, log_z=log_z(teacher, tau).float()
    )
    torch.testing.assert_close(log_tail32.exp().double(), dense_tail, rtol=1e-5, atol=0)


def test_tempering_the_tail_bucket_as_one_token_is_far_from_the_tempered_teacher():
    """The defect this module had: (p_K, p_tail) ** (1/tau), renormalized, treats 151,601 tail ids
    as one token.  Zipf teacher, k = 64, p_tail = 0.304: the tempered tail is 0.099 instead of
    0.958 at tau = 2, and 0.042 instead of 0.996 at tau = 4."""
    teacher = zipf_teacher()
    lp, ids = teacher.topk(ZIPF_K, -1)
    p_tail = 1 - lp.exp().sum(-1)  # (1,)
    assert abs(p_tail.item() - 0.304) < 1e-3
    for tau, old_tail, exact_tail in ((2.0, 0.099, 0.958), (4.0, 0.042, 0.996)):
        one_token = (torch.cat([lp, p_tail.log().unsqueeze(-1)], -1) / tau).softmax(-1)[:, -1]
        mask = torch.ones_like(ids, dtype=torch.bool)
        _, log_tail = tempered_topk_targets(lp, mask, temperature=tau, vocab_size=ZIPF_V, log_z=log_z(teacher, tau))
        assert abs(one_token.item() - old_tail) < 1e-3
        assert abs(log_tail.exp().item() - exact_tail) < 1e-3


@pytest.mark.parametrize("kind", TAIL_KINDS)
@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_tail_kinds_at_temperature_equal_the_dense_tempered_reference_at_32k_vocab(kind, tau):
    case = make_case(k=8, vocab=BIG_V, batch=1, seq=4, seed=1)
    out = run(case, KDLossSpec(kind=kind, alpha=1.0, temperature=tau))  # run passes topk_log_z
    ref = kd_scale(kind, tau) * ref_kd(kind, case["teacher"], case["logits"], topk_keep(case), tau=tau).mean()
    assert_close(out.loss, ref)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


@pytest.mark.parametrize("kind", TAIL_KINDS)
def test_tail_kinds_at_temperature_without_log_z_refuse_naming_the_fixes(kind):
    case = make_case(k=3)
    targets = {name: case[name] for name in ("topk_ids", "topk_logprobs", "topk_log_tail")}
    with pytest.raises(ValueError, match="topk_log_z") as err:
        kd_loss(case["logits"], input_ids=case["input_ids"], spec=KDLossSpec(kind=kind, temperature=2.0), **targets)
    for fix in ("no log-normalizer", "temperature 1", "topk_renorm", "rebuild the cache"):
        assert fix in str(err.value)
    with pytest.raises(ValueError, match="topk_log_z"):
        tempered_topk_targets(case["topk_logprobs"], case["topk_ids"] >= 0, temperature=2.0, vocab_size=V)


def test_temperature_with_k_equal_vocab_equals_tau_squared_dense_kl_of_tempered_softmaxes():
    case, tau = make_case(k=V), 3.0
    out = run(case, KDLossSpec(alpha=1.0, temperature=tau))
    ref = tau**2 * dense_kl((case["teacher"] / tau).log_softmax(-1), case["logits"] / tau).mean()
    assert_close(out.loss, ref)


def test_temperature_one_is_the_untempered_loss():
    case = make_case(k=4)
    default = run(case, KDLossSpec(alpha=0.7))
    explicit = run(case, KDLossSpec(alpha=0.7, temperature=1.0 + 0.0))
    assert_close(default.loss, explicit.loss, tol=0)
    kd = ref_kd("topk_tail", case["teacher"], case["logits"], topk_keep(case)).mean()
    assert_close(default.loss, 0.7 * kd + 0.3 * ref_ce(case["logits"], case["input_ids"]))


# --- CE ------------------------------------------------------------------------------------------


def test_kind_ce_equals_cross_entropy_on_shifted_labels_values_and_grads():
    case = make_case(k=2)
    out = kd_loss(case["logits"], input_ids=case["input_ids"], spec=KDLossSpec(kind="ce", alpha=0.3))
    ref = ref_ce(case["logits"], case["input_ids"])
    assert_close(out.loss, ref)
    assert_close(out.ce, ref.detach())
    assert out.kd.item() == 0.0 and out.n_tokens == out.n_ce_tokens == B * (T - 1)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


@pytest.mark.parametrize("kind", ["topk_tail", "ce"])
def test_ce_mask_selects_the_ce_positions_and_loss_mask_only_the_kd_positions(kind):
    case = make_case(k=3)
    g = torch.Generator().manual_seed(7)
    ce_mask, loss_mask = torch.rand(B, T, generator=g) < 0.6, torch.rand(B, T, generator=g) < 0.6
    ce_mask[0, 0] = loss_mask[0, 0] = True
    case["input_ids"][1, 2] = -100  # position 1's label: never counted
    out = run(case, KDLossSpec(kind=kind, alpha=0.4), ce_mask=ce_mask, loss_mask=loss_mask)
    labels = case["input_ids"][:, 1:]  # (B, T-1)
    counted = ce_mask[:, :-1] & (labels != -100)
    ce = F.cross_entropy(case["logits"][:, :-1][counted], labels[counted])
    assert_close(out.ce, ce.detach())
    assert out.n_ce_tokens == int(counted.sum())
    if kind == "ce":
        assert_close(out.loss, ce)
        assert out.n_tokens == int(counted.sum())
        return
    kd = ref_kd(kind, case["teacher"], case["logits"], topk_keep(case))[loss_mask.reshape(-1)].mean()
    ref = 0.4 * kd + 0.6 * ce
    assert_close(out.loss, ref)
    assert out.n_tokens == int(loss_mask.sum())
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


# --- sampled -------------------------------------------------------------------------------------


def sampled_case(seed=0, draws=5, pad=3):
    """Unique ids with counts per position, padded with `pad` garbage entries of count 0."""
    case = make_case(k=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(case["teacher"].exp().reshape(-1, V), draws, replacement=True, generator=g)
    rows_ids, rows_counts = [], []
    for row in drawn:
        ids, counts = row.unique(return_counts=True)
        n_pad = draws + pad - len(ids)
        rows_ids.append(torch.cat([ids, torch.randint(0, V, (n_pad,), generator=g)]))
        rows_counts.append(torch.cat([counts, torch.zeros(n_pad, dtype=counts.dtype)]))
    case["sample_ids"] = torch.stack(rows_ids).reshape(B, T, -1)
    case["sample_counts"] = torch.stack(rows_counts).reshape(B, T, -1)
    case["sample_total"] = torch.full((B, T), draws)
    return case


def test_sampled_equals_hand_computed_weighted_cross_entropy():
    case = sampled_case()
    spec = KDLossSpec(kind="sampled", alpha=1.0)
    out = kd_loss(
        case["logits"],
        input_ids=case["input_ids"],
        spec=spec,
        sample_ids=case["sample_ids"],
        sample_counts=case["sample_counts"],
    )
    logq = case["logits"].log_softmax(-1).reshape(-1, V)
    terms = []
    for n, (ids, counts) in enumerate(
        zip(case["sample_ids"].reshape(B * T, -1), case["sample_counts"].reshape(B * T, -1), strict=True)
    ):
        terms.append(
            -sum(c.double() / counts.sum().double() * logq[n, i] for i, c in zip(ids, counts, strict=True) if c > 0)
        )
    ref = torch.stack(terms).mean()
    assert_close(out.loss, ref)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


def test_sampled_estimate_averages_to_dense_cross_entropy():
    g = torch.Generator().manual_seed(1)
    reps, draws = 4000, 8
    teacher = torch.randn(V, generator=g, dtype=F64).log_softmax(-1)
    student = torch.randn(V, generator=g, dtype=F64)
    drawn = torch.multinomial(teacher.exp().expand(reps, V), draws, replacement=True, generator=g)  # (reps, draws)
    counts = torch.zeros(reps, V, dtype=F64).scatter_add_(1, drawn, torch.ones(reps, draws, dtype=F64))
    out = kd_loss(
        student.expand(1, reps, V),
        input_ids=torch.zeros(1, reps, dtype=torch.long),
        spec=KDLossSpec(kind="sampled", alpha=1.0),
        sample_ids=torch.arange(V).expand(1, reps, V),
        sample_counts=counts.unsqueeze(0),
    )
    logq = student.log_softmax(-1)
    dense_ce = -(teacher.exp() * logq).sum()
    std = math.sqrt(((teacher.exp() * logq**2).sum() - dense_ce**2) / (reps * draws))
    assert abs(out.loss.item() - dense_ce.item()) < 5 * std


def test_sampled_with_sample_total_weights_kept_draws_by_draws_made_at_32k_vocab():
    """Unmapped ids dropped (count 0, id 0, as a vocabulary mapping does): weight c_j / S, and a
    position whose draws were all dropped still counts, with 0."""
    case, draws = make_case(k=1, vocab=BIG_V, batch=1, seq=4), 16
    g = torch.Generator().manual_seed(2)
    drawn = torch.multinomial(case["teacher"].exp().reshape(-1, BIG_V), draws, replacement=True, generator=g)
    rows = [row.unique(return_counts=True) for row in drawn]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.stack([F.pad(i, (0, width - len(i))) for i, _ in rows]).reshape(1, 4, width)
    counts = torch.stack([F.pad(c, (0, width - len(c))) for _, c in rows]).reshape(1, 4, width)
    dropped = (ids % 2 == 1) | (torch.arange(4) == 3).reshape(1, 4, 1)  # odd ids unmapped; position 3 loses all
    ids, counts = ids.masked_fill(dropped, 0), counts.masked_fill(dropped, 0)
    assert 0 < int(counts.sum()) < 4 * draws
    out = kd_loss(
        case["logits"],
        input_ids=case["input_ids"],
        spec=KDLossSpec(kind="sampled", alpha=1.0),
        sample_ids=ids,
        sample_counts=counts,
        sample_total=torch.full((1, 4), draws),
    )
    logq = case["logits"].log_softmax(-1).reshape(4, BIG_V)
    terms = [
        -sum(
            (c / draws * logq[n, i] for i, c in zip(ids[0, n], counts[0, n], strict=True) if c > 0), logq.new_zeros(())
        )
        for n in range(4)
    ]
    ref = torch.stack(terms).mean()
    assert out.n_tokens == 4
    assert_close(out.loss, ref)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


def test_sampled_with_dropped_ids_is_unbiased_only_with_sample_total():
    """E[sum_kept c_j/S (-log q_j)] = sum_{v kept} p_v (-log q_v); renormalizing over kept draws
    estimates that divided by the kept mass instead."""
    g = torch.Generator().manual_seed(3)
    reps, draws = 4000, 8
    teacher = torch.randn(V, generator=g, dtype=F64).log_softmax(-1)
    student = torch.randn(V, generator=g, dtype=F64)
    kept = teacher.argsort() < V - 3  # the 3 most likely ids are unmapped
    drawn = torch.multinomial(teacher.exp().expand(reps, V), draws, replacement=True, generator=g)  # (reps, draws)
    counts = torch.zeros(reps, V, dtype=F64).scatter_add_(1, drawn, torch.ones(reps, draws, dtype=F64)) * kept
    targets = dict(sample_ids=torch.arange(V).expand(1, reps, V), sample_counts=counts.unsqueeze(0))
    spec = KDLossSpec(kind="sampled", alpha=1.0)
    inputs = dict(input_ids=torch.zeros(1, reps, dtype=torch.long), spec=spec, **targets)
    unbiased = kd_loss(student.expand(1, reps, V), sample_total=torch.full((1, reps), draws), **inputs)
    renormalized = kd_loss(student.expand(1, reps, V), **inputs)
    logq, p = student.log_softmax(-1), teacher.exp()
    target = -(p * logq)[kept].sum()
    std = math.sqrt((((p * logq**2)[kept].sum() - target**2) / (reps * draws)).item())
    assert abs(unbiased.loss.item() - target.item()) < 5 * std
    assert abs(renormalized.loss.item() - target.item()) > 20 * std


def test_sample_counts_above_sample_total_raise_naming_it():
    case = sampled_case()
    with pytest.raises(ValueError, match="sample_total"):
        kd_loss(
            case["logits"],
            input_ids=case["input_ids"],
            spec=KDLossSpec(kind="sampled"),
            sample_ids=case["sample_ids"],
            sample_counts=case["sample_counts"],
            sample_total=case["sample_total"] - 1,
        )


# --- one table of targets, the default loss ------------------------------------------------------


def test_target_keys_are_kd_loss_arguments_and_every_kind_runs_on_a_batch_filtered_by_them():
    case = sampled_case()
    batch = {
        "topk_ids": case["teacher"].topk(4, -1).indices,
        "topk_logprobs": case["teacher"].topk(4, -1).values,
        "topk_mask": torch.ones(B, T, 4, dtype=torch.bool),
        "topk_log_tail": case["teacher"].scatter(-1, case["teacher"].topk(4, -1).indices, -torch.inf).logsumexp(-1),
        "topk_log_z": log_z(case["teacher"], 2.0),
        **{name: case[name] for name in ("sample_ids", "sample_counts", "sample_total")},
    }
    params = inspect.signature(kd_loss).parameters
    assert set(TARGET_KEYS) == set(KINDS)
    for kind in KINDS:
        assert set(TARGET_KEYS[kind]) <= set(params) - {"logits", "input_ids", "spec", "loss_mask", "ce_mask"}
        spec = KDLossSpec(kind=kind, temperature=2.0 if kind in TAIL_KINDS else 1.0)
        targets = {name: batch[name] for name in TARGET_KEYS[kind]}
        out = kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec, **targets)
        assert torch.isfinite(out.loss), kind


def test_default_loss_is_topk_tail_for_topk_caches_and_sampled_for_sampled_caches():
    assert default_loss("topk") == default_loss("both") == "topk_tail"
    assert default_loss("sampled") == "sampled"
    with pytest.raises(ValueError, match="cache.targets"):
        default_loss("dense")


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TOPK_KINDS)
@pytest.mark.parametrize("stored_tail", [False, True])
def test_padded_topk_entries_get_no_probability_and_no_gradient(kind, stored_tail):
    """Adaptive top-k: row n keeps its first k_n ids; padding carries garbage ids and log-probs."""
    case = make_case(k=5)
    g = torch.Generator().manual_seed(3)
    k_per_row = torch.randint(0, 6, (B, T), generator=g)  # includes k = 0 (all mass in the tail)
    mask = torch.arange(5) < k_per_row.unsqueeze(-1)  # (B, T, 5)
    ids = torch.where(mask, case["topk_ids"], case["topk_ids"][..., :1])  # garbage = a real id of the row
    logprobs = torch.where(mask, case["topk_logprobs"], 0.0)  # garbage log-prob 0 = probability 1
    keep = [row[:kn] for row, kn in zip(topk_keep(case), k_per_row.reshape(-1).tolist(), strict=True)]
    extra = {}
    if stored_tail:
        kept = torch.where(mask, case["topk_ids"], case["topk_ids"].new_tensor(V))  # (B, T, 5); V = nothing
        outside = F.pad(case["teacher"], (0, 1)).scatter(-1, kept, -torch.inf)[..., :V]  # (B, T, V)
        extra["topk_log_tail"] = outside.logsumexp(-1)
    out = kd_loss(
        case["logits"],
        input_ids=case["input_ids"],
        spec=KDLossSpec(kind=kind, alpha=1.0),
        topk_ids=ids,
        topk_logprobs=logprobs,
        topk_mask=mask,
        **extra,
    )
    rows = [n for n, row in enumerate(keep) if row or kind != "hard"]  # hard: no argmax without entries
    teacher, logits = case["teacher"].reshape(B * T, V)[rows], case["logits"].reshape(B * T, V)[rows]
    ref = ref_kd(kind, teacher, logits, [keep[n] for n in rows]).mean()
    assert out.n_tokens == len(rows)
    assert_close(out.loss, ref)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


@pytest.mark.parametrize("kind", TOPK_KINDS)
def test_padding_every_row_with_masked_columns_equals_the_unpadded_loss(kind):
    case = make_case(k=3)
    spec = KDLossSpec(kind=kind, alpha=0.5)
    plain = run(case, spec, topk_log_tail=case["topk_log_tail"])
    pad = dict(
        topk_ids=F.pad(case["topk_ids"], (0, 4), value=V - 1),
        topk_logprobs=F.pad(case["topk_logprobs"], (0, 4)),
        topk_mask=F.pad(torch.ones(B, T, 3, dtype=torch.bool), (0, 4), value=False),
    )
    padded = kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec, topk_log_tail=case["topk_log_tail"], **pad)
    assert_close(padded.loss, plain.loss)
    assert_close(grad(padded.loss, case["logits"]), grad(plain.loss, case["logits"]))


MASKED = [(kind, tau) for kind in TAIL_KINDS for tau in (1.0, 2.0)] + [("topk_renorm", 2.0), ("hard", 1.0)]


@pytest.mark.parametrize(("kind", "tau"), [*MASKED, ("sampled", 1.0)])
def test_loss_mask_excludes_positions_from_kd_even_with_nan_targets_there(kind, tau):
    case = sampled_case() if kind == "sampled" else make_case(k=4)
    loss_mask = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) < 0.5
    loss_mask[0, 0] = True
    if kind == "sampled":
        targets = {name: case[name] for name in ("sample_ids", "sample_counts", "sample_total")}
    else:
        targets = {name: case[name] for name in ("topk_ids", "topk_logprobs", "topk_log_tail")}
        targets["topk_log_z"] = log_z(case["teacher"], tau)
    spec = KDLossSpec(kind=kind, alpha=1.0, temperature=tau)
    per_row = []
    for n in range(B * T):  # the KD of each position alone, via a one-hot loss_mask
        one = torch.zeros(B * T, dtype=torch.bool)
        one[n] = True
        per_row.append(
            kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec, loss_mask=one.reshape(B, T), **targets).loss
        )
    ref = torch.stack(per_row)[loss_mask.reshape(-1)].mean()
    poisoned = {
        name: t.to(F64).masked_fill(~loss_mask.reshape(B, T, *[1] * (t.dim() - 2)), torch.nan)
        for name, t in targets.items()
        if name not in ("topk_ids", "sample_ids")
    }
    out = kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec, loss_mask=loss_mask, **(targets | poisoned))
    assert out.n_tokens == int(loss_mask.sum())
    assert_close(out.loss, ref)
    g = grad(out.loss, case["logits"])
    assert torch.isfinite(g).all()
    assert (g[~loss_mask] == 0).all()
    assert_close(g, grad(ref, case["logits"]))


# --- chunking, stability, memory ------------------------------------------------------------------


def all_targets(case, k=4):
    """Every target kd_loss may read, for `sampled_case`s (topk_log_z at tau = 2)."""
    topk_logprobs, topk_ids = case["teacher"].topk(k, -1)
    return dict(
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        topk_log_tail=case["teacher"].scatter(-1, topk_ids, -torch.inf).logsumexp(-1),
        topk_log_z=log_z(case["teacher"], 2.0),
        **{name: case[name] for name in ("sample_ids", "sample_counts", "sample_total")},
    )


def spec_for(kind, **kw):
    """A spec for `kind`; tail kinds and topk_renorm at tau = 2, the rest at 1."""
    return KDLossSpec(kind=kind, temperature=2.0 if kind in (*TAIL_KINDS, "topk_renorm") else 1.0, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_values_and_grads(kind):
    case = sampled_case()
    targets = {name: t for name, t in all_targets(case).items() if name in TARGET_KEYS[kind]}
    small = kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec_for(kind, chunk_tokens=3), **targets)
    big = kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec_for(kind, chunk_tokens=10_000), **targets)
    assert_close(small.loss, big.loss)
    assert_close(small.kd, big.kd)
    assert_close(grad(small.loss, case["logits"]), grad(big.loss, case["logits"]))


def test_auto_chunk_keeps_the_working_set_budget_at_262k_vocab():
    vocab, spec = 262_144, KDLossSpec()
    assert spec.chunk_tokens == 0 and spec.chunk_budget_bytes == 256 << 20
    per_row = WORKING_BUFFERS * 4 * (vocab + 1)
    rows = spec.rows_per_chunk(vocab)
    assert rows * per_row <= spec.chunk_budget_bytes < (rows + 1) * per_row  # the most rows that fit
    assert rows == 85
    assert KDLossSpec(chunk_budget_bytes=1).rows_per_chunk(vocab) == 1  # at least one row
    assert KDLossSpec().rows_per_chunk(4096) == 1024  # at most MAX_AUTO_ROWS: the per-row math stays small
    assert KDLossSpec(chunk_tokens=7).rows_per_chunk(vocab) == 7


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of live storages created by ops while active (storages of `existing` excluded)."""

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen = {t.untyped_storage().data_ptr() for t in existing}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                storage = t.untyped_storage()
                self.seen.add(storage.data_ptr())
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, storage.data_ptr(), storage.nbytes())
                self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["ce", "sampled", "hard", "topk_renorm", "topk_tail", "jsd"])  # tail kinds at tau = 2
def test_measured_working_set_is_the_counted_workspaces_within_the_auto_chunk_budget_at_262k_vocab(kind, dtype):
    """Logits (8, 262144) in auto chunks: peak live memory beyond the one (N, V) gradient is the (rows, V)
    fp32 workspaces ``workspaces`` counts (a copy of low-precision logits, the tempered softmax of coarse
    kinds at tau != 1) plus a few small tensors, and within chunk_budget_bytes."""
    vocab, n, budget = 262_144, 8, 10 << 20
    spec = spec_for(kind, chunk_budget_bytes=budget)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, n, vocab, generator=g).to(dtype).requires_grad_()
    teacher = torch.randn(1, n, vocab, generator=g).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(8, -1)
    counts = torch.ones(1, n, 8)
    targets = dict(topk_ids=topk_ids, topk_logprobs=topk_logprobs, topk_log_z=log_z(teacher, 2.0))
    targets |= dict(sample_ids=topk_ids, sample_counts=counts)
    targets = {name: t for name, t in targets.items() if name in TARGET_KEYS[kind]}
    with _PeakLiveBytes(logits, teacher, *targets.values()) as memory:
        kd_loss(logits, input_ids=topk_ids[..., 0], spec=spec, **targets).loss.backward()
    working_set = memory.peak - logits.numel() * logits.element_size()  # the gradient has the logits' size
    buffers = workspaces(spec, owned=dtype != torch.float32)
    assert buffers == {"jsd": 1, "topk_tail": 1}.get(kind, 0) + (dtype != torch.float32) <= WORKING_BUFFERS
    rows = spec.rows_per_chunk(vocab, buffers=buffers)  # the auto chunk counts the buffers it allocates
    assert rows == {0: 9, 1: 9, 2: 4}[buffers]
    used = buffers * min(rows, n) * vocab * 4
    assert used <= working_set < used + (16 << 10) <= budget


def test_auto_chunked_equals_unchunked_at_262k_vocab():
    case = make_case(k=8, vocab=262_144, batch=1, seq=3)
    auto = KDLossSpec(kind="jsd", temperature=2.0, chunk_budget_bytes=3 << 20)  # fp64, 1 buffer: 1 row per chunk
    assert auto.rows_per_chunk(262_144, itemsize=8, buffers=1) == 1
    one = run(case, auto, topk_log_tail=case["topk_log_tail"])
    full = run(case, KDLossSpec(kind="jsd", temperature=2.0, chunk_tokens=10_000))
    assert_close(one.loss, full.loss)
    assert_close(grad(one.loss, case["logits"]), grad(full.loss, case["logits"]))


@pytest.mark.parametrize("teacher_dtype", [torch.float32, F64])
@pytest.mark.parametrize("logit_scale", [1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_teacher_and_extreme_student_give_finite_loss_and_grads(logit_scale, dtype, teacher_dtype):
    teacher_logits = torch.full((B, T, V), -30.0, dtype=teacher_dtype)
    teacher_logits[..., 0] = 0.0  # top-2 kept: p_tail = 11 e^-30 = 1.03e-12 (fp32 log-probs round it to 0)
    teacher = teacher_logits.log_softmax(-1)
    logprobs, ids = teacher.topk(2, -1)
    g = torch.Generator().manual_seed(0)
    logits = (logit_scale * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_()
    logits_onk = torch.full((B, T, V), -1e4).scatter(-1, ids, 1e4).to(dtype).requires_grad_()  # q_tail ~ 0
    for z in (logits, logits_onk):
        for kind in TOPK_KINDS:
            for tau in (0.5, 1.0, 4.0) if kind != "hard" else (1.0,):
                out = kd_loss(
                    z,
                    input_ids=ids[..., 0],
                    spec=KDLossSpec(kind=kind, temperature=tau),
                    topk_ids=ids,
                    topk_logprobs=logprobs,
                    topk_log_z=log_z(teacher, tau).to(teacher_dtype),
                )
                assert torch.isfinite(out.loss) and out.kd >= 0, (kind, tau)
                assert torch.isfinite(grad(out.loss, z)).all(), (kind, tau)


class _CountLogitsSizedAllocations(TorchDispatchMode):
    """Counts op outputs of at least `numel` elements that do not alias an input (new storage)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_backward_allocate_one_logits_sized_tensor_the_gradient(kind):
    case = sampled_case()
    targets = {name: t for name, t in all_targets(case).items() if name in TARGET_KEYS[kind]}
    with _CountLogitsSizedAllocations(B * T * V) as counter:
        kd_loss(
            case["logits"], input_ids=case["input_ids"], spec=spec_for(kind, chunk_tokens=4), **targets
        ).loss.backward()
    assert counter.count == 1
    with _CountLogitsSizedAllocations(B * T * V) as naive:  # sanity: the counter sees dense CE's copies
        F.cross_entropy(case["logits"].reshape(-1, V), case["input_ids"].reshape(-1)).backward()
    assert naive.count >= 2


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="topk"), "kind"),
        (dict(kind="auto"), "kind"),
        (dict(alpha=1.5), "alpha"),
        (dict(temperature=0.0), "temperature"),
        (dict(kind="sampled", temperature=2.0), "sampled"),
        (dict(kind="hard", temperature=2.0), "hard"),
        (dict(kind="jsd", beta=0.0), "beta"),
        (dict(kind="jsd", beta=1.0), "beta"),
        (dict(kind="skew_kl", beta=1.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(chunk_tokens=-1), "chunk_tokens"),
        (dict(chunk_budget_bytes=0), "chunk_budget_bytes"),
    ],
)
def test_spec_rejects_invalid_settings_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KDLossSpec(**kwargs)


def test_spec_accepts_skew_kl_at_beta_zero_which_is_forward_kl():
    case = make_case(k=3)
    skew = run(case, KDLossSpec(kind="skew_kl", beta=0.0, alpha=1.0))
    assert_close(skew.loss, run(case, KDLossSpec(kind="topk_tail", alpha=1.0)).loss)


def test_missing_or_misshaped_targets_raise_naming_the_argument():
    case = make_case(k=3)
    with pytest.raises(ValueError, match="topk_logprobs"):
        kd_loss(case["logits"], input_ids=case["input_ids"], spec=KDLossSpec(), topk_ids=case["topk_ids"])
    with pytest.raises(ValueError, match="topk_mask"):
        run(case, KDLossSpec(), topk_mask=torch.ones(B, T, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="sample_ids"):
        run(case, KDLossSpec(kind="sampled"))
    with pytest.raises(ValueError, match="topk_log_tail"):
        run(case, KDLossSpec(), topk_log_tail=case["topk_log_tail"].unsqueeze(-1))
    with pytest.raises(ValueError, match="ce_mask"):
        run(case, KDLossSpec(), ce_mask=torch.ones(B, T - 1, dtype=torch.bool))


def test_a_cache_made_at_a_temperature_trains_at_that_temperature_without_tempering_twice() -> None:
    """Targets stored at tau_c = 2 (log softmax(l / 2)), trained at tau = 2: KD = tau^2 * KL(p_2 || softmax(z / 2)),
    and the sampled loss accepts that tau; tau = 1 on such a cache would need re-tempering by 1/2."""
    torch.manual_seed(0)
    B, T, V = 2, 5, 12
    z, teacher = torch.randn(B, T, V, dtype=torch.float64), 3 * torch.randn(B, T, V, dtype=torch.float64)
    stored = torch.log_softmax(teacher / 2.0, dim=-1)  # (B, T, V) what a cache at temperature 2 holds
    ids = torch.arange(V).expand(B, T, V)  # k = V: no tail
    spec = KDLossSpec(kind="topk_tail", alpha=1.0, temperature=2.0, targets_temperature=2.0)
    out = kd_loss(z, input_ids=ids[..., 0], spec=spec, topk_ids=ids, topk_logprobs=stored)
    want = 4.0 * dense_kl(stored, z / 2.0).mean()
    assert torch.allclose(out.kd.double(), want, rtol=1e-6)
    assert KDLossSpec(kind="sampled", temperature=2.0, targets_temperature=2.0).retemper == 1.0
    with pytest.raises(ValueError, match="supports only the cache's temperature 2.0, got 1.0"):
        KDLossSpec(kind="sampled", temperature=1.0, targets_temperature=2.0)
    with pytest.raises(ValueError, match="needs topk_log_z"):
        kd_loss(
            z,
            input_ids=ids[..., 0],
            spec=KDLossSpec(kind="topk_tail", temperature=1.0, targets_temperature=2.0),
            topk_ids=ids,
            topk_logprobs=stored,
        )
