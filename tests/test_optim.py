"""The optimizer and schedule shared by the trainer and the demo teacher."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdcache.optim import lr_factor, lr_scheduler, make_optimizer


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    factors = [lr_factor(s, warmup_steps=4, max_steps=14, min_lr_ratio=0.1) for s in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[9] == pytest.approx(0.55) and factors[14] == pytest.approx(0.1)
    assert factors[15] == pytest.approx(0.1)  # past the budget: stays at the floor
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_no_warmup_starts_at_the_peak() -> None:
    assert lr_factor(0, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == 1.0


def test_matrices_decay_and_norms_and_tied_embeddings_do_not() -> None:
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    embed = model.get_input_embeddings().weight
    assert any(p is embed for p in no_decay["params"]) and all(p is not embed for p in decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"] if p is not embed)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_scheduler_follows_lr_factor() -> None:
    model = torch.nn.Embedding(4, 2)
    opt = make_optimizer(_Wrap(model), lr=2.0, weight_decay=0.0)
    sched = lr_scheduler(opt, warmup_steps=2, max_steps=6, min_lr_ratio=0.5)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * lr_factor(s, warmup_steps=2, max_steps=6, min_lr_ratio=0.5) for s in range(7)])


class _Wrap(torch.nn.Module):
    def __init__(self, embed: torch.nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed
