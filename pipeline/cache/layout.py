"""What a cache stores per token: ``TargetLayout`` (the manifest's ``targets`` section, which decides the
Parquet schema) and ``SequenceTargets`` (one sequence's targets, what the cache stage encodes and a reader
returns). Split from ``format`` (which re-exports everything here and holds the manifest); the byte-level
codes live in ``codec``, rows in ``rows``; the specification is ``cache/README.md``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.cache.codec import (
    ABS_ENCODING,
    VALUE_ENCODING,
    CacheFormatError,
    count_dtype_for,
    id_dtype_for,
    value_code_dtypes,
)
from kdcache.cache.hidden_format import HiddenSpec, dequantized

SIGNALS = ("nll", "entropy")
"""Per-token teacher signals (``targets.signals``), stored as float16 columns ``teacher_<signal>``."""
SIGNAL_DTYPE = np.dtype("<f2")
LOG_Z_DTYPE = np.dtype("<f4")
"""``topk_log_z``: float32 (fp16's 1e-3 relative step on log Z ~ 10 would move tempered probabilities ~1%)."""
RESERVED_TARGETS: dict[str, str] = {}
"""v2 manifest ``targets`` fields reserved for features this kdcache does not read yet: a cache that sets one
(non-empty) is refused, naming it (``hidden`` is read since issue 11.3: ``hidden_format``)."""
MAX_TOP_K = 1024
MAX_SAMPLES = 65535


# ----------------------------------------------------------------------------- layout and rows


@dataclass(frozen=True)
class TargetLayout:
    """What a cache stores per token; decides the schema. Recorded as ``manifest["targets"]``."""

    kind: str  # "topk" | "sampled" | "both"
    vocab_size: int
    seq_len: int
    top_k: int = 0
    mass: float = 0.0  # > 0: adaptive top-k (variable length per position)
    samples: int = 0
    temperature: float = 1.0
    seed: int = 0
    values: str = "logprob"
    value_encoding: str = VALUE_ENCODING
    temperatures: tuple[float, ...] = ()  # v2: extra temperatures whose full-vocab log-normalizer is stored
    signals: tuple[str, ...] = ()  # v2: per-token teacher signals stored (subset of SIGNALS)
    max_token_bytes: int = 0  # v2: byte_lengths column (from manifest tokenizer.bytes); 0 = none
    hidden: HiddenSpec | None = None  # v2: projected teacher hidden states (manifest targets.hidden)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "seq_len", "top_k", "samples", "seed", "mass", "temperature"):
            value, kind = getattr(self, key), numbers.Real if key in ("mass", "temperature") else numbers.Integral
            if not isinstance(value, kind) or isinstance(value, bool):  # e.g. seq_len 12.0 from a hand-edited manifest
                raise CacheFormatError(
                    f"targets.{key} must be {'a number' if kind is numbers.Real else 'an integer'}, got {value!r}"
                )
        if self.kind not in ("topk", "sampled", "both"):
            raise CacheFormatError(f"targets.kind must be topk|sampled|both, got {self.kind!r}")
        if not (0 < self.vocab_size < 1 << 32) or self.seq_len < 1:
            raise CacheFormatError(f"bad vocab_size/seq_len: {self.vocab_size}/{self.seq_len}")
        if self.has_topk and not 1 <= self.top_k <= min(MAX_TOP_K, self.vocab_size):
            raise CacheFormatError(f"targets.top_k must be in [1, {MAX_TOP_K}] and <= vocab_size, got {self.top_k}")
        if self.has_samples and not 1 <= self.samples <= MAX_SAMPLES:
            raise CacheFormatError(f"targets.samples must be in [1, {MAX_SAMPLES}], got {self.samples}")
        if not 0.0 <= self.mass < 1.0 or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise CacheFormatError(f"bad targets.mass/temperature: {self.mass}/{self.temperature}")
        temps = self.temperatures
        if not isinstance(temps, tuple) or not all(
            isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in temps
        ):
            raise CacheFormatError(f"targets.temperatures must be a list of numbers > 0, got {temps!r}")
        if len(set(temps)) != len(temps) or self.temperature in temps:
            raise CacheFormatError(
                f"targets.temperatures {list(temps)} must be distinct and differ from targets.temperature "
                f"{self.temperature} (whose log-normalizer is 0)"
            )
        if temps and not self.has_topk:
            raise CacheFormatError(
                "targets.temperatures needs top-k targets (kind topk|both): sampled ids are drawn at one temperature"
            )
        if (
            not isinstance(self.signals, tuple)
            or len(set(self.signals)) != len(self.signals)
            or any(s not in SIGNALS for s in self.signals)
        ):
            raise CacheFormatError(f"targets.signals must be distinct names from {list(SIGNALS)}, got {self.signals!r}")
        if not isinstance(self.max_token_bytes, int) or not 0 <= self.max_token_bytes < 1 << 16:
            raise CacheFormatError(
                f"tokenizer.bytes.max_token_bytes must be in [1, 65535] (0: none), got {self.max_token_bytes!r}"
            )
        if self.values != "logprob":
            raise CacheFormatError(f"targets.values {self.values!r} is not supported (reads 'logprob'); upgrade")
        value_code_dtypes(self.value_encoding)  # refuses an unknown value encoding, naming the known ones

    @property
    def has_topk(self) -> bool:
        return self.kind in ("topk", "both")

    @property
    def has_samples(self) -> bool:
        return self.kind in ("sampled", "both")

    @property
    def adaptive(self) -> bool:
        return self.has_topk and self.mass > 0

    @property
    def value_dtypes(self) -> tuple[np.dtype, np.dtype]:
        """(top-k value code dtype, tail code dtype) of ``value_encoding``, as stored and as staged."""
        return value_code_dtypes(self.value_encoding)

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype_for(self.vocab_size)

    @property
    def byte_dtype(self) -> np.dtype:
        """Element dtype of ``byte_lengths``: uint8, or uint16 when a token is longer than 255 bytes."""
        return count_dtype_for(self.max_token_bytes)

    def blob_dtypes(self) -> dict[str, np.dtype]:
        """Element dtype of every blob column (before byte-plane splitting)."""
        ids = self.id_dtype
        out = {"input_ids": ids}
        if self.has_topk:
            out |= ({"topk_lengths": count_dtype_for(self.top_k)} if self.adaptive else {}) | {
                "topk_ids": ids,
                "topk_codes": self.value_dtypes[0],
                **({"topk_code_base": np.dtype("u1")} if self.value_encoding == ABS_ENCODING else {}),
                "topk_tail": self.value_dtypes[1],
            }
            out |= {"topk_log_z": LOG_Z_DTYPE} if self.temperatures else {}
        if self.has_samples:
            out |= {
                "sample_lengths": count_dtype_for(self.samples),
                "sample_ids": ids,
                "sample_counts": count_dtype_for(self.samples),
            }
        out |= {f"teacher_{s}": SIGNAL_DTYPE for s in self.signals}
        out |= {"byte_lengths": self.byte_dtype} if self.max_token_bytes else {}
        return out | (self.hidden.blob_dtypes() if self.hidden else {})

    def columns(self) -> list[str]:
        return ["seq_index", *self.blob_dtypes()]

    def schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c, pa.int64() if c == "seq_index" else pa.binary(), nullable=False) for c in self.columns()]
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``targets`` section (``max_token_bytes`` lives in ``tokenizer.bytes``)."""
        d = asdict(self) | {"temperatures": list(self.temperatures), "signals": list(self.signals)}
        del d["max_token_bytes"], d["hidden"]  # targets.hidden: absent (not empty) without hidden states
        d |= {"hidden": self.hidden.to_dict()} if self.hidden else {}
        return d | {"id_dtype": self.id_dtype.name, "adaptive": self.adaptive}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, tokenizer: dict[str, Any] | None = None) -> TargetLayout:
        """A manifest ``targets`` section (+ its ``tokenizer`` section, for ``tokenizer.bytes``) -> layout.

        Refuses reserved features this kdcache cannot read (``RESERVED_TARGETS``), naming them."""
        for key, what in RESERVED_TARGETS.items():
            if d.get(key):
                raise CacheFormatError(
                    f"targets.{key} is set: the cache holds {what}, which this kdcache cannot read; upgrade kdcache"
                )
        known = {f for f in cls.__dataclass_fields__} - {"max_token_bytes"}
        fields = {k: v for k, v in d.items() if k in known} | {"hidden": HiddenSpec.from_dict(d.get("hidden"))}
        for key in ("temperatures", "signals"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        spans = (tokenizer or {}).get("bytes")
        if spans is not None:
            if not isinstance(spans, dict) or not isinstance(spans.get("max_token_bytes"), int):
                raise CacheFormatError(f"tokenizer.bytes must be {{normalization, max_token_bytes}}, got {spans!r}")
            fields["max_token_bytes"] = spans["max_token_bytes"]
        try:
            return cls(**fields)
        except TypeError as e:
            raise CacheFormatError(f"manifest targets section is malformed: {e}") from e


@dataclass
class SequenceTargets:
    """Targets of one sequence: what the cache stage encodes and what ``reader[i]`` returns (as a dict).

    Top-k entries may come in any order on encode (padding: id 0 / log-prob -inf past
    ``topk_lengths``); decoded rows hold them in ascending id order, padding last.
    """

    seq_index: int
    input_ids: np.ndarray  # (T,)
    topk_ids: np.ndarray | None = None  # (T, k) padded with 0 past topk_lengths
    topk_logprobs: np.ndarray | None = None  # (T, k) float32, -inf past topk_lengths
    topk_lengths: np.ndarray | None = None  # (T,) entries kept (== k unless adaptive)
    topk_log_tail: np.ndarray | None = None  # (T,) log p_tail (encode input; None: 1 - sum of the kept mass)
    sample_ids: np.ndarray | None = None  # (T, S_max) padded with 0
    sample_counts: np.ndarray | None = None  # (T, S_max) int32, 0 marks padding
    topk_log_z: np.ndarray | None = None  # (len(temperatures), T) float32 logsumexp_v(log p_v * tau0 / tau)
    teacher_nll: np.ndarray | None = None  # (T,) float32 nats at tau = 1 of input_ids[t + 1]; NaN at t = T - 1
    teacher_entropy: np.ndarray | None = None  # (T,) float32 nats at tau = 1
    byte_lengths: np.ndarray | None = None  # (T,) UTF-8 bytes each input token contributes to the text
    hidden: dict[str, np.ndarray] | None = None  # hidden_<L> (T, dim) int8 codes, hidden_scale_<L> (T,) float16

    def as_dict(self) -> dict[str, Any]:
        """The fields set; ``hidden`` as ``hidden_<L>`` (T, dim) float32 values (codes x scale)."""
        out = {k: v for k, v in self.__dict__.items() if v is not None and k != "hidden"}
        return out | dequantized(self.hidden or {})
