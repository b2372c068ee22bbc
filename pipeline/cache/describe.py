"""``kdcache inspect``'s text: what a receiving team needs to decide whether a cache fits its student, from the
manifest (and, given the cache directory, the shards' Parquet footers and this node's staging directory)."""

from __future__ import annotations

from pathlib import Path

from kdcache.cache.format import Manifest
from kdcache.cache.shards import column_bytes
from kdcache.cache.signals import histogram_lines
from kdcache.cache.staging import default_staging_dir, staging_size

SHOWN_ABOVE = frozenset({"num_rows", "num_tokens", "total_bytes", "bytes_per_token"})
"""Manifest stats that ``describe_manifest`` already prints in its sequences/size lines."""


def describe_manifest(m: Manifest, *, cache_dir: Path | None = None) -> str:
    """Everything a receiving team needs to decide whether a cache fits its student. With ``cache_dir``: also
    bytes/token per column group (from the shards' Parquet footers) and this node's staging directory."""
    t, layout = m.targets, m.layout
    kind = f"{layout.kind}, k={layout.top_k}" + (f" (adaptive, mass {layout.mass})" if layout.adaptive else "")
    if layout.has_samples:
        kind += f", samples={layout.samples}, seed={layout.seed}"
    size = sum(s.bytes for s in m.shards)
    stats = m.stats
    lines = [
        f"cache          {m.name}  (format {m.format} {m.format_version}, written by {m.created_by})",
        f"teacher        {m.teacher.get('path')}  {m.teacher.get('model_type')} {m.teacher.get('num_parameters')} "
        f"params, {m.teacher.get('dtype')}, sha256 {m.teacher.get('sha256')}",
        f"tokenizer      {m.tokenizer.get('fingerprint')}  vocab {m.tokenizer.get('vocab_size')}",
        f"corpus         {m.corpus.get('fingerprint')}  split {m.corpus.get('split')}, "
        f"seq_len {m.corpus.get('seq_len')}",
        f"sequences      {m.num_rows} in {len(m.shards)} shards, {m.num_tokens} tokens",
        f"targets        {kind}, temperature {layout.temperature}, values {layout.values} ({layout.value_encoding}), "
        f"batch_size {t.get('batch_size')}, compute {t.get('compute_dtype')}",
        f"size           {size} bytes, {size / max(m.num_tokens, 1):.2f} bytes/token",
    ]
    lines += _v2_lines(m, cache_dir)
    lines += [
        f"{k:<14} {v:.4f}" if isinstance(v, float) else f"{k:<14} {v}"
        for k, v in stats.items()
        if not isinstance(v, (list, dict)) and k not in SHOWN_ABOVE
    ]
    for key, what in (("nll_histogram", "teacher NLL of the next token"), ("entropy_histogram", "teacher entropy")):
        if key in stats:
            lines += [f"{what} (nats, tau = 1; share of positions):", *histogram_lines(stats[key])]
    return "\n".join(lines)


def _v2_lines(m: Manifest, cache_dir: Path | None) -> list[str]:
    """Format-2 fields (temperatures, signals, byte spans, hidden states), column-group sizes and the staging dir."""
    layout, spans = m.layout, m.tokenizer.get("bytes")
    lines = [
        f"log-normalizers {', '.join(f'{t:g}' for t in layout.temperatures) or 'none'} (cache.temperatures)",
        f"signals        {', '.join(layout.signals) or 'none'}",
        f"byte spans     {spans if spans else 'none'}",
        "hidden states  "
        + (
            f"teacher layers {list(h.layers)} projected to {h.dim} ({h.kind}, seed {h.seed}, sha256 {h.sha256[:12]}…), "
            "int8 + fp16 scale"
            if (h := layout.hidden)
            else "none (cache.hidden_layers)"
        ),
    ]
    if cache_dir is not None:
        per_group = column_bytes(cache_dir, m.shards)
        lines.append(
            "bytes/token    "
            + ", ".join(f"{group} {n / max(m.num_tokens, 1):.2f}" for group, n in sorted(per_group.items()))
        )
        staging = default_staging_dir()
        files, total = staging_size(staging)
        lines.append(f"staging        {staging}: {files} staged shard(s), {total / 2**20:.1f} MiB on this node")
    return lines
