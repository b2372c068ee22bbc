"""Hidden-state (feature) targets of the cache stage (issue 11.3): which teacher layers, the stored projection,
and the projected, int8-quantized states of a batch, computed on the teacher's device.

``cache.hidden_layers`` index the teacher's ``output_hidden_states`` (0 = the embeddings, i = the output of
decoder layer i, the last = the final normed state the LM head reads; negative counts from the end) and are
stored non-negative. Each layer's (H,) state is projected by one (H, ``cache.hidden_dim``) matrix with
orthonormal columns -- the Q of a QR decomposition of a float64 Gaussian drawn from ``cache.seed`` (numpy's
PCG64), signs fixed so that R's diagonal is positive, cast to float32 -- saved in the cache directory as
``PROJECTION_FILE`` and checked against ``targets.hidden.projection.sha256`` wherever it is read. Format:
``kdcache.cache.hidden_format`` (which also saves, loads and checks the projection file).
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.cache.hidden_format import HIDDEN_LEVELS, HiddenSpec, projection_sha256
from kdcache.cache.writer import CacheWriteError
from kdcache.config.cache import CacheConfig
from kdcache.layer_taps import hook_output, layer_module, model_shape
from kdcache.teacher import Teacher, context_hidden


def orthogonal_projection(width: int, dim: int, seed: int) -> np.ndarray:
    """(width, dim) float32 with orthonormal columns: Q of a seeded float64 Gaussian's QR, R's diagonal made > 0."""
    gauss = np.random.default_rng(seed).standard_normal((width, dim))  # (H, dim) float64
    q, r = np.linalg.qr(gauss)
    return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).astype(np.float32)


def hidden_targets(cfg: CacheConfig, teacher: Teacher) -> tuple[HiddenSpec, np.ndarray] | None:
    """The manifest's ``targets.hidden`` and the (H, dim) projection for ``cfg`` (None: no hidden targets).

    Refuses a layer outside the teacher's ``output_hidden_states``, two names for one layer, and a
    ``hidden_dim`` above the teacher's width, naming the field and the fix."""
    if not cfg.hidden_layers:
        return None
    num_layers, width = model_shape(teacher.model)
    where = f"the teacher ({teacher.info['path']}: {num_layers} layers, width {width})"
    layers = []
    for layer in cfg.hidden_layers:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise CacheWriteError(
                f"cache.hidden_layers: layer {layer} is outside {where}'s output_hidden_states "
                f"[{-(num_layers + 1)}, {num_layers}] (0 = embeddings, {num_layers} or -1 = the final normed state); "
                "pick layers in that range"
            )
        layers.append(layer % (num_layers + 1))
    if any(layer_module(teacher.model, layer, num_layers) is None for layer in layers):
        raise CacheWriteError(
            f"cache.hidden_layers: {type(teacher.model).__name__}'s decoder has no list of {num_layers} layers "
            "kdcache can tap for an intermediate layer; set cache.hidden_layers: [-1] (the final state)"
        )
    if len(set(layers)) != len(layers):
        raise CacheWriteError(f"cache.hidden_layers: {list(cfg.hidden_layers)} names one layer of {where} twice")
    if cfg.hidden_dim > width:
        raise CacheWriteError(
            f"cache.hidden_dim: {cfg.hidden_dim} > the hidden width of {where}; set cache.hidden_dim <= {width}"
        )
    matrix = orthogonal_projection(width, cfg.hidden_dim, cfg.seed)
    spec = HiddenSpec(tuple(layers), cfg.hidden_dim, "orthogonal", cfg.seed, projection_sha256(matrix))
    return spec, matrix


def forward_with_layers(
    teacher: Teacher, input_ids: torch.Tensor, layers: tuple[int, ...], context: tuple[int, ...] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``kdcache.teacher.context_hidden``'s forward (the final hidden states (B, T, H) that feed the LM head,
    unchanged) plus ``output_hidden_states[L]`` (B, T, H) of each L in ``layers``, cut to the rows' positions.

    Intermediate layers are captured by forward hooks on their modules (``kdcache.layer_taps``), so only the
    listed layers' states are kept, never all of them."""
    num_layers, _ = model_shape(teacher.model)
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer_module(teacher.model, L, num_layers).register_forward_hook(
            lambda _module, _args, out, L=L: captured.__setitem__(L, hook_output(out))
        )
        for L in layers
        if num_layers != L
    ]
    try:
        final = context_hidden(teacher, input_ids, context)  # (B, T, H), the context already cut
    finally:
        for hook in hooks:
            hook.remove()
    cut = len(context)
    return final, [final if num_layers == L else captured[L][:, cut:].to(final.device) for L in layers]


def project_quantize(state: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, T, H) hidden states x (H, dim) float32 projection -> int8 codes (B, T, dim), float16 scales (B, T)
    with value = code x scale, scale = max |value| / 127 rounded to float16 (symmetric absmax), and (B,) True
    where a row's projected values or scales are not finite. All on the states' device."""
    with torch.inference_mode():
        z = state.float() @ projection.to(state.device)  # (B, T, dim) float32
        scale = (z.abs().amax(dim=-1) / HIDDEN_LEVELS).to(torch.float16)  # (B, T)
        s = scale.float().unsqueeze(-1)  # (B, T, 1): quantize against the stored (rounded) scale
        codes = torch.where(s > 0, torch.round(z / torch.where(s > 0, s, 1.0)), 0.0)
        codes = codes.clamp(-HIDDEN_LEVELS, HIDDEN_LEVELS).to(torch.int8)
        bad = ~(torch.isfinite(z).all(dim=-1) & torch.isfinite(scale)).all(dim=-1)  # (B,)
    return codes, scale, bad
