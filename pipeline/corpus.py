"""Read a corpus with ``datasets``, split it by document content, tokenize and pack it.

Documents come from local text files (one document per file), JSON Lines / JSON or Parquet files
(one document per row, column ``corpus.text_field``) or, by default, the running Python's standard
library. Everything is read through ``datasets`` with ``keep_in_memory=True`` and a throw-away cache
directory, so prepare never writes into ``~/.cache/huggingface`` and never touches the network; the
price is that the corpus text is held in RAM (fine up to a few GB; the packed ids are what is kept).

Every document starts with the special tokens the tokenizer's own rules add (BOS for Llama-3 and
Gemma tokenizers) and ends with EOS. Packing (``prepare.packing``, see ``kdcache.packing``) is by
default ``documents``: each document starts a new row and its last row is padded, so a teacher
never attends across a document boundary; padding is masked downstream. We chose padding over
several documents per row with block-diagonal attention masks because every family's forward
and every student take plain causal rows, and a masked pad costs only compute (on average half a
row per document); ``stream`` packs without padding when documents are long or boundaries do
not matter.

``corpus.context_field`` (context distillation, ``kdcache.teacher_context``) names a column holding each
document's teacher-only context. Prepare stores the distinct contexts once, tokenized as the teacher sees
them (the tokenizer's leading special tokens, then the text's ids; an empty context is no tokens), and each
row's context index (``kdcache.token_data``); a row never mixes documents of different contexts: packing
restarts where the context changes (``stream`` packs the documents sorted by context, so each context's
incomplete last row is dropped). The cache stage runs the teacher on ``[context; row]``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import tempfile
from collections.abc import Iterator
from itertools import chain, groupby
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError
from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from kdcache import token_data
from kdcache.config.base import to_dict
from kdcache.config.corpus import CorpusConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.corpus_files import (
    CorpusError,
    check_utf8,
    default_corpus_files,
    default_corpus_name,
    expand_paths,
    file_kind,
    utf8_error_offset,
)
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.packing import check_bos_rule, packing_record, pad_id_for, row_packer, special_tokens_around
from kdcache.tokenizer import load_tokenizer, tokenizer_vocab_size

log = logging.getLogger(__name__)

_TOKENIZE_CHARS = 1 << 20  # characters per tokenizer call


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """Show or hide ``datasets``' own progress bars for the duration of a call, then restore."""
    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


def _load(builder: str, files: list[Path], **kwargs: Any) -> datasets.Dataset:
    with tempfile.TemporaryDirectory(prefix="kdcache-datasets-") as cache_dir:
        # datasets treats data_files as glob patterns: escape names such as "notes[1].txt"
        return datasets.load_dataset(
            builder,
            data_files=[glob.escape(str(f)) for f in files],
            split="train",
            cache_dir=cache_dir,
            keep_in_memory=True,
            **kwargs,
        )


def _read_text_files(files: list[Path], cfg: CorpusConfig) -> datasets.Dataset:
    """One document per file (universal newlines, like ``open()`` in text mode)."""
    if cfg.context_field:
        raise CorpusError(
            f"{files[0]}: a text file holds no corpus.context_field={cfg.context_field!r} column — use JSON Lines or "
            "Parquet documents with that field, or set corpus.context_field: null"
        )
    if cfg.errors == "strict":
        for path in files:
            check_utf8(path)
    ds = _load("text", files, sample_by="document", encoding_errors=cfg.errors)
    if len(ds) != len(files):
        raise CorpusError(f"datasets returned {len(ds)} documents for {len(files)} text files (first: {files[0]})")
    return ds.add_column("source", [str(f) for f in files])


def _read_table_file(path: Path, kind: str, cfg: CorpusConfig) -> datasets.Dataset | None:
    """One document per row of a JSON Lines / JSON / Parquet file, taken from ``cfg.text_field``.

    An empty (0-byte) file holds no documents: None.
    """
    if path.stat().st_size == 0:
        return None
    kwargs: dict[str, Any] = {}
    if kind == "json":
        if cfg.errors == "strict":
            check_utf8(path)
        elif utf8_error_offset(path) is not None:
            kwargs = {"encoding": "utf-8-sig", "encoding_errors": "replace"}  # makes the builder re-encode
    try:
        ds = _load(kind, [path], **kwargs)
    except (DatasetGenerationError, ValueError, StopIteration) as e:
        raise CorpusError(f"{path}: cannot read as {kind} ({e.__cause__ or e}) — fix the file or its extension") from e
    field = cfg.text_field
    if field not in ds.column_names:
        raise CorpusError(
            f"corpus.text_field={field!r} not in columns {ds.column_names} of {path} — "
            "set corpus.text_field to the column holding the text"
        )
    feature = ds.features[field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise CorpusError(f"{path}: column corpus.text_field={field!r} holds {feature}, not text")
    if cfg.context_field:
        _check_context_column(ds, path, cfg.context_field)
    ds = ds.select_columns([field, *([cfg.context_field] if cfg.context_field else [])])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if cfg.context_field:
        ds = ds.rename_column(cfg.context_field, "context")
    return ds.add_column("source", [str(path)] * len(ds))


def _check_context_column(ds: datasets.Dataset, path: Path, field: str) -> None:
    """Refuse a file without a text column ``field`` or with a document lacking it (missing or null)."""
    how = "give every document this field ('' for no context), or set corpus.context_field: null"
    if field not in ds.column_names:
        raise CorpusError(f"{path}: no column corpus.context_field={field!r} (columns {ds.column_names}) — {how}")
    feature = ds.features[field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise CorpusError(f"{path}: column corpus.context_field={field!r} holds {feature}, not text — {how}")
    missing = next((i for i, c in enumerate(ds[field]) if c is None), None)
    if missing is not None:
        raise CorpusError(f"{path}: document {missing} (row order) has no corpus.context_field={field!r} — {how}")


def _is_nonempty(batch: dict[str, list]) -> list[bool]:
    return [bool(t and not t.isspace()) for t in batch["text"]]


def read_documents(cfg: CorpusConfig, *, progress: bool = False) -> datasets.Dataset:
    """Read the corpus into an in-memory Dataset with columns ``text`` and ``source`` (its file).

    Files are read in sorted path order, rows in file order; empty (or whitespace-only) documents are
    dropped and ``cfg.max_documents`` caps the count. Raises ``CorpusError`` naming the file and the fix.
    """
    files = expand_paths(cfg.paths) if cfg.paths else default_corpus_files()
    if not files:
        raise CorpusError("corpus: no files to read — set corpus.paths")
    parts: list[datasets.Dataset] = []
    count = 0
    with _datasets_progress(progress):
        for kind, run in groupby(files, key=file_kind):
            run = list(run)
            loaded = [_read_text_files(run, cfg)] if kind == "text" else [_read_table_file(p, kind, cfg) for p in run]
            for ds in (d for d in loaded if d is not None):
                ds = ds.filter(_is_nonempty, batched=True, keep_in_memory=True)
                parts.append(ds)
                count += len(ds)
            if cfg.max_documents and count >= cfg.max_documents:
                break
    if count == 0:
        raise CorpusError(f"corpus: all {len(files)} files are empty (first: {files[0]}) — add text to corpus.paths")
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if cfg.max_documents and len(docs) > cfg.max_documents:
        docs = docs.select(range(cfg.max_documents), keep_in_memory=True)
    log.info("read %d documents from %d files", len(docs), len(files))
    return docs


def _content_hash(text: str) -> float:
    """sha256 of the text mapped to a uniform number in [0, 1)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(ds: datasets.Dataset, *, val_fraction: float) -> dict[str, datasets.Dataset]:
    """Split by content hash: a document goes to ``val`` iff hash(text) < ``val_fraction``.

    The assignment depends only on each document's text, never on its position, so adding,
    removing or reordering files moves no other document between splits (identical documents
    always land together). Both splits are non-empty: if one would be empty, the document with
    the lowest (for val) or highest (for train) hash is moved.
    """
    if len(ds) < 2:
        raise CorpusError(f"corpus has {len(ds)} document(s); a train/val split needs at least 2 — add documents")
    hashes = np.array(
        [_content_hash(t) for rows in ds.select_columns(["text"]).iter(batch_size=1024) for t in rows["text"]]
    )  # (D,)
    is_val = hashes < val_fraction
    if not is_val.any():
        is_val[np.argmin(hashes)] = True
    if is_val.all():
        is_val[np.argmax(hashes)] = False
    _warn_if_lopsided(ds, is_val, val_fraction=val_fraction)
    return {
        "train": ds.select(np.flatnonzero(~is_val), keep_in_memory=True),
        "val": ds.select(np.flatnonzero(is_val), keep_in_memory=True),
    }


def _warn_if_lopsided(ds: datasets.Dataset, is_val: np.ndarray, *, val_fraction: float) -> None:
    """Warn when the split by document puts far more (or less) text in val than ``val_fraction`` asks,
    e.g. one huge document that hashed into val: the split is by document, never inside one."""
    sizes = np.array([len(t) for t in ds["text"]], dtype=np.int64)  # (D,) characters
    share = float(sizes[is_val].sum() / max(sizes.sum(), 1))
    if share <= max(3 * val_fraction, val_fraction + 0.2) and share >= val_fraction / 10:
        return
    biggest = int(np.argmax(np.where(is_val, sizes, -1) if share > val_fraction else sizes))
    log.warning(
        "corpus: the val split holds %.1f%% of the text (corpus.val_fraction %.3f); its split is by document "
        "and %s alone is %.1f%% of the corpus — add more documents, or cut large ones into several files",
        100 * share,
        val_fraction,
        ds[biggest].get("source", f"document {biggest}"),
        100 * sizes[biggest] / max(sizes.sum(), 1),
    )


def _text_batches(ds: datasets.Dataset) -> Iterator[tuple[list[str], np.ndarray]]:
    """Documents in order as (pieces, ends) batches of about ``_TOKENIZE_CHARS`` characters.

    ``ends[i]`` is True where piece i is the last of its document. A document longer than
    ``_TOKENIZE_CHARS`` is cut into pieces (``_cut_points``), so no tokenizer call — whose
    encodings cost ~100 bytes per token — ever sees more than that many characters.
    """
    max_chars = _TOKENIZE_CHARS  # read per call (tests shrink it)
    batch: list[str] = []
    ends: list[bool] = []
    size = 0
    for rows in ds.select_columns(["text"]).iter(batch_size=256):
        for text in rows["text"]:
            bounds = [0, *_cut_points(text, max_chars), len(text)]
            for a, b in zip(bounds, bounds[1:], strict=False):
                batch.append(text[a:b])
                ends.append(b == len(text))
                size += b - a
                if size >= max_chars:
                    yield batch, np.array(ends)
                    batch, ends, size = [], [], 0
    if batch:
        yield batch, np.array(ends)


def _cut_points(text: str, max_chars: int) -> list[int]:
    """Where to cut a document longer than ``max_chars``: just before a newline that follows a
    non-space character, at most ``max_chars`` apart (a single longer line is cut at ``max_chars``).

    With a byte-level BPE tokenizer (GPT-2-style pre-tokenizer regex, as ``kdcache.tokenizer``
    trains) such a point is always a pre-token boundary, so the pieces' ids equal the whole
    document's; other pre-tokenizers (e.g. SentencePiece's Metaspace) may tokenize the first
    characters after a cut differently.
    """
    cuts, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n", start + 1, start + max_chars)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind("\n", start + 1, cut)
        if cut <= start:
            cut = start + max_chars
        cuts.append(cut)
        start = cut
    return cuts


def tokenize_and_pack(
    ds: datasets.Dataset,
    tokenizer: Any,
    *,
    seq_len: int,
    packing: str,
    max_sequences: int = 0,
    allow_empty: bool = False,
    seq_len_key: str = "prepare.seq_len",
    progress: bool = False,
) -> np.ndarray:
    """Tokenize documents and pack them into rows of ``seq_len`` ids: ``(N, seq_len)`` int32.

    Each document becomes the tokenizer's own special tokens around its text (``special_tokens_around``:
    BOS for Llama-3/Gemma-style tokenizers) followed by EOS (unless the tokenizer already appended
    it). ``packing`` (``prepare.packing``) is ``"stream"``: documents concatenated and cut into rows,
    the incomplete last row dropped; or ``"documents"``: each document from a new row, its last row
    padded (``kdcache.packing``). The demo teacher trains on ``stream`` rows.

    Tokenizing streams over batches of documents (about 1M characters each; a longer document is
    tokenized in pieces cut at line starts, see ``_cut_points``) and stops once ``max_sequences``
    rows exist (0 = all). No row at all raises ``CorpusError`` unless ``allow_empty`` (then the
    result is ``(0, seq_len)``).
    """
    return _tokenize_pack(
        ds,
        tokenizer,
        seq_len=seq_len,
        packing=packing,
        max_sequences=max_sequences,
        allow_empty=allow_empty,
        seq_len_key=seq_len_key,
        progress=progress,
    )[0]


def _tokenize_pack(
    ds: datasets.Dataset,
    tokenizer: Any,
    *,
    seq_len: int,
    packing: str,
    max_sequences: int = 0,
    allow_empty: bool = False,
    seq_len_key: str = "prepare.seq_len",
    progress: bool = False,
    contexts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``tokenize_and_pack`` -> (rows (N, seq_len) int32, their contexts (N,) int32). ``contexts`` (D,): each
    document's context index (None: all 0); packing restarts with a new packer where the context changes."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("tokenizer has no EOS token; documents cannot be separated — set eos_token")
    prefix, suffix = special_tokens_around(tokenizer)
    end = suffix if suffix[-1:] == [eos] else [*suffix, eos]
    packers: list[tuple[Any, int]] = []  # (packer, context) per run of documents sharing a context
    done, doc = 0, 0  # rows of the finished packers, documents read
    n_tokens, at_start = 0, True
    bar = tqdm(total=len(ds), desc="tokenize", unit="doc", disable=not progress)
    for texts, ends in _text_batches(ds):
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        for piece, is_end in zip(ids, ends.tolist(), strict=True):
            context = int(contexts[doc]) if contexts is not None else 0
            if at_start and (not packers or packers[-1][1] != context):
                done += packers[-1][0].count if packers else 0
                packers.append((row_packer(packing, seq_len=seq_len, pad_id=pad_id_for(tokenizer)), context))
            flat = np.fromiter(chain(prefix if at_start else (), piece, end if is_end else ()), dtype=np.int32)
            n_tokens += flat.size
            packers[-1][0].add(flat, document_end=is_end)
            at_start, doc = is_end, doc + is_end
        bar.update(int(ends.sum()))
        if max_sequences and done + packers[-1][0].count >= max_sequences:
            break
    bar.close()
    parts = [p.rows() for p, _ in packers]
    rows = np.concatenate(parts) if parts else np.zeros((0, seq_len), dtype=np.int32)  # (N, T)
    row_contexts = np.repeat(np.array([c for _, c in packers], np.int32), [len(r) for r in parts])  # (N,)
    if max_sequences:
        rows, row_contexts = rows[:max_sequences], row_contexts[:max_sequences]
    if len(rows) == 0 and not allow_empty:
        raise CorpusError(
            f"corpus yields {n_tokens} tokens, fewer than {seq_len_key}={seq_len}; add text or lower seq_len"
        )
    return rows, row_contexts


def _document_contexts(
    splits: dict[str, datasets.Dataset], tokenizer: Any
) -> tuple[list[tuple[int, ...]], list[str], dict[str, np.ndarray]]:
    """The distinct contexts (in order of first appearance) as the teacher sees them — the tokenizer's leading
    special tokens then the text's ids, no tokens for an empty one — their texts, each split's (D,) index."""
    index: dict[str, int] = {}
    per_split = {
        name: np.array([index.setdefault(c, len(index)) for c in ds["context"]], dtype=np.int32)
        for name, ds in splits.items()
    }
    texts = list(index)
    prefix, _ = special_tokens_around(tokenizer)
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    table = [tuple(int(i) for i in (*prefix, *t)) if x.strip() else () for x, t in zip(texts, ids, strict=True)]
    return table, texts, per_split


def prepare_tokens(
    corpus_cfg: CorpusConfig,
    prepare_cfg: PrepareConfig,
    *,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    progress: bool = False,
) -> dict[str, Any]:
    """The prepare stage: read, split by document, tokenize with the teacher's tokenizer, pack, write.

    Returns the token-data manifest written to ``out_dir`` (see ``kdcache.token_data``).
    """
    tokenizer = load_tokenizer(tokenizer_dir)
    check_bos_rule(tokenizer, tokenizer_dir)
    docs = read_documents(corpus_cfg, progress=progress)
    splits = split_documents(docs, val_fraction=corpus_cfg.val_fraction)
    caps = {"train": prepare_cfg.max_train_sequences, "val": prepare_cfg.max_val_sequences}
    contexts = _document_contexts(splits, tokenizer) if corpus_cfg.context_field else None
    packed, row_contexts = {}, {}
    for name, ds in splits.items():
        doc_contexts = contexts[2][name] if contexts else None  # (D,)
        if doc_contexts is not None and prepare_cfg.packing == "stream":  # each context's documents together
            order = np.argsort(doc_contexts, kind="stable")
            ds, doc_contexts = ds.select(order, keep_in_memory=True), doc_contexts[order]
        packed[name], row_contexts[name] = _tokenize_pack(
            ds,
            tokenizer,
            seq_len=prepare_cfg.seq_len,
            packing=prepare_cfg.packing,
            max_sequences=caps[name],
            allow_empty=name == "val",
            progress=progress,
            contexts=doc_contexts,
        )
    if len(packed["val"]) == 0:
        raise CorpusError(
            f"val split ({len(splits['val'])} documents) has no full sequence of "
            f"prepare.seq_len={prepare_cfg.seq_len} tokens; raise corpus.val_fraction or lower prepare.seq_len"
        )
    for name, ids in packed.items():
        log.info(
            "%s: %d documents -> %d sequences of %d tokens", name, len(splits[name]), len(ids), prepare_cfg.seq_len
        )
    meta = {
        "corpus": {
            "source": list(corpus_cfg.paths) or default_corpus_name(),
            "num_documents": {name: len(ds) for name, ds in splits.items()},
            "config": to_dict(corpus_cfg),
        },
        "prepare": to_dict(prepare_cfg),
        "tokenizer_dir": str(tokenizer_dir),
        "packing": packing_record(tokenizer, prepare_cfg.packing),
    }
    return token_data.write_tokens(
        out_dir,
        packed,
        vocab_size=tokenizer_vocab_size(tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        meta=meta,
        contexts=(corpus_cfg.context_field, contexts[0], contexts[1], row_contexts) if contexts else None,
    )
