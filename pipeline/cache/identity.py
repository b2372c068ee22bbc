"""What a cache is made of and where it goes: its target layout, its manifest header (teacher,
tokenizer, corpus, targets, runtime), its content-derived name, and the check that a directory
holds no cache of other inputs or settings. ``build`` uses these before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcache.cache.format import (
    MANIFEST_NAME,
    SIGNALS,
    VALUE_ENCODING,
    VALUE_ENCODINGS,
    HiddenSpec,
    Manifest,
    TargetLayout,
)
from kdcache.cache.hidden import hidden_targets
from kdcache.cache.signals import byte_spans
from kdcache.cache.writer import CacheWriteError
from kdcache.config.cache import CacheConfig
from kdcache.devices import runtime_key
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.packing import packing_of
from kdcache.teacher import Teacher
from kdcache.teacher_context import cache_context
from kdcache.token_data import TokenSplit
from kdcache.tokenizer import tokenizer_vocab_size


class CacheDirError(CacheWriteError):
    """The output directory already holds a cache made from other inputs or settings."""


def target_layout(
    cfg: CacheConfig, *, vocab_size: int, seq_len: int, max_token_bytes: int = 0, hidden: HiddenSpec | None = None
) -> TargetLayout:
    """The cache layout for ``cfg`` (every v2 cache built here stores the teacher signals ``SIGNALS``, byte spans
    when ``max_token_bytes`` > 0 and ``hidden`` states when given: ``kdcache.cache.hidden.hidden_targets``);
    fields that do not apply to the chosen kind are zeroed."""
    topk = cfg.targets in ("topk", "both")
    sampled = cfg.targets in ("sampled", "both")
    return TargetLayout(
        kind=cfg.targets,
        vocab_size=vocab_size,
        seq_len=seq_len,
        top_k=cfg.top_k if topk else 0,
        mass=cfg.mass if topk else 0.0,
        samples=cfg.samples if sampled else 0,
        temperature=cfg.temperature,
        seed=cfg.seed if sampled else 0,
        temperatures=tuple(float(t) for t in cfg.temperatures) if topk else (),
        value_encoding=VALUE_ENCODINGS[cfg.value_encoding] if topk else VALUE_ENCODING,
        signals=SIGNALS,
        max_token_bytes=max_token_bytes,
        hidden=hidden,
    )


def default_cache_name(
    teacher_info: dict[str, Any],
    tokens: TokenSplit,
    layout: TargetLayout,
    teacher_context: dict[str, Any] | None = None,
) -> str:
    """A content-addressed directory name: same teacher, corpus and targets -> same name.

    e.g. ``3f2a9c1b-77d0e4a2-train-top32``, ``…-train-top64m0.99-t2``, ``…-val-top32-s16seed0``, ``…-top32-log32``
    (top-k value codes other than ``abs8``); hidden-state
    targets add ``h<layers>d<dim>p<projection sha256[:8]>``, e.g. ``…-h2d64p1c0ffee0``.
    """
    parts = []
    if layout.has_topk:
        parts.append(f"top{layout.top_k}" + (f"m{layout.mass:g}" if layout.adaptive else ""))
    if layout.has_samples:
        parts.append(f"s{layout.samples}seed{layout.seed}")
    if layout.temperature != 1.0:
        parts.append(f"t{layout.temperature:g}")
    if layout.temperatures:
        parts.append("z" + "+".join(f"{t:g}" for t in layout.temperatures))
    if layout.has_topk and layout.value_encoding != VALUE_ENCODINGS["abs8"]:  # the default value codes: no suffix
        parts.append({v: k for k, v in VALUE_ENCODINGS.items()}.get(layout.value_encoding, "values"))
    if teacher_context:
        parts.append("ctx" + teacher_context["sha256"][:8])
    if layout.hidden:
        h = layout.hidden
        parts.append(f"h{'+'.join(map(str, h.layers))}d{h.dim}p{h.sha256[:8]}")
    return "-".join([teacher_info["sha256"][:8], tokens.fingerprint[:8], tokens.split, *parts])


def cache_dir_for(
    teacher: Teacher,
    tokens: TokenSplit,
    cfg: CacheConfig,
    *,
    out_dir: str | Path | None = None,
    cache_root: str | Path = "cache",
) -> Path:
    """``out_dir``, or ``cache_root / default_cache_name(...)`` when it is None."""
    if out_dir is not None:
        return Path(out_dir)
    hidden = hidden_targets(cfg, teacher, tokens)
    layout = target_layout(
        cfg, vocab_size=tokenizer_vocab_size(teacher.tokenizer), seq_len=tokens.seq_len, hidden=hidden and hidden[0]
    )
    context = cache_context(cfg, teacher, tokens)
    return Path(cache_root) / default_cache_name(teacher.info, tokens, layout, context and context.record)


def check_cache_dir(out: Path, header: dict[str, Any], *, content_named: bool) -> None:
    """Refuse to resume into ``out`` if its manifest was made by another teacher, corpus or settings."""
    if not (out / MANIFEST_NAME).exists():
        return  # shards without a manifest are checked one by one (``read_shard_meta``)
    m = Manifest.load(out)
    want = {
        "teacher.sha256": header["teacher"]["sha256"],
        "corpus.fingerprint": header["corpus"]["fingerprint"],
        "corpus.split": header["corpus"]["split"],
        "corpus.teacher_context": header["corpus"].get("teacher_context"),
        **{f"targets.{k}": v for k, v in header["targets"].items()},
    }
    have = {
        "teacher.sha256": m.teacher.get("sha256"),
        "corpus.fingerprint": m.corpus.get("fingerprint"),
        "corpus.split": m.corpus.get("split"),
        "corpus.teacher_context": m.corpus.get("teacher_context"),
        **{f"targets.{k}": v for k, v in m.targets.items()},
    }
    diffs = [f"{key} {have.get(key)!r} (this run: {value!r})" for key, value in want.items() if have.get(key) != value]
    if diffs:
        fix = (
            "pass --out DIR to write elsewhere, or delete the directory if its cache is no longer needed"
            if content_named
            else "choose another output directory (--out, or paths.cache in params.yaml), or omit --out "
            "to write to a directory named after the teacher, corpus and settings (under --cache-root)"
        )
        raise CacheDirError(
            f"{out / MANIFEST_NAME}: this directory holds a cache made by a different teacher, corpus "
            f"or settings — {'; '.join(diffs)}; refusing to write into it: {fix}"
        )


def manifest_header(
    teacher: Teacher, tokens: TokenSplit, cfg: CacheConfig, *, teacher_context: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Check the inputs fit together; the manifest's teacher/tokenizer/corpus/targets sections.

    ``teacher_context``: {sha256, num_tokens, source} of a context the teacher saw before each row and the
    student does not (issue 11.2; recorded as ``corpus.teacher_context``, part of the cache's identity)."""
    if tokens.split != cfg.split:
        raise CacheWriteError(f"cache.split is {cfg.split!r} but the token split passed is {tokens.split!r}")
    fingerprint = tokenizer_fingerprint(teacher.tokenizer)
    if tokens.tokenizer_fingerprint != fingerprint:
        raise CacheWriteError(
            f"token data was made with tokenizer {tokens.tokenizer_fingerprint[:12]}… but teacher "
            f"{teacher.info['path']} has tokenizer {fingerprint[:12]}… — rerun prepare with this teacher's tokenizer"
        )
    vocab = tokenizer_vocab_size(teacher.tokenizer)
    if tokens.vocab_size > teacher.vocab_size:
        raise CacheWriteError(
            f"token data declares vocab_size {tokens.vocab_size} > the teacher's "
            f"{teacher.vocab_size} logits — rerun prepare with this teacher's tokenizer"
        )
    spans, _ = byte_spans(teacher.tokenizer)
    hidden = hidden_targets(cfg, teacher, tokens)
    layout = target_layout(
        cfg,
        vocab_size=vocab,
        seq_len=tokens.seq_len,
        max_token_bytes=spans["max_token_bytes"] if spans else 0,
        hidden=hidden and hidden[0],
    )
    return {
        "teacher": dict(teacher.info),
        "tokenizer": {"fingerprint": fingerprint, "vocab_size": vocab, "model_vocab_size": teacher.vocab_size}
        | ({"bytes": spans} if spans else {}),
        "corpus": {
            "fingerprint": tokens.fingerprint,
            "split": tokens.split,
            "seq_len": tokens.seq_len,
            "num_sequences": len(tokens),
            "num_tokens": len(tokens) * tokens.seq_len,
            "packing": packing_of(tokens.manifest),
        }
        | ({"teacher_context": dict(teacher_context)} if teacher_context is not None else {}),
        "targets": layout.to_dict()
        | {
            "batch_size": cfg.batch_size,
            "rows_per_shard": cfg.rows_per_shard,
            "compute_dtype": teacher.info["dtype"],
            "runtime": runtime_key(teacher.device, teacher.dtype, teacher.model),
        },
    }
