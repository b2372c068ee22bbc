"""The GPU-box check: one short run (under 10 minutes on one H100/H200) of what only a GPU can show.

Measures, side by side in one process on one GPU:

- teacher forward tokens/s in bf16 and MFU (2 x parameters x tokens / s over the GPU's dense bf16 peak)
- the cache stage (forward + chunked LM head + sparsify + background writer) vs the bare forward
- a student training step: sparse KD (top-k + tail) vs plain CE, tokens/s and peak memory
- the loader: finished top-k batches per second vs what the student consumes (stall = loader slower)

The teacher is a random-weight Llama built from its config class (default ~1.1B parameters with a
128,256-id vocabulary, Llama-3 sized), so nothing is downloaded. Writes a JSON of the figures and
prints a markdown table to paste into bench/RESULTS.md.

On the GPU machine (its own torch/transformers; kdcache installed with --no-deps)::

    python -m pip install --no-deps -e . && python bench/gpu_box.py --out $OUT/gpu_box.json

Here, to check the script itself on the CPU in a minute::

    python bench/gpu_box.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s per GPU (vendor figures)
BIG = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 128256,
}  # ~1.1B parameters (TinyLlama-shaped, Llama-3 vocabulary)
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 4096,
}
STUDENT_BIG = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048}
STUDENT_TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def make_teacher(root: Path, shape: dict, *, seq_len: int, sequences: int, dtype: torch.dtype) -> tuple[Path, Path]:
    """A random Llama of ``shape`` saved as a model dir with a word-level tokenizer, and random token data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kdcache.fingerprint import tokenizer_fingerprint
    from kdcache.token_data import write_tokens

    teacher, tokens = root / "teacher", root / "tokens"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=seq_len)).to(dtype).save_pretrained(teacher)
    vocab = shape["vocab_size"]
    words = ["<eos>", "<pad>", *(f"w{i}" for i in range(2, vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(teacher)
    ids = np.random.default_rng(0).integers(2, vocab, size=(sequences + 8, seq_len))
    write_tokens(
        tokens,
        {"train": ids[:sequences], "val": ids[sequences:]},
        vocab_size=vocab,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    return teacher, tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(teacher, tokens, *, batch: int, batches: int) -> float:
    """Tokens/s of the bare teacher forward (logits computed, then dropped), after one warm-up batch."""
    ids = torch.from_numpy(np.asarray(tokens.ids[: batch * (batches + 1)], dtype=np.int64))
    with torch.inference_mode():
        _ = teacher.model(input_ids=ids[:batch].to(teacher.device)).logits  # warm-up (kernels, allocator)
        sync(teacher.device)
        t0 = time.perf_counter()
        for b in range(1, batches + 1):
            _ = teacher.model(input_ids=ids[b * batch : (b + 1) * batch].to(teacher.device)).logits
        sync(teacher.device)
    return batch * batches * tokens.seq_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models: check the script on a CPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=64, help="sequences cached (and forward-timed)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--student-steps", type=int, default=20)
    ap.add_argument("--out", default="bench/results/gpu_box.json")
    args = ap.parse_args()
    if args.tiny:
        args.seq_len, args.sequences, args.batch_size, args.student_steps = 64, 16, 4, 4

    from kdcache.cache.build import build_cache
    from kdcache.cache.reader import open_cache
    from kdcache.config.cache import CacheConfig
    from kdcache.config.teacher import TeacherConfig
    from kdcache.config.train import StudentConfig, TrainConfig
    from kdcache.teacher import load_teacher
    from kdcache.token_data import open_tokens
    from kdcache.train import train

    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict = {
        "command": "python bench/gpu_box.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "device": gpu,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        teacher_dir, token_dir = make_teacher(
            root, TINY if args.tiny else BIG, seq_len=args.seq_len, sequences=args.sequences, dtype=dtype
        )
        teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device=args.device, dtype="auto"))
        tokens = open_tokens(token_dir, "train")
        params = teacher.info["num_parameters"]
        results |= {
            "setup_s": time.perf_counter() - t0,
            "teacher_parameters": params,
            "vocab_size": teacher.vocab_size,
            "dtype": teacher.info["dtype"],
        }

        fwd = forward_rate(
            teacher, tokens, batch=args.batch_size, batches=max(1, args.sequences // args.batch_size - 1)
        )
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
        results |= {"forward_tokens_per_s": fwd, "mfu": 2 * params * fwd / peak if peak else None}

        cfg = CacheConfig(targets="topk", top_k=args.top_k, batch_size=args.batch_size, rows_per_shard=args.sequences)
        sync(device)
        t0 = time.perf_counter()
        build_cache(teacher, tokens, cfg, out_dir=root / "cache")
        sync(device)
        cache_rate = args.sequences * args.seq_len / (time.perf_counter() - t0)
        results |= {"cache_tokens_per_s": cache_rate, "cache_over_forward": fwd / cache_rate}
        del teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()

        student = STUDENT_TINY if args.tiny else STUDENT_BIG
        for loss in ("topk_tail", "ce"):
            cfg_t = TrainConfig(
                loss=loss,
                max_steps=args.student_steps,
                batch_size=args.batch_size,
                warmup_steps=1,
                checkpoint_every=10**6,
                log_every=10**6,
                student=StudentConfig(**student),
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            summary = train(cfg_t, cache_dir=root / "cache", out_dir=root / f"student-{loss}", device=args.device)
            results[f"student_{loss}_tokens_per_s"] = summary["tokens_per_s"]
            results[f"student_{loss}_peak_bytes"] = summary["peak_memory_bytes"].get(
                "cuda", summary["peak_memory_bytes"]["cpu_rss"]
            )
        results["kd_over_ce_step_time"] = results["student_ce_tokens_per_s"] / results["student_topk_tail_tokens_per_s"]

        with open_cache(root / "cache", staging_dir=root / "staging") as reader:
            list(reader.batches(args.batch_size, seed=0))  # stage once
            t0 = time.perf_counter()
            n = sum(b["input_ids"].numel() for b in reader.batches(args.batch_size, seed=1))
            results["loader_tokens_per_s"] = n / (time.perf_counter() - t0)
        results["loader_over_student"] = results["loader_tokens_per_s"] / results["student_topk_tail_tokens_per_s"]

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"| {gpu} | teacher {params / 1e9:.2f}B bf16 fwd tok/s | MFU | cache tok/s | fwd/cache | "
        "KD step / CE step | loader / student |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    mfu = f"{results['mfu']:.1%}" if results["mfu"] else "n/a"
    print(
        f"| {args.seq_len}x{args.batch_size} | {fwd:,.0f} | {mfu} | {cache_rate:,.0f} | "
        f"{results['cache_over_forward']:.2f} | {results['kd_over_ce_step_time']:.2f} | "
        f"{results['loader_over_student']:.0f}x |"
    )


if __name__ == "__main__":
    main()
