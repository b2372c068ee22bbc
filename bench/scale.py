"""Scale-out benchmark: tokens/s of the cache stage and of DDP training at 1 and 2 ranks under torchrun.

Each configuration is a real ``torchrun --standalone`` launch of this script's ``worker`` mode:

- ``1r x 1t``: one rank, one torch thread (the baseline)
- ``2r x 1t``: two ranks, one thread each (what torchrun scale-out buys on 2 cores)
- ``1r x 2t``: one rank, two threads (the alternative use of the same 2 cores)

The timed region starts after model loading, at a barrier, and ends at a barrier after every rank
finished, so it counts neither interpreter start-up nor imports. Training compares 2 ranks x batch
b with 1 rank x batch 2b (the same global batch). Each configuration runs ``--repeats`` times,
interleaved, and the best run is kept (the machine may be shared). Writes ``bench/results/scale.json``
and prints a markdown table.

    python bench/scale.py [--sequences 96] [--repeats 2]
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

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("1r x 1t", 1, 1), ("2r x 1t", 2, 1), ("1r x 2t", 1, 2)]
TEACHER = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 768,
}  # the demo teacher's shape
STUDENT = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 384}  # params.yaml's student


def make_inputs(root: Path, *, sequences: int, seq_len: int) -> tuple[Path, Path]:
    """A random-weight teacher of the demo teacher's shape with a word-level tokenizer, and random token data."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kdcache.fingerprint import tokenizer_fingerprint
    from kdcache.token_data import write_tokens

    teacher, tokens = root / "teacher", root / "tokens"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TEACHER, max_position_embeddings=seq_len)).save_pretrained(teacher)
    words = ["<eos>", "<pad>", *(f"w{i}" for i in range(2, TEACHER["vocab_size"]))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(teacher)
    ids = np.random.default_rng(0).integers(2, TEACHER["vocab_size"], size=(sequences + 8, seq_len))
    write_tokens(
        tokens,
        {"train": ids[:sequences], "val": ids[sequences:]},
        vocab_size=TEACHER["vocab_size"],
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    return teacher, tokens


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration (run under torchrun): time the cache build or training."""
    import torch

    torch.set_num_threads(args.threads)
    from kdcache.config.cache import CacheConfig
    from kdcache.config.teacher import TeacherConfig
    from kdcache.config.train import StudentConfig, TrainConfig
    from kdcache.distributed import barrier, process_group

    with process_group("gloo") as (rank, world):
        if args.what == "cache":
            from kdcache.cache.build import build_cache
            from kdcache.teacher import load_teacher
            from kdcache.token_data import open_tokens

            teacher = load_teacher(TeacherConfig(path=args.teacher, device="cpu"))
            tokens = open_tokens(args.tokens, "train")
            cfg = CacheConfig(targets="topk", top_k=32, batch_size=args.batch_size, rows_per_shard=args.batch_size)
            barrier()
            began = time.perf_counter()
            build_cache(teacher, tokens, cfg, out_dir=args.out, rank=rank, world_size=world)
            barrier()
            seconds, count = time.perf_counter() - began, len(tokens) * tokens.seq_len
        else:
            from kdcache.train import train

            cfg = TrainConfig(
                batch_size=args.batch_size // world,
                max_steps=args.steps,
                warmup_steps=2,
                checkpoint_every=10**6,
                log_every=10**6,
                student=StudentConfig(**STUDENT),
            )
            summary = train(cfg, cache_dir=args.cache, out_dir=args.out, device="cpu")
            seconds, count = summary["elapsed_s"], summary["tokens"]  # the loop only, all ranks' tokens
        if rank == 0:
            Path(args.result).write_text(json.dumps({"tokens": count, "seconds": seconds}))


def launch(what: str, ranks: int, threads: int, *, result: Path, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "KDCACHE_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        str(Path(__file__).resolve()),
        "worker",
        what,
        "--threads",
        str(threads),
        "--result",
        str(result),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    data = json.loads(result.read_text())
    return {**data, "tokens_per_s": data["tokens"] / data["seconds"]}


def run_all(args: argparse.Namespace) -> dict:
    results: dict[str, dict[str, dict]] = {"cache": {}, "train": {}}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="kdcache-scale-") as tmp:
        root = Path(tmp)
        teacher, tokens = make_inputs(root, sequences=args.sequences, seq_len=args.seq_len)
        for rep in range(args.repeats if "cache" in args.stages else 1):
            for name, ranks, threads in CONFIGS if "cache" in args.stages else CONFIGS[:1]:
                out = root / f"cache-{rep}-{ranks}-{threads}"
                run = launch(
                    "cache",
                    ranks,
                    threads,
                    result=root / "r.json",
                    extra=[
                        "--teacher",
                        str(teacher),
                        "--tokens",
                        str(tokens),
                        "--out",
                        str(out),
                        "--batch-size",
                        str(args.cache_batch),
                    ],
                )
                best = results["cache"].get(name)
                results["cache"][name] = run if best is None or run["tokens_per_s"] > best["tokens_per_s"] else best
                loads.append(os.getloadavg()[0])
        cache = root / "cache-0-1-1"
        for rep in range(args.repeats if "train" in args.stages else 0):
            for name, ranks, threads in CONFIGS:
                run = launch(
                    "train",
                    ranks,
                    threads,
                    result=root / "r.json",
                    extra=[
                        "--cache",
                        str(cache),
                        "--out",
                        str(root / f"student-{rep}-{ranks}-{threads}"),
                        "--batch-size",
                        str(args.train_batch),
                        "--steps",
                        str(args.steps),
                    ],
                )
                best = results["train"].get(name)
                results["train"][name] = run if best is None or run["tokens_per_s"] > best["tokens_per_s"] else best
                loads.append(os.getloadavg()[0])
    return {
        "results": results,
        "load_average_1min": loads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "settings": {k: v for k, v in vars(args).items() if k not in ("fn", "out")},
    }


def table(report: dict) -> str:
    names = [n for n, _, _ in CONFIGS]
    lines = [
        "| stage | " + " | ".join(f"{n} tokens/s" for n in names) + " | 2r x 1t / 1r x 1t | 1r x 2t / 1r x 1t |",
        "|---" * (len(names) + 3) + "|",
    ]
    for stage, runs in report["results"].items():
        if len(runs) < len(names):
            continue
        base = runs["1r x 1t"]["tokens_per_s"]
        cells = [f"{runs[n]['tokens_per_s']:,.0f}" for n in names]
        lines.append(
            f"| {stage} | " + " | ".join(cells) + f" | {runs['2r x 1t']['tokens_per_s'] / base:.2f}x | "
            f"{runs['1r x 2t']['tokens_per_s'] / base:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode")
    w = sub.add_parser("worker")
    w.add_argument("what", choices=["cache", "train"])
    for flag in ("--threads", "--batch-size", "--steps"):
        w.add_argument(flag, type=int, default=1)
    for flag in ("--result", "--teacher", "--tokens", "--cache", "--out"):
        w.add_argument(flag)
    ap.add_argument("--sequences", type=int, default=96, help="sequences cached (and trained on)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--cache-batch", type=int, default=8, help="teacher batch size (also rows per shard)")
    ap.add_argument("--train-batch", type=int, default=8, help="global training batch (split over ranks)")
    ap.add_argument("--steps", type=int, default=24, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration (best kept)")
    ap.add_argument("--stages", nargs="+", choices=["cache", "train"], default=["cache", "train"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    if args.mode == "worker":
        worker(args)
        return
    report = run_all(args)
    report["table"] = table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(report["table"])
    print(f"\nload average (1 min) during the runs: {', '.join(f'{x:.1f}' for x in report['load_average_1min'])}")


if __name__ == "__main__":
    main()
