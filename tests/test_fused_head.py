"""pipeline/fused_loss.py's head path and pipeline/lm_head.py: the loss of head(hidden) without the (N, V)
logits equals the dense float64 reference and the logits path, in values and in the gradients of the
hidden states, the head weight and bias; real families' heads (tied, biased, soft-capped) against their
own full-logits forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_losses import (
    _CountLogitsSizedAllocations,
    _PeakLiveBytes,
    assert_close,
    kd_scale,
    log_z,
    ref_ce,
    ref_kd,
    topk_keep,
)
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.fused_loss import workspaces
from kdcache.lm_head import FUSED_FAMILIES, final_hidden_states, fused_head
from kdcache.losses import (
    KINDS,
    TAIL_KINDS,
    TARGET_KEYS,
    WORKING_BUFFERS,
    KDLossSpec,
    LMHead,
    kd_loss,
    kd_loss_from_hidden,
)

B, T, H, V, K = 2, 6, 5, 13, 3
F64 = torch.float64
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def head_case(*, seed=0, vocab=V, bias=True, softcap=None, k=K):
    """Hidden states (B, T, H) and a head (V, H) + bias with grad, teacher log-probs, its top-k and draws."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64).requires_grad_()
    weight = (0.8 * torch.randn(vocab, H, generator=g, dtype=F64)).requires_grad_()
    b = (0.5 * torch.randn(vocab, generator=g, dtype=F64)).requires_grad_() if bias else None
    teacher = (3 * torch.randn(B, T, vocab, generator=g, dtype=F64)).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(k, -1)
    draws = torch.multinomial(teacher.exp().reshape(-1, vocab), 4, replacement=True, generator=g).reshape(B, T, 4)
    return dict(
        hidden=hidden,
        head=LMHead(weight=weight, bias=b, softcap=softcap),
        teacher=teacher,
        input_ids=torch.randint(0, vocab, (B, T), generator=g),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        topk_log_tail=teacher.scatter(-1, topk_ids, -torch.inf).logsumexp(-1),
        topk_log_z=log_z(teacher, 2.0),
        sample_ids=draws,
        sample_counts=torch.ones(B, T, 4),
        sample_total=torch.full((B, T), 4.0),
    )


def logits_of(case):
    """The head's logits, computed the obvious way (autograd through F.linear and the soft-cap)."""
    head = case["head"]
    z = F.linear(case["hidden"], head.weight, head.bias)  # (B, T, V)
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


def params(case):
    head = case["head"]
    return [t for t in (case["hidden"], head.weight, head.bias) if t is not None]


def targets_for(case, kind):
    return {name: case[name] for name in TARGET_KEYS[kind] if name in case}


def spec_for(kind, **kw):
    return KDLossSpec(kind=kind, alpha=0.7, temperature=2.0 if kind in (*TAIL_KINDS, "topk_renorm") else 1.0, **kw)


def fused(case, spec, **extra):
    kw = targets_for(case, spec.kind) | extra
    return kd_loss_from_hidden(case["hidden"], case["head"], input_ids=case["input_ids"], spec=spec, **kw)


def grads(loss, case):
    return torch.autograd.grad(loss, params(case))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_head_equals_the_logits_path_values_and_grads_of_hidden_weight_and_bias(kind, softcap):
    case = head_case(softcap=softcap)
    spec = spec_for(kind)
    out = fused(case, spec)
    ref = kd_loss(logits_of(case), input_ids=case["input_ids"], spec=spec, **targets_for(case, kind))
    assert_close(out.loss, ref.loss)
    assert_close(out.kd, ref.kd)
    assert_close(out.ce, ref.ce)
    assert out.n_tokens == ref.n_tokens and out.n_ce_tokens == ref.n_ce_tokens
    for a, b in zip(grads(out.loss, case), grads(ref.loss, case), strict=True):
        assert_close(a, b)


@pytest.mark.parametrize(("kind", "tau"), [("topk_tail", 1.0), ("topk_tail", 2.0), ("jsd", 0.5), ("ce", 1.0)])
def test_fused_head_equals_the_dense_float64_reference(kind, tau):
    case = head_case(seed=1, softcap=4.0)
    spec = KDLossSpec(kind=kind, alpha=0.6, temperature=tau)
    extra = {"topk_log_z": log_z(case["teacher"], tau)} if tau != 1.0 else {}
    out = fused(case, spec, **extra)
    logits = logits_of(case)
    ce = ref_ce(logits, case["input_ids"])
    if kind == "ce":
        ref = ce
    else:
        kd = kd_scale(kind, tau) * ref_kd(kind, case["teacher"], logits, topk_keep(case), tau=tau).mean()
        ref = 0.6 * kd + 0.4 * ce
    assert_close(out.loss, ref)
    for a, b in zip(grads(out.loss, case), grads(ref, case), strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("kind", ["ce", "sampled", "topk_tail", "jsd"])
def test_fused_head_chunked_equals_unchunked(kind):
    case = head_case(seed=2, softcap=2.0)
    small, big = fused(case, spec_for(kind, chunk_tokens=3)), fused(case, spec_for(kind, chunk_tokens=10_000))
    assert_close(small.loss, big.loss)
    for a, b in zip(grads(small.loss, case), grads(big.loss, case), strict=True):
        assert_close(a, b)


def test_fused_head_allocates_no_logits_sized_tensor_and_its_counted_workspaces_fit_the_budget():
    """V = 262,144, 8 positions in chunks of 2 rows: no (N, V) tensor, and the peak beyond the gradients
    (hidden, weight, bias) is the (2, V) fp32 workspaces ``workspaces`` counts: logits, soft-cap
    derivative and tempered softmax (jsd at tau = 2)."""
    vocab, budget, g = 262_144, 7 << 20, torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 8, 4, generator=g).requires_grad_()  # width 4: the weight gradient has 4 V < 8 V
    weight, bias = torch.randn(vocab, 4, generator=g).requires_grad_(), torch.zeros(vocab).requires_grad_()
    teacher = torch.randn(1, 8, vocab, generator=g).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(8, -1)
    spec = KDLossSpec(kind="jsd", temperature=2.0, chunk_budget_bytes=budget)
    assert spec.rows_per_chunk(vocab) == 2
    targets = dict(topk_ids=topk_ids, topk_logprobs=topk_logprobs, topk_log_z=log_z(teacher, 2.0))
    head = LMHead(weight=weight, bias=bias, softcap=30.0)
    with _CountLogitsSizedAllocations(8 * vocab) as counter, _PeakLiveBytes(hidden, weight, bias, teacher) as memory:
        kd_loss_from_hidden(hidden, head, input_ids=topk_ids[..., 0], spec=spec, **targets).loss.backward()
    assert counter.count == 0
    buffers = workspaces(spec, owned=True, softcap=True)
    assert buffers == WORKING_BUFFERS == 3
    gradients = (weight.numel() + bias.numel() + hidden.numel()) * 4
    working_set = memory.peak - gradients
    assert buffers * 2 * vocab * 4 <= working_set < buffers * 2 * vocab * 4 + (64 << 10) <= budget


def test_a_second_backward_is_refused_with_a_clear_message():
    case = head_case()
    out = fused(case, spec_for("topk_tail"))
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        out.loss.backward()


def test_no_grad_forward_gives_the_same_values():
    case = head_case(seed=3)
    with torch.no_grad():
        quiet = fused(case, spec_for("topk_tail"))
    assert_close(quiet.loss, fused(case, spec_for("topk_tail")).loss.detach())


def test_misfit_head_is_refused_naming_it():
    case = head_case()
    with pytest.raises(ValueError, match="head weight"):
        kd_loss_from_hidden(
            case["hidden"], LMHead(weight=torch.zeros(V, H + 1)), input_ids=case["input_ids"], spec=KDLossSpec("ce")
        )


# --- real families: the fused head against the model's own full-logits forward ------------------------


FAMILIES = {
    "llama": dict(tie_word_embeddings=True),  # the default student: a tied head
    "qwen2": dict(tie_word_embeddings=False),
    "phi": dict(),  # a head bias
    "gemma2": dict(final_logit_softcapping=3.0, head_dim=16),  # tied and soft-capped
    "gemma3_text": dict(final_logit_softcapping=2.0, head_dim=16, sliding_window=4),
}


def tiny(family, **extra):
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=40, num_key_value_heads=2, **SMALL, **extra)
    return AutoModelForCausalLM.from_config(config).double()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_fused_family_matches_its_full_logits_forward_in_loss_and_every_parameter_gradient(family):
    model = tiny(family, **FAMILIES[family])
    head, why = fused_head(model)
    assert head is not None, why
    assert (head.bias is not None) == (family == "phi")
    assert (head.softcap is not None) == family.startswith("gemma")
    tied = model.config.tie_word_embeddings
    assert (head.weight is model.get_input_embeddings().weight) == tied
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    teacher = torch.randn(2, 9, 40, generator=g, dtype=F64).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(5, -1)
    spec = KDLossSpec(kind="topk_tail", alpha=0.5, chunk_tokens=4)
    targets = dict(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    out = kd_loss_from_hidden(final_hidden_states(model, ids), head, input_ids=ids, spec=spec, **targets)
    out.loss.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = kd_loss(model(input_ids=ids).logits, input_ids=ids, spec=spec, **targets)
    ref.loss.backward()
    assert_close(out.loss, ref.loss)
    for name, p in model.named_parameters():
        assert_close(fused_grads[name], p.grad)  # the tied embedding gets its head gradient added once
    if tied:
        no_head = kd_loss(model(input_ids=ids).logits.detach(), input_ids=ids, spec=spec, **targets)
        assert no_head.loss.grad_fn is None  # (sanity) the head's share is what makes the difference


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_heads_with_a_logit_scale_keep_the_full_logits_path_naming_the_reason(family):
    head, why = fused_head(tiny(family))
    assert head is None and family in why and family not in FUSED_FAMILIES
