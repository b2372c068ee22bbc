"""pipeline/losses.py against dense references written the obvious way (full softmax, explicit
sums, float64, loops over positions)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kdcache.losses import KDLossSpec, dense_kl, kd_loss

B, T, V = 2, 6, 13
F64 = torch.float64


def make_case(*, k: int, seed: int = 0, dtype: torch.dtype = F64) -> dict:
    """Student logits (B, T, V) with grad, full teacher log-probs (B, T, V) and its top-k."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g, dtype=F64)).requires_grad_()
    teacher = (3 * torch.randn(B, T, V, generator=g, dtype=F64)).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    return dict(
        logits=logits, teacher=teacher, topk_ids=topk_ids, topk_logprobs=topk_logprobs.to(dtype), input_ids=input_ids
    )


def run(case: dict, spec: KDLossSpec, **extra):
    kw = {name: case[name] for name in ("input_ids", "topk_ids", "topk_logprobs") if name in case}
    return kd_loss(case["logits"], spec=spec, **(kw | extra))


def ref_coarse_kl(teacher_logprobs, student_logits, keep, tau=1.0):
    """KL between (K + tail) buckets, per position; keep[n] is the list of ids in K."""
    out = []
    for logp, z, ids in zip(teacher_logprobs.reshape(-1, V), student_logits.reshape(-1, V), keep, strict=True):
        p, q = logp.exp(), torch.softmax(z / tau, dim=-1)
        in_k = torch.zeros(V, dtype=torch.bool)
        in_k[list(ids)] = True
        p_b = torch.cat([p[in_k], (1 - p[in_k].sum()).clamp_min(0).reshape(1)]) ** (1 / tau)
        p_b = p_b / p_b.sum()
        q_b = torch.cat([q[in_k], q[~in_k].sum().reshape(1)])
        out.append(sum(pi * torch.log(pi / qi) for pi, qi in zip(p_b, q_b, strict=True) if pi > 0))
    return torch.stack(out)


def ref_renorm_kl(teacher_logprobs, student_logits, keep):
    out = []
    for logp, z, ids in zip(teacher_logprobs.reshape(-1, V), student_logits.reshape(-1, V), keep, strict=True):
        p, q = logp.exp()[list(ids)], torch.softmax(z, dim=-1)[list(ids)]
        p, q = p / p.sum(), q / q.sum()
        out.append((p * torch.log(p / q)).sum())
    return torch.stack(out)


def ref_ce(logits, input_ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1))


def topk_keep(case):
    return case["topk_ids"].reshape(B * T, -1).tolist()


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def grad(loss, logits):
    return torch.autograd.grad(loss, logits)[0]


# --- top-k + tail --------------------------------------------------------------------------------


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


@pytest.mark.parametrize("k", [1, 3, V - 1])
def test_topk_tail_equals_hand_computed_coarse_grained_kl_values_and_grads(k):
    case = make_case(k=k, seed=k)
    out = run(case, KDLossSpec(alpha=1.0))
    ref = ref_coarse_kl(case["teacher"], case["logits"], topk_keep(case)).mean()
    assert_close(out.loss, ref)
    assert_close(out.kd, ref.detach())
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


def test_dense_kl_is_zero_for_identical_distributions_and_handles_zero_teacher_probs():
    logits = torch.tensor([[0.0, 1.0, -2.0]], dtype=F64)
    assert_close(dense_kl(logits.log_softmax(-1), logits), torch.zeros(1, dtype=F64))
    teacher = torch.tensor([[0.0, -torch.inf, -torch.inf]], dtype=F64)  # p = one-hot
    assert_close(dense_kl(teacher, logits), -logits.log_softmax(-1)[:, 0])


# --- renormalized, sampled, CE ----------------------------------------------------------------------


def test_topk_renorm_equals_hand_computed_reference_values_and_grads():
    case = make_case(k=4)
    out = run(case, KDLossSpec(kind="topk_renorm", alpha=1.0))
    ref = ref_renorm_kl(case["teacher"], case["logits"], topk_keep(case)).mean()
    assert_close(out.loss, ref)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


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


def test_kind_ce_equals_cross_entropy_on_shifted_labels_values_and_grads():
    case = make_case(k=2)
    out = kd_loss(case["logits"], input_ids=case["input_ids"], spec=KDLossSpec(kind="ce", alpha=0.3))
    ref = ref_ce(case["logits"], case["input_ids"])
    assert_close(out.loss, ref)
    assert_close(out.ce, ref.detach())
    assert out.kd.item() == 0.0 and out.n_tokens == B * (T - 1)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_alpha_mixes_kd_and_shifted_label_ce(alpha):
    case = make_case(k=3)
    out = run(case, KDLossSpec(alpha=alpha))
    kd = ref_coarse_kl(case["teacher"], case["logits"], topk_keep(case)).mean()
    ce = ref_ce(case["logits"], case["input_ids"])
    ref = alpha * kd + (1 - alpha) * ce
    assert_close(out.loss, ref)
    assert_close(out.kd, kd.detach())
    assert_close(out.ce, ce.detach())
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


# --- temperature ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_temperature_tempers_student_and_buckets_and_scales_kd_by_tau_squared(tau):
    case = make_case(k=3)
    out = run(case, KDLossSpec(alpha=1.0, temperature=tau))
    ref = tau**2 * ref_coarse_kl(case["teacher"], case["logits"], topk_keep(case), tau=tau).mean()
    assert_close(out.loss, ref)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


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
    ref = 0.7 * ref_coarse_kl(case["teacher"], case["logits"], topk_keep(case)).mean() + 0.3 * ref_ce(
        case["logits"], case["input_ids"]
    )
    assert_close(default.loss, ref)


# --- masks ---------------------------------------------------------------------------------------


def test_padded_topk_entries_get_no_probability_and_no_gradient():
    """Adaptive top-k: row n keeps its first k_n ids; padding carries garbage ids and log-probs."""
    case = make_case(k=5)
    g = torch.Generator().manual_seed(3)
    k_per_row = torch.randint(0, 6, (B, T), generator=g)  # includes k = 0 (all mass in the tail)
    mask = torch.arange(5) < k_per_row.unsqueeze(-1)  # (B, T, 5)
    ids = torch.where(mask, case["topk_ids"], case["topk_ids"][..., :1])  # garbage = a real id of the row
    logprobs = torch.where(mask, case["topk_logprobs"], 0.0)  # garbage log-prob 0 = probability 1
    out = kd_loss(
        case["logits"],
        input_ids=case["input_ids"],
        spec=KDLossSpec(alpha=1.0),
        topk_ids=ids,
        topk_logprobs=logprobs,
        topk_mask=mask,
    )
    keep = [row[:kn] for row, kn in zip(topk_keep(case), k_per_row.reshape(-1).tolist(), strict=True)]
    ref = ref_coarse_kl(case["teacher"], case["logits"], keep).mean()
    assert_close(out.loss, ref)
    assert_close(grad(out.loss, case["logits"]), grad(ref, case["logits"]))


@pytest.mark.parametrize("kind", ["topk_tail", "topk_renorm"])
def test_padding_every_row_with_masked_columns_equals_the_unpadded_loss(kind):
    case = make_case(k=3)
    spec = KDLossSpec(kind=kind, alpha=0.5)
    plain = run(case, spec)
    pad = dict(
        topk_ids=F.pad(case["topk_ids"], (0, 4), value=V - 1),
        topk_logprobs=F.pad(case["topk_logprobs"], (0, 4)),
        topk_mask=F.pad(torch.ones(B, T, 3, dtype=torch.bool), (0, 4), value=False),
    )
    padded = kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec, **pad)
    assert_close(padded.loss, plain.loss)
    assert_close(grad(padded.loss, case["logits"]), grad(plain.loss, case["logits"]))


@pytest.mark.parametrize("kind", ["topk_tail", "topk_renorm", "sampled"])
def test_loss_mask_excludes_positions_from_kd_even_with_nan_targets_there(kind):
    case = sampled_case() if kind == "sampled" else make_case(k=4)
    loss_mask = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) < 0.5
    loss_mask[0, 0] = True
    targets = (
        dict(sample_ids=case["sample_ids"], sample_counts=case["sample_counts"])
        if kind == "sampled"
        else dict(topk_ids=case["topk_ids"], topk_logprobs=case["topk_logprobs"])
    )
    spec = KDLossSpec(kind=kind, alpha=1.0)
    per_row = []
    for n in range(B * T):  # the KD of each position alone, via a one-hot loss_mask
        one = torch.zeros(B * T, dtype=torch.bool)
        one[n] = True
        per_row.append(
            kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec, loss_mask=one.reshape(B, T), **targets).loss
        )
    ref = torch.stack(per_row)[loss_mask.reshape(-1)].mean()
    poisoned = {name: t.clone() for name, t in targets.items()}
    value_key = "sample_counts" if kind == "sampled" else "topk_logprobs"
    poisoned[value_key] = poisoned[value_key].to(F64).masked_fill(~loss_mask.unsqueeze(-1), torch.nan)
    out = kd_loss(case["logits"], input_ids=case["input_ids"], spec=spec, loss_mask=loss_mask, **poisoned)
    assert out.n_tokens == int(loss_mask.sum())
    assert_close(out.loss, ref)
    g = grad(out.loss, case["logits"])
    assert torch.isfinite(g).all()
    assert (g[~loss_mask] == 0).all()
    assert_close(g, grad(ref, case["logits"]))


# --- chunking, stability, memory ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk_tail", "topk_renorm", "sampled", "ce"])
def test_chunked_equals_unchunked_values_and_grads(kind):
    case = sampled_case()
    case["topk_ids"], case["topk_logprobs"] = case["teacher"].topk(4, -1)[::-1]
    extra = dict(sample_ids=case["sample_ids"], sample_counts=case["sample_counts"]) if kind == "sampled" else {}
    small = run(case, KDLossSpec(kind=kind, chunk_tokens=3), **extra)
    big = run(case, KDLossSpec(kind=kind, chunk_tokens=10_000), **extra)
    assert_close(small.loss, big.loss)
    assert_close(small.kd, big.kd)
    assert_close(grad(small.loss, case["logits"]), grad(big.loss, case["logits"]))


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
        for kind in ("topk_tail", "topk_renorm"):
            for tau in (0.5, 1.0, 4.0):
                out = kd_loss(
                    z,
                    input_ids=ids[..., 0],
                    spec=KDLossSpec(kind=kind, temperature=tau),
                    topk_ids=ids,
                    topk_logprobs=logprobs,
                )
                assert torch.isfinite(out.loss) and out.kd >= 0
                assert torch.isfinite(grad(out.loss, z)).all()


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


@pytest.mark.parametrize("kind", ["topk_tail", "sampled", "ce"])
def test_forward_and_backward_allocate_one_logits_sized_tensor_the_gradient(kind):
    case = sampled_case()
    case["topk_ids"], case["topk_logprobs"] = case["teacher"].topk(4, -1)[::-1]
    extra = dict(sample_ids=case["sample_ids"], sample_counts=case["sample_counts"]) if kind == "sampled" else {}
    with _CountLogitsSizedAllocations(B * T * V) as counter:
        run(case, KDLossSpec(kind=kind, chunk_tokens=4), **extra).loss.backward()
    assert counter.count == 1
    with _CountLogitsSizedAllocations(B * T * V) as naive:  # sanity: the counter sees dense CE's copies
        F.cross_entropy(case["logits"].reshape(-1, V), case["input_ids"].reshape(-1)).backward()
    assert naive.count >= 2


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="topk"), "kind"),
        (dict(alpha=1.5), "alpha"),
        (dict(temperature=0.0), "temperature"),
        (dict(kind="sampled", temperature=2.0), "sampled"),
        (dict(chunk_tokens=0), "chunk_tokens"),
    ],
)
def test_spec_rejects_invalid_settings_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KDLossSpec(**kwargs)


def test_missing_or_misshaped_targets_raise_naming_the_argument():
    case = make_case(k=3)
    with pytest.raises(ValueError, match="topk_logprobs"):
        kd_loss(case["logits"], input_ids=case["input_ids"], spec=KDLossSpec(), topk_ids=case["topk_ids"])
    with pytest.raises(ValueError, match="topk_mask"):
        run(case, KDLossSpec(), topk_mask=torch.ones(B, T, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="sample_ids"):
        run(case, KDLossSpec(kind="sampled"))
