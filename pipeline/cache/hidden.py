"""Hidden-state (feature) targets of the cache stage (issue 11.3): which teacher layers, the stored projection,
and the projected, int8-quantized states of a batch, computed on the teacher's device.

``cache.hidden_layers`` index the teacher's ``output_hidden_states`` (0 = the embeddings, i = the output of
decoder layer i, the last = the final normed state the LM head reads; negative counts from the end) and are
stored non-negative. Each layer's (H,) state is projected by one (H, ``cache.hidden_dim``) matrix with
orthonormal columns, chosen by ``cache.hidden_projection``:

- ``orthogonal``: the Q of a QR decomposition of a float64 Gaussian drawn from ``cache.seed`` (numpy's PCG64),
  signs fixed so that R's diagonal is positive, cast to float32. Needs no data.
- ``pca``: the top ``hidden_dim`` principal axes of the listed layers' states (pooled) at every position of the
  token split's first ``PCA_SAMPLE_ROWS`` rows (the same rows on every rank and every rerun), from their float64
  mean and covariance, by decreasing variance, each axis's sign set so that its largest-magnitude entry is
  positive, cast to float32. The states come from the teacher's forward as the build runs it (device, dtype,
  ``cache.teacher_context``), so the matrix, like the targets, is reproducible for the same teacher, device
  type and dtype; the values stored are ``state @ matrix`` (not centred).

The matrix is saved in the cache directory as ``PROJECTION_FILE`` and checked against
``targets.hidden.projection.sha256`` wherever it is read. Format: ``kdcache.cache.hidden_format`` (which also
saves, loads and checks the projection file).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import numpy as np
import torch

from kdcache.cache.hidden_format import HIDDEN_LEVELS, HiddenSpec, projection_sha256
from kdcache.cache.writer import CacheWriteError
from kdcache.config.cache import CacheConfig
from kdcache.layer_taps import hook_output, layer_module, model_shape
from kdcache.teacher import Teacher, context_hidden
from kdcache.teacher_context import load_teacher_context
from kdcache.token_data import TokenSplit

PCA_SAMPLE_ROWS = 64
"""``cache.hidden_projection: pca`` is fitted on the states at every position of the token split's first 64 rows."""

_PCA_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""teacher model -> {(sample, layers, dim): (H, dim) matrix}: one fit per build, though its identity asks thrice."""


def orthogonal_projection(width: int, dim: int, seed: int) -> np.ndarray:
    """(width, dim) float32 with orthonormal columns: Q of a seeded float64 Gaussian's QR, R's diagonal made > 0."""
    gauss = np.random.default_rng(seed).standard_normal((width, dim))  # (H, dim) float64
    q, r = np.linalg.qr(gauss)
    return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).astype(np.float32)


def pca_projection(states: Iterable[torch.Tensor], dim: int) -> np.ndarray:
    """(H, dim) float32: the top ``dim`` principal axes of the rows of ``states`` (each (n, H), any device and
    dtype), from their float64 mean and covariance; by decreasing variance, each axis's largest-|entry| > 0.

    Raises ValueError when the rows cannot fix ``dim`` axes (fewer than ``dim + 1`` of them) or are not finite."""
    count, total, gram = 0, None, None
    for x in states:
        x = x.detach().to(torch.float64)  # (n, H), on its own device
        count += x.shape[0]
        total = x.sum(0) if total is None else total + x.sum(0)  # (H,)
        gram = x.T @ x if gram is None else gram + x.T @ x  # (H, H)
    if count <= dim:
        raise ValueError(f"{count} states fix at most {max(count - 1, 0)} principal axes, not {dim}")
    mean = (total / count).cpu().numpy()  # (H,)
    cov = gram.cpu().numpy() / count - np.outer(mean, mean)  # (H, H) float64
    if not np.isfinite(cov).all():
        raise ValueError("the states are not all finite")
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)  # ascending
    axes = vectors[:, np.argsort(-values, kind="stable")[:dim]]  # (H, dim)
    peak = np.abs(axes).argmax(axis=0)  # (dim,)
    return (axes * np.where(axes[peak, np.arange(dim)] < 0, -1.0, 1.0)).astype(np.float32)


def _pca_of_sample(cfg: CacheConfig, teacher: Teacher, tokens: TokenSplit, layers: tuple[int, ...]) -> np.ndarray:
    """``pca_projection`` of ``layers``' states at every position of the first ``PCA_SAMPLE_ROWS`` rows of
    ``tokens``, run as the build runs them (``forward_with_layers``, ``cache.teacher_context``); memoized per
    teacher model."""
    rows = min(PCA_SAMPLE_ROWS, len(tokens))
    key = (tokens.fingerprint, tokens.split, rows, cfg.teacher_context, layers, cfg.hidden_dim)
    fitted = _PCA_FITTED.setdefault(teacher.model, {})
    if key in fitted:
        return fitted[key]
    context = load_teacher_context(cfg.teacher_context, teacher, seq_len=tokens.seq_len)
    ids = np.asarray(tokens.ids[:rows], dtype=np.int64)  # (rows, T)
    if ids.size and (ids.min() < 0 or ids.max() >= teacher.vocab_size):
        raise CacheWriteError(
            f"token split {tokens.split!r} holds ids outside the teacher's [0, {teacher.vocab_size}) — rerun "
            "prepare with this teacher's tokenizer"
        )

    def states() -> Iterable[torch.Tensor]:
        for b in range(0, rows, cfg.batch_size):
            with torch.inference_mode():
                _, per_layer = forward_with_layers(
                    teacher, torch.from_numpy(ids[b : b + cfg.batch_size]), layers, context.ids if context else ()
                )
            yield from (s.reshape(-1, s.shape[-1]) for s in per_layer)  # (B * T, H) each

    try:
        fitted[key] = pca_projection(states(), cfg.hidden_dim)
    except ValueError as e:
        raise CacheWriteError(
            f"cache.hidden_projection: pca on the teacher's states at the {rows * tokens.seq_len} positions of "
            f"the first {rows} rows of split {tokens.split!r}: {e}; lower cache.hidden_dim or set "
            "cache.hidden_projection: orthogonal"
        ) from e
    return fitted[key]


def hidden_targets(
    cfg: CacheConfig, teacher: Teacher, tokens: TokenSplit | None = None
) -> tuple[HiddenSpec, np.ndarray] | None:
    """The manifest's ``targets.hidden`` and the (H, dim) projection for ``cfg`` (None: no hidden targets).

    ``tokens``: the split being cached (``cache.hidden_projection: pca`` is fitted on its first rows).
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
    if cfg.hidden_projection == "pca":
        if tokens is None:
            raise ValueError("hidden_targets: cache.hidden_projection pca needs the token split it is fitted on")
        matrix = _pca_of_sample(cfg, teacher, tokens, tuple(layers))
    else:
        matrix = orthogonal_projection(width, cfg.hidden_dim, cfg.seed)
    spec = HiddenSpec(tuple(layers), cfg.hidden_dim, cfg.hidden_projection, cfg.seed, projection_sha256(matrix))
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
