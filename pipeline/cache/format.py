"""The cache contract: target layout (Parquet schema), sequence targets and the manifest (format version 2).

Writers and readers both import this module (the value codecs live in ``codec``, rows in ``rows``);
nothing else knows the byte layout. The specification -- every column with its dtype, the manifest
fields, v1 compatibility, a by-hand decoder and the measurements behind each choice -- is
``cache/README.md``. In short: one Parquet row per packed sequence; per-token arrays are
little-endian binary blobs, byte-plane split; ids gap coded within a position; top-k values as
uint8 codes relative to the position's max plus a uint16 tail code (``codec``); v2 adds
``topk_log_z`` (float32 log-normalizers at ``targets.temperatures``), ``teacher_nll`` /
``teacher_entropy`` (float16, tau = 1) and ``byte_lengths`` (uint8/uint16 UTF-8 bytes per token).
"""

from __future__ import annotations

import json
import math
import numbers
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.cache.codec import (  # noqa: F401  re-exported: the format's codecs
    TAIL_EMPTY,
    TAIL_LOGIT_MAX,
    TAIL_SCALE,
    VALUE_GAMMA,
    VALUE_LEVELS,
    CacheFormatError,
    column_values,
    count_dtype_for,
    decode_gaps,
    decode_log_mass,
    decode_topk_logprobs,
    encode_gaps,
    encode_tail,
    encode_values,
    from_planes,
    id_dtype_for,
    padded,
    row_blobs,
    segment_starts,
    sorted_entries,
    to_planes,
    value_table,
)
from kdcache.cache.hidden_format import HIDDEN_COLUMN, HIDDEN_SCALE_COLUMN, HiddenSpec, dequantized  # noqa: F401

FORMAT_NAME = "kdcache"
FORMAT_VERSION = "2.0"
"""major.minor written here: readers refuse a major not in ``READ_MAJORS``; minors only add optional fields."""
READ_MAJORS = ("1", "2")
"""Major versions this kdcache reads. A v1 cache simply lacks the v2 columns (log-normalizers, teacher
signals, byte spans): what needs them refuses it, naming the manifest and the fix (rebuild)."""
SIGNALS = ("nll", "entropy")
"""Per-token teacher signals (``targets.signals``), stored as float16 columns ``teacher_<signal>``."""
SIGNAL_DTYPE = np.dtype("<f2")
LOG_Z_DTYPE = np.dtype("<f4")
"""``topk_log_z``: float32 (fp16's 1e-3 relative step on log Z ~ 10 would move tempered probabilities ~1%)."""
RESERVED_TARGETS: dict[str, str] = {}
"""v2 manifest ``targets`` fields reserved for features this kdcache does not read yet: a cache that sets one
(non-empty) is refused, naming it (``hidden`` is read since issue 11.3: ``hidden_format``)."""
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
"""The teacher's tokenizer, saved inside the cache so that a cache is self-contained."""
SHARD_PATTERN = re.compile(r"\Ashard-[0-9]{5}\.parquet\Z")  # \Z, not $ (which accepts a trailing newline)
VALUE_ENCODING = f"u8-pow{VALUE_GAMMA:.4f}-rel+u16-tail-logit/{int(TAIL_SCALE)}"
"""Recorded in the manifest; readers refuse any other value encoding."""
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,
    "write_page_checksum": True,
}
"""``pq.ParquetWriter`` keyword arguments every shard writer uses (level chosen by bench/cache_format.py)."""
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
        if self.values != "logprob" or self.value_encoding != VALUE_ENCODING:
            raise CacheFormatError(
                f"targets.values/value_encoding {self.values!r}/{self.value_encoding!r} are not "
                f"supported by this kdcache (reads 'logprob'/{VALUE_ENCODING!r}); upgrade kdcache"
            )

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
                "topk_codes": np.dtype("u1"),
                "topk_tail": np.dtype("<u2"),
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


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    first_seq: int = 0  # smallest seq_index in the shard


@dataclass
class Manifest:
    """Everything needed to trust and reuse a cache elsewhere (``manifest.json``)."""

    name: str
    teacher: dict[str, Any]  # path, sha256, files, dtype, model_type, num_parameters
    tokenizer: dict[str, Any]  # fingerprint, vocab_size
    corpus: dict[str, Any]  # fingerprint, split, seq_len, num_sequences
    targets: dict[str, Any]  # TargetLayout.to_dict() + batch_size, compute dtype
    shards: list[ShardInfo] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION

    @property
    def layout(self) -> TargetLayout:
        return TargetLayout.from_dict(self.targets, tokenizer=self.tokenizer)

    @property
    def major(self) -> int:
        return int(self.format_version.split(".")[0])

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MANIFEST_NAME) -> Manifest:
        """Validate an untrusted manifest mapping; raise ``CacheFormatError`` naming ``source``."""
        return _parse_manifest(data, source)

    @classmethod
    def load(cls, cache_dir: str | Path) -> Manifest:
        path = Path(cache_dir) / MANIFEST_NAME
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
                raise CacheFormatError(f"{path}: not a regular file of at most 64 MiB; the cache is damaged or hostile")
            with open(path, "rb") as f:
                raw = f.read((64 << 20) + 1)
        except FileNotFoundError as e:
            raise CacheFormatError(
                f"{path}: no manifest — the cache is incomplete or not a kdcache cache; "
                "rerun the cache stage (it resumes) or pull the cache again"
            ) from e
        if len(raw) > 64 << 20:
            raise CacheFormatError(f"{path}: manifest is {len(raw)} bytes, refusing (> 64 MiB)")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise CacheFormatError(
                f"{path}: not valid JSON ({type(e).__name__}: {e}); the file is damaged — pull or rebuild the cache"
            ) from e
        return _parse_manifest(data, str(path))


def missing_feature(manifest: Manifest, cache_dir: str | Path, what: str) -> str:
    """One line for a cache that lacks ``what`` (a v1 cache, or one written without it) and the fix."""
    why = (
        f"format {manifest.format_version} predates it"
        if manifest.major < 2
        else "it was written without it (e.g. imported from another tool, or made with other cache settings)"
    )
    return (
        f"{Path(cache_dir) / MANIFEST_NAME}: the cache has no {what} ({why}); rebuild it with this kdcache "
        "(`kdcache cache` / `dvc repro cache`)"
    )


def check_shard_name(name: Any, source: str = MANIFEST_NAME) -> str:
    """Refuse shard names that could reach outside the cache directory."""
    if not isinstance(name, str) or not SHARD_PATTERN.match(name):
        raise CacheFormatError(
            f"{source}: shard file name {name!r} is not of the form shard-NNNNN.parquet "
            "(absolute paths, separators and '..' are refused); the manifest is corrupt or hostile"
        )
    return name


def _parse_manifest(data: Any, source: str) -> Manifest:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CacheFormatError(f"{source}: {what}")

    need(isinstance(data, dict), "top level must be a JSON object")
    need(data.get("format") == FORMAT_NAME, f"format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    version = data.get("format_version")
    need(isinstance(version, str) and re.fullmatch(r"\d+\.\d+", version) is not None, f"bad format_version {version!r}")
    major = version.split(".")[0]
    need(
        major in READ_MAJORS,
        f"format version {version} is not supported by this kdcache (reads "
        f"{', '.join(m + '.x' for m in READ_MAJORS)}); upgrade kdcache",
    )
    for key in ("teacher", "tokenizer", "corpus", "targets", "stats"):
        need(isinstance(data.get(key), dict), f"field '{key}' must be an object")
    need(isinstance(data.get("name"), str), "field 'name' must be a string")
    need(isinstance(data.get("shards"), list), "field 'shards' must be a list")
    shards, seen = [], set()
    for i, s in enumerate(data["shards"]):
        need(isinstance(s, dict), f"shards[{i}] must be an object")
        name = check_shard_name(s.get("file"), source)
        need(name not in seen, f"shards[{i}]: duplicate file {name}")
        seen.add(name)
        for key in ("rows", "tokens", "bytes", "first_seq"):
            v = s.get(key, 0)
            need(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62,
                f"shards[{i}].{key} must be a non-negative integer, got {v!r}",
            )
        sha = s.get("sha256")
        need(
            isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None,
            f"shards[{i}].sha256 must be 64 hex digits",
        )
        shards.append(
            ShardInfo(
                file=name,
                rows=s["rows"],
                tokens=s["tokens"],
                bytes=s["bytes"],
                sha256=sha,
                first_seq=s.get("first_seq", 0),
            )
        )
    manifest = Manifest(
        name=data["name"],
        teacher=data["teacher"],
        tokenizer=data["tokenizer"],
        corpus=data["corpus"],
        targets=data["targets"],
        shards=shards,
        stats=data["stats"],
        created_by=str(data.get("created_by", "")),
        format=FORMAT_NAME,
        format_version=version,
    )
    try:
        layout = manifest.layout  # validates kind, k, samples, sizes, value encoding
    except CacheFormatError as e:
        raise CacheFormatError(f"{source}: {e}") from e
    need(
        layout.vocab_size == manifest.tokenizer.get("vocab_size"),
        "targets.vocab_size differs from tokenizer.vocab_size",
    )
    context = manifest.corpus.get("teacher_context")
    need(
        context is None
        or (
            isinstance(context, dict)
            and isinstance(context.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", context["sha256"]) is not None
            and isinstance(context.get("num_tokens"), int)
            and context["num_tokens"] >= 0
            and isinstance(context.get("source"), str)
        ),
        "corpus.teacher_context must be {sha256 (64 hex digits), num_tokens (>= 0), source (a string)}",
    )
    for i, s in enumerate(shards):
        need(
            s.tokens == s.rows * layout.seq_len,
            f"shards[{i}]: tokens {s.tokens} != rows {s.rows} x seq_len {layout.seq_len}",
        )
    return manifest
