"""Packed token data: one Arrow IPC file per split plus ``manifest.json`` (output of prepare).

``<dir>/<split>.arrow`` holds one column ``input_ids: fixed_size_list<int32>[seq_len]``, a row per
packed sequence; it is memory-mapped on open, so a split of any size costs no RAM.

Per-document teacher contexts (``corpus.context_field``, ``kdcache.corpus``): ``contexts.arrow`` holds the
distinct contexts once (``ids: list<int32>`` as the teacher sees them, ``text``), each split's file a second
column ``context_index: int32`` (the row's context), and the manifest ``contexts`` = {field, file, num_contexts}
plus per split ``splits.<name>.contexts`` = {sha256, num_contexts, max_tokens} (``RowContexts.record``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.files import InputFileError, atomic_write, atomic_write_text, check_regular_file, read_json_file
from kdcache.fingerprint import array_fingerprint
from kdcache.outputs import claim_output_dir

TOKENS_FORMAT = "kdcache-tokens"
TOKENS_VERSION = 1
MANIFEST = "manifest.json"
CONTEXTS_FILE = "contexts.arrow"
OUTPUT_KIND = "tokens"
"""The marker kind of a token directory (``kdcache.files``)."""


class TokenDataError(ValueError):
    """Token data is missing, malformed or does not match what the caller expects."""


@dataclass(frozen=True)
class RowContexts:
    """Each row's teacher-only context (``corpus.context_field``): ``table[index[row]]`` are its token ids."""

    index: np.ndarray  # (N,) int32, read-only view of the mapped split file
    table: tuple[tuple[int, ...], ...]  # the distinct contexts' ids
    record: dict[str, Any]  # {source: "field:<name>", sha256, num_tokens (the longest), num_contexts}: provenance

    def for_rows(self, seqs: np.ndarray) -> list[tuple[int, ...]]:
        """The contexts of rows ``seqs``, one per row."""
        return [self.table[i] for i in self.index[seqs].tolist()]


def contexts_sha256(table: list[tuple[int, ...]] | tuple[tuple[int, ...], ...], index: np.ndarray) -> str:
    """sha256 over the contexts' ids (each length-prefixed, int32 little-endian) then the rows' context indices:
    the same for the same contexts in the same rows, whatever else the table holds."""
    h = hashlib.sha256()
    for ids in table:
        h.update(np.int64(len(ids)).astype("<i8").tobytes() + np.asarray(ids, dtype="<i4").tobytes())
    h.update(np.asarray(index, dtype="<i4").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TokenSplit:
    """One split of packed sequences, memory-mapped."""

    ids: np.ndarray  # (N, T) int32, read-only view of the mapped file
    split: str
    fingerprint: str  # sha256 of the ids (array_fingerprint)
    seq_len: int
    vocab_size: int
    tokenizer_fingerprint: str
    manifest: dict[str, Any]
    path: Path | None = None  # the token directory
    contexts: RowContexts | None = None  # per-document teacher contexts (corpus.context_field), else None

    def __len__(self) -> int:
        return self.ids.shape[0]


def write_tokens(
    out_dir: str | Path,
    splits: dict[str, np.ndarray],
    *,
    vocab_size: int,
    tokenizer_fingerprint: str,
    meta: dict[str, Any] | None = None,
    contexts: tuple[str, list[tuple[int, ...]], list[str], dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Write each (N, T) id array as ``<split>.arrow`` and the manifest last; returns the manifest.

    ``contexts`` = (field, the distinct contexts' ids, their texts, each split's (N,) context index): per-row
    teacher contexts (module docstring).

    Files are written to temporary names and renamed, so a crash never leaves a file that looks complete.
    ``out_dir`` must be new or token data kdcache wrote (``kdcache.outputs.claim_output_dir``): another
    directory is refused before anything is written. Locking it is the caller's job (``kdcache prepare``).
    """
    out = claim_output_dir(out_dir, kind=OUTPUT_KIND, legacy=is_token_dir)
    entries = {}
    for split, ids in splits.items():
        ids = np.ascontiguousarray(ids, dtype=np.int32)  # (N, T)
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise TokenDataError(f"split {split!r}: expected (N, seq_len >= 2) ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise TokenDataError(f"split {split!r}: ids outside [0, {vocab_size})")
        column = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), ids.shape[1])
        table = pa.table({"input_ids": column})
        if contexts is not None:
            index = np.ascontiguousarray(contexts[3][split], dtype=np.int32)  # (N,)
            n = len(contexts[1])
            if index.shape != (ids.shape[0],) or (index.size and not 0 <= index.min() <= index.max() < n):
                raise TokenDataError(f"split {split!r}: the context index must be (N,) in [0, {len(contexts[1])})")
            table = table.append_column("context_index", pa.array(index))
        atomic_write(out / f"{split}.arrow", lambda tmp, table=table: _write_ipc(tmp, table))
        entries[split] = {
            "file": f"{split}.arrow",
            "num_sequences": int(ids.shape[0]),
            "num_tokens": int(ids.size),
            "fingerprint": array_fingerprint(ids),
        }
        if contexts is not None:
            used = np.unique(index)
            entries[split]["contexts"] = {
                "sha256": contexts_sha256(contexts[1], index),
                "num_contexts": int(used.size),
                "max_tokens": max((len(contexts[1][i]) for i in used.tolist()), default=0),
            }
    seq_lens = {int(a.shape[1]) for a in splits.values()}
    if len(seq_lens) != 1:
        raise TokenDataError(f"all splits must share one seq_len, got {sorted(seq_lens)}")
    manifest = {
        "format": TOKENS_FORMAT,
        "format_version": TOKENS_VERSION,
        "seq_len": seq_lens.pop(),
        "vocab_size": int(vocab_size),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "splits": entries,
        **(meta or {}),
    }
    if contexts is not None:
        field, table, texts, _ = contexts
        lists = pa.array([list(c) for c in table], type=pa.list_(pa.int32()))
        ctx_table = pa.table({"ids": lists, "text": pa.array(texts, type=pa.string())})
        atomic_write(out / CONTEXTS_FILE, lambda tmp: _write_ipc(tmp, ctx_table))
        manifest["contexts"] = {"field": field, "file": CONTEXTS_FILE, "num_contexts": len(table)}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_ipc(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def is_token_dir(path: Path) -> bool:
    """A token directory written before output markers existed (its manifest says so)."""
    try:
        return read_token_manifest(path)["format"] == TOKENS_FORMAT
    except (TokenDataError, OSError):
        return False


def read_token_manifest(token_dir: str | Path) -> dict[str, Any]:
    """The token manifest, with its fields checked (a malformed one is refused naming the field)."""
    path = Path(token_dir) / MANIFEST
    if not path.exists():
        raise TokenDataError(f"{path}: not found — run the prepare stage (`kdcache prepare ...`) first")
    try:
        manifest = read_json_file(path, what="the token manifest", fix="rerun prepare")
    except InputFileError as e:
        raise TokenDataError(str(e)) from e
    if not isinstance(manifest, dict):
        raise TokenDataError(f"{path}: must be a JSON object — rerun prepare")
    if manifest.get("format") != TOKENS_FORMAT or manifest.get("format_version") != TOKENS_VERSION:
        raise TokenDataError(
            f"{path}: not kdcache token data v{TOKENS_VERSION} "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    _check_manifest_fields(manifest, path)
    return manifest


def _check_manifest_fields(manifest: dict[str, Any], path: Path) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise TokenDataError(f"{path}: {what} — the manifest is damaged; rerun prepare")

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    need(count(manifest.get("seq_len")) and manifest["seq_len"] >= 2, "seq_len must be an integer >= 2")
    need(count(manifest.get("vocab_size")) and manifest["vocab_size"] >= 1, "vocab_size must be a positive integer")
    need(isinstance(manifest.get("tokenizer_fingerprint"), str), "tokenizer_fingerprint must be a string")
    splits = manifest.get("splits")
    need(isinstance(splits, dict), "splits must be an object")
    for name, entry in splits.items():
        need(isinstance(entry, dict), f"splits.{name} must be an object")
        need(isinstance(entry.get("file"), str), f"splits.{name}.file must be a string")
        need(count(entry.get("num_sequences")), f"splits.{name}.num_sequences must be a non-negative integer")
        need(isinstance(entry.get("fingerprint"), str), f"splits.{name}.fingerprint must be a string")


def open_tokens(token_dir: str | Path, split: str) -> TokenSplit:
    """Memory-map one split; checks the file against the manifest's shape (not its hash: see ``verify_tokens``)."""
    manifest = read_token_manifest(token_dir)
    entry = manifest["splits"].get(split)
    if entry is None:
        raise TokenDataError(f"{Path(token_dir) / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    path = Path(token_dir) / entry["file"]
    if entry["file"] != f"{split}.arrow":
        raise TokenDataError(
            f"{Path(token_dir) / MANIFEST}: split {split!r} names file {entry['file']!r}; expected {split}.arrow"
        )
    T = manifest["seq_len"]
    try:
        check_regular_file(path, fix="rerun prepare")
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        column = table.column("input_ids").combine_chunks()
        if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != T:
            raise TokenDataError(f"input_ids is {column.type}, expected fixed_size_list<int32>[{T}]")
        ids = column.values.to_numpy(zero_copy_only=True).reshape(-1, T) if len(column) else np.zeros((0, T), np.int32)
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise TokenDataError(f"{path}: cannot read token file ({e}) — rerun prepare") from e
    if ids.shape[0] != entry["num_sequences"]:
        raise TokenDataError(
            f"{path}: holds {ids.shape[0]} sequences, manifest says {entry['num_sequences']} — rerun prepare"
        )
    return TokenSplit(
        ids=ids,
        split=split,
        fingerprint=entry["fingerprint"],
        seq_len=T,
        vocab_size=manifest["vocab_size"],
        tokenizer_fingerprint=manifest["tokenizer_fingerprint"],
        manifest=manifest,
        path=Path(token_dir),
        contexts=_open_contexts(Path(token_dir), manifest, split, table) if "contexts" in manifest else None,
    )


def _open_contexts(token_dir: Path, manifest: dict[str, Any], split: str, table: pa.Table) -> RowContexts:
    """The split's ``RowContexts`` (``corpus.context_field``): the contexts table and the rows' index column."""
    path = token_dir / CONTEXTS_FILE
    info, entry = manifest["contexts"], manifest["splits"][split].get("contexts")
    try:
        check_regular_file(path, fix="rerun prepare")
        lists = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().column("ids").to_pylist()
        index = table.column("context_index").combine_chunks().to_numpy(zero_copy_only=False)  # (N,) int32
        if not isinstance(entry, dict) or len(lists) != info.get("num_contexts"):
            raise TokenDataError("the manifest's contexts entries do not match the file")
        if index.size and not 0 <= int(index.min()) <= int(index.max()) < len(lists):
            raise TokenDataError(f"context_index outside [0, {len(lists)})")
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise TokenDataError(f"{path}: cannot read the corpus contexts of split {split!r} ({e}) — rerun prepare") from e
    record = {  # the cache's corpus.teacher_context: num_tokens = the longest context's (bounds the positions)
        "source": f"field:{info['field']}",
        "sha256": entry["sha256"],
        "num_tokens": entry["max_tokens"],
        "num_contexts": entry["num_contexts"],
    }
    return RowContexts(index=index, table=tuple(tuple(c) for c in lists), record=record)


def verify_tokens(split: TokenSplit) -> None:
    """Recompute the ids' fingerprint (and the per-document contexts' sha256) and compare with the manifest."""
    actual = array_fingerprint(np.asarray(split.ids, dtype=np.int32))
    if actual != split.fingerprint:
        raise TokenDataError(
            f"token split {split.split!r}: fingerprint {actual[:12]}… != manifest {split.fingerprint[:12]}… "
            "— the file was modified; rerun prepare"
        )
    rows = split.contexts
    if rows is not None and contexts_sha256(rows.table, rows.index) != rows.record["sha256"]:
        raise TokenDataError(
            f"token split {split.split!r}: its per-document contexts ({CONTEXTS_FILE}, context_index) differ from "
            "the manifest's sha256 — the files were modified; rerun prepare"
        )
