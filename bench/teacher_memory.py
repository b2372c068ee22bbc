"""Peak memory and throughput of the cache stage's scoring step: chunked LM head vs materialized logits.

Two ways to turn a batch of token ids into sparse targets, on a random-weight Llama-family teacher
(hidden 64, 2 layers) on the CPU:

- ``chunked`` (what ``kdcache.cache.build`` runs): ``teacher_hidden`` -> (B, T, H) final hidden
  states, then ``sparsify_rows`` over ``logit_rows``: the LM head computes (chunk, V) logits for
  one chunk of positions at a time, sparsified before the next one.
- ``materialize`` (the path before issue 9): the model's own forward -> (B, T, V) logits, then
  ``sparsify`` over chunks of them.

Both use the chunk size the cache stage uses on a CPU (``targets.cache_chunk_tokens``). Each variant runs in
its own subprocess; peak memory is the kernel's high-water mark of resident memory (VmHWM, reset
through ``/proc/self/clear_refs`` once the weights and inputs are in memory) minus the resident
memory at that point, i.e. what scoring adds on top of the weights. Throughput is tokens/s of
forward + sparsify (best of ``--repeats``, variants interleaved: the machine may be shared).

    python bench/teacher_memory.py [--repeats 3] [--threads 2]

Writes ``bench/results/teacher_memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "teacher_memory.json"
MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
GIB = 1 << 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(args: argparse.Namespace) -> dict:
    """One variant in this process: peak resident memory above the weights, and tokens/s."""
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcache.cache.format import TargetLayout
    from kdcache.cache.targets import cache_chunk_tokens, sparsify, sparsify_rows
    from kdcache.teacher import Teacher, logit_rows, output_head, teacher_hidden, teacher_logits

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, max_position_embeddings=args.seq_len, **MODEL)
    model = LlamaForCausalLM(config).eval()
    info = {"path": "random-llama", "vocab_size": args.vocab}
    teacher = Teacher(model, None, torch.device("cpu"), torch.float32, info, head=output_head(model, config))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))  # (B, T)
    seqs = torch.arange(args.batch)
    layout = TargetLayout(kind="topk", vocab_size=args.vocab, seq_len=args.seq_len, top_k=args.top_k)
    chunk = cache_chunk_tokens(args.vocab, "cpu")

    def score() -> dict[str, torch.Tensor]:
        if args.variant == "chunked":
            hidden = teacher_hidden(teacher, ids)  # (B, T, H)
            rows = logit_rows(teacher, hidden)
            return sparsify_rows(
                rows, batch=args.batch, device=hidden.device, layout=layout, seq_indices=seqs, chunk_tokens=chunk
            )
        return sparsify(teacher_logits(teacher, ids), layout=layout, seq_indices=seqs, chunk_tokens=chunk)

    gc.collect()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = score()
        times.append(time.perf_counter() - t0)
        del out
        gc.collect()
    peak_kib = _status_kib("VmHWM")
    return {
        "variant": args.variant,
        "vocab": args.vocab,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "top_k": args.top_k,
        "chunk_tokens": chunk,
        "threads": args.threads,
        "weights_bytes": weights,
        "rss_before_bytes": base_kib * 1024,
        "peak_above_bytes": (peak_kib - base_kib) * 1024,
        "seconds": times,
        "tokens_per_s": args.batch * args.seq_len / min(times),
    }


def run_variant(variant: str, *, vocab: int, batch: int, seq_len: int, top_k: int, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "worker", "--variant", variant, "--vocab", str(vocab), "--batch", str(batch)]
    cmd += ["--seq-len", str(seq_len), "--top-k", str(top_k), "--repeats", str(repeats), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "worker"])
    ap.add_argument("--variant", choices=["chunked", "materialize"], default="chunked")
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (memory: one subprocess per variant and V)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    if args.mode == "worker":
        print(json.dumps(worker(args)))
        return
    shape = {"batch": args.batch, "seq_len": args.seq_len, "top_k": args.top_k, "threads": args.threads}
    rows = []
    # memory at the large vocabulary: one run each (the materialized variant needs ~9 GB)
    for variant in ("chunked", "materialize"):
        rows.append(run_variant(variant, vocab=args.vocab, repeats=1, **shape))
    # throughput at 32k: interleaved runs in separate processes, best kept
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for variant in ("chunked", "materialize"):
            r = run_variant(variant, vocab=32_768, repeats=2, **shape)
            if variant not in best or r["tokens_per_s"] > best[variant]["tokens_per_s"]:
                best[variant] = r
    rows += [best["chunked"], best["materialize"]]
    ratio = best["chunked"]["tokens_per_s"] / best["materialize"]["tokens_per_s"]
    print(f"teacher {MODEL} (Llama, random weights, fp32, CPU), B={args.batch}, T={args.seq_len}, top-{args.top_k}")
    print("| V | path | chunk tokens | weights | peak RSS above weights | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['vocab']:,} | {r['variant']} | {r['chunk_tokens']} | {r['weights_bytes'] / 2**20:.0f} MiB | "
            f"{r['peak_above_bytes'] / GIB:.2f} GiB | {r['tokens_per_s']:,.0f} |"
        )
    print(f"throughput at V=32,768: chunked / materialize = {ratio:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python bench/teacher_memory.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                "model": MODEL,
                "rows": rows,
                "throughput_ratio_32k": ratio,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
