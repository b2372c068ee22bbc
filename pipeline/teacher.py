"""Load a teacher causal LM from a local directory and run batched forwards (no file I/O besides loading)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.config import TeacherConfig
from kdcache.devices import resolve_device, resolve_dtype
from kdcache.fingerprint import model_dir_fingerprint
from kdcache.tokenizer import tokenizer_vocab_size

log = logging.getLogger(__name__)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class TeacherError(ValueError):
    """The teacher directory is missing, is not a causal LM, or does not fit its tokenizer."""


@dataclass
class Teacher:
    """A loaded teacher: model in eval mode on ``device``, its tokenizer, and provenance ``info``."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    info: dict[str, Any]  # path, sha256, files, dtype, model_type, num_parameters, vocab_size

    @property
    def vocab_size(self) -> int:
        """Width of the teacher's logits (may exceed ``len(tokenizer)`` by padding rows)."""
        return int(self.info["vocab_size"])


def load_teacher(cfg: TeacherConfig) -> Teacher:
    """Load ``cfg.path`` (a local Hugging Face causal-LM directory) with its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(cfg.path)
    config = _check_model_dir(path, trust_remote_code=cfg.trust_remote_code)
    try:
        fingerprint = model_dir_fingerprint(path)
    except FileNotFoundError as e:
        raise TeacherError(
            f"teacher.path '{path}': no weight files (*.safetensors / *.bin) next to config.json — "
            "copy the full model directory, or run the demo_teacher stage"
        ) from e
    tokenizer = _load_tokenizer(path)
    device = resolve_device(cfg.device, field="teacher.device")
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.trust_remote_code:
        log.warning("teacher.trust_remote_code is on: executing modelling code shipped in %s", path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise TeacherError(f"teacher.path '{path}': cannot load the model ({e})") from e
    model.to(device).eval()
    vocab_size = _logits_width(model, config)
    if vocab_size < tokenizer_vocab_size(tokenizer):
        raise TeacherError(
            f"teacher.path '{path}': the model's logits have {vocab_size} entries but its tokenizer "
            f"has {tokenizer_vocab_size(tokenizer)} token ids — the tokenizer files do not belong "
            "to this model"
        )
    info = {
        "path": str(path),
        "sha256": fingerprint["sha256"],
        "files": fingerprint["files"],
        "dtype": str(dtype).removeprefix("torch."),
        "model_type": getattr(config, "model_type", ""),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab_size": vocab_size,
    }
    log.info(
        "teacher %s: %s, %.1fM parameters, %s on %s",
        path,
        info["model_type"],
        info["num_parameters"] / 1e6,
        info["dtype"],
        device,
    )
    return Teacher(model=model, tokenizer=tokenizer, device=device, dtype=dtype, info=info)


def _check_model_dir(path: Path, *, trust_remote_code: bool) -> Any:
    """Refuse a missing dir, a dir without config.json and configs that are not causal LMs; return the config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not path.is_dir():
        raise TeacherError(
            f"teacher.path '{path}' does not exist — set teacher.path in params.yaml to a local "
            "Hugging Face model directory, or run the demo_teacher stage"
        )
    if not (path / "config.json").is_file():
        raise TeacherError(
            f"teacher.path '{path}': no config.json — point teacher.path at a Hugging Face model "
            "directory (the one holding config.json and the weights)"
        )
    if not trust_remote_code:
        _refuse_shipped_code(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise TeacherError(f"{path / 'config.json'}: cannot read the model config ({e})") from e
    model_type = getattr(config, "model_type", "")
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    archs = list(getattr(config, "architectures", None) or [])
    causal_archs = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    arch_ok = not archs or any(a in causal_archs or a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    type_ok = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (remote and trust_remote_code)
    if not (type_ok and arch_ok) or getattr(config, "is_encoder_decoder", False):
        what = ", ".join(archs) or type(config).__name__
        raise TeacherError(
            f"teacher.path '{path}': {what} (model_type {model_type!r}) is not a causal LM — "
            "the teacher must be a decoder-only model loadable with AutoModelForCausalLM"
        )
    return config


def _refuse_shipped_code(path: Path) -> None:
    """A config whose model type exists only as code shipped in the directory needs trust_remote_code: say so."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path / 'config.json'}: cannot read the model config ({e})") from e
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    if auto_map and raw.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise TeacherError(
            f"teacher.path '{path}': model_type {raw.get('model_type')!r} exists only as Python code "
            f"shipped in the directory (auto_map: {sorted(auto_map)}); kdcache does not run it unless "
            "you review it and set teacher.trust_remote_code: true"
        )


def _load_tokenizer(path: Path) -> Any:
    from kdcache.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise TeacherError(f"teacher.path '{path}': {e}") from e


def _logits_width(model: Any, config: Any) -> int:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return int(config.get_text_config().vocab_size)


def teacher_logits(teacher: Teacher, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for a batch of packed sequences, on ``teacher.device`` in the model dtype.

    input_ids: (B, T) int64. Returns (B, T, V) with V = ``teacher.vocab_size``; never copied to the CPU.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    with torch.inference_mode():
        out = teacher.model(input_ids=input_ids.to(teacher.device, non_blocking=True), use_cache=False)
    return out.logits  # (B, T, V)
