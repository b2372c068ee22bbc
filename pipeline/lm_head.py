"""A student's LM head for the fused loss (``kdcache.losses.kd_loss_from_hidden``): which heads can be
fused, and the hidden states that feed them, without computing the (B, T, V) logits.

A head is fused only for model families whose ``ForCausalLM.forward`` is exactly
``logits = lm_head(decoder(...).last_hidden_state)`` -- optionally soft-capped -- as read in their
transformers code (``FUSED_FAMILIES``; each is tested against its full-logits forward in
tests/test_fused_head.py). Others (a logit scale such as Cohere's ``logit_scale`` or Granite's
``logits_scaling``, a head that is not one ``nn.Linear``, unknown families) keep the full-logits path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["FUSED_FAMILIES", "LMHead", "final_hidden_states", "fused_head"]

FUSED_FAMILIES: dict[str, str | None] = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "phi3": None,
    "phi": None,  # a head bias
    "gemma": None,
    "olmo2": None,
    "smollm3": None,
    "gemma2": "final_logit_softcapping",
    "gemma3_text": "final_logit_softcapping",
}
"""``config.model_type`` -> the config field holding its final-logit soft-cap (None: the head is plain)."""


@dataclass(frozen=True)
class LMHead:
    """A student's output layer as the fused loss computes it: logits = cap * tanh((h W^T + b) / cap)."""

    weight: Tensor
    """(V, H) the head's weight (the input embedding for a tied head: its gradient accumulates there)."""
    bias: Tensor | None = None
    """(V,) or None."""
    softcap: float | None = None
    """Final-logit soft-capping (Gemma-2/3), or None."""


def fused_head(model: torch.nn.Module) -> tuple[LMHead | None, str]:
    """(the head to pass to ``kd_loss_from_hidden``, "") or (None, why the full logits are computed instead).

    ``model`` is a transformers causal LM (or a DDP wrapper of one); the head's weight is the
    parameter itself (the input embedding when tied), so its gradient lands where the optimizer looks.
    """
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FUSED_FAMILIES:
        known = ", ".join(sorted(FUSED_FAMILIES))
        return None, f"model type {family!r} is not a family whose head kdcache fuses ({known})"
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None, f"its output layer is a {type(head).__name__}, not one torch.nn.Linear"
    cap_field = FUSED_FAMILIES[family]
    softcap = getattr(config, cap_field, None) if cap_field else None
    return LMHead(weight=head.weight, bias=head.bias, softcap=None if softcap is None else float(softcap)), ""


def final_hidden_states(model: torch.nn.Module, input_ids: Tensor, **kwargs: Any) -> Tensor:
    """(B, T, H): the input of ``model``'s LM head -- its decoder's output -- from a forward through
    ``model`` itself (a DDP wrapper runs its hooks) that asks for logits at no position (``logits_to_keep``)."""
    inner = getattr(model, "module", model)
    captured: list[Tensor] = []
    hook = inner.get_decoder().register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
    try:
        model(input_ids=input_ids, logits_to_keep=input_ids.new_zeros(0), **kwargs)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"final_hidden_states: the decoder of {type(inner).__name__} ran {len(captured)} times in one "
            "forward; its head cannot be fused (use the full-logits path: kd_loss on model(...).logits)"
        )
    return captured[0]
