"""Typed, frozen configuration: one dataclass per ``params.yaml`` section.

Config flows one way: a params section (or CLI flags) -> ``load_section`` -> a frozen
dataclass validated in ``__post_init__`` -> plain functions.  Defaults live here and
nowhere else.  Unknown keys are refused with a did-you-mean hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar


class ConfigError(ValueError):
    """A params section has an unknown key, a wrong type or an invalid value."""


def _check(ok: bool, section: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{key}: {message}")


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and how it is split (params section ``corpus``)."""

    paths: tuple[str, ...] = ()
    """Text/jsonl/parquet files or globs. Empty: the running Python's standard library ``.py`` files."""
    text_field: str = "text"
    """Column holding the document text in jsonl/parquet files."""
    val_fraction: float = 0.05
    """Fraction of documents (chosen by content hash, not position) that go to the val split."""
    max_documents: int = 0
    """Use at most this many documents (by sorted path / row order); 0 = all."""
    errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 bytes: ``strict`` fails naming the file, ``replace`` substitutes U+FFFD."""

    def __post_init__(self) -> None:
        s = "corpus"
        _check(0.0 < self.val_fraction < 1.0, s, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(self.max_documents >= 0, s, "max_documents", "must be >= 0 (0 = all)")
        _check(self.errors in ("strict", "replace"), s, "errors", f"must be 'strict' or 'replace', got {self.errors!r}")


@dataclass(frozen=True)
class DemoTeacherConfig:
    """The small teacher trained locally when no real teacher is available (section ``demo_teacher``)."""

    vocab_size: int = 4096
    """Byte-level BPE vocabulary size of the demo tokenizer."""
    seq_len: int = 256
    """Training sequence length."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    batch_size: int = 8
    """Sequences per step. 8 beat 16 at equal tokens (val CE 6.08 vs 6.44 after 393k tokens): with a
    CPU budget of ~1M tokens, more optimizer steps matter more than bigger batches."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 10
    """Linear warmup steps, then cosine decay over whichever budget (steps or minutes) runs out first."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    max_steps: int = 2000
    """Upper bound on optimizer steps; ``max_minutes`` usually stops training first."""
    max_minutes: float = 5.0
    """Wall-clock training budget (the step count reached is recorded in the model card)."""
    max_train_tokens: int = 4_000_000
    """Tokens of the train split used for training the teacher (0 = all)."""
    seed: int = 0

    def __post_init__(self) -> None:
        s = "demo_teacher"
        for key in (
            "vocab_size",
            "seq_len",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "batch_size",
            "max_steps",
        ):
            _check(getattr(self, key) > 0, s, key, "must be > 0")
        _check(self.vocab_size >= 300, s, "vocab_size", "must be >= 300 (256 byte tokens + specials + merges)")
        _check(self.hidden_size % self.num_heads == 0, s, "hidden_size", "must be divisible by num_heads")
        _check(self.lr > 0, s, "lr", "must be > 0")
        _check(self.warmup_steps >= 0, s, "warmup_steps", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, s, "min_lr_ratio", "must be in [0, 1]")
        _check(self.max_minutes > 0, s, "max_minutes", "must be > 0")
        _check(self.max_train_tokens >= 0, s, "max_train_tokens", "must be >= 0")


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
        _check(bool(self.path), "teacher", "path", "must name a local model directory")
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "teacher",
            "dtype",
            f"must be auto|float32|bfloat16|float16, got {self.dtype!r}",
        )


@dataclass(frozen=True)
class PrepareConfig:
    """Tokenize and pack the corpus (section ``prepare``)."""

    seq_len: int = 256
    """Tokens per packed sequence (documents joined with EOS)."""
    max_train_sequences: int = 0
    """Keep at most this many train sequences (0 = all)."""
    max_val_sequences: int = 0
    """Keep at most this many val sequences (0 = all)."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2, "prepare", "seq_len", "must be >= 2")
        _check(self.max_train_sequences >= 0, "prepare", "max_train_sequences", "must be >= 0")
        _check(self.max_val_sequences >= 0, "prepare", "max_val_sequences", "must be >= 0")


@dataclass(frozen=True)
class CacheConfig:
    """Teacher soft targets to cache (section ``cache``)."""

    targets: Literal["topk", "sampled", "both"] = "topk"
    """``topk``: top-k ids + log-probs (tail mass implied); ``sampled``: ids drawn from the teacher
    with counts; ``both``: a top-k head plus samples."""
    top_k: int = 32
    """Top-k entries per token (the maximum when ``mass`` is set)."""
    mass: float = 0.0
    """Adaptive top-k: keep entries until their cumulative probability reaches ``mass``
    (e.g. 0.99), at most ``top_k``. 0 = fixed k."""
    samples: int = 32
    """Draws per token for sampled targets."""
    temperature: float = 1.0
    """Teacher temperature applied before log-softmax; recorded in the manifest."""
    batch_size: int = 8
    """Sequences per teacher forward. Part of the determinism contract: bf16/fp16 outputs
    depend on batch shape, so a cache is byte-identical only for the same batch size and dtype."""
    rows_per_shard: int = 512
    """Sequences per Parquet shard."""
    seed: int = 0
    """Seed for sampled targets (per sequence index and position)."""
    on_nan: Literal["fail", "skip"] = "fail"
    """Non-finite teacher logits: ``fail`` stops naming the sequence; ``skip`` drops that sequence."""
    split: str = "train"
    """Token split to score (one cache per split)."""

    def __post_init__(self) -> None:
        s = "cache"
        _check(
            self.targets in ("topk", "sampled", "both"),
            s,
            "targets",
            f"must be topk|sampled|both, got {self.targets!r}",
        )
        _check(1 <= self.top_k <= 1024, s, "top_k", f"must be in [1, 1024], got {self.top_k}")
        _check(0.0 <= self.mass < 1.0, s, "mass", f"must be in [0, 1) (0 = fixed k), got {self.mass}")
        _check(1 <= self.samples <= 255 * 255, s, "samples", f"must be >= 1, got {self.samples}")
        _check(self.temperature > 0, s, "temperature", "must be > 0")
        _check(self.batch_size > 0, s, "batch_size", "must be > 0")
        _check(self.rows_per_shard > 0, s, "rows_per_shard", "must be > 0")
        _check(self.on_nan in ("fail", "skip"), s, "on_nan", "must be 'fail' or 'skip'")
        _check(self.split in ("train", "val"), s, "split", f"must be 'train' or 'val', got {self.split!r}")


@dataclass(frozen=True)
class StudentConfig:
    """Student architecture (section ``train.student``) when not loading a pretrained dir."""

    path: str = ""
    """Local pretrained student directory; empty = build from the sizes below (Llama)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check(getattr(self, key) > 0, "train.student", key, "must be > 0")
        _check(self.hidden_size % self.num_heads == 0, "train.student", "hidden_size", "must be divisible by num_heads")


@dataclass(frozen=True)
class TrainConfig:
    """Student training (sections ``train`` and ``train_baseline``)."""

    loss: Literal["topk_tail", "topk_renorm", "sampled", "ce"] = "topk_tail"
    """KD loss; ``ce`` trains on hard labels only (the baseline)."""
    alpha: float = 0.5
    """Weight of the KD term: loss = alpha*KD + (1 - alpha)*CE."""
    temperature: float = 1.0
    """KD temperature tau (KD term scaled by tau^2)."""
    max_steps: int = 150
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 15
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    chunk_tokens: int = 1024
    """Tokens per chunk in the KD loss (caps extra memory)."""
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    vocab_map: Literal["none", "exact"] = "none"
    """Student tokenizer differs from the cache's: ``none`` refuses; ``exact`` maps identical token strings."""
    student: StudentConfig = field(default_factory=StudentConfig)

    def __post_init__(self) -> None:
        s = "train"
        _check(
            self.loss in ("topk_tail", "topk_renorm", "sampled", "ce"),
            s,
            "loss",
            f"must be topk_tail|topk_renorm|sampled|ce, got {self.loss!r}",
        )
        _check(0.0 <= self.alpha <= 1.0, s, "alpha", f"must be in [0, 1], got {self.alpha}")
        _check(self.temperature > 0, s, "temperature", "must be > 0")
        for key in ("max_steps", "batch_size", "grad_accum", "chunk_tokens", "checkpoint_every", "log_every"):
            _check(getattr(self, key) > 0, s, key, "must be > 0")
        _check(self.lr > 0, s, "lr", "must be > 0")
        _check(self.warmup_steps >= 0, s, "warmup_steps", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, s, "min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, s, "grad_clip", "must be >= 0 (0 = off)")
        _check(self.vocab_map in ("none", "exact"), s, "vocab_map", "must be 'none' or 'exact'")


@dataclass(frozen=True)
class EvaluateConfig:
    """Held-out evaluation (section ``evaluate``)."""

    batch_size: int = 8
    max_sequences: int = 0
    """Evaluate on at most this many val sequences (0 = all)."""
    calibration_bins: int = 15
    """Bins for expected calibration error (ECE) of top-1 predictions."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "evaluate", "batch_size", "must be > 0")
        _check(self.max_sequences >= 0, "evaluate", "max_sequences", "must be >= 0")
        _check(self.calibration_bins > 0, "evaluate", "calibration_bins", "must be > 0")


T = TypeVar("T")


def load_section(cls: type[T], values: dict[str, Any] | None, *, section: str) -> T:
    """Build ``cls`` from a params mapping, refusing unknown keys and wrong types.

    >>> load_section(CacheConfig, {"top_k": 16}, section="cache").top_k
    16
    """
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" — did you mean '{section}.{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{section}.{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{section}.{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a field's type hint; convert lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return load_section(hint, value, section=where)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = "|".join(map(str, typing.get_args(hint)))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {type(value).__name__}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of the allowed types ({'; '.join(errors)})")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: must be null")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_params(path: str | Path) -> dict[str, Any]:
    """Read ``params.yaml`` (a mapping of sections)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found — run from the repository root or pass --params") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists), for manifests and logs."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
