"""Benchmark: staged copies (local scratch) vs the Parquet bytes, and the loader's speed on them, before/after.

For each cache: stages every shard into a fresh directory and reports staged bytes / Parquet bytes (per
column too: which columns dominate), staging tokens per CPU second, and finished batches (``reader.batches``
with the keys the cache's loss reads: ``topk_tail`` for top-k, ``sampled`` for sampled caches, assembled on
the calling thread = one loader core) in tokens per CPU second. Each measurement runs in its own
subprocess, alternating between this tree's ``kdcache`` ("after") and, with ``--before DIR``, an older
tree's (``DIR/pipeline``, e.g. ``git archive <commit> pipeline | tar -x -C DIR``: "before"), so the two are
measured side by side under the same load.

Caches: ``--cache NAME=PATH`` (repeatable; e.g. the demo's sampled S=16 cache), plus synthetic top-64 caches
at V = 4,096 and 151,936 (``train_step.write_random_cache``: ids spread over the vocabulary, so they
compress worse than a real teacher's). Writes ``bench/results/staging.json`` and prints Markdown tables.

    python bench/staging.py --cache demo-sampled-S16=cache/demo --before /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "staging.json"


def measure(cache: Path, staging: Path, *, batch_size: int, seconds: float) -> dict:
    """Run in a subprocess: stage ``cache`` into ``staging`` (fresh), then time epochs of finished batches."""
    import numpy as np
    import pyarrow.parquet as pq

    from kdcache.cache.format import Manifest
    from kdcache.cache.reader import open_cache
    from kdcache.losses import TARGET_KEYS

    meta = Manifest.load(cache)
    keys = TARGET_KEYS["topk_tail" if meta.layout.has_topk else "sampled"]
    tokens = sum(s.tokens for s in meta.shards)
    t0 = time.process_time()
    reader = open_cache(cache, staging_dir=staging, prefetch=0)
    shards = [reader._shard(s) for s in range(len(meta.shards))]  # stages every shard on this thread
    staging_cpu = time.process_time() - t0
    files = [p for p in staging.iterdir() if not p.name.startswith(".")]
    staged = sum(p.stat().st_size for p in files)
    parquet = sum(s.bytes for s in meta.shards)
    columns: dict[str, dict[str, float]] = {}
    for info in meta.shards:
        footer = pq.read_metadata(cache / info.file)
        for g in range(footer.num_row_groups):
            for c in range(footer.row_group(g).num_columns):
                col = footer.row_group(g).column(c)
                entry = columns.setdefault(col.path_in_schema, {"parquet": 0.0, "staged": 0.0})
                entry["parquet"] += col.total_compressed_size / tokens
    codecs = {}
    for shard in shards:
        for name in getattr(shard, "data", {}):  # layout v2: blob bytes per column
            offsets = shard.offsets[name]
            columns.setdefault(name, {"parquet": 0.0, "staged": 0.0})["staged"] += (offsets[-1] - offsets[0]) / tokens
            codecs[name] = shard.codec[name]
        for name, values in getattr(shard, "flat", {}).items() if not hasattr(shard, "data") else ():  # layout v1
            columns.setdefault(name, {"parquet": 0.0, "staged": 0.0})["staged"] += values.nbytes / tokens
    for _ in reader.batches(batch_size, seed=0, epoch=0, keys=keys):  # warm-up epoch
        pass
    t0, n, epoch = time.process_time(), 0, 1
    wall = time.perf_counter()
    while time.perf_counter() - wall < seconds:
        for batch in reader.batches(batch_size, seed=0, epoch=epoch, keys=keys):
            n += batch["input_ids"].numel()
        epoch += 1
    cpu = time.process_time() - t0
    assert np.isfinite(cpu)
    return {
        "tokens": tokens,
        "parquet_bytes": parquet,
        "staged_bytes": staged,
        "staged_over_parquet": staged / parquet,
        "staging_tokens_per_cpu_s": tokens / staging_cpu,
        "loader_tokens_per_cpu_s": n / cpu,
        "columns_bytes_per_token": columns,
        "codecs": codecs,
    }


def run_one(cache: Path, impl: str, before: Path | None, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if impl == "before":
        link = Path(tempfile.mkdtemp(prefix="kdcache-before-")) / "kdcache"
        link.symlink_to(before.resolve() / "pipeline")
        env["PYTHONPATH"] = os.pathsep.join([str(link.parent), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="kdcache-staging-bench-") as staging:
        cmd = [sys.executable, __file__, "--measure", str(cache), "--staging", staging]
        cmd += ["--batch-size", str(args.batch_size), "--seconds", str(args.seconds)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd="/").stdout
    return json.loads(out.strip().splitlines()[-1])


def synthetic(root: Path, vocab: int, args: argparse.Namespace) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from train_step import write_random_cache

    out = root / f"random-top64-V{vocab}"
    write_random_cache(
        out, sequences=args.sequences, seq_len=256, vocab=vocab, k=64, rows_per_shard=128, full_softmax=False
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", default=[], help="NAME=PATH of a cache to measure (repeatable)")
    ap.add_argument("--before", type=Path, help="a tree whose pipeline/ is the 'before' kdcache")
    ap.add_argument("--vocabs", default="4096,151936", help="synthetic top-64 caches at these vocab sizes")
    ap.add_argument("--sequences", type=int, default=512, help="rows of each synthetic cache (x 256 tokens)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0, help="time finished batches for at least this long")
    ap.add_argument("--rounds", type=int, default=2, help="before/after alternations per cache")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--staging", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.staging, batch_size=args.batch_size, seconds=args.seconds)))
        return
    impls = ["before", "after"] if args.before else ["after"]
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="kdcache-staging-caches-") as tmp:
        caches = {name: Path(path).resolve() for name, path in (c.rsplit("=", 1) for c in args.cache)}
        for vocab in (int(v) for v in args.vocabs.split(",") if v):
            caches[f"random top-64 V={vocab:,}"] = synthetic(Path(tmp), vocab, args)
        for name, path in caches.items():
            results[name] = {impl: [] for impl in impls}
            for _ in range(args.rounds):
                for impl in impls:
                    results[name][impl].append(run_one(path, impl, args.before, args))
                    print(
                        f"{name} {impl}: {json.dumps(results[name][impl][-1]['loader_tokens_per_cpu_s'])}",
                        file=sys.stderr,
                    )
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, dict[str, list[dict]]]) -> None:
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| cache | Parquet B/token | staged ÷ Parquet before | after | loader tok/CPU-s before | after | "
        "staging tok/CPU-s before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_impl in results.items():

        def med(impl: str, key: str, by_impl: dict[str, list[dict]] = by_impl) -> float:
            values = sorted(r[key] for r in by_impl.get(impl, []))
            return values[len(values) // 2] if values else float("nan")

        first = next(iter(by_impl.values()))[0]
        lines.append(
            f"| {name} | {first['parquet_bytes'] / first['tokens']:.1f} | {med('before', 'staged_over_parquet'):.2f} | "
            f"{med('after', 'staged_over_parquet'):.2f} | {med('before', 'loader_tokens_per_cpu_s'):,.0f} | "
            f"{med('after', 'loader_tokens_per_cpu_s'):,.0f} | {med('before', 'staging_tokens_per_cpu_s'):,.0f} | "
            f"{med('after', 'staging_tokens_per_cpu_s'):,.0f} |"
        )
    lines += ["", "Bytes per token by column (Parquet / staged before / staged after; codec after):", ""]
    for name, by_impl in results.items():
        cols = {impl: runs[0]["columns_bytes_per_token"] for impl, runs in by_impl.items()}
        codecs = by_impl["after"][0]["codecs"]
        after, before = cols["after"], cols.get("before", {})
        parts = [
            f"{c} {after.get(c, before.get(c, {})).get('parquet', 0):.1f} / {before.get(c, {}).get('staged', 0):.1f} / "
            f"{after.get(c, {}).get('staged', 0):.1f} {codecs.get(c, '')}"
            for c in sorted(after, key=lambda c: -max(after[c]["staged"], before.get(c, {}).get("staged", 0)))
            if c != "seq_index"
        ]
        lines.append(f"- {name}: " + "; ".join(parts))
    print(f"\n{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end; medians of {args.rounds} rounds\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
