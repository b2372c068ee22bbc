"""Section ``teacher``: which model scores the corpus (the cache, prepare and evaluate stages read it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdcache.config.base import check


@dataclass(frozen=True)
class TeacherConfig:
    """Which teacher model scores the corpus (section ``teacher``)."""

    path: str = "models/demo-teacher"
    """Local Hugging Face causal-LM directory (config.json, weights, tokenizer files)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights/compute dtype. ``auto``: bfloat16 on CUDA, float32 on CPU. Log-softmax is always fp32."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N``."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped in the model dir. Off unless you trust that code."""

    def __post_init__(self) -> None:
        check(bool(self.path), "teacher", "path", "must name a local model directory")
        check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "teacher",
            "dtype",
            f"must be auto|float32|bfloat16|float16, got {self.dtype!r}",
        )
