"""Benchmark: student quality by soft-target kind — same student, steps, data order and seeds.

Every variant trains the same freshly initialised student (``TrainConfig().student``, seed fixed)
on the same batches in lockstep: each step runs the teacher once, turns its logits into each
variant's targets exactly as the cache stage does (``targets.sparsify``) and passes them through
the cache format (``encode_table`` -> ``decode_row``, i.e. quantized as stored), then steps each
student with ``losses.kd_loss`` (``alpha``, optimizer and LR schedule from ``TrainConfig``).

Variants: CE only; top-k renormalized and top-k + tail at each ``--ks``; adaptive top-k at each
``--masses`` (k_max = max k); sampled at each ``--samples``; and online full-logit KD (the dense
teacher distribution in the loop: ``alpha * KL(p || q) + (1 - alpha) * CE``, the quality ceiling).

Reports on ``--val`` held-out sequences: CE (nats/token), KL(teacher || student), top-1 agreement
with the teacher, ECE (15 equal-width bins) and over-confidence (mean top-1 confidence minus
accuracy). Prints a markdown table; writes ``bench/results/kd_quality.json``.

    python bench/kd_quality.py --teacher models/demo-teacher --tokens data/tokens
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.cache.format import TargetLayout
from kdcache.cache.rows import decode_row, encode_table
from kdcache.cache.targets import sparsify, to_sequence_targets
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import TrainConfig
from kdcache.evaluate import Tally
from kdcache.losses import KDLossSpec, dense_kl, kd_loss
from kdcache.optim import lr_scheduler, make_optimizer
from kdcache.student import build_student
from kdcache.teacher import load_teacher, teacher_logits
from kdcache.token_data import open_tokens

RESULTS = Path(__file__).parent / "results" / "kd_quality.json"
log = logging.getLogger("kd_quality")


@dataclass
class Variant:
    name: str
    loss: str  # kd_loss kind, or "online"
    layout: TargetLayout | None = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    kd_sum: float = 0.0
    train_s: float = 0.0


def variants(*, ks: list[int], masses: list[float], samples: list[int], vocab: int, seq_len: int) -> list[Variant]:
    def topk(k: int, mass: float = 0.0) -> TargetLayout:
        return TargetLayout(kind="topk", vocab_size=vocab, seq_len=seq_len, top_k=k, mass=mass)

    out = [Variant("ce", "ce")]
    out += [Variant(f"top-{k} renorm", "topk_renorm", topk(k)) for k in ks]
    out += [Variant(f"top-{k} + tail", "topk_tail", topk(k)) for k in ks]
    out += [Variant(f"adaptive m={m:g} (k<={max(ks)}) + tail", "topk_tail", topk(max(ks), m)) for m in masses]
    out += [
        Variant(
            f"sampled S={s}",
            "sampled",
            TargetLayout(kind="sampled", vocab_size=vocab, seq_len=seq_len, samples=s, seed=0),
        )
        for s in samples
    ]
    return out + [Variant("online full KD", "online")]


def cached_targets(
    logits: torch.Tensor, layout: TargetLayout, seqs: np.ndarray, ids: np.ndarray
) -> dict[str, torch.Tensor]:
    """What the loader would serve for these sequences: sparsify -> encode -> decode, as batch tensors."""
    sparse = {k: v.cpu() for k, v in sparsify(logits, layout=layout, seq_indices=torch.from_numpy(seqs)).items()}
    table = encode_table(layout, to_sequence_targets(sparse, ids, seqs))
    rows = [decode_row(layout, r) for r in table.to_pylist()]
    if layout.has_topk:
        keep = np.stack([np.isfinite(r.topk_logprobs) for r in rows])  # (B, T, k)
        lp = np.where(keep, np.stack([r.topk_logprobs for r in rows]), 0.0)
        return {
            "topk_ids": torch.from_numpy(np.stack([r.topk_ids for r in rows]).astype(np.int64)),
            "topk_logprobs": torch.from_numpy(lp.astype(np.float32)),
            "topk_mask": torch.from_numpy(keep),
        }
    width = max(r.sample_ids.shape[1] for r in rows)
    pad = [(0, 0), (0, 0)]
    ids_ = np.stack([np.pad(r.sample_ids, [pad[0], (0, width - r.sample_ids.shape[1])]) for r in rows])
    counts = np.stack([np.pad(r.sample_counts, [pad[0], (0, width - r.sample_counts.shape[1])]) for r in rows])
    return {
        "sample_ids": torch.from_numpy(ids_.astype(np.int64)),
        "sample_counts": torch.from_numpy(counts.astype(np.float32)),
    }


def online_loss(
    logits: torch.Tensor, teacher_lp: torch.Tensor, ids: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, float]:
    """alpha * mean_t KL(p_t || q_t) over all positions + (1 - alpha) * CE, chunked over positions."""
    B, T, V = logits.shape
    flat, tflat = logits.reshape(-1, V), teacher_lp.reshape(-1, V)  # (N, V)
    kl = torch.cat([dense_kl(tflat[i : i + 1024], flat[i : i + 1024]) for i in range(0, B * T, 1024)]).mean()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
    return alpha * kl + (1 - alpha) * ce, float(kl.detach())


def train_step(
    v: Variant, ids: torch.Tensor, targets: dict[str, torch.Tensor] | None, teacher_lp: torch.Tensor, cfg: TrainConfig
) -> None:
    t0 = time.perf_counter()
    v.optimizer.zero_grad(set_to_none=True)
    logits = v.model(input_ids=ids).logits  # (B, T, V)
    if v.loss == "online":
        loss, kd = online_loss(logits, teacher_lp, ids, cfg.alpha)
    else:
        spec = KDLossSpec(kind=v.loss, alpha=cfg.alpha, temperature=cfg.temperature, chunk_tokens=cfg.chunk_tokens)
        out = kd_loss(logits, input_ids=ids, spec=spec, **(targets or {}))
        loss, kd = out.loss, float(out.kd)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.model.parameters(), cfg.grad_clip)
    v.optimizer.step()
    v.scheduler.step()
    v.kd_sum += kd
    v.train_s += time.perf_counter() - t0


@torch.inference_mode()
def evaluate_all(
    models: dict[str, Any], teacher: Any, val: np.ndarray, *, batch_size: int = 16, bins: int = 15
) -> dict[str, dict[str, float]]:
    """CE, KL(teacher || model), top-1 agreement, ECE, over-confidence on positions 0..T-2."""
    tallies = {name: Tally(bins=bins) for name in ["teacher", *models]}
    for b0 in range(0, len(val), batch_size):
        ids = torch.from_numpy(val[b0 : b0 + batch_size])  # (B, T)
        labels = ids[:, 1:].reshape(-1)  # (N,)
        t_logits = teacher_logits(teacher, ids)[:, :-1].float()
        V = t_logits.shape[-1]
        t_lp = torch.log_softmax(t_logits.reshape(-1, V), dim=-1)  # (N, V)
        for name, tally in tallies.items():
            logits = (
                t_logits.reshape(-1, V)
                if name == "teacher"
                else models[name](input_ids=ids).logits[:, :-1].reshape(-1, V).float()
            )
            logq = torch.log_softmax(logits, dim=-1)  # (N, V)
            conf, pred = logq.max(dim=-1)
            tally.n += labels.numel()
            tally.ce += float(F.nll_loss(logq, labels, reduction="sum"))
            tally.kl += float(dense_kl(t_lp, logits).sum()) if name != "teacher" else 0.0
            tally.agree += int((pred == t_lp.argmax(-1)).sum())
            tally.correct += int((pred == labels).sum())
            tally.add_calibration(conf.exp(), pred == labels)
    return {
        name: {
            "ce": t.ce / t.n,
            "kl_to_teacher": t.kl / t.n,
            "top1_agreement": t.agree / t.n,
            "top1_accuracy": t.correct / t.n,
            "ece": t.ece(),
            "overconfidence": float((t.bin_conf.sum() - t.bin_correct.sum()) / t.n),
        }
        for name, t in tallies.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="models/demo-teacher")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--ks", default="8,64")
    ap.add_argument("--masses", default="0.95")
    ap.add_argument("--samples", default="8,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, seed=args.seed)
    teacher = load_teacher(TeacherConfig(path=args.teacher, device="cpu", dtype="float32"))
    train, val = open_tokens(args.tokens, "train"), open_tokens(args.tokens, "val")
    V, T = train.vocab_size, train.seq_len
    need = args.steps * args.batch
    order = np.random.default_rng(args.seed).permutation(len(train))[:need]  # one data order for all
    if len(order) < need:
        order = np.concatenate([order] * (need // len(order) + 1))[:need]
    vs = variants(
        ks=[int(x) for x in args.ks.split(",")],
        masses=[float(x) for x in args.masses.split(",") if x],
        samples=[int(x) for x in args.samples.split(",")],
        vocab=V,
        seq_len=T,
    )
    for v in vs:
        torch.manual_seed(cfg.seed)  # identical initial weights for every variant
        v.model = build_student(cfg.student, vocab_size=V, seq_len=T, tokenizer=teacher.tokenizer).train()
        v.optimizer = make_optimizer(v.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        v.scheduler = lr_scheduler(
            v.optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
        )
    began, target_s = time.perf_counter(), 0.0
    for step in range(args.steps):
        seqs = np.sort(order[step * args.batch : (step + 1) * args.batch])
        ids_np = np.asarray(train.ids[seqs], np.int64)
        ids = torch.from_numpy(ids_np)  # (B, T)
        t0 = time.perf_counter()
        logits = teacher_logits(teacher, ids)[..., :V].float()  # (B, T, V)
        teacher_lp = torch.log_softmax(logits, dim=-1)
        for v in vs:
            targets = cached_targets(logits, v.layout, seqs, ids_np) if v.layout is not None else None
            target_s += time.perf_counter() - t0
            train_step(v, ids, targets, teacher_lp, cfg)
            t0 = time.perf_counter()
        if (step + 1) % 10 == 0:
            log.info(
                "step %d/%d (%.0fs): %s",
                step + 1,
                args.steps,
                time.perf_counter() - began,
                ", ".join(f"{v.name} kd {v.kd_sum / (step + 1):.3f}" for v in vs[1:]),
            )
    metrics = evaluate_all({v.name: v.model.eval() for v in vs}, teacher, np.asarray(val.ids[: args.val], np.int64))
    rows = [{"variant": name, **m} for name, m in metrics.items()]
    for r in rows:
        v = next((v for v in vs if v.name == r["variant"]), None)
        r["train_s"] = v.train_s if v else None
    cols = [
        ("variant", "variant", ""),
        ("val CE", "ce", ".4f"),
        ("KL(teacher‖student)", "kl_to_teacher", ".4f"),
        ("top-1 agreement", "top1_agreement", ".4f"),
        ("ECE", "ece", ".4f"),
        ("over-confidence", "overconfidence", "+.4f"),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(format(r[k], f) if f else str(r[k]) for _, k, f in cols) + " |" for r in rows]
    print("\n".join(lines))
    out = {
        "command": "python bench/kd_quality.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "config": {
            "train": {k: getattr(cfg, k) for k in ("alpha", "lr", "warmup_steps", "max_steps", "batch_size")},
            "student": vars(cfg.student),
            "teacher": args.teacher,
            "val_sequences": args.val,
            "seq_len": T,
        },
        "teacher": teacher_info(args.teacher),
        "wall_s": time.perf_counter() - began,
        "target_s": target_s,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")


def teacher_info(path: str) -> dict[str, Any]:
    """How the teacher was made (the demo teacher's ``training.json``: steps, val loss), if recorded."""
    try:
        info = json.loads((Path(path) / "training.json").read_text())
    except (OSError, ValueError):
        return {"path": path}
    return {"path": path} | {k: info.get(k) for k in ("steps", "stopped_by", "val_loss", "tokens_seen", "elapsed_s")}


if __name__ == "__main__":
    main()
