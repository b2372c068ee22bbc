"""train.token_filter: which positions keep their KD term (by teacher NLL or entropy), checked by hand,
and the loss and its gradient with the filter equal a float64 dense computation over the kept positions."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.config.base import ConfigError, load_section
from kdcache.config.token_filter import TokenFilterConfig
from kdcache.config.train import TrainConfig
from kdcache.losses import KDLossSpec, kd_loss
from kdcache.token_filter import apply_token_filter, kept_positions
from kdcache.train_data import prepare_batch

NAN = math.nan
SIGNAL = torch.tensor([[0.5, 2.0, 0.1, NAN], [3.0, 0.5, 1.0, NAN]])  # (B=2, T=4); NaN: no next token


@pytest.mark.parametrize(
    ("keep", "fraction", "want"),
    [
        # eligible: 6 finite values 0.5 2.0 0.1 | 3.0 0.5 1.0 (row-major); low: 0.1 < 0.5 = 0.5 (earlier first)
        ("low", 0.5, [[1, 0, 1, 0], [0, 1, 0, 0]]),  # ceil(3) = 3: 0.1, 0.5 (row 0), 0.5 (row 1)
        ("low", 0.3, [[1, 0, 1, 0], [0, 0, 0, 0]]),  # ceil(1.8) = 2: 0.1, then the earlier of the tied 0.5s
        ("high", 0.5, [[0, 1, 0, 0], [1, 0, 1, 0]]),  # 3.0, 2.0, 1.0
        ("high", 1.0, [[1, 1, 1, 0], [1, 1, 1, 0]]),  # all finite positions
        ("low", 0.01, [[0, 0, 1, 0], [0, 0, 0, 0]]),  # at least one
    ],
)
def test_kept_positions_by_hand(keep: str, fraction: float, want: list) -> None:
    cfg = TokenFilterConfig(by="nll", keep=keep, fraction=fraction)
    assert kept_positions(SIGNAL, cfg).tolist() == torch.tensor(want, dtype=torch.bool).tolist()


def test_only_kd_positions_are_ranked_and_ce_keeps_every_position() -> None:
    loss_mask = torch.tensor([[True, True, False, True], [True, True, True, True]])  # 0.1 is padding: not ranked
    batch = {"teacher_nll": SIGNAL, "loss_mask": loss_mask, "ce_mask": loss_mask.clone()}
    out = apply_token_filter(batch, TokenFilterConfig(by="nll", keep="low", fraction=0.4))  # ceil(2) of 5
    assert out["loss_mask"].tolist() == [[True, False, False, False], [False, True, False, False]]
    assert torch.equal(out["ce_mask"], loss_mask)  # CE untouched
    assert apply_token_filter(batch, TokenFilterConfig()) is batch  # by: none


def test_prepare_batch_applies_the_filter_after_document_padding() -> None:
    ids = torch.tensor([[5, 6, 7, 1], [5, 6, 7, 8]])  # pad id 1 ends row 0
    packing = {"mode": "documents", "eos_id": 0, "pad_id": 1}
    batch = {"input_ids": ids, "teacher_entropy": torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 6.0, 7.0]])}
    cfg = TokenFilterConfig(by="entropy", keep="high", fraction=0.5)
    _, out = prepare_batch(((0, 1), batch), vmap=None, pin=False, packing=packing, token_filter=cfg)
    real = out["ce_mask"]
    assert real.tolist() == [[True, True, False, False], [True, True, True, False]]  # no target before padding
    assert out["loss_mask"].sum() == math.ceil(0.5 * int(real.sum()))  # 3 of the 5 real positions
    assert out["loss_mask"].tolist() == [[False, False, False, False], [True, True, True, False]]


def test_filtered_kd_loss_and_gradient_equal_a_dense_float64_mean_over_kept_positions() -> None:
    """k = V top-k: the KD term is the dense KL; with the filter it is the mean over the kept positions
    only, and positions that are not kept get no KD gradient (CE still reaches every position)."""
    B, T, V = 2, 4, 8
    gen = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    student = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=gen)
    kept = kept_positions(SIGNAL, TokenFilterConfig(by="nll", keep="low", fraction=0.5))  # 3 positions
    targets = {"topk_ids": torch.arange(V).expand(B, T, V), "topk_logprobs": teacher}
    for alpha in (1.0, 0.5):
        spec = KDLossSpec(kind="topk_tail", alpha=alpha, chunk_tokens=3)
        out = kd_loss(student, input_ids=ids, spec=spec, loss_mask=kept, **targets)
        (grad,) = torch.autograd.grad(out.loss, student)
        logq = torch.log_softmax(student, -1)
        kl = (teacher.exp() * (teacher - logq)).sum(-1)  # (B, T) dense KL, float64
        ce = -logq[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): position t predicts ids[t+1]
        want = alpha * kl[kept].mean() + (1 - alpha) * ce.mean()
        (want_grad,) = torch.autograd.grad(want, student)
        torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-12)
        if alpha == 1.0:
            assert grad[~kept].abs().max() == 0  # no KD gradient where the filter drops the position
            assert grad[kept].abs().max() > 0


def test_token_filter_config_is_validated_and_loads_from_params() -> None:
    cfg = load_section(
        TrainConfig, {"token_filter": {"by": "entropy", "keep": "high", "fraction": 0.25}}, section="train"
    )
    assert cfg.token_filter == TokenFilterConfig(by="entropy", keep="high", fraction=0.25)
    with pytest.raises(ConfigError, match=r"train.token_filter.fraction: must be in \(0, 1\]"):
        TokenFilterConfig(by="nll", fraction=0.0)
    with pytest.raises(ConfigError, match="train.token_filter.by: must be one of none|nll|entropy"):
        load_section(TrainConfig, {"token_filter": {"by": "loss"}}, section="train")
