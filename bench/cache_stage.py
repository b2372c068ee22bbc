"""Cache stage vs the teacher's forward, side by side in one run (issue 12, goal 5).

Part 1 (the demo teacher, default cache settings: sampled S=16, signals): each round times, on the same
sequences, in turn
  - ``forward``: the teacher's forward alone (body, then the LM head chunk by chunk, logits dropped),
  - ``head_stage``: the whole cache build (``build_cache`` into a fresh directory: forward, sparsify, checks,
    Parquet writer) with the sparsifier of ``--base`` (git; the code before this goal) run serially, as it was,
  - the whole cache build with this tree's sparsifier, serial and overlapped (``kdcache.cache.scoring``):
    forward on ``--threads`` intra-op threads + a ``--worker-threads`` sparsify worker, and forward on one
    thread fewer + a one-thread worker.
Ratios are per round (the same load), medians over rounds. Wall-clock and process CPU seconds (all threads).

Part 2 (``--large-vocab``): a tiny teacher (hidden 64, 2 layers) at V=151,936: forward (body + head) vs
sparsify per token, this tree's and ``--base``'s, one thread.

    python bench/cache_stage.py --sequences 64 --rounds 3 --out bench/results/cache_stage.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kdcache.cache.scoring as scoring
from kdcache.cache.build import build_cache
from kdcache.cache.format import TargetLayout
from kdcache.cache.targets import cache_chunk_tokens, next_token_ids, sparsify_rows
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.teacher import Teacher, load_teacher, logit_rows, output_head, teacher_hidden
from kdcache.token_data import open_tokens, write_tokens

ROOT = Path(__file__).resolve().parents[1]


def base_targets(commit: str):
    """``kdcache.cache.targets`` as of ``commit``, loaded from git as a separate module."""
    source = subprocess.run(
        ["git", "show", f"{commit}:pipeline/cache/targets.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "base_targets.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("base_targets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def forward_only(teacher: Teacher, tokens, batch: int) -> None:
    chunk = cache_chunk_tokens(teacher.vocab_size, teacher.device.type)
    for b0 in range(0, len(tokens), batch):
        ids = torch.from_numpy(np.asarray(tokens.ids[b0 : b0 + batch], dtype=np.int64))
        rows = logit_rows(teacher, teacher_hidden(teacher, ids))
        for a in range(0, ids.numel(), chunk):
            rows(slice(a, a + chunk))


def stage(teacher, tokens, cfg, out: Path, *, overlap: bool, sparsify=None, worker_threads=None, main_threads=None):
    """One full build into a fresh ``out``; ``sparsify``: replace the sparsifier (the base's), run serially."""
    shutil.rmtree(out, ignore_errors=True)
    saved = (scoring.sparsify_rows, scoring.SPARSIFY_THREADS, torch.get_num_threads())
    if sparsify is not None:
        scoring.sparsify_rows = lambda *a, writable=False, **k: sparsify(*a, **k)
    scoring.SPARSIFY_THREADS = worker_threads
    torch.set_num_threads(main_threads or saved[2])
    try:
        build_cache(teacher, tokens, cfg, out_dir=out, overlap=overlap)
    finally:
        scoring.sparsify_rows, scoring.SPARSIFY_THREADS = saved[:2]
        torch.set_num_threads(saved[2])


def demo(args, base) -> dict:
    teacher = load_teacher(TeacherConfig(path=args.teacher, device="cpu"))
    full = open_tokens(args.tokens, "train")
    work = Path(tempfile.mkdtemp(prefix="cache_stage_"))
    fp = tokenizer_fingerprint(teacher.tokenizer)
    ids = np.asarray(full.ids[: args.sequences])
    write_tokens(work / "tokens", {"train": ids}, vocab_size=full.vocab_size, tokenizer_fingerprint=fp)
    tokens = open_tokens(work / "tokens", "train")
    cfg = CacheConfig(split="train")  # the defaults: sampled S=16, batch 8, signals; rows_per_shard 512
    n_tok = ids.size
    threads, worker = torch.get_num_threads(), args.worker_threads
    modes = {
        "forward": lambda: forward_only(teacher, tokens, cfg.batch_size),
        "base_serial": lambda: stage(teacher, tokens, cfg, work / "c", overlap=False, sparsify=base.sparsify_rows),
        "new_serial": lambda: stage(teacher, tokens, cfg, work / "c", overlap=False),
        f"new_overlap_main{threads}_worker{worker}": lambda: stage(
            teacher, tokens, cfg, work / "c", overlap=True, worker_threads=worker
        ),
    }
    if threads > 1:  # the forward on one core fewer, the sparsifier on it
        modes[f"new_overlap_main{threads - 1}_worker1"] = lambda: stage(
            teacher, tokens, cfg, work / "c", overlap=True, worker_threads=1, main_threads=threads - 1
        )
    modes["forward"]()  # warm-up
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, run in modes.items():
            with Clock() as c:
                run()
            row[name] = {"wall_s": round(c.wall, 3), "cpu_s": round(c.cpu, 3)}
        rounds.append(row)
        print(f"round {r}:", {k: v["wall_s"] for k, v in row.items()}, flush=True)
    summary = {}
    for name in modes:
        summary[name] = {
            "wall_s_median": statistics.median(r[name]["wall_s"] for r in rounds),
            "stage_over_forward_wall": round(
                statistics.median(r[name]["wall_s"] / r["forward"]["wall_s"] for r in rounds), 3
            ),
            "stage_over_forward_cpu": round(
                statistics.median(r[name]["cpu_s"] / r["forward"]["cpu_s"] for r in rounds), 3
            ),
            "us_per_token_wall": round(1e6 * statistics.median(r[name]["wall_s"] for r in rounds) / n_tok, 1),
        }
    shutil.rmtree(work, ignore_errors=True)
    return {
        "teacher": args.teacher,
        "tokens": n_tok,
        "sequences": args.sequences,
        "torch_threads": threads,
        "rounds": rounds,
        "summary": summary,
    }


def large_vocab(args, base) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    V, T, B = 151_936, 256, 2
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=192,
        max_position_embeddings=T,
    )
    model = LlamaForCausalLM(config).eval()
    teacher = Teacher(
        model, None, torch.device("cpu"), torch.float32, {"path": "tiny"}, head=output_head(model, config)
    )
    layout = TargetLayout(kind="sampled", vocab_size=V, seq_len=T, samples=16, seed=0, signals=("nll", "entropy"))
    ids = torch.randint(0, V, (B, T))
    kw = {
        "batch": B,
        "device": teacher.device,
        "layout": layout,
        "seq_indices": torch.arange(B),
        "chunk_tokens": cache_chunk_tokens(V, "cpu"),
        "next_ids": next_token_ids(ids),
    }
    times = {"body": [], "head": [], "new": [], "base": []}
    for rep in range(args.rounds + 1):
        t0 = time.thread_time()
        hidden = teacher_hidden(teacher, ids)
        t1 = time.thread_time()
        rows = logit_rows(teacher, hidden)
        for a in range(0, B * T, kw["chunk_tokens"]):
            rows(slice(a, a + kw["chunk_tokens"]))
        t2 = time.thread_time()
        sparsify_rows(rows, writable=True, **kw)
        t3 = time.thread_time()
        base.sparsify_rows(rows, **kw)
        t4 = time.thread_time()
        if rep:  # sparsify times include the head (it feeds them): subtract it
            for key, dt in (
                ("body", t1 - t0),
                ("head", t2 - t1),
                ("new", t3 - t2 - (t2 - t1)),
                ("base", t4 - t3 - (t2 - t1)),
            ):
                times[key].append(dt / (B * T) * 1e6)
    us = {k: round(statistics.median(v), 1) for k, v in times.items()}
    fwd = us["body"] + us["head"]
    return {
        "vocab_size": V,
        "model": "Llama hidden 64, 2 layers, 2 heads, random init",
        "tokens_per_round": B * T,
        "threads": 1,
        "clock": "thread CPU time",
        "us_per_token": us | {"forward": round(fwd, 1)},
        "sparsify_over_forward": {"new": round(us["new"] / fwd, 3), "base": round(us["base"] / fwd, 3)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="models/demo-teacher")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the forward (0: default)")
    ap.add_argument("--worker-threads", type=int, default=1, help="intra-op threads of the sparsify worker")
    ap.add_argument("--base", default="761751f", help="git commit whose sparsifier is the 'before' figure")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--large-vocab", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_targets(args.base)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "base": args.base}
    result["load_before"] = os.getloadavg()
    if not args.skip_demo:
        result["demo"] = demo(args, base)
    if args.large_vocab:
        result["large_vocab"] = large_vocab(args, base)
    result["load_after"] = os.getloadavg()
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "demo"} | {"demo": result.get("demo", {}).get("summary")}, indent=1
        )
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
