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
    device_map: str = ""
    """Teachers larger than one GPU: accelerate's placement (auto, balanced, balanced_low_0, sequential)
    over the visible GPUs, then CPU, then disk, within max_memory. Empty: the whole model on device.
    Under torchrun each rank places its own copy: give each rank its GPUs (CUDA_VISIBLE_DEVICES)."""
    max_memory: tuple[str, ...] = ()
    """With device_map: memory per device as DEVICE=SIZE items, e.g. [0=70GiB, 1=70GiB, cpu=200GiB]."""
    tp_plan: Literal["auto"] | None = None
    """Tensor parallelism under torchrun: ``auto`` shards every layer of the teacher over the ranks with
    transformers' own tensor-parallel plan for its model type (one process per GPU, all ranks run every
    batch). Null: each rank loads the whole model (or its device_map). Exclusive with device_map."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped in the model dir. Off unless you trust that code."""

    def __post_init__(self) -> None:
        check(bool(self.path), "teacher", "path", "must name a local model directory")
        maps = ("", "auto", "balanced", "balanced_low_0", "sequential")
        check(self.device_map in maps, "teacher", "device_map", f"must be one of {'|'.join(maps[1:])} or empty")
        for item in self.max_memory:
            check(
                "=" in item, "teacher", "max_memory", f"items are DEVICE=SIZE (e.g. 0=70GiB, cpu=200GiB), got {item!r}"
            )
        check(not self.max_memory or bool(self.device_map), "teacher", "max_memory", "needs teacher.device_map")
        check(
            not (self.tp_plan and self.device_map),
            "teacher",
            "tp_plan",
            "and device_map are exclusive: tp_plan shards each layer over the torchrun ranks, device_map places "
            "whole layers on one rank's devices — set one of them",
        )
        check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "teacher",
            "dtype",
            f"must be auto|float32|bfloat16|float16, got {self.dtype!r}",
        )
