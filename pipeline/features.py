"""Feature (hidden-state) distillation against a cache's stored teacher hidden states (issue 11.3).

The cache stores, per position, teacher layer L's hidden state projected to ``dim`` (``targets.hidden``;
``kdcache.cache.hidden``). The student learns a linear map W (dim, H_s), no bias, from its ``train.feature_layer``
hidden state h (H_s,) to that space, and the loss adds ``train.feature_weight`` x

- ``mse``: mean over dims of (W h - t)^2, or
- ``cosine``: 1 - cos(W h, t),

averaged over the positions that carry a loss (``ce_mask`` where the batch has one; every position otherwise),
computed in float32. The map is a submodule of the student (``FEATURE_MAP``), so the optimizer trains it,
DDP averages its gradients and checkpoints save and resume it with the student; ``detach_feature_map`` drops
it before the student is exported, so the exported Hugging Face model is the plain student. The teacher
layer is the cache's last listed one (``targets.hidden.layers[-1]``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdcache.cache.format import MANIFEST_NAME, TargetLayout
from kdcache.config.base import ConfigError
from kdcache.config.train import TrainConfig
from kdcache.layer_taps import hook_output, layer_module, model_shape
from kdcache.losses import LossOutput

FEATURE_MAP = "kdcache_feature_map"
"""Attribute of the student holding the feature map (an ``nn.Linear(H_s, dim, bias=False)``) during training."""


def feature_loss(hidden: Tensor, weight: Tensor, target: Tensor, mask: Tensor | None, kind: str) -> Tensor:
    """Mean feature loss of (B, T, H_s) student states mapped by ``weight`` (dim, H_s) against (B, T, dim)
    targets over the positions where ``mask`` (B, T) is True (all when None); float32 whatever the inputs."""
    with torch.autocast(hidden.device.type, enabled=False):
        pred = hidden.float() @ weight.float().T  # (B, T, dim)
        target = target.float()
        if kind == "mse":
            per = (pred - target).pow(2).mean(dim=-1)  # (B, T)
        elif kind == "cosine":
            per = 1.0 - torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-8)  # (B, T)
        else:
            raise ValueError(f"train.feature_loss must be mse|cosine, got {kind!r}")
        if mask is None:
            return per.mean()
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp_min(1.0)


class FeatureTap:
    """Captures the student's chosen hidden state in each forward and adds the weighted feature loss."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module, *, key: str, cfg: TrainConfig) -> None:
        self.model, self.key, self.weight, self.kind = model, key, cfg.feature_weight, cfg.feature_loss
        self._captured: list[Tensor] = []
        self._hook = module.register_forward_hook(self._capture)

    def _capture(self, _module: Any, _args: Any, out: Any) -> None:
        self._captured.append(hook_output(out))

    @property
    def keys(self) -> tuple[str, ...]:
        """Batch keys the tap needs from the reader: the stored teacher layer."""
        return (self.key,)

    def add_to(self, out: LossOutput, batch: dict[str, Tensor], device: torch.device) -> LossOutput:
        """``out`` with ``feature_weight`` x the feature loss of this micro-batch's forward added to its loss."""
        if len(self._captured) != 1:
            n, self._captured = len(self._captured), []
            raise RuntimeError(f"train.feature_layer: the tapped module ran {n} times in one forward (expected once)")
        state, self._captured = self._captured[0], []
        target = batch[self.key].to(device, non_blocking=True)  # (B, T, dim)
        mask = batch["ce_mask"].to(device, non_blocking=True) if "ce_mask" in batch else None
        loss = feature_loss(state, getattr(self.model, FEATURE_MAP).weight, target, mask, self.kind)
        return replace(out, loss=out.loss + self.weight * loss)

    def close(self) -> None:
        self._hook.remove()


def attach_features(
    cfg: TrainConfig, model: torch.nn.Module, layout: TargetLayout, *, cache_dir: str | Path, world: int = 1
) -> FeatureTap | None:
    """With ``train.feature_weight`` > 0: add the feature map to ``model`` (before its optimizer is made) and
    tap its ``feature_layer``; refuses a cache without hidden-state targets and a layer out of range."""
    if cfg.feature_weight == 0:
        return None
    if layout.hidden is None:
        raise ConfigError(
            f"{Path(cache_dir) / MANIFEST_NAME}: train.feature_weight is {cfg.feature_weight} but the cache has no "
            "hidden-state targets (manifest targets.hidden); rebuild it with cache.hidden_layers (e.g. [-1]), or "
            "set train.feature_weight: 0"
        )
    if cfg.cross_tokenizer != "none" or len(cfg.caches) > 1 or (cfg.parallel == "fsdp" and world > 1):
        raise ConfigError(
            "train.feature_weight: the feature loss needs one same-tokenizer cache and no FSDP (train.caches, "
            "train.cross_tokenizer, train.parallel); set train.feature_weight: 0 for this run"
        )
    num_layers, width = model_shape(model)
    if not -(num_layers + 1) <= cfg.feature_layer <= num_layers:
        raise ConfigError(
            f"train.feature_layer: {cfg.feature_layer} is outside the student's output_hidden_states "
            f"[{-(num_layers + 1)}, {num_layers}] ({num_layers} layers: 0 = embeddings, -1 = the final state); "
            "pick a layer in that range"
        )
    module = layer_module(model, cfg.feature_layer % (num_layers + 1), num_layers)
    if module is None:
        raise ConfigError(
            f"train.feature_layer: {cfg.feature_layer} — {type(model).__name__}'s decoder has no list of "
            f"{num_layers} layers kdcache can tap; set train.feature_layer: -1 (the final state)"
        )
    model.add_module(FEATURE_MAP, torch.nn.Linear(width, layout.hidden.dim, bias=False))
    key = next(reversed(layout.hidden.columns()))  # hidden_<L> of the cache's last listed layer
    return FeatureTap(model, module, key=key, cfg=cfg)


def detach_feature_map(model: torch.nn.Module) -> None:
    """Remove the feature map (if any) from the student, e.g. before exporting it."""
    if hasattr(model, FEATURE_MAP):
        delattr(model, FEATURE_MAP)
