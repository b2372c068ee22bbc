"""Device and dtype names -> torch objects: one meaning everywhere (teacher, trainer, evaluation).

``auto`` means CUDA when a GPU is visible, else CPU. A bare ``cuda`` means the current GPU
(``cuda:LOCAL_RANK`` under torchrun, set by ``kdcache.distributed.process_group``).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Config dtype names -> torch dtypes (``auto`` is resolved per device by ``resolve_dtype``)."""


class DeviceError(ValueError):
    """A device name that does not exist on this machine."""


def resolve_device(name: str, *, field: str = "device") -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cuda`` -> the current GPU; else ``torch.device(name)``.

    Refuses a CUDA device when CUDA is not available, naming ``field`` (the config key or flag).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"{field}: {name!r} is not a device name — use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{field} is {name!r} but CUDA is not available here — use cpu or auto")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else the named dtype (see ``DTYPES``)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
