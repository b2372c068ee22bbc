"""The cache contract: target layout (Parquet schema), sequence targets and the manifest (format version 2).

Writers and readers both import this module (the value codecs live in ``codec``, the target layout and
sequence targets in ``layout`` -- re-exported here -- and rows in ``rows``);
nothing else knows the byte layout. The specification -- every column with its dtype, the manifest
fields, v1 compatibility, a by-hand decoder and the measurements behind each choice -- is
``cache/README.md``. In short: one Parquet row per packed sequence; per-token arrays are
little-endian binary blobs, byte-plane split; ids gap coded within a position; top-k values as
value codes plus a tail code per position (``targets.value_encoding``, ``codec``); v2 adds
``topk_log_z`` (float32 log-normalizers at ``targets.temperatures``), ``teacher_nll`` /
``teacher_entropy`` (float16, tau = 1) and ``byte_lengths`` (uint8/uint16 UTF-8 bytes per token).
"""

from __future__ import annotations

import json
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdcache.cache.codec import (  # noqa: F401  re-exported: the format's codecs
    ABS_ENCODING,
    FINE_ENCODING,
    TAIL_EMPTY,
    TAIL_LOGIT_MAX,
    TAIL_SCALE,
    VALUE_ENCODINGS,
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
    encode_topk_values,
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
from kdcache.cache.layout import (  # noqa: F401  re-exported: the layout half of the contract
    LOG_Z_DTYPE,
    MAX_SAMPLES,
    MAX_TOP_K,
    RESERVED_TARGETS,
    SIGNAL_DTYPE,
    SIGNALS,
    VALUE_ENCODING,
    SequenceTargets,
    TargetLayout,
)

FORMAT_NAME = "kdcache"
FORMAT_VERSION = "2.0"
"""major.minor written here: readers refuse a major not in ``READ_MAJORS``; minors only add optional fields."""
READ_MAJORS = ("1", "2")
"""Major versions this kdcache reads. A v1 cache simply lacks the v2 columns (log-normalizers, teacher
signals, byte spans): what needs them refuses it, naming the manifest and the fix (rebuild)."""
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
"""The teacher's tokenizer, saved inside the cache so that a cache is self-contained."""
SHARD_PATTERN = re.compile(r"\Ashard-[0-9]{5}\.parquet\Z")  # \Z, not $ (which accepts a trailing newline)
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,
    "write_page_checksum": True,
}
"""``pq.ParquetWriter`` keyword arguments every shard writer uses (level chosen by bench/cache_format.py)."""


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
