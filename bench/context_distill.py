"""Benchmark: offline context (prompt) distillation on the demo — does a student trained without the context
move toward the *prompted* teacher?

Builds two top-k caches of the same train rows with the real cache path (``build_cache``): one plain, one with
``cache.teacher_context`` (a reference document: the start of the standard library's ``json/decoder.py``).
Trains three identical students with the real trainer (same init, data order, steps): CE only, KD on the plain
cache, KD on the context cache. Reports on held-out val rows (the student never sees the context):
KL(prompted teacher || student), KL(plain teacher || student) and CE, nats/token over non-padding positions.
The plain teacher's own row says how far the context moves the teacher (KL(prompted || plain)): the most a
student trained on the context cache can gain over one trained on the plain cache.
Prints a markdown table; writes ``bench/results/context_distill.json``.

    python bench/context_distill.py --teacher models/demo-teacher --tokens data/tokens
"""

from __future__ import annotations

import argparse
import json
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kdcache.cache.build import build_cache
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import TrainConfig
from kdcache.teacher import load_teacher
from kdcache.teacher_context import load_teacher_context
from kdcache.token_data import open_tokens, read_token_manifest, write_tokens
from kdcache.train import train

RESULTS = Path(__file__).parent / "results" / "context_distill.json"


def small_tokens(src: Path, out: Path, *, train_rows: int, val_rows: int, row_len: int) -> Path:
    """The first rows of each split of ``src``, cut into rows of ``row_len`` (room for the context within the demo
    teacher's 256 positions), as a token directory of their own (same tokenizer and packing record)."""
    manifest = read_token_manifest(src)
    tr, va = open_tokens(src, "train"), open_tokens(src, "val")
    meta = {k: manifest[k] for k in ("corpus", "prepare", "tokenizer_dir", "packing") if k in manifest}
    write_tokens(
        out,
        {
            "train": np.asarray(tr.ids).reshape(-1, row_len)[:train_rows],
            "val": np.asarray(va.ids).reshape(-1, row_len)[:val_rows],
        },
        vocab_size=tr.vocab_size,
        tokenizer_fingerprint=tr.tokenizer_fingerprint,
        meta=meta,
    )
    return out


def val_metrics(model, teacher, ids: torch.Tensor, context: tuple[int, ...], pad_id: int | None) -> dict[str, float]:
    """Per-token means over positions whose next token is not padding: KL to the prompted and plain teacher, CE."""
    sums = {"kl_prompted": 0.0, "kl_plain": 0.0, "ce": 0.0}
    count = 0
    for b in range(0, len(ids), 8):
        x = ids[b : b + 8]  # (B, T)
        prefix = torch.tensor(context).expand(len(x), -1)  # (B, C)
        with torch.no_grad():
            q = torch.log_softmax(model(input_ids=x).logits.float(), -1)[:, :-1]  # (B, T-1, V)
            p_ctx = torch.log_softmax(teacher(input_ids=torch.cat([prefix, x], 1)).logits.float(), -1)
            p_ctx = p_ctx[:, len(context) : -1]  # (B, T-1, V) aligned with the rows
            p = torch.log_softmax(teacher(input_ids=x).logits.float(), -1)[:, :-1]  # (B, T-1, V)
        nxt = x[:, 1:]  # (B, T-1)
        mask = torch.ones_like(nxt, dtype=torch.bool) if pad_id is None else nxt != pad_id
        v = q.shape[-1]
        p_ctx, p = p_ctx[..., :v], p[..., :v]
        sums["kl_prompted"] += float(((p_ctx.exp() * (p_ctx - q)).sum(-1) * mask).sum())
        sums["kl_plain"] += float(((p.exp() * (p - q)).sum(-1) * mask).sum())
        sums["ce"] += float((-q.gather(-1, nxt[..., None])[..., 0] * mask).sum())
        count += int(mask.sum())
    return {k: v / count for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="models/demo-teacher")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--train-rows", type=int, default=256)
    ap.add_argument("--val-rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--row-len", type=int, default=128)
    ap.add_argument("--context-chars", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    context_text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()[: args.context_chars]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcache-ctxbench-") as tmp:
        root = Path(tmp)
        ctx_file = root / "context.txt"
        ctx_file.write_text(context_text, encoding="utf-8")
        tokens_dir = small_tokens(
            Path(args.tokens), root / "tokens", train_rows=args.train_rows, val_rows=args.val_rows, row_len=args.row_len
        )
        teacher = load_teacher(TeacherConfig(path=args.teacher, device="cpu"))
        tokens = open_tokens(tokens_dir, "train")
        base = CacheConfig(targets="topk", top_k=32, batch_size=8, rows_per_shard=512)
        ctx_cfg = CacheConfig(**{**base.__dict__, "teacher_context": str(ctx_file)})
        context = load_teacher_context(str(ctx_file), teacher, seq_len=tokens.seq_len)
        timings = {}
        for name, cfg in (("plain", base), ("context", ctx_cfg)):
            t0 = time.perf_counter()
            build_cache(teacher, tokens, cfg, out_dir=root / f"cache-{name}")
            timings[f"cache_{name}_s"] = round(time.perf_counter() - t0, 1)
        runs = {
            "ce only": ("plain", "ce"),
            "KD, plain cache": ("plain", "auto"),
            "KD, context cache": ("context", "auto"),
        }
        val = torch.from_numpy(np.asarray(open_tokens(tokens_dir, "val").ids, dtype=np.int64))
        pad = read_token_manifest(tokens_dir).get("packing", {}).get("pad_id")
        rows = {"plain teacher (no context)": val_metrics(teacher.model, teacher.model, val, context.ids, pad)}
        for label, (cache, loss) in runs.items():
            cfg = TrainConfig(
                loss=loss, max_steps=args.steps, batch_size=args.batch_size, warmup_steps=4, checkpoint_every=10**6
            )
            out = root / f"student-{cache}-{loss}"
            t0 = time.perf_counter()
            train(cfg, cache_dir=root / f"cache-{cache}", out_dir=out, device="cpu")
            timings[f"train {label} s"] = round(time.perf_counter() - t0, 1)
            student = AutoModelForCausalLM.from_pretrained(out).eval()
            rows[label] = val_metrics(student, teacher.model, val, context.ids, pad)
    result = {
        "command": "python bench/context_distill.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, shared with other jobs",
        "context": {**context.record, "chars": len(context_text)},
        "results": rows,
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - began, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"context: {context.record['num_tokens']} tokens; val rows {len(val)}; steps {args.steps}")
    print("| student | KL(prompted teacher ‖ s) | KL(plain teacher ‖ s) | val CE |")
    print("|---|---|---|---|")
    for label, m in rows.items():
        print(f"| {label} | {m['kl_prompted']:.4f} | {m['kl_plain']:.4f} | {m['ce']:.4f} |")


if __name__ == "__main__":
    main()
