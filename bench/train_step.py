"""Benchmark: sparse-KD training step vs plain CE step, and cache loader vs trainer throughput.

Writes a real cache (Parquet shards + manifest, random-but-valid top-k targets from random teacher
logits) to a temp dir, then measures side by side in one run:

- step time: KD (``topk_tail``) and CE (``kd_loss(kind="ce")``, chunked like the trainer) steps of
  the default student, interleaved step by step (so machine load drifts hit all alike); median over
  ``--steps`` each, after warm-up. A third column, unchunked ``F.cross_entropy``, is the reference
  "plain CE" training step.
- peak step memory: each variant in a fresh subprocess. On CPU: growth of the peak RSS during one
  step over the RSS just before it (``/proc/self/clear_refs`` resets the peak; glibc is told to
  mmap large blocks so freed tensors return to the OS and the baseline is honest). On CUDA:
  ``max_memory_allocated`` over ``memory_allocated`` before the step.
- loader tokens/s: ``reader.batches`` over the cache, cold (includes staging Parquet -> Arrow IPC)
  and warm (staged, memory-mapped), vs the trainer's KD tokens/s.

Prints a markdown table and writes ``bench/results/train_step.json``.

    python bench/train_step.py              # defaults: StudentConfig(), vocab 4096, seq 256, batch 16, k 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from kdcache.cache.format import Manifest, SequenceTargets, ShardInfo, TargetLayout
from kdcache.cache.reader import open_cache
from kdcache.cache.rows import encode_table
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.fingerprint import sha256_file
from kdcache.losses import KDLossSpec, kd_loss
from kdcache.optim import make_optimizer
from kdcache.student import count_parameters

RESULTS = Path(__file__).parent / "results" / "train_step.json"
VARIANTS = ("topk_tail", "ce", "plain_ce")


def write_random_cache(
    out: Path,
    *,
    sequences: int,
    seq_len: int,
    vocab: int,
    k: int,
    rows_per_shard: int = 64,
    seed: int = 0,
    full_softmax: bool = True,
) -> Path:
    """A valid top-k cache: ids uniform, targets = top-k of log_softmax(3 * randn) per position. Without
    ``full_softmax`` (fast at large V): k distinct ids spread over the vocabulary in random rank order and
    the k largest of k + 1 log_softmax(3 * randn) values (the last one's mass is the tail)."""
    gen = torch.Generator().manual_seed(seed)
    layout = TargetLayout(kind="topk", vocab_size=vocab, seq_len=seq_len, top_k=k)
    out.mkdir(parents=True)
    shards = []
    for first in range(0, sequences, rows_per_shard):
        rows = []
        for i in range(first, min(first + rows_per_shard, sequences)):
            if full_softmax:
                logp = F.log_softmax(3.0 * torch.randn(seq_len, vocab, generator=gen), dim=-1)  # (T, V)
                top = logp.topk(k, dim=-1)  # (T, k) each
                top_ids, top_logp = top.indices, top.values
            else:
                gaps = torch.randint(1, max(2, vocab // k), (seq_len, k), generator=gen)  # (T, k): sum < V, distinct
                ids = (torch.randint(vocab, (seq_len, 1), generator=gen) + gaps.cumsum(-1)) % vocab  # (T, k)
                top_ids = ids.gather(1, torch.rand(seq_len, k, generator=gen).argsort(-1))  # (T, k) random ranks
                logp = F.log_softmax(3.0 * torch.randn(seq_len, k + 1, generator=gen), dim=-1)  # (T, k+1)
                top_logp = logp.sort(-1, descending=True).values[:, :k]  # (T, k)
            rows.append(
                SequenceTargets(
                    seq_index=i,
                    input_ids=torch.randint(vocab, (seq_len,), generator=gen).numpy(),
                    topk_ids=top_ids.numpy(),
                    topk_logprobs=top_logp.numpy(),
                )
            )
        path = out / f"shard-{first // rows_per_shard:05d}.parquet"
        pq.write_table(encode_table(layout, rows), path, compression="zstd")
        shards.append(
            ShardInfo(
                file=path.name,
                rows=len(rows),
                tokens=len(rows) * seq_len,
                bytes=path.stat().st_size,
                sha256=sha256_file(path),
                first_seq=first,
            )
        )
    manifest = Manifest(
        name="bench",
        teacher={"path": "random"},
        tokenizer={"fingerprint": "random", "vocab_size": vocab},
        corpus={"split": "train", "seq_len": seq_len, "num_sequences": sequences},
        targets=layout.to_dict(),
        shards=shards,
    )
    (out / "manifest.json").write_text(manifest.to_json())
    return out


def make_student(vocab: int, seq_len: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = StudentConfig()
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=s.hidden_size,
            num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_heads,
            intermediate_size=s.intermediate_size,
            max_position_embeddings=seq_len,
            tie_word_embeddings=True,
            use_cache=False,
        )
    )


class Trainer:
    """The same step as ``kdcache.train``: forward, ``kd_loss``, backward, clip, AdamW."""

    def __init__(self, kind: str, *, vocab: int, seq_len: int, device: torch.device) -> None:
        self.plain = kind == "plain_ce"  # unchunked F.cross_entropy: the reference plain CE step
        cfg = TrainConfig(loss="ce" if self.plain else kind)
        self.device, self.clip = device, cfg.grad_clip
        self.model = make_student(vocab, seq_len).to(device)
        self.optimizer = make_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.spec = KDLossSpec(
            kind=cfg.loss, alpha=cfg.alpha, temperature=cfg.temperature, chunk_tokens=cfg.chunk_tokens
        )

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        dev = self.device
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        ids = batch["input_ids"].to(dev)  # (B, T)
        targets = {} if self.spec.kind == "ce" else {k: batch[k].to(dev) for k in ("topk_ids", "topk_logprobs")}
        amp = (
            torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        )
        with amp:
            logits = self.model(input_ids=ids).logits  # (B, T, V)
        if self.plain:
            vocab = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        else:
            loss = kd_loss(logits, input_ids=ids, spec=self.spec, **targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0


def first_batch(cache: Path, batch_size: int) -> dict[str, torch.Tensor]:
    with open_cache(cache) as reader:
        return next(iter(reader.batches(batch_size, seed=0)))


def time_steps(cache: Path, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """KD and CE steps interleaved on the same batches; returns per-step seconds (after warm-up)."""
    trainers = {kind: Trainer(kind, vocab=args.vocab, seq_len=args.seq_len, device=device) for kind in VARIANTS}
    times: dict[str, list[float]] = {kind: [] for kind in trainers}
    with open_cache(cache) as reader:
        batches = reader.batches(args.batch_size, seed=0)
        for i in range(args.warmup + args.steps):
            batch = next(batches)
            for kind, trainer in trainers.items():
                dt = trainer.step(batch)
                if i >= args.warmup:
                    times[kind].append(dt)
        batches.close()
    return times


def loader_tokens_per_s(cache: Path, batch_size: int, staging: Path) -> dict[str, float]:
    out = {}
    for label in ("cold", "warm"):  # cold: staging dir empty, shards decoded on the fly
        with open_cache(cache, staging_dir=staging) as reader:
            t0, tokens = time.perf_counter(), 0
            for batch in reader.batches(batch_size, seed=1):
                tokens += batch["input_ids"].numel()
            out[label] = tokens / (time.perf_counter() - t0)
    return out


def measure_memory(cache: Path, args: argparse.Namespace, kind: str) -> dict[str, float]:
    """Run ``--worker kind`` in a fresh subprocess; it prints JSON."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large frees go back to the OS: honest RSS deltas
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--cache",
        str(cache),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--vocab",
        str(args.vocab),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(args: argparse.Namespace) -> None:
    """Peak memory growth of one training step (in a fresh process)."""
    device = resolve(args.device)
    trainer = Trainer(args.worker, vocab=args.vocab, seq_len=args.seq_len, device=device)
    batch = first_batch(Path(args.cache), args.batch_size)
    trainer.step(batch)  # warm-up: allocates optimizer state and kernels' workspaces
    trainer.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        trainer.step(batch)
        peak = torch.cuda.max_memory_allocated(device)
        result = {"peak_step_bytes": peak - before, "method": "cuda max_memory_allocated - memory_allocated"}
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
        trainer.step(batch)
        result = {
            "peak_step_bytes": (_proc_status_kib("VmHWM") - before) * 1024,
            "method": "VmHWM - VmRSS before the step (clear_refs reset, MALLOC_MMAP_THRESHOLD_=65536)",
        }
    print(json.dumps(result))


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def resolve(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--sequences", type=int, default=256, help="sequences in the benchmark cache")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    device = resolve(args.device)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        os.environ["KDCACHE_STAGING_DIR"] = str(Path(tmp) / "staging")
        cache = write_random_cache(
            Path(tmp) / "cache", sequences=args.sequences, seq_len=args.seq_len, vocab=args.vocab, k=args.top_k
        )
        loader = loader_tokens_per_s(cache, args.batch_size, Path(tmp) / "loader-staging")
        times = time_steps(cache, args, device)
        memory = {kind: measure_memory(cache, args, kind) for kind in VARIANTS}
    report(args, device, times=times, memory=memory, loader=loader)


def report(args: argparse.Namespace, device: torch.device, *, times: dict, memory: dict, loader: dict) -> None:
    tokens = args.batch_size * args.seq_len
    step = {kind: statistics.median(t) for kind, t in times.items()}
    mib = {kind: m["peak_step_bytes"] / 2**20 for kind, m in memory.items()}
    trainer_tps = tokens / step["topk_tail"]
    result = {
        "config": {
            "student": vars(StudentConfig()),
            "vocab": args.vocab,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "top_k": args.top_k,
            "steps": args.steps,
            "device": str(device),
            "num_parameters": count_parameters(make_student(args.vocab, args.seq_len)),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_avg_1m_at_end": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "step_s": step,
        "step_s_all": times,
        "peak_step_mib": mib,
        "memory_method": memory["ce"]["method"],
        "kd_over_ce_time": step["topk_tail"] / step["ce"],
        "kd_over_ce_peak_memory": mib["topk_tail"] / mib["ce"],
        "kd_over_plain_ce_time": step["topk_tail"] / step["plain_ce"],
        "kd_over_plain_ce_peak_memory": mib["topk_tail"] / mib["plain_ce"],
        "trainer_tokens_per_s": {kind: tokens / s for kind, s in step.items()},
        "loader_tokens_per_s": loader,
        "loader_over_trainer": loader["warm"] / trainer_tps,
        "command": "python " + " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("step time, median (ms)", *(f"{step[v] * 1e3:.0f}" for v in VARIANTS), f"{result['kd_over_ce_time']:.2f}"),
        ("peak step memory (MiB)", *(f"{mib[v]:.0f}" for v in VARIANTS), f"{result['kd_over_ce_peak_memory']:.2f}"),
        ("trainer tokens/s", *(f"{tokens / step[v]:.0f}" for v in VARIANTS), ""),
    ]
    print(
        f"\nstudent {result['config']['num_parameters']:,} params, vocab {args.vocab}, seq {args.seq_len}, "
        f"batch {args.batch_size}, k {args.top_k}, {device} ({torch.get_num_threads()} threads)\n"
    )
    print(
        "| measure | KD (topk_tail) | CE (kd_loss, chunked) | plain CE (F.cross_entropy) | KD / CE |\n"
        "|---|---:|---:|---:|---:|"
    )
    for r in rows:
        print(f"| {' | '.join(r)} |")
    print(
        f"\n| loader | tokens/s | / trainer KD tokens/s |\n|---|---:|---:|\n"
        f"| cold (stages Parquet -> Arrow) | {loader['cold']:.0f} | {loader['cold'] / trainer_tps:.1f} |\n"
        f"| warm (memory-mapped) | {loader['warm']:.0f} | {loader['warm'] / trainer_tps:.1f} |"
    )
    print(f"\nmemory: {result['memory_method']}\nwrote {args.out}")


if __name__ == "__main__":
    main()
