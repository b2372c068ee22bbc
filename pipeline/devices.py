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


def runtime_key(device: torch.device, dtype: torch.dtype, model: torch.nn.Module | None = None) -> dict[str, str]:
    """What changes a model's numerics besides its weights and inputs: library versions, device type and
    name, dtype and attention kernel. Two runs agree bit for bit only where these agree (and the batch
    shape does); a cache records them so that a resume on other hardware or software is refused."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None) if model is not None else None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": str(attn),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()),
    }


def use_deterministic_algorithms() -> None:
    """Opt-in bitwise-reproducible kernels: deterministic cuBLAS workspaces, no cuDNN autotuning, and
    torch's deterministic algorithms (an op without one raises instead of silently varying). Slower on
    GPUs; on CPUs kdcache's results are already run-to-run identical for a fixed batch shape."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS initializes
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
