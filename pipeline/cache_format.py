"""The cache contract: Parquet schema, value codecs and the manifest (format version 1).

Writers and readers both import this module; nothing else knows the byte layout.

One Parquet row per packed sequence. Per-token arrays are stored as little-endian binary
blobs (one blob per row and column), which Parquet stores as plain byte arrays: they decode
far faster than list columns and any tool can read them (see ``cache/README.md``).

Columns (``T`` = seq_len, ``k`` = top_k, ids are ``uint16`` when vocab_size <= 65536 else ``uint32``):

- ``seq_index``      int64   global index of the sequence in the token split
- ``input_ids``      binary  (T,) ids
- ``topk_lengths``   binary  (T,) uint16 entries kept per position (adaptive top-k only)
- ``topk_ids``       binary  (sum of lengths,) or (T*k,) ids, by descending probability per position
- ``topk_logprobs``  binary  same length, uint16 codes: logprob = -code / LOGPROB_SCALE
- ``sample_lengths`` binary  (T,) uint16 unique sampled ids per position (sampled targets)
- ``sample_ids``     binary  (sum of lengths,) ids, ascending per position
- ``sample_counts``  binary  same length, uint16 draw counts (sum per position = samples)
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_NAME = "kdcache"
FORMAT_VERSION = "1.0"
"""major.minor: readers refuse another major; minors only add optional fields."""
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"\Ashard-[0-9]{5}\.parquet\Z")  # \Z, not $ (which accepts a trailing newline)
LOGPROB_SCALE = 2048.0
"""uint16 fixed point on -logprob: step 1/2048 nats (KL cost ~ step^2/24 ~ 1e-8), floor -32 nats."""
MAX_CODE = np.iinfo(np.uint16).max
LENGTH_DTYPE = np.dtype("<u2")
CODE_DTYPE = np.dtype("<u2")
MAX_TOP_K = 1024
MAX_SAMPLES = 65535


class CacheFormatError(ValueError):
    """A cache file or manifest does not follow the format contract."""


def id_dtype_for(vocab_size: int) -> np.dtype:
    """Narrowest little-endian unsigned dtype holding ids < vocab_size."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """float log-probs (<= 0) -> uint16 codes, rounding -logprob to 1/LOGPROB_SCALE nats."""
    scaled = np.rint(-np.asarray(logprobs, dtype=np.float64) * LOGPROB_SCALE)
    return np.clip(scaled, 0, MAX_CODE).astype(CODE_DTYPE)


def decode_logprobs(codes: np.ndarray) -> np.ndarray:
    """uint16 codes -> float32 log-probs."""
    return codes.astype(np.float32) * np.float32(-1.0 / LOGPROB_SCALE)


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
    value_encoding: str = f"uint16 -logprob*{int(LOGPROB_SCALE)}"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "seq_len", "top_k", "samples", "seed", "mass", "temperature"):
            value, kind = getattr(self, key), numbers.Real if key in ("mass", "temperature") else numbers.Integral
            if not isinstance(value, kind) or isinstance(value, bool):  # e.g. seq_len 12.0 from a hand-edited manifest
                raise CacheFormatError(f"targets.{key} must be {'a number' if kind is numbers.Real else 'an integer'}, got {value!r}")
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

    def columns(self) -> list[str]:
        cols = ["seq_index", "input_ids"]
        if self.has_topk:
            cols += (["topk_lengths"] if self.adaptive else []) + ["topk_ids", "topk_logprobs"]
        if self.has_samples:
            cols += ["sample_lengths", "sample_ids", "sample_counts"]
        return cols

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c, pa.int64() if c == "seq_index" else pa.binary(), nullable=False)
                          for c in self.columns()])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "id_dtype": self.id_dtype.name, "adaptive": self.adaptive}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetLayout:
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise CacheFormatError(f"manifest targets section is malformed: {e}") from e


@dataclass
class SequenceTargets:
    """Decoded targets of one sequence (what ``reader[i]`` returns, as a dict)."""

    seq_index: int
    input_ids: np.ndarray  # (T,)
    topk_ids: np.ndarray | None = None  # (T, k) padded with 0 past topk_lengths
    topk_logprobs: np.ndarray | None = None  # (T, k) float32, -inf past topk_lengths
    topk_lengths: np.ndarray | None = None  # (T,) entries kept (== k unless adaptive)
    sample_ids: np.ndarray | None = None  # (T, S_max) padded with 0
    sample_counts: np.ndarray | None = None  # (T, S_max) int32, 0 marks padding

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _ragged(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Keep the first lengths[t] entries of each row of a padded (T, K) array -> flat (sum,)."""
    keep = np.arange(values.shape[1])[None, :] < lengths[:, None]  # (T, K)
    return values[keep]


def _padded(flat: np.ndarray, lengths: np.ndarray, width: int, fill: Any) -> np.ndarray:
    """Inverse of ``_ragged``: flat (sum,) -> (T, width) padded with ``fill``."""
    out = np.full((lengths.shape[0], width), fill, dtype=flat.dtype)
    out[np.arange(width)[None, :] < lengths[:, None]] = flat
    return out


def encode_row(layout: TargetLayout, t: SequenceTargets) -> dict[str, Any]:
    """One sequence -> a dict of column values (bytes blobs) following ``layout``."""
    ids = layout.id_dtype
    row: dict[str, Any] = {"seq_index": int(t.seq_index), "input_ids": t.input_ids.astype(ids).tobytes()}
    if layout.has_topk:
        assert t.topk_ids is not None and t.topk_logprobs is not None
        if layout.adaptive:
            assert t.topk_lengths is not None
            lengths = t.topk_lengths.astype(LENGTH_DTYPE)
            row["topk_lengths"] = lengths.tobytes()
            row["topk_ids"] = _ragged(t.topk_ids, lengths).astype(ids).tobytes()
            row["topk_logprobs"] = encode_logprobs(_ragged(t.topk_logprobs, lengths)).tobytes()
        else:
            row["topk_ids"] = t.topk_ids.astype(ids).tobytes()
            row["topk_logprobs"] = encode_logprobs(t.topk_logprobs).tobytes()
    if layout.has_samples:
        assert t.sample_ids is not None and t.sample_counts is not None
        lengths = (t.sample_counts > 0).sum(-1).astype(LENGTH_DTYPE)
        row["sample_lengths"] = lengths.tobytes()
        row["sample_ids"] = _ragged(t.sample_ids, lengths).astype(ids).tobytes()
        row["sample_counts"] = _ragged(t.sample_counts, lengths).astype(CODE_DTYPE).tobytes()
    return row


def encode_table(layout: TargetLayout, rows: list[SequenceTargets]) -> pa.Table:
    """Sequences -> an Arrow table with ``layout.schema()``."""
    encoded = [encode_row(layout, r) for r in rows]
    return pa.Table.from_pylist(encoded, schema=layout.schema())


def decode_row(layout: TargetLayout, row: dict[str, Any]) -> SequenceTargets:
    """A dict of column values (bytes or buffers, e.g. ``table.slice(i, 1).to_pylist()[0]``) -> arrays."""
    ids = layout.id_dtype
    T = layout.seq_len
    out = SequenceTargets(seq_index=int(row["seq_index"]), input_ids=np.frombuffer(row["input_ids"], ids))
    if out.input_ids.shape != (T,):
        raise CacheFormatError(f"row {out.seq_index}: input_ids has {out.input_ids.size} tokens, expected {T}")
    if layout.has_topk:
        k = layout.top_k
        flat_ids = np.frombuffer(row["topk_ids"], ids)
        flat_lp = decode_logprobs(np.frombuffer(row["topk_logprobs"], CODE_DTYPE))
        if layout.adaptive:
            lengths = np.frombuffer(row["topk_lengths"], LENGTH_DTYPE)
            _check_lengths(lengths, flat_ids, flat_lp, k, T, f"row {out.seq_index}: topk")
            out.topk_ids = _padded(flat_ids, lengths, k, 0)
            out.topk_logprobs = _padded(flat_lp, lengths, k, -np.inf)
            out.topk_lengths = lengths
        else:
            if flat_ids.size != T * k or flat_lp.size != T * k:
                raise CacheFormatError(f"row {out.seq_index}: topk blobs hold {flat_ids.size}/{flat_lp.size} entries, expected {T * k}")
            out.topk_ids, out.topk_logprobs = flat_ids.reshape(T, k), flat_lp.reshape(T, k)
            out.topk_lengths = np.full(T, k, LENGTH_DTYPE)
    if layout.has_samples:
        lengths = np.frombuffer(row["sample_lengths"], LENGTH_DTYPE)
        flat_ids = np.frombuffer(row["sample_ids"], ids)
        flat_counts = np.frombuffer(row["sample_counts"], CODE_DTYPE)
        width = max(int(lengths.max(initial=0)), 1)
        _check_lengths(lengths, flat_ids, flat_counts, layout.samples, T, f"row {out.seq_index}: samples")
        out.sample_ids = _padded(flat_ids, lengths, width, 0)
        out.sample_counts = _padded(flat_counts, lengths, width, 0).astype(np.int32)
    return out


def _check_lengths(lengths: np.ndarray, a: np.ndarray, b: np.ndarray, limit: int, T: int, where: str) -> None:
    if lengths.shape != (T,) or int(lengths.max(initial=0)) > limit:
        raise CacheFormatError(f"{where}_lengths malformed (shape {lengths.shape}, max {lengths.max(initial=0)}, limit {limit})")
    total = int(lengths.sum(dtype=np.int64))
    if a.size != total or b.size != total:
        raise CacheFormatError(f"{where}: blobs hold {a.size}/{b.size} entries, lengths say {total}")


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
        return TargetLayout.from_dict(self.targets)

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
            raw = path.read_bytes()
        except FileNotFoundError as e:
            raise CacheFormatError(f"{path}: no manifest — the cache is incomplete or not a kdcache cache; "
                                   "rerun the cache stage (it resumes) or pull the cache again") from e
        if len(raw) > 64 << 20:
            raise CacheFormatError(f"{path}: manifest is {len(raw)} bytes, refusing (> 64 MiB)")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheFormatError(f"{path}: not valid JSON ({e}); the file is damaged — pull or rebuild the cache") from e
        return _parse_manifest(data, str(path))


def check_shard_name(name: Any, source: str = MANIFEST_NAME) -> str:
    """Refuse shard names that could reach outside the cache directory."""
    if not isinstance(name, str) or not SHARD_PATTERN.match(name):
        raise CacheFormatError(f"{source}: shard file name {name!r} is not of the form shard-NNNNN.parquet "
                               "(absolute paths, separators and '..' are refused); the manifest is corrupt or hostile")
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
    need(major == FORMAT_VERSION.split(".")[0],
         f"format version {version} is not supported by this kdcache (reads {FORMAT_VERSION.split('.')[0]}.x); upgrade kdcache")
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
            need(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62, f"shards[{i}].{key} must be a non-negative integer, got {v!r}")
        sha = s.get("sha256")
        need(isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None, f"shards[{i}].sha256 must be 64 hex digits")
        shards.append(ShardInfo(file=name, rows=s["rows"], tokens=s["tokens"], bytes=s["bytes"], sha256=sha,
                                first_seq=s.get("first_seq", 0)))
    manifest = Manifest(name=data["name"], teacher=data["teacher"], tokenizer=data["tokenizer"],
                        corpus=data["corpus"], targets=data["targets"], shards=shards, stats=data["stats"],
                        created_by=str(data.get("created_by", "")), format=FORMAT_NAME, format_version=version)
    try:
        layout = manifest.layout  # validates kind, k, samples, sizes
    except CacheFormatError as e:
        raise CacheFormatError(f"{source}: {e}") from e
    need(layout.vocab_size == manifest.tokenizer.get("vocab_size"), "targets.vocab_size differs from tokenizer.vocab_size")
    for i, s in enumerate(shards):
        need(s.tokens == s.rows * layout.seq_len, f"shards[{i}]: tokens {s.tokens} != rows {s.rows} x seq_len {layout.seq_len}")
    return manifest
