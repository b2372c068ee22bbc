"""Benchmark: issue 10's open goals -- a cached target within 0.5% of online KD at <= 12 B/token, and a cached
student that beats online KD at the same steps -- with estimators and weightings only a cache's signals allow.

Reuses ``kd_quality.py``'s phase 1 (teacher logits memmap, target files through the cache format, val set)
and its evaluation. Every variant here trains with one dense loss (``kdcache.soft_targets``):

    loss = alpha(step) * sum_t w_t H(target_t, q_t) / sum_t w_t + (1 - alpha(step)) * CE

target: ``online`` (the dense teacher p, the same gradient as online KL), ``sampled`` (c / S: the cache's
sampled loss; tests/test_soft_targets.py checks it equals ``kd_loss(kind="sampled")`` in value and gradient),
``label_exact`` (the draws + the teacher's exact p of the next token from the stored ``teacher_nll``),
``strat`` (a top-k head + draws for the tail; ``--both`` files). w_t: 1, or a token filter (0/1 by
``teacher_nll`` rank per batch, ``kdcache.token_filter``). alpha(step): constant or a linear ramp.

    python bench/kd_quality_study3.py --teacher models/demo-teacher --tokens data/tokens --workdir /tmp/kd/h4/q \
        --samples 4,8,12,16 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from kd_quality import Targets, bytes_per_token, cell, data_order, evaluate, prepare, summarize, teacher_info

from kdcache.cache.codec import padded
from kdcache.cache.format import PARQUET_OPTIONS, TargetLayout
from kdcache.cache.rows import encode_table, stage_rows
from kdcache.cache.targets import next_token_ids, sparsify, to_sequence_targets
from kdcache.config.teacher import TeacherConfig
from kdcache.config.token_filter import TokenFilterConfig
from kdcache.config.train import TrainConfig
from kdcache.optim import lr_scheduler, make_optimizer
from kdcache.soft_targets import label_exact_target, sampled_target, soft_target_ce, stratified_target
from kdcache.student import build_student
from kdcache.teacher import load_teacher
from kdcache.token_filter import kept_positions

RESULTS = Path(__file__).parent / "results" / "kd_quality_study3.json"
log = logging.getLogger("kd_quality_study3")
LOW_NLL = dict(by="nll", keep="low", fraction=0.8)
TAIL_SPECS = [(1, 6), (1, 7), (2, 5), (2, 6), (4, 4)]  # (top-k, tail draws) of the t<k>s<S> files


def variant_table(screen: bool) -> dict[str, dict[str, Any]]:
    """name -> settings: target, file, token filter, alpha ramp (a0, a1), group (core: all seeds)."""
    v: dict[str, dict[str, Any]] = {
        "online full KD": dict(target="online", group="core"),
        "sampled S=8": dict(target="sampled", file="s8", group="core"),
        "sampled S=16": dict(target="sampled", file="s16", group="core"),
        "S=8 label-exact": dict(target="label_exact", file="s8", group="core"),
        "S=8, KD on low nll 0.8": dict(target="sampled", file="s8", filter=LOW_NLL, group="core"),
        "S=8 label-exact, KD on low nll 0.8": dict(target="label_exact", file="s8", filter=LOW_NLL, group="core"),
        "S=16, KD on low nll 0.8": dict(target="sampled", file="s16", filter=LOW_NLL, group="core"),
        "online, KD on low nll 0.8": dict(target="online", filter=LOW_NLL, group="core"),
        "top-2 + tail draws S=6 (both, tail-only sampler)": dict(target="strat", file="bt2s6", group="screen"),
        "top-2 + draws S=6 (both, today's sampler)": dict(target="strat", file="b2s6", group="screen"),
        "S=12 label-exact": dict(target="label_exact", file="s12", group="screen"),
    }
    for k, n in TAIL_SPECS:
        v[f"top-{k} + S={n} tail draws"] = dict(target="strat", file=f"t{k}s{n}", group="core")
    for a0, a1 in ((0.8, 0.8), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        ramp = f"alpha {a0:g}" if a0 == a1 else f"alpha {a0:g}->{a1:g}"
        group = "core" if (a0, a1) == (0.0, 1.0) else "screen"  # the ramp that won its screen: all seeds
        v[f"online, {ramp}"] = dict(target="online", alpha=(a0, a1), group=group)
        v[f"S=8 label-exact, {ramp}"] = dict(target="label_exact", file="s8", alpha=(a0, a1), group="screen")
    v["sampled S=16, alpha 0->1"] = dict(target="sampled", file="s16", alpha=(0.0, 1.0), group="core")
    v["sampled S=8, alpha 0->1"] = dict(target="sampled", file="s8", alpha=(0.0, 1.0), group="core")
    return v


# ----------------------------------------------------------------------------- extra target files


def both_files(work: Path, info: dict[str, Any], specs: list[tuple[int, int]]) -> dict[str, Any]:
    """Top-k head + S draws per position as a ``both`` layout, twice: draws from p (today's sampler, file
    b<k>s<S>) and from p restricted to the ids outside K (bt<k>s<S>: the sampler a stratified loss wants);
    returns name -> bytes/token (the files' sizes, as ``prepare`` measures them)."""
    done = work / "both.json"
    if done.exists():
        return json.loads(done.read_text())
    P, T, V = info["train_seqs"], info["seq_len"], info["vocab"]
    logits_mm = np.load(work / "train_logits.npy", mmap_mode="r")
    ids_all = np.load(work / "train_ids.npy")
    rows: dict[str, list] = {}
    lays = {}
    for k, s in specs:
        lay = TargetLayout(kind="both", vocab_size=V, seq_len=T, top_k=k, samples=s, seed=0)
        lays[f"b{k}s{s}"] = lays[f"bt{k}s{s}"] = lay
    gen = torch.Generator().manual_seed(0)
    for b0 in range(0, P, 8):
        seqs = np.arange(b0, min(P, b0 + 8))
        logits = torch.from_numpy(np.array(logits_mm[seqs]))  # (B, T, V)
        nxt = next_token_ids(torch.from_numpy(ids_all[seqs]))
        for k, s in specs:
            lay = lays[f"b{k}s{s}"]
            sparse = sparsify(logits, layout=lay, seq_indices=torch.from_numpy(seqs), next_ids=nxt)
            rows.setdefault(f"b{k}s{s}", []).extend(to_sequence_targets(sparse, ids_all[seqs], seqs))
            p = torch.softmax(logits.double(), -1).reshape(-1, V)  # (N, V)
            p.scatter_(1, sparse["topk_ids"].reshape(-1, k).long(), 0.0)  # the tail alone
            draws = torch.multinomial(p, s, replacement=True, generator=gen)  # (N, S)
            counts = torch.zeros(p.shape, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
            top = counts.topk(s, -1)  # (N, S): the distinct ids first, count 0 = padding
            tail = dict(sparse) | {
                "sample_ids": top.indices.int().reshape(len(seqs), T, s),
                "sample_counts": top.values.int().reshape(len(seqs), T, s),
            }
            rows.setdefault(f"bt{k}s{s}", []).extend(to_sequence_targets(tail, ids_all[seqs], seqs))
    sizes = {}
    for name, lay in lays.items():
        path = work / f"{name}.parquet"
        pq.write_table(encode_table(lay, rows[name]), path, **PARQUET_OPTIONS)
        sizes[name] = bytes_per_token(path, P * T) | {"layout": dataclasses.asdict(lay)}
    done.write_text(json.dumps(sizes, indent=2) + "\n")
    return sizes


def tail_files(work: Path, info: dict[str, Any], specs: list[tuple[int, int]]) -> dict[str, Any]:
    """``both`` files t<k>s<S>: the top-k head and S draws from the tail alone (p restricted to the ids outside
    K, renormalized), each batch of 8 sequences from its own generator (seed k, S, first sequence), so a file
    does not depend on which others are made; name -> bytes/token. Made once per spec (``tail.json``)."""
    done = work / "tail.json"
    sizes = json.loads(done.read_text()) if done.exists() else {}
    P, T, V = info["train_seqs"], info["seq_len"], info["vocab"]
    logits_mm, ids_all = np.load(work / "train_logits.npy", mmap_mode="r"), np.load(work / "train_ids.npy")
    for k, s in specs:
        name = f"t{k}s{s}"
        if name in sizes:
            continue
        lay = TargetLayout(kind="both", vocab_size=V, seq_len=T, top_k=k, samples=s, seed=0)
        rows = []
        for b0 in range(0, P, 8):
            seqs = np.arange(b0, min(P, b0 + 8))
            logits = torch.from_numpy(np.array(logits_mm[seqs]))  # (B, T, V)
            nxt = next_token_ids(torch.from_numpy(ids_all[seqs]))
            sparse = sparsify(logits, layout=lay, seq_indices=torch.from_numpy(seqs), next_ids=nxt)
            p = torch.softmax(logits.double(), -1).reshape(-1, V)  # (N, V)
            p.scatter_(1, sparse["topk_ids"].reshape(-1, k).long(), 0.0)  # the tail alone
            gen = torch.Generator().manual_seed(1_000_000 * k + 1000 * s + b0)
            draws = torch.multinomial(p, s, replacement=True, generator=gen)  # (N, S)
            counts = torch.zeros(p.shape, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
            top = counts.topk(s, -1)  # (N, S): the distinct ids first, count 0 = padding
            sparse |= {
                "sample_ids": top.indices.int().reshape(len(seqs), T, s),
                "sample_counts": top.values.int().reshape(len(seqs), T, s),
            }
            rows.extend(to_sequence_targets(sparse, ids_all[seqs], seqs))
        path = work / f"{name}.parquet"
        pq.write_table(encode_table(lay, rows), path, **PARQUET_OPTIONS)
        sizes[name] = bytes_per_token(path, P * T) | {"layout": dataclasses.asdict(lay)}
        done.write_text(json.dumps(sizes, indent=2) + "\n")
        log.info("%s: %.2f B/token of targets", name, sizes[name]["targets"])
    return sizes


class BothTargets(Targets):
    """A ``both`` file: the top-k head (as ``Targets`` decodes it) and the draws."""

    def __init__(self, work: Path, name: str, info: dict[str, Any]) -> None:
        super().__init__(work, name, info)
        P, T, S = info["train_seqs"], self.layout.seq_len, self.layout.samples
        a = stage_rows(self.layout, pq.read_table(work / f"{name}.parquet")).arrays
        lengths = a["sample_lengths"]
        self.sample_ids = padded(a["sample_ids"], lengths, S, 0).reshape(P, T, -1).astype(np.int64)
        self.counts = padded(a["sample_counts"], lengths, S, 0).reshape(P, T, -1).astype(np.float32)


# ----------------------------------------------------------------------------- one student


def run_task(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    work, info, v, seed, args = Path(job["work"]), job["info"], job["variant"], job["seed"], job["args"]
    cfg = TrainConfig(max_steps=args["steps"], batch_size=args["batch"], seed=seed, alpha=args["alpha"])
    student_cfg = dataclasses.replace(
        cfg.student, hidden_size=args["hidden"], num_layers=args["layers"], intermediate_size=3 * args["hidden"]
    )
    V, T, P = info["vocab"], info["seq_len"], info["train_seqs"]
    tok = load_teacher(TeacherConfig(path=args["teacher"], device="cpu", dtype="float32")).tokenizer
    torch.manual_seed(seed)
    model = build_student(student_cfg, vocab_size=V, seq_len=T, tokenizer=tok).train()
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_scheduler(
        optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    order = data_order(seed, P, cfg.max_steps * cfg.batch_size)
    train_ids = np.load(work / "train_ids.npy")
    teacher_mm = np.load(work / "train_logits.npy", mmap_mode="r")
    nll = Targets(work, "top64", info).signals["teacher_nll"]  # (P, T) as every v2 cache stores it
    tg = None
    if v["target"] in ("sampled", "label_exact"):
        tg = Targets(work, v["file"], info)
    elif v["target"] == "strat":
        tg = BothTargets(work, v["file"], info | {"bytes_per_token": info["both"]})
    filt = TokenFilterConfig(**v["filter"]) if "filter" in v else None
    a0, a1 = v.get("alpha", (cfg.alpha, cfg.alpha))
    t0, kd_sum = time.perf_counter(), 0.0
    for step in range(cfg.max_steps):
        seqs = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        ids = torch.from_numpy(train_ids[seqs])  # (B, T)
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits  # (B, T, V)
        flat = logits.reshape(-1, V)
        target = dense_target(v["target"], tg, seqs, ids, flat, teacher_mm, nll)  # (N, V)
        kd_tok = soft_target_ce(flat, target)  # (N,)
        w = torch.ones_like(kd_tok)
        if filt is not None:
            w = kept_positions(torch.from_numpy(nll[seqs]), filt).reshape(-1).to(kd_tok.dtype)
        kd = (w * kd_tok).sum() / w.sum()
        alpha = a0 + (a1 - a0) * step / max(1, cfg.max_steps - 1)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        loss = alpha * kd + (1 - alpha) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        sched.step()
        kd_sum += float(kd.detach())
    train_s = time.perf_counter() - t0
    metrics = evaluate(model.eval(), work)
    out = {"variant": job["name"], "seed": seed, "group": v["group"], "key": job["key"], **metrics}
    return out | {"train_kd": kd_sum / cfg.max_steps, "train_s": train_s}


def dense_target(kind: str, tg: Any, seqs: np.ndarray, ids: torch.Tensor, flat, teacher_mm, nll) -> torch.Tensor:
    """(N, V) float32 soft target of one batch (N = B * T positions)."""
    V = flat.shape[-1]
    if kind == "online":
        return torch.softmax(torch.from_numpy(np.array(teacher_mm[seqs])).reshape(-1, V), -1)
    b = tg.batch(seqs, 1.0) if kind != "strat" else None
    if kind in ("sampled", "label_exact"):
        si, sc = b["sample_ids"].reshape(flat.shape[0], -1), b["sample_counts"].reshape(flat.shape[0], -1)
        total = b["sample_total"].reshape(-1)
        if kind == "sampled":
            return sampled_target(si, sc, total, V).float()
        labels = F.pad(ids[:, 1:], (0, 1), value=-1).reshape(-1)  # (N,)
        return label_exact_target(si, sc, total, labels, -torch.from_numpy(nll[seqs]).reshape(-1), V).float()
    head = Targets.batch(tg, seqs, 1.0)
    n = flat.shape[0]
    return stratified_target(
        head["topk_ids"].reshape(n, -1),
        head["topk_logprobs"].reshape(n, -1),
        head["topk_mask"].reshape(n, -1),
        head["topk_log_tail"].reshape(-1),
        torch.from_numpy(tg.sample_ids[seqs]).reshape(n, -1),
        torch.from_numpy(tg.counts[seqs]).reshape(n, -1),
        flat,
    ).float()


# ----------------------------------------------------------------------------- main


def table(summary: list[dict[str, Any]], info: dict[str, Any], vt: dict[str, Any]) -> str:
    lines = [
        "| variant | seeds | val CE | KL(teacher‖student) | Δ val CE vs online (paired) | Δ KL vs online (paired) | "
        "top-1 agr. | target B/token (+ teacher_nll) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    t = info["teacher_metrics"]
    lines.append(f"| teacher | – | {t['ce']:.3f} | 0 | | | 1 | |")
    nll_b = info["bytes_per_token"]["top64"]["columns"]["teacher_nll"]
    for s in summary:
        n, v = len(s["seeds"]), vt[s["variant"]]
        rel = []
        for m in ("ce", "kl_to_teacher"):
            d = s[f"{m}_vs_online_pct"]
            rel.append("" if d is None else f"{d['mean']:+.2f}%" + (f" ({d['min']:+.2f} to {d['max']:+.2f})" * (n > 1)))
        f = v.get("file")
        b = "" if f is None else (info["bytes_per_token"] | info["both"])[f]["targets"]
        uses_nll = v["target"] == "label_exact" or "filter" in v
        bytes_ = "dense (not cached)" if f is None else f"{b:.1f}" + (f" + {nll_b:.1f}" if uses_nll else "")
        if f is None and "filter" in v:
            bytes_ += f" + {nll_b:.1f}"
        lines.append(
            f"| {s['variant']} | {n} | {cell(s['ce'], n)} | {cell(s['kl_to_teacher'], n)} | {rel[0]} | {rel[1]} | "
            f"{cell(s['top1_agreement'], n)} | {bytes_} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--workdir", default="/tmp/kd_quality")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train-seqs", type=int, default=512)
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--samples", default="4,8,12,16")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the core variants")
    ap.add_argument("--screen-seeds", default="0", help="seeds of the screening variants")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    began = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("teacher", "tokens", "seq_len", "train_seqs", "val", "top_k", "samples")}
    work = Path(args.workdir) / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(args, work)
    info["both"] = both_files(work, info, [(2, 6)]) | tail_files(work, info, TAIL_SPECS)
    vt = variant_table(screen=True)
    seeds = {"core": [int(s) for s in args.seeds.split(",")], "screen": [int(s) for s in args.screen_seeds.split(",")]}
    only = set(args.only.split(";")) if args.only else None
    common = {k: getattr(args, k) for k in ("steps", "batch", "alpha", "hidden", "layers")} | {"teacher": args.teacher}
    jobs = []
    for seed in sorted(set().union(*seeds.values())):
        for name, v in vt.items():
            if seed in seeds[v["group"]] and (only is None or name in only):
                key = hashlib.sha256(json.dumps([name, seed, common, settings], sort_keys=True).encode()).hexdigest()
                jobs.append({"work": str(work), "info": info, "variant": v, "name": name, "seed": seed, "args": common})
                jobs[-1]["key"] = key[:16]
    done_path = work / "study3.jsonl"
    done = [json.loads(x) for x in done_path.read_text().splitlines()] if done_path.exists() else []
    keys = {r["key"] for r in done}
    todo = [j for j in jobs if j["key"] not in keys] if not args.report_only else []
    log.info("%d tasks, %d already done", len(jobs), len(jobs) - len(todo))
    for job in todo:
        r = run_task(job)
        done.append(r)
        with done_path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        log.info(
            "%s seed %d: val CE %.4f KL %.4f (%.0fs)",
            r["variant"],
            r["seed"],
            r["ce"],
            r["kl_to_teacher"],
            r["train_s"],
        )
    rows = [r for r in done if r["key"] in {j["key"] for j in jobs}]
    summary = summarize(rows, [n for n in vt if any(r["variant"] == n for r in rows)])
    md = table(summary, info, vt)
    print(md)
    out = {
        "command": "python bench/kd_quality_study3.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v!r}" if k == "only" else f" {v}")
            for k, v in vars(args).items()
            if k not in ("out", "report_only") and v not in ("", False)
        ),
        "machine": "2 CPU cores shared by ~8 engineers' jobs; 1 process, 1 torch thread; times are not speeds",
        "config": {"student": {"hidden_size": args.hidden, "num_layers": args.layers}, **common, **settings},
        "teacher": teacher_info(args.teacher) | {"val_ce_on_study_val": info["teacher_metrics"]["ce"]},
        "bytes_per_token": info["bytes_per_token"] | info["both"],
        "wall_s": time.perf_counter() - began,
        "summary": summary,
        "runs": rows,
        "table": md,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
