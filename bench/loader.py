"""Benchmark: the cache loader sized for a GPU trainer, and the trainer's stall waiting for it.

Writes a top-k cache (format v1; k distinct ids spread over the vocabulary, log-probs of a random
softmax over k + 1 buckets, see ``train_step.write_random_cache``) and
measures finished batches -- what ``kdcache.train`` consumes: ``reader.batches`` with the keys of
``topk_tail`` (ids, log-probs, mask, stored tail), staged and memory-mapped -- in tokens/s:

- ``1 thread``: assembled on the calling thread (one loader core);
- ``prefetch thread``: through ``kdcache.cache.prefetch.Prefetcher`` (the trainer's loader);
- ``N workers``: ``reader.batches(..., workers=N)``, DataLoader worker processes.

Each as tokens per wall second and per CPU second (this process and its workers): on a shared machine
the CPU-second rate is the per-loader-core figure.

Then trains the default student with ``kdcache.train.train`` on a cache of the demo's shape (V = 4096)
and reports the time its steps waited for batches (``data_wait_s`` in train_log.jsonl) against the
step time. Prints tables and writes ``bench/results/loader.json``.

    python bench/loader.py                          # V = 151,936, k = 64, batch 16 x 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from train_step import write_random_cache
from transformers import PreTrainedTokenizerFast

from kdcache.cache.prefetch import Prefetcher
from kdcache.cache.reader import open_cache
from kdcache.cache.staging import staging_size
from kdcache.config.train import TrainConfig
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.losses import TARGET_KEYS
from kdcache.train import train

RESULTS = Path(__file__).parent / "results" / "loader.json"
KEYS = TARGET_KEYS["topk_tail"]


def write_cache(out: Path, *, vocab: int, k: int, sequences: int, seq_len: int, rows_per_shard: int) -> Path:
    """A top-k cache with a word-level tokenizer of ``vocab`` ids saved beside it (so ``train`` accepts it)."""
    write_random_cache(
        out, sequences=sequences, seq_len=seq_len, vocab=vocab, k=k, rows_per_shard=rows_per_shard, full_softmax=False
    )
    words = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(out / "tokenizer")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"] = {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": vocab}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def tokens_per_s(make_batches, *, min_seconds: float) -> tuple[float, float]:
    """(finished-batch tokens per wall second, per CPU second of this process and its worker processes),
    over whole epochs until ``min_seconds`` have passed, after one warm-up epoch. On a shared machine the
    CPU-second rate is the per-core figure: the wall rate also counts time other jobs held the core."""
    for _ in make_batches(0):
        pass
    cpu = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start, tokens, epoch = time.perf_counter(), 0, 1
    while time.perf_counter() - start < min_seconds:
        for batch in make_batches(epoch):
            tokens += batch["input_ids"].numel()
        epoch += 1
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    used = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(cpu, after, strict=True))
    return tokens / wall, tokens / used


def loader_rates(cache: Path, args: argparse.Namespace) -> tuple[dict[str, tuple[float, float]], float]:
    """(tokens/s per loader, staged bytes / Parquet bytes once every shard is staged)."""
    rates = {}
    with open_cache(cache) as reader:
        rates["1 thread"] = tokens_per_s(
            lambda e: reader.batches(args.batch_size, seed=0, epoch=e, keys=KEYS), min_seconds=args.seconds
        )
        staged = staging_size(reader.staging_dir)[1] / sum(s.bytes for s in reader.meta.shards)

        def prefetched(e: int) -> Prefetcher:
            return Prefetcher(reader.batches(args.batch_size, seed=0, epoch=e, keys=KEYS), depth=4)

        rates["prefetch thread"] = tokens_per_s(prefetched, min_seconds=args.seconds)
        for n in args.workers:
            rates[f"{n} workers"] = tokens_per_s(
                lambda e, n=n: reader.batches(args.batch_size, seed=0, epoch=e, keys=KEYS, workers=n),
                min_seconds=args.seconds,
            )
    return rates, staged


def trainer_stall(tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train the default student on a demo-shaped cache; sum the steps' data waits."""
    cache = write_cache(tmp / "demo-cache", vocab=4096, k=64, sequences=256, seq_len=256, rows_per_shard=64)
    cfg = TrainConfig(loss="topk_tail", max_steps=args.train_steps, checkpoint_every=args.train_steps, log_every=10)
    train(cfg, cache_dir=cache, out_dir=tmp / "student")
    lines = [json.loads(line) for line in (tmp / "student" / "train_log.jsonl").read_text().splitlines()]
    steps = lines[2:]  # the first steps stage the shards and warm up
    step_s = sum(r["tokens_per_s"] and (cfg.batch_size * 256) / r["tokens_per_s"] for r in steps)
    waited = sum(r["data_wait_s"] for r in steps)
    return {
        "steps": len(steps),
        "step_s_total": step_s,
        "data_wait_s_total": waited,
        "stall_fraction": waited / step_s,
        "trainer_tokens_per_s": len(steps) * cfg.batch_size * 256 / step_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sequences", type=int, default=1024, help="in the benchmark cache (1024 x 256 = 262k tokens)")
    ap.add_argument("--workers", default="1,2", help="DataLoader worker counts to measure")
    ap.add_argument("--seconds", type=float, default=3.0, help="measure each loader for at least this long")
    ap.add_argument("--train-steps", type=int, default=40, help="steps of the stall measurement (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.workers = [int(n) for n in args.workers.split(",") if n]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kdcache-loader-") as tmp:
        os.environ["KDCACHE_STAGING_DIR"] = str(Path(tmp) / "staging")
        cache = write_cache(
            Path(tmp) / "cache",
            vocab=args.vocab,
            k=args.top_k,
            sequences=args.sequences,
            seq_len=args.seq_len,
            rows_per_shard=128,
        )
        rates, staged = loader_rates(cache, args)
        stall = trainer_stall(Path(tmp), args) if args.train_steps else {}
    report(args, rates, stall, staged)


def report(
    args: argparse.Namespace, rates: dict[str, tuple[float, float]], stall: dict[str, float], staged: float
) -> None:
    result = {
        "command": "python " + " ".join(sys.argv),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "tokens_per_s": {name: wall for name, (wall, _) in rates.items()},
        "tokens_per_cpu_s": {name: cpu for name, (_, cpu) in rates.items()},
        "trainer_stall": stall,
        "staged_over_parquet": staged,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nfinished top-{args.top_k} batches ({args.batch_size} x {args.seq_len}, keys of topk_tail) at "
        f"V = {args.vocab:,}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n"
    )
    print("| loader | tokens/s (wall) | tokens per CPU second (per loader core) |\n|---|---:|---:|")
    for name, (wall, cpu) in rates.items():
        print(f"| {name} | {wall:,.0f} | {cpu:,.0f} |")
    if stall:
        print(
            f"\ntrainer (default student, V = 4096, batch {TrainConfig().batch_size} x 256, {stall['steps']} steps): "
            f"{stall['trainer_tokens_per_s']:,.0f} tokens/s, waited {stall['data_wait_s_total']:.3f} s of "
            f"{stall['step_s_total']:.1f} s for batches (stall {100 * stall['stall_fraction']:.2f}%)"
        )
    print(f"\nstaged copies: {staged:.2f}x the Parquet bytes")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
