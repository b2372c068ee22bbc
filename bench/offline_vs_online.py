"""Benchmark: offline KD (from a kdcache cache, the trainer's real path) vs online KD (the teacher's forward in
every step + dense KL on full logits), wall time for the same student steps, side by side in one run.

Two teacher/student pairs with random weights over the demo vocabulary (V=4,096, T=256): the demo's own
shapes (the demo teacher of params.yaml vs the default student, ~5:1 parameters) and a teacher deepened to
~8:1. For each pair: the cache build (top-64 + tail and S=16 samples, one cache: ``targets: both``), offline
training with ``kdcache.train.train`` on the pipeline's default loss (sampled) and on top-64 + tail (the
slowest sparse loss measured), and online KD (same student init, optimizer, schedule, batch shape and
steps; loss alpha * KL(p_t || p_s) + (1 - alpha) * CE on full logits, the teacher in ``no_grad``).
Times: the sum of the optimizer steps (``steps``) and the whole call (``wall``: loading, staging, saving).
One thread (``torch.set_num_threads(1)``).

``--profile DIR`` also writes torch.profiler top-10 tables (self CPU time) of one online step and one offline
top-64 + tail step of the 8:1 pair -- the two slowest steps measured -- as text.

    python bench/offline_vs_online.py --profile bench/results/profiles   # ~4 minutes on 2 shared cores

Writes ``bench/results/offline_vs_online.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdcache.cache.build import build_cache
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.lm_head import fused_head
from kdcache.optim import lr_scheduler, make_optimizer
from kdcache.packing import packing_of
from kdcache.student import build_student, count_parameters
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens, write_tokens
from kdcache.train import _step, step_spec, train
from kdcache.train_data import Position, batch_keys, batch_stream, loss_spec, open_inputs, prepare_batch

RESULTS = Path(__file__).parent / "results" / "offline_vs_online.json"
VOCAB, SEQ = 4096, 256
DEMO_TEACHER = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768)  # params.yaml demo_teacher
STUDENT = StudentConfig()  # params.yaml train.student (the library defaults)
log = logging.getLogger("offline_vs_online")


def llama_config(sizes: dict[str, int]) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=SEQ,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=1,
    )


def eight_to_one() -> dict[str, int]:
    """The demo teacher's width with as many layers as bring it closest to 8x the student's parameters."""
    student = count_parameters(teacher_model({k: v for k, v in STUDENT.__dict__.items() if k != "path"}))
    best = min(
        range(1, 33),
        key=lambda n: abs(count_parameters(teacher_model({**DEMO_TEACHER, "num_layers": n})) / student - 8),
    )
    return {**DEMO_TEACHER, "num_layers": best}


def teacher_model(sizes: dict[str, int]) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(sizes))


def make_inputs(root: Path, sizes: dict[str, int], *, sequences: int) -> tuple[Path, Path]:
    """A random-weight teacher dir (word-level tokenizer) and random token data of ``sequences`` rows."""
    words = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<eos>")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(sizes)).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    ids = np.random.default_rng(0).integers(2, VOCAB, size=(sequences + 2, SEQ))
    write_tokens(
        root / "tokens",
        {"train": ids[:sequences], "val": ids[sequences:]},
        vocab_size=VOCAB,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    return root / "teacher", root / "tokens"


def train_cfg(loss: str, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        loss=loss,
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_steps=2,
        checkpoint_every=args.steps,
        log_every=args.steps,
        student=STUDENT,
    )


def offline(cache: Path, out: Path, loss: str, args: argparse.Namespace) -> dict[str, float]:
    began = time.perf_counter()
    summary = train(train_cfg(loss, args), cache_dir=cache, out_dir=out, device="cpu")
    return {"wall_s": time.perf_counter() - began, "steps_s": summary["elapsed_s"], "final_loss": summary["final_loss"]}


def online(teacher_dir: Path, tokens_dir: Path, args: argparse.Namespace, *, profile: Path | None = None) -> dict:
    """Online KD: the teacher's forward on every batch, dense forward KL + CE on the student's full logits."""
    began = time.perf_counter()
    cfg = train_cfg("topk_tail", args)
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu", dtype="float32")).model
    torch.manual_seed(cfg.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher_dir)
    student = build_student(cfg.student, vocab_size=VOCAB, seq_len=SEQ, tokenizer=tokenizer)
    optimizer = make_optimizer(student, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(
        optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    data = open_tokens(tokens_dir, "train")
    order = np.random.default_rng(cfg.seed).permutation(len(data))
    steps_s, loss = 0.0, math.nan
    for step in range(cfg.max_steps):
        rows = order[(np.arange(cfg.batch_size) + step * cfg.batch_size) % len(data)]
        ids = torch.from_numpy(data.ids[np.sort(rows)].astype(np.int64))  # (B, T)
        t0 = time.perf_counter()
        if profile is not None and step == 2:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss = online_step(student, teacher, optimizer, ids, alpha=cfg.alpha, clip=cfg.grad_clip)
            write_profile(prof, profile, "online full-logit KD step (teacher forward + dense KL + CE)", ids.numel())
        else:
            loss = online_step(student, teacher, optimizer, ids, alpha=cfg.alpha, clip=cfg.grad_clip)
        scheduler.step()
        steps_s += time.perf_counter() - t0
    return {"wall_s": time.perf_counter() - began, "steps_s": steps_s, "final_loss": loss}


def online_step(student: Any, teacher: Any, optimizer: Any, ids: torch.Tensor, *, alpha: float, clip: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_logp = teacher(input_ids=ids).logits.float().log_softmax(-1)  # (B, T, V)
    s_logp = student(input_ids=ids).logits.float().log_softmax(-1)  # (B, T, V)
    kd = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()  # KL(p_t || p_s), mean over positions
    ce = F.nll_loss(s_logp[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))  # next-token CE
    loss = alpha * kd + (1 - alpha) * ce
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    optimizer.step()
    return float(loss.detach())


def profile_offline_step(cache: Path, args: argparse.Namespace, out: Path) -> None:
    """One trainer step (``kdcache.train._step``: fused head, top-64 + tail loss, AdamW) under the profiler."""
    cfg = train_cfg("topk_tail", args)
    reader, tok, vmap, _ = open_inputs(cfg, cache)
    spec = step_spec(loss_spec(cfg, reader, cache_dir=cache), cfg, 2)
    torch.manual_seed(cfg.seed)
    model = build_student(cfg.student, vocab_size=VOCAB, seq_len=SEQ, tokenizer=tok)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pos = Position()
    prep = functools.partial(prepare_batch, vmap=vmap, pin=False, packing=packing_of(reader.meta.corpus))
    with reader:
        stream = map(
            prep, batch_stream(reader, cfg.batch_size, seed=0, pos=pos, rank=0, world=1, keys=batch_keys(cfg, spec))
        )
        kw = dict(model=model, head=fused_head(model)[0], optimizer=optimizer, spec=spec, stream=stream, pos=pos)
        for _ in range(2):  # warm up
            _step(cfg, **kw, dev=torch.device("cpu"))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _step(cfg, **kw, dev=torch.device("cpu"))
    write_profile(
        prof, out, "offline top-64 + tail KD step (kdcache.train._step: fused head + loss)", cfg.batch_size * SEQ
    )


def write_profile(prof: Any, out: Path, title: str, tokens: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = "online_step.txt" if title.startswith("online") else "offline_topk_tail_step.txt"
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    who = "the 8:1 pair's teacher + student" if name == "online_step.txt" else "the 8:1 pair's student (no teacher)"
    head = f"# {title}\n# {who}, B*T = {tokens} tokens, V = {VOCAB}, 1 thread, CPU (machine shared by other jobs)\n"
    (out / name).write_text(head + table + "\n")


def run_pair(name: str, sizes: dict[str, int], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / name
    root.mkdir(parents=True)
    teacher_dir, tokens_dir = make_inputs(root, sizes, sequences=args.steps * args.batch_size)
    teacher_params = count_parameters(LlamaForCausalLM.from_pretrained(teacher_dir))
    student_params = count_parameters(
        build_student(
            STUDENT, vocab_size=VOCAB, seq_len=SEQ, tokenizer=PreTrainedTokenizerFast.from_pretrained(teacher_dir)
        )
    )
    began = time.perf_counter()
    teacher = load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu", dtype="float32"))
    cache_cfg = CacheConfig(targets="both", top_k=64, samples=16, batch_size=args.batch_size, rows_per_shard=512)
    build_cache(teacher, open_tokens(tokens_dir, "train"), cache_cfg, out_dir=root / "cache")
    cache_s = time.perf_counter() - began
    del teacher
    row: dict[str, Any] = {"pair": name, "teacher": sizes, "teacher_params": teacher_params}
    row |= {"student_params": student_params, "ratio": teacher_params / student_params, "cache_build_s": cache_s}
    profile = args.profile if name == "8:1" else None
    runs: dict[str, list[dict[str, float]]] = {"offline_sampled": [], "online": [], "offline_topk_tail": []}
    for rep in range(args.reps):  # interleaved; each variant's fastest repetition is reported (a shared machine)
        runs["offline_sampled"].append(offline(root / "cache", root / f"sampled-{rep}", "sampled", args))
        runs["online"].append(online(teacher_dir, tokens_dir, args, profile=profile if rep == 0 else None))
        runs["offline_topk_tail"].append(offline(root / "cache", root / f"topk-{rep}", "topk_tail", args))
    for key, found in runs.items():
        row[key] = min(found, key=lambda r: r["steps_s"]) | {"steps_s_each": [r["steps_s"] for r in found]}
    if profile is not None:
        profile_offline_step(root / "cache", args, profile)
    for key in ("offline_sampled", "offline_topk_tail"):
        row[f"online_over_{key}"] = row["online"]["steps_s"] / row[key]["steps_s"]
    return row


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.steps} student steps of {args.batch_size} x {SEQ} tokens, V={VOCAB}, 1 thread, fastest of {args.reps} "
        "interleaved runs (steps only; wall incl. loading, staging and saving in parentheses)",
        "",
        "| teacher:student (params) | cache build (once) | offline sampled S=16 | offline top-64+tail | online KD "
        "| online / offline sampled | online / offline top-64+tail |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(
            f"{r[k]['steps_s']:.1f} s ({r[k]['wall_s']:.1f} s)"
            for k in ("offline_sampled", "offline_topk_tail", "online")
        )
        lines.append(
            f"| {r['ratio']:.1f}:1 ({r['teacher_params'] / 1e6:.2f}M : {r['student_params'] / 1e6:.2f}M) "
            f"| {r['cache_build_s']:.1f} s | {cells} "
            f"| **{r['online_over_offline_sampled']:.2f}x** | {r['online_over_offline_topk_tail']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions; the fastest is reported")
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler top-10 tables here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run_pair(name, sizes, args, Path(tmp)) for name, sizes in (("demo", DEMO_TEACHER), ("8:1", eight_to_one()))
        ]
    text = table(rows, args)
    print(text)
    machine = {
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": 1,
        "note": "2-core machine shared by other jobs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "rows": rows,
                "steps": args.steps,
                "reps": args.reps,
                "batch_size": args.batch_size,
                "seq_len": SEQ,
                "vocab": VOCAB,
                **machine,
                "table": text,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
