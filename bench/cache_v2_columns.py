"""Bytes/token of each cache-format-2 column group on a real teacher (default: the demo teacher's val split).

Builds a top-k cache with log-normalizers at two extra temperatures and a sampled cache (both with the
teacher signals and byte spans every v2 cache stores), then reads each group's compressed size from the
Parquet footers (``kdcache.cache.shards.column_bytes``). Prints a table; writes JSON with ``--json``.

    python bench/cache_v2_columns.py --teacher models/demo-teacher --tokens data/tokens --split val
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kdcache.cache.build import cache_corpus
from kdcache.cache.format import Manifest
from kdcache.cache.shards import column_bytes
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig


def measure(teacher: str, tokens: str, split: str, cfg: CacheConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "c"
        began = time.perf_counter()
        cache_corpus(TeacherConfig(path=teacher, device="cpu", dtype="float32"), cfg, tokens_dir=tokens, out_dir=out)
        seconds = time.perf_counter() - began
        m = Manifest.load(out)
        groups = column_bytes(out, m.shards)
        total = sum(s.bytes for s in m.shards)
        return {
            "targets": cfg.targets,
            "top_k": cfg.top_k,
            "samples": cfg.samples,
            "temperatures": list(cfg.temperatures),
            "tokens": m.num_tokens,
            "build_s": round(seconds, 1),
            "bytes_per_token": {g: n / m.num_tokens for g, n in sorted(groups.items())}
            | {"file total": total / m.num_tokens},
            "mean_nll": m.stats.get("mean_nll"),
            "mean_entropy": m.stats.get("mean_entropy"),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/demo-teacher")
    p.add_argument("--tokens", default="data/tokens")
    p.add_argument("--split", default="val")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    runs = [
        CacheConfig(targets="topk", top_k=32, temperatures=(2.0, 4.0), split=a.split),
        CacheConfig(targets="sampled", samples=16, split=a.split),
    ]
    results = [measure(a.teacher, a.tokens, a.split, cfg) for cfg in runs]
    for r in results:
        label = (
            f"{r['targets']} k={r['top_k']} temps={r['temperatures']}"
            if r["targets"] == "topk"
            else (f"sampled S={r['samples']}")
        )
        print(f"{label}: {r['tokens']} tokens, built in {r['build_s']} s")
        for group, value in r["bytes_per_token"].items():
            print(f"  {group:<16} {value:7.2f} bytes/token")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
