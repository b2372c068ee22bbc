"""The hidden-state targets' part of the cache contract (format 2, issue 11.3): manifest ``targets.hidden``
and its columns.

``targets.hidden`` = ``{layers, dim, projection: {kind, seed, sha256}}``: for each teacher layer L (an index
into the teacher's ``output_hidden_states``, made non-negative when the cache is built) the hidden state
(H,) is projected to ``dim`` by the matrix stored in the cache directory (``PROJECTION_FILE``, (H, dim)
float32; ``sha256`` is the digest of its float32 little-endian row-major bytes) and stored per position as
``hidden_<L>`` (T, dim) int8 and ``hidden_scale_<L>`` (T,) float16: value = int8 x scale, with
scale = max |value| / 127 (symmetric absmax). ``format`` imports this module; nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.cache.codec import CacheFormatError

HIDDEN_COLUMN = "hidden_{layer}"
"""(T, dim) int8 projected hidden states of teacher layer ``layer`` (``targets.hidden.layers``), byte planes."""
HIDDEN_SCALE_COLUMN = "hidden_scale_{layer}"
"""(T,) float16 per-position scale of ``hidden_<layer>`` (value = int8 * scale; symmetric absmax / 127)."""
HIDDEN_DTYPE = np.dtype("i1")
HIDDEN_SCALE_DTYPE = np.dtype("<f2")
HIDDEN_LEVELS = 127
"""int8 codes are in [-127, 127]: a position's largest |value| is code +-127."""
PROJECTION_KINDS = ("orthogonal", "pca")
PROJECTION_FILE = "hidden_projection.safetensors"
"""The projection matrix in the cache directory: one float32 tensor ``projection`` of shape (H, dim)."""
PROJECTION_KEY = "projection"
"""The tensor's name inside ``PROJECTION_FILE``."""


@dataclass(frozen=True)
class HiddenSpec:
    """Manifest ``targets.hidden``: which teacher layers are stored, their projected width and the projection."""

    layers: tuple[int, ...]
    dim: int
    kind: str = "orthogonal"
    seed: int = 0
    sha256: str = ""

    def __post_init__(self) -> None:
        def integer(x: Any, low: int, high: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high

        if not (
            isinstance(self.layers, tuple)
            and self.layers
            and all(integer(x, 0, 1 << 16) for x in self.layers)
            and len(set(self.layers)) == len(self.layers)
            and integer(self.dim, 1, 1 << 16)
            and self.kind in PROJECTION_KINDS
            and integer(self.seed, -(1 << 63), 1 << 64)
            and re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)) is not None
        ):
            raise CacheFormatError(
                "targets.hidden must be {layers (distinct integers >= 0), dim (>= 1), projection {kind "
                f"({'|'.join(PROJECTION_KINDS)}), seed (an integer), sha256 (64 hex digits)}}}}, got {self.to_dict()!r}"
            )

    def columns(self) -> dict[str, str]:
        """``hidden_<L>`` -> ``hidden_scale_<L>`` per stored layer, in manifest order."""
        return {HIDDEN_COLUMN.format(layer=L): HIDDEN_SCALE_COLUMN.format(layer=L) for L in self.layers}

    def blob_dtypes(self) -> dict[str, np.dtype]:
        out: dict[str, np.dtype] = {}
        for h, scale in self.columns().items():
            out |= {h: HIDDEN_DTYPE, scale: HIDDEN_SCALE_DTYPE}
        return out

    def shapes(self, seq_len: int) -> dict[str, tuple[int, ...]]:
        """One row's array shape per column: (T, dim) codes, (T,) scales."""
        out: dict[str, tuple[int, ...]] = {}
        for h, scale in self.columns().items():
            out |= {h: (seq_len, self.dim), scale: (seq_len,)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "dim": self.dim,
            "projection": {"kind": self.kind, "seed": self.seed, "sha256": self.sha256},
        }

    @classmethod
    def from_dict(cls, d: Any) -> HiddenSpec | None:
        """Manifest ``targets.hidden`` (absent or empty: None) -> a validated spec."""
        if not d:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("projection"), dict):
            raise CacheFormatError(
                f"targets.hidden must be {{layers, dim, projection {{kind, seed, sha256}}}}, got {d!r}"
            )
        layers, p = d.get("layers"), d["projection"]
        return cls(
            layers=tuple(layers) if isinstance(layers, list) else layers,
            dim=d.get("dim"),
            kind=p.get("kind"),
            seed=p.get("seed"),
            sha256=p.get("sha256"),
        )


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes (..., dim) x float16 scales (...,) -> float32 values (..., dim)."""
    return codes.astype(np.float32) * scale.astype(np.float32)[..., None]


def dequantized(hidden: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{hidden_<L>: codes, hidden_scale_<L>: scales} -> {hidden_<L>: float32 values}."""
    return {
        name: dequantize(codes, hidden["hidden_scale_" + name.removeprefix("hidden_")])
        for name, codes in hidden.items()
        if not name.startswith("hidden_scale_")
    }


def projection_sha256(matrix: np.ndarray) -> str:
    """sha256 of a projection's float32 little-endian row-major bytes (``targets.hidden.projection.sha256``)."""
    return hashlib.sha256(np.ascontiguousarray(matrix, np.dtype("<f4")).tobytes()).hexdigest()


def save_projection(out: Path, matrix: np.ndarray) -> None:
    """Write ``PROJECTION_FILE`` into the cache directory (atomically: a temp file, then a rename)."""
    from safetensors.numpy import save_file

    tmp = out / f".{PROJECTION_FILE}.tmp"
    save_file({PROJECTION_KEY: np.ascontiguousarray(matrix, np.float32)}, str(tmp))
    tmp.replace(out / PROJECTION_FILE)


def load_projection(cache_dir: str | Path, spec: HiddenSpec) -> np.ndarray:
    """The cache's (H, dim) projection, refused unless its sha256 is the manifest's."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(cache_dir) / PROJECTION_FILE
    fix = "the cache is incomplete or damaged: pull it again or rebuild it (`kdcache cache` / `dvc repro cache`)"
    try:
        matrix = load_file(str(path)).get(PROJECTION_KEY)
    except (OSError, SafetensorError) as e:
        raise CacheFormatError(f"{path}: cannot read the hidden-state projection ({e}); {fix}") from e
    if matrix is None or matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != spec.dim:
        raise CacheFormatError(f"{path}: no float32 (H, {spec.dim}) tensor {PROJECTION_KEY!r}; {fix}")
    if (digest := projection_sha256(matrix)) != spec.sha256:
        raise CacheFormatError(
            f"{path}: sha256 {digest} differs from manifest.json targets.hidden.projection.sha256 {spec.sha256}; {fix}"
        )
    return matrix
