"""Load a teacher causal LM from a local directory and run batched forwards (no file I/O besides loading).

The cache stage never materializes a batch's (B, T, V) logits: ``teacher_hidden`` runs the model
without its LM head, and ``logit_rows`` computes logits from those final hidden states a chunk of
positions at a time (``head_logits``), for ``kdcache.cache.targets.sparsify_rows`` to sparsify
before the next chunk. The head is the model's own output embedding (tied or not, bias included),
followed by the output transform of its family (``OUTPUT_TRANSFORMS``): Gemma-2/3 final-logit
soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``, Falcon-H1's
``lm_head_multiplier``. ``load_teacher`` proves the two paths agree on a short probe and refuses a
model whose full forward computes something else (an output transform this module does not know).
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.config.teacher import TeacherConfig
from kdcache.devices import resolve_device, resolve_dtype
from kdcache.files import InputFileError, loading
from kdcache.fingerprint import model_dir_fingerprint
from kdcache.tokenizer import tokenizer_vocab_size

log = logging.getLogger(__name__)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class TeacherError(ValueError):
    """The teacher directory is missing, is not a causal LM, or does not fit its tokenizer."""


OUTPUT_TRANSFORMS = {
    "final_logit_softcapping": "softcap",  # Gemma-2/3: cap * tanh(logits / cap)
    "logit_scale": "multiply",  # Cohere / Command-R: logits * scale
    "lm_head_multiplier": "multiply",  # Falcon-H1
    "logits_scaling": "divide",  # Granite: logits / scaling
}
"""Text-config fields that transform the LM head's output, and how (applied in this order)."""


@dataclass(frozen=True)
class OutputHead:
    """Final hidden states -> logits: the output embedding, then the family's transform (``OUTPUT_TRANSFORMS``)."""

    module: Any  # torch.nn.Module: the model's output embedding (the input embedding when tied)
    multiply: float = 1.0
    divide: float = 1.0
    softcap: float | None = None


@dataclass
class Teacher:
    """A loaded teacher: model in eval mode on ``device``, its tokenizer, and provenance ``info``."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    info: dict[str, Any]  # path, sha256, files, dtype, model_type, num_parameters, vocab_size
    head: OutputHead | None = None  # None: ``output_head(model)`` on first use

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
    placement = _placement(cfg, device, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=cfg.trust_remote_code, **placement
        )
    except (OSError, ValueError) as e:
        raise TeacherError(f"teacher.path '{path}': cannot load the model ({e})") from e
    model.eval()
    device = _input_device(model, device)
    vocab_size = _logits_width(model, config)
    if vocab_size < tokenizer_vocab_size(tokenizer):
        raise TeacherError(
            f"teacher.path '{path}': the model's logits have {vocab_size} entries but its tokenizer "
            f"has {tokenizer_vocab_size(tokenizer)} token ids — the tokenizer files do not belong "
            "to this model"
        )
    head = output_head(model, config, where=f"teacher.path '{path}'")
    _check_head(model, head, where=f"teacher.path '{path}'", vocab=tokenizer_vocab_size(tokenizer), device=device)
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
    return Teacher(model=model, tokenizer=tokenizer, device=device, dtype=dtype, info=info, head=head)


def _placement(cfg: TeacherConfig, device: torch.device, config: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments that put the weights where they compute, streamed from safetensors.

    With ``teacher.tp_plan`` transformers shards every layer over the torchrun ranks by the model type's
    own tensor-parallel plan (``_tp_arguments``). With ``teacher.device_map`` accelerate spreads the model
    over the visible GPUs (then CPU, then a temporary offload folder) within ``teacher.max_memory``;
    otherwise the whole model loads straight to ``device`` (on a GPU box: the rank's GPU, never a full
    copy in CPU RAM per rank first).
    """
    if cfg.tp_plan:
        return _tp_arguments(cfg, config)
    if cfg.device_map:
        memory = dict(item.split("=", 1) for item in cfg.max_memory)
        memory = {int(k) if k.isdigit() else k: v for k, v in memory.items()}
        offload = tempfile.mkdtemp(prefix="kdcache-offload-")
        atexit.register(shutil.rmtree, offload, ignore_errors=True)
        return {"device_map": cfg.device_map, "max_memory": memory or None, "offload_folder": offload}
    return {"device_map": {"": device.index}} if device.type == "cuda" else {}  # accelerate: GPU index


def _tp_arguments(cfg: TeacherConfig, config: Any) -> dict[str, Any]:
    """transformers' tensor parallelism (``tp_plan="auto"``), refused where it cannot run: outside a
    torchrun process group of several ranks, or for a model type without a tensor-parallel plan."""
    import torch.distributed as dist

    where = f"teacher.tp_plan: {cfg.tp_plan}"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "base_model_tp_plan", None):
        import transformers

        raise TeacherError(
            f"{where}, but model_type {getattr(config, 'model_type', '?')!r} has no tensor-parallel plan in "
            f"transformers {transformers.__version__} — set teacher.tp_plan: null and span GPUs with teacher.device_map"
        )
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world < 2:
        raise TeacherError(
            f"{where} shards the teacher over torchrun's ranks, but this process is not one of several ranks — "
            "launch with `torchrun --nproc_per_node N ...` (one rank per GPU), or set teacher.tp_plan: null"
        )
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # transformers < 5: the plan is a from_pretrained argument of its own
        return {"tp_plan": cfg.tp_plan}
    return {"distributed_config": DistributedConfig(tp_plan=cfg.tp_plan)}


def _input_device(model: Any, device: torch.device) -> torch.device:
    """Where input ids go: the device of the first placed module under a device map, else ``device``."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return device
    first = next(iter(placed.values()))
    if isinstance(first, int):
        return torch.device("cuda", first)
    return torch.device("cpu") if first in ("cpu", "disk") else torch.device(first)


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
        with loading(path / "config.json", what="the model config", fix=CONFIG_FIX):
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except InputFileError as e:
        raise TeacherError(str(e)) from e
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


CONFIG_FIX = "replace it with the model's own config.json (copy the model directory again)"
"""What to do about a config.json that cannot be read (malformed, nested too deep, unreadable)."""


def _refuse_shipped_code(path: Path) -> None:
    """A config whose model type exists only as code shipped in the directory needs trust_remote_code: say so."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        with loading(path / "config.json", what="the model config", fix=CONFIG_FIX):
            raw = json.loads((path / "config.json").read_bytes())
    except InputFileError as e:
        raise TeacherError(str(e)) from e
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


def output_head(model: Any, config: Any, *, where: str = "teacher") -> OutputHead:
    """The model's LM head and its family's output transform, read from its (text) config."""
    module = model.get_output_embeddings()
    if module is None:
        raise TeacherError(f"{where}: the model has no output embedding (LM head) — the teacher must be a causal LM")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kw: dict[str, Any] = {"multiply": 1.0, "divide": 1.0, "softcap": None}
    for name, how in OUTPUT_TRANSFORMS.items():
        value = getattr(text, name, None)
        if value is None or (how == "softcap" and not value):
            continue
        if how == "softcap":
            kw["softcap"] = float(value)
        else:
            kw[how] *= float(value)
    return OutputHead(module=module, **kw)


def _check_head(model: Any, head: OutputHead, *, where: str, vocab: int, device: torch.device) -> None:
    """Refuse a model whose full forward disagrees with hidden states -> ``head_logits`` on a 16-token probe."""
    ids = (torch.arange(16, device=device) * 7919 % max(vocab, 1))[None]  # (1, 16) spread over the id space
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits[0].float()  # (16, V)
        mine = head_logits(head, _hidden(model, ids, where=where)[0])  # (16, V)
    dtype = next(model.parameters()).dtype
    tol = 8 * torch.finfo(dtype).eps * max(1.0, float(full.abs().max()))
    diff = float((full - mine).abs().max()) if full.shape == mine.shape else float("inf")
    if not diff <= tol:
        raise TeacherError(
            f"{where}: {type(model).__name__} computes logits that kdcache cannot reproduce from its final hidden "
            f"states (max difference {diff:.3g} > {tol:.3g} on a probe): its family transforms the LM head's output "
            f"in a way kdcache.teacher.OUTPUT_TRANSFORMS ({', '.join(OUTPUT_TRANSFORMS)}) does not cover — add "
            "that transform there"
        )


def _hidden(model: Any, input_ids: torch.Tensor, *, where: str = "teacher") -> torch.Tensor:
    base = model.base_model
    out = base(input_ids=input_ids, use_cache=False) if base is not model else None
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise TeacherError(
            f"{where}: {type(model).__name__} has no base model returning final hidden states "
            "(base_model_prefix) — kdcache needs them to compute logits in chunks"
        )
    return hidden  # (B, T, H)


def teacher_hidden(teacher: Teacher, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the last norm) of a batch of packed sequences: (B, T, H) on ``teacher.device``."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    with torch.inference_mode():
        return _hidden(teacher.model, input_ids.to(teacher.device, non_blocking=True), where=teacher.info["path"])


def context_hidden(
    teacher: Teacher, input_ids: torch.Tensor, context: tuple[int, ...] | list[tuple[int, ...]] = ()
) -> torch.Tensor:
    """``teacher_hidden`` of ``[context; row]`` for each row, cut to the rows' positions: (B, T, H), position t
    the state after row[: t + 1] given the context (``kdcache.teacher_context``). Empty context: ``teacher_hidden``.

    ``context`` a list: each row's own context (``corpus.context_field``). Rows whose contexts have the same
    length run in one forward (no padding: each row's result is its own plain forward's), one forward per length.
    """
    if isinstance(context, list) and context:
        lengths = [len(c) for c in context]
        if len(set(lengths)) > 1:
            out: torch.Tensor | None = None
            for n in sorted(set(lengths)):
                rows = [i for i, length in enumerate(lengths) if length == n]
                part = context_hidden(teacher, input_ids[rows], [context[i] for i in rows])  # (b, T, H)
                with torch.inference_mode():
                    if out is None:
                        out = part.new_empty((input_ids.shape[0], *part.shape[1:]))  # (B, T, H)
                    out[torch.tensor(rows, device=out.device)] = part
            return out
        if not lengths[0]:
            return teacher_hidden(teacher, input_ids)
        prefix = torch.tensor(context, dtype=input_ids.dtype)  # (B, C) the rows' own contexts
        return teacher_hidden(teacher, torch.cat([prefix, input_ids], dim=1))[:, lengths[0] :]  # (B, T, H)
    if not context:
        return teacher_hidden(teacher, input_ids)
    prefix = torch.tensor(context, dtype=input_ids.dtype).expand(input_ids.shape[0], -1)  # (B, C)
    return teacher_hidden(teacher, torch.cat([prefix, input_ids], dim=1))[:, len(context) :]  # (B, T, H)


def head_logits(head: OutputHead, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of (n, H) final hidden states: (n, V) float32, the LM head then its transform in fp32.

    The same ops in the same order as the model's own forward, so in fp32 each row equals it bit
    for bit wherever the matmul gives a row the same result whatever the number of rows (here:
    CPU BLAS with >= 16 rows; otherwise within fp32 rounding). In bf16 the transform runs in fp32
    where the model's forward would round to bf16 first.
    """
    with torch.inference_mode():
        logits = head.module(hidden).float()  # (n, V) fp32; a fresh tensor from the matmul (or its fp32 copy)
        if head.multiply != 1.0:
            logits.mul_(head.multiply)
        if head.divide != 1.0:
            logits.div_(head.divide)
        if head.softcap is not None:
            logits.div_(head.softcap).tanh_().mul_(head.softcap)  # (n, V) cap * tanh(logits / cap)
    return logits


def logit_rows(teacher: Teacher, hidden: torch.Tensor) -> Callable[[slice], torch.Tensor]:
    """``rows -> (n, V) fp32`` logits of flat positions ``rows`` of (B, T, H) hidden states, for ``sparsify_rows``."""
    head = teacher.head or output_head(teacher.model, teacher.model.config)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H) a view
    return lambda rows: head_logits(head, flat[rows])


def teacher_logits(teacher: Teacher, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for a batch of packed sequences from the model's own forward, on ``teacher.device``, model dtype.

    input_ids: (B, T) int64. Returns (B, T, V) with V = ``teacher.vocab_size``; never copied to the CPU.
    This materializes (B, T, V): the cache stage uses ``teacher_hidden`` + ``logit_rows`` instead.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    with torch.inference_mode():
        out = teacher.model(input_ids=input_ids.to(teacher.device, non_blocking=True), use_cache=False)
    return out.logits  # (B, T, V)
