"""Context (prompt) distillation: a fixed text the teacher sees before every row and the student never does.

``cache.teacher_context`` is the text itself or the path of a UTF-8 file holding it (a system prompt,
few-shot examples, a reference document). The cache stage tokenizes it once — the tokenizer's own leading
special tokens (BOS for Llama-3/Gemma-style tokenizers) then the text's ids — runs the teacher on
``[context; row]`` (``kdcache.teacher.context_hidden``) and stores targets for the row's positions only,
position-aligned with the row: position t holds the teacher's distribution of row token t + 1 given the
context and row[: t + 1]. The student trains on the rows alone, so it learns to behave as if prompted.
The manifest records ``corpus.teacher_context`` = {sha256 of the text's UTF-8 bytes (for a file:
``sha256sum FILE``), num_tokens, source}; it is part of the cache's identity (build key, resume check and
content-derived name), so a cache is never resumed or reused under another context.

A per-document context instead (``corpus.context_field``): prepare stores each row's context with the token
data (``kdcache.token_data.RowContexts``); the teacher runs on ``[that row's context; row]`` and the manifest's
``corpus.teacher_context`` is {source: "field:<name>", sha256 over the contexts and the rows' context indices,
num_tokens (the longest context's), num_contexts} (``cache_context``), with the same role in the cache's identity.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.packing import special_tokens_around

FIELD = "cache.teacher_context"

_PATHLIKE = re.compile(r"[^\s]*(/|\\)[^\s]*|[^\s]+\.(txt|md|json|jsonl|yaml|yml|prompt)")
"""A value without whitespace that contains a path separator or ends like a text file: meant as a file."""


class TeacherContextError(ValueError):
    """The teacher context cannot be read, is empty, or does not fit the teacher's positions."""


@dataclass(frozen=True)
class TeacherContext:
    """A tokenized teacher-only prefix and its manifest record ``{sha256, num_tokens, source}``."""

    ids: tuple[int, ...]
    text: str
    record: dict[str, Any]


def context_text(value: str, *, field: str = FIELD) -> tuple[str, bytes, str] | None:
    """``value`` -> (text, its UTF-8 bytes, source), or None when empty.

    An existing file is read (strict UTF-8); a value that looks like a path but names no file is refused
    (a typo must not become the context); anything else is the context text itself.
    """
    if not value:
        return None
    path = Path(value)
    if "\n" not in value and len(value) < 4096 and path.is_file():
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TeacherContextError(f"{field}: {path} is not UTF-8 at byte {e.start} — save it as UTF-8") from e
        source = f"file {path.name}"
    elif _PATHLIKE.fullmatch(value):
        raise TeacherContextError(
            f"{field}: {value!r} looks like a file path but no such file exists — fix the path (relative paths are "
            "from the working directory), or give the context text itself"
        )
    else:
        text, data, source = value, value.encode("utf-8"), "string"
    if not text.strip():
        raise TeacherContextError(f"{field}: the context ({source}) is empty — give it text, or set it to ''")
    return text, data, source


def cache_context(cfg: Any, teacher: Any, tokens: Any) -> TeacherContext | None:
    """The cache build's teacher context for ``tokens`` (a ``kdcache.token_data.TokenSplit``) under ``cfg`` (a
    ``CacheConfig``): the fixed ``cache.teacher_context``, or the token data's per-row contexts
    (``corpus.context_field``: ``ids`` empty, the rows' own contexts are ``tokens.contexts``), or None."""
    rows = getattr(tokens, "contexts", None)
    if rows is None:
        return load_teacher_context(cfg.teacher_context, teacher, seq_len=tokens.seq_len)
    source = f"token data {tokens.path} (corpus.context_field={rows.record['source'][len('field:') :]!r})"
    if cfg.teacher_context:
        raise TeacherContextError(
            f"{FIELD} is set but {source} gives each document its own context — set one of them: "
            "cache.teacher_context: '' or corpus.context_field: null (then rerun prepare)"
        )
    if cfg.hidden_layers:
        raise TeacherContextError(
            f"cache.hidden_layers with per-document contexts ({source}) is not supported — set cache.hidden_layers: []"
        )
    limit = _max_positions(teacher)
    if isinstance(limit, int) and rows.record["num_tokens"] + tokens.seq_len > limit:
        raise TeacherContextError(
            f"{source}: its longest context ({rows.record['num_tokens']} tokens) + rows of {tokens.seq_len} exceed "
            f"the teacher's max_position_embeddings {limit} — shorten the contexts or lower prepare.seq_len"
        )
    return TeacherContext(ids=(), text="", record=dict(rows.record))


def _max_positions(teacher: Any) -> int | None:
    config = teacher.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


def load_teacher_context(value: str, teacher: Any, *, seq_len: int, field: str = FIELD) -> TeacherContext | None:
    """Tokenize the context for ``teacher`` (a ``kdcache.teacher.Teacher``); None when ``value`` is empty.

    Refuses a context that, with a row of ``seq_len`` tokens, exceeds the teacher's
    ``max_position_embeddings``.
    """
    found = context_text(value, field=field)
    if found is None:
        return None
    text, data, source = found
    tok = teacher.tokenizer
    prefix, _ = special_tokens_around(tok)
    ids = (*prefix, *tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    limit = _max_positions(teacher)
    if isinstance(limit, int) and len(ids) + seq_len > limit:
        raise TeacherContextError(
            f"{field}: {len(ids)} context tokens + rows of {seq_len} exceed the teacher's max_position_embeddings "
            f"{limit} — shorten the context or lower prepare.seq_len"
        )
    record = {"sha256": hashlib.sha256(data).hexdigest(), "num_tokens": len(ids), "source": source}
    return TeacherContext(ids=tuple(int(i) for i in ids), text=text, record=record)
