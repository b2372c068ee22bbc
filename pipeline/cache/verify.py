"""``verify_cache``: every problem in a whole cache, each naming its file (what ``kdcache verify`` runs).

Nothing in the directory is trusted because the manifest says so: the manifest's counts must add
up to its shards and its corpus, each shard's footer must carry the build key of the manifest's
teacher/tokenizer/corpus/targets sections (so a manifest edited to another vocabulary size or k is
caught), the tokenizer files must be exactly the ones the manifest records, with their sha256, and
no file the manifest does not list may sit in the cache.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from kdcache.cache.format import MANIFEST_NAME, TOKENIZER_DIR, CacheFormatError, Manifest
from kdcache.cache.hidden_format import PROJECTION_FILE, load_projection
from kdcache.cache.shards import check_shard_file, content_problems, decode_shard, read_shard
from kdcache.cache.writer import SHARD_META_KEY, build_key_of, shard_name
from kdcache.files import InputFileError, UnsafeFileError, check_regular_file, loading
from kdcache.fingerprint import sha256_file, tokenizer_fingerprint
from kdcache.outputs import BOOKKEEPING
from kdcache.tokenizer import tokenizer_vocab_size

REBUILD = "rebuild the cache (rerun the cache stage) or pull it again"


def verify_cache(path: str | Path, *, progress: bool = False) -> list[str]:
    """Every problem found in a cache, human-readable and naming its file; empty means OK.

    Checks the manifest; its counts (stats, corpus, shard list, shard size); each shard's size,
    sha256, Parquet structure, footer build key and blob sizes, row and token counts, that
    ``seq_index`` is increasing from the shard's ``first_seq`` and unique across shards, ids <
    vocab_size and strictly ascending within a position, lengths within [1, top_k] (adaptive) /
    [1, samples], and sample counts >= 1 summing to ``samples``; the tokenizer files (regular files
    inside the cache, sha256 as recorded, none unlisted) and that they load to the recorded
    fingerprint and vocabulary size; and that no unlisted file sits in the cache directory.
    Top-k values need no check: every code and tail code decodes to a finite, normalized distribution.
    """
    root = Path(path)
    try:
        meta = Manifest.load(root)
    except (CacheFormatError, InputFileError) as e:
        return [str(e)]
    where = root / MANIFEST_NAME
    try:
        problems = count_problems(meta, where) + unlisted_files(root, meta)
    except (KeyError, TypeError, ValueError) as e:
        return [f"{where}: malformed ({type(e).__name__}: {e}); {REBUILD}"]
    problems += tokenizer_problems(root, meta)
    if meta.layout.hidden:  # the stored projection must be the one the hidden-state targets were made with
        try:
            load_projection(root, meta.layout.hidden)
        except CacheFormatError as e:
            problems.append(str(e))
    shards = meta.shards
    if progress:
        from tqdm.auto import tqdm

        shards = tqdm(shards, desc="verify", unit="shard")
    key, layout, seen = _build_key(meta), meta.layout, []
    for info in shards:
        try:
            file = check_shard_file(root, info)
            table = read_shard(file, info, layout)
            staged = decode_shard(table, layout, where=str(file))
        except CacheFormatError as e:
            problems.append(str(e))
            continue
        problems += [f"{file}: {p}" for p in footer_problems(file, info, key)]
        problems += [f"{file}: {p}" for p in content_problems(staged, layout, info, meta.corpus.get("num_sequences"))]
        seen.append(staged.seq_index)
    if seen and len(np.unique(all_seq := np.concatenate(seen))) != len(all_seq):
        problems.append(f"{where}: some seq_index values appear more than once")
    return problems


def _build_key(meta: Manifest) -> str | None:
    try:
        return build_key_of(
            {"teacher": meta.teacher, "tokenizer": meta.tokenizer, "corpus": meta.corpus, "targets": meta.targets}
        )
    except (KeyError, TypeError):
        return None


def count_problems(meta: Manifest, where: Path) -> list[str]:
    """The manifest's numbers must add up: stats vs shards, shards vs corpus, names and first_seq vs position."""
    out, stats, corpus, targets = [], meta.stats, meta.corpus, meta.targets
    rows, tokens = meta.num_rows, meta.num_tokens
    for key, value in (("num_rows", rows), ("num_tokens", tokens)):
        if stats.get(key) != value:
            out.append(f"stats.{key} is {stats.get(key)!r} but the shards listed hold {value}")
    skipped = stats.get("skipped_sequences", [])
    if not isinstance(skipped, list) or stats.get("num_skipped", 0) != len(skipped):
        out.append("stats.num_skipped does not match stats.skipped_sequences")
        skipped = []
    num_sequences, per_shard = corpus.get("num_sequences"), targets.get("rows_per_shard")
    if not isinstance(num_sequences, int) or rows + len(skipped) != num_sequences:
        out.append(f"corpus.num_sequences is {num_sequences!r} but the shards hold {rows} (+ {len(skipped)} skipped)")
    if isinstance(num_sequences, int) and isinstance(per_shard, int) and per_shard > 0:
        expected = math.ceil(num_sequences / per_shard)
        if len(meta.shards) != expected:
            out.append(
                f"{len(meta.shards)} shards listed, but {num_sequences} sequences at {per_shard} per shard "
                f"make {expected}"
            )
        for i, info in enumerate(meta.shards):
            if info.file != shard_name(i) or info.first_seq != i * per_shard or info.rows > per_shard:
                out.append(f"shards[{i}] ({info.file}, first_seq {info.first_seq}, {info.rows} rows) is out of place")
    else:
        out.append(f"targets.rows_per_shard is {per_shard!r}, not a positive integer")
    return [f"{where}: {p}; {REBUILD}" for p in out]


def unlisted_files(root: Path, meta: Manifest) -> list[str]:
    """Entries of the cache directory the manifest does not account for: never trusted, so reported."""
    known = {MANIFEST_NAME, TOKENIZER_DIR, *BOOKKEEPING, *(s.file for s in meta.shards)}
    known |= {PROJECTION_FILE} if meta.layout.hidden else set()
    return [
        f"{p}: not listed in {MANIFEST_NAME} — not part of the cache; remove it (or {REBUILD})"
        for p in sorted(root.iterdir())
        if p.name not in known
    ]


def tokenizer_problems(root: Path, meta: Manifest) -> list[str]:
    """The tokenizer/ files: exactly the recorded ones, regular files inside the cache, each sha256 as
    recorded; then loaded, they must give the manifest's fingerprint and vocabulary size."""
    tok, files = root / TOKENIZER_DIR, meta.tokenizer.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{root / MANIFEST_NAME}: tokenizer.files (the sha256 of each tokenizer file) is missing; {REBUILD}"]
    if tok.is_symlink() or not tok.is_dir():
        return [f"{tok}: not a directory inside the cache; {REBUILD}"]
    out = []
    for name, digest in sorted(files.items()):
        path = tok / str(name)
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
            out.append(f"{root / MANIFEST_NAME}: tokenizer file name {name!r} is not a plain file name; {REBUILD}")
            continue
        try:
            check_regular_file(path, fix=f"refusing it: {REBUILD}", parent="the cache's tokenizer/")
        except FileNotFoundError:
            out.append(f"{path}: listed in {MANIFEST_NAME} but missing; {REBUILD}")
            continue
        except UnsafeFileError as e:
            out.append(str(e))
            continue
        if path.is_symlink():
            out.append(f"{path}: a symbolic link, not the file the manifest records; {REBUILD}")
        elif (actual := sha256_file(path)) != digest:
            out.append(f"{path}: sha256 {actual} does not match the manifest's {digest}; {REBUILD}")
    out += [
        f"{p}: not listed in {MANIFEST_NAME} (tokenizer.files) — a tokenizer would load it; remove it or {REBUILD}"
        for p in sorted(tok.iterdir())
        if p.name not in files
    ]
    return out or _loaded_tokenizer_problems(tok, meta)


def _loaded_tokenizer_problems(tok: Path, meta: Manifest) -> list[str]:
    from transformers import AutoTokenizer

    try:
        with loading(tok, what="the cache's tokenizer", fix=REBUILD):
            loaded = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
            fingerprint, vocab = tokenizer_fingerprint(loaded), tokenizer_vocab_size(loaded)
    except InputFileError as e:
        return [str(e)]
    out, recorded = [], meta.tokenizer
    if fingerprint != recorded.get("fingerprint"):
        out.append(f"{tok}: loads to fingerprint {fingerprint}, the manifest records {recorded.get('fingerprint')}")
    if vocab != recorded.get("vocab_size"):
        out.append(f"{tok}: has {vocab} token ids, the manifest records vocab_size {recorded.get('vocab_size')}")
    return [f"{p}; {REBUILD}" for p in out]


def footer_problems(file: Path, info: Any, key: str | None) -> list[str]:
    """The shard's own record (Parquet footer): the manifest's build key, its rows and first sequence."""
    try:
        raw = (pq.read_metadata(file).metadata or {}).get(SHARD_META_KEY)
        meta = json.loads(raw) if raw is not None else None
    except (OSError, ValueError, RecursionError) as e:
        return [f"footer unreadable ({e})"]
    if not isinstance(meta, dict):
        return ["no kdcache shard record in its footer (not written by the cache stage)"]
    out = []
    if meta.get("build_key") != key:
        out.append(
            "its footer's build key differs from the manifest's teacher/tokenizer/corpus/targets sections "
            "(the manifest was edited, or the shard belongs to another cache)"
        )
    if meta.get("rows") != info.rows or meta.get("first_seq") != info.first_seq:
        out.append(f"its footer says {meta.get('rows')} rows from {meta.get('first_seq')}, the manifest otherwise")
    return out
