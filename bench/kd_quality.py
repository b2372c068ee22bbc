"""Benchmark: student quality by soft-target kind and loss -- same student, steps and data order per seed.

Phase 1 (``prepare``, once per teacher): the teacher scores the first ``--train-seqs`` train sequences
(cropped to ``--seq-len``; causal, so the crop's logits equal the full row's) and the first ``--val``
val sequences. Its targets go through the cache format exactly as the cache stage stores them:
``targets.sparsify`` -> ``encode_table`` -> a zstd Parquet file per target kind (bytes/token measured
from the files) -> ``stage_rows`` -> decoded as ``CacheReader`` decodes a batch (``decode_topk_logprobs``,
``decode_log_tail``, ``topk_log_z`` at the training temperature, ``teacher_nll`` / ``teacher_entropy``
as stored). The top-k file is a v2 layout with ``temperatures`` (the full-vocabulary log-normalizer at
tau = 2 and 4) and both teacher signals, so tau != 1 re-tempers the top-k + tail exactly. The dense
teacher logits go to a float32 memmap for online KD and evaluation.

Phase 2: one task per (variant, seed) in ``--procs`` worker processes (1 torch thread each). A seed
fixes the student's initial weights and the data order. Each task trains ``--steps`` steps with
``losses.kd_loss`` (``alpha``, optimizer and LR schedule from ``TrainConfig``) and reports, on the held-out
sequences: CE (nats/token), KL(teacher || student), top-1 agreement with the teacher, top-1 accuracy, ECE
(15 bins) and over-confidence. Results are appended to ``<workdir>/results.jsonl`` as tasks finish (a rerun
with the same settings skips finished tasks). Phase 3 aggregates mean, std, min and max over seeds and
writes ``bench/results/kd_quality.json`` and a markdown table.

    python bench/kd_quality.py --teacher /tmp/kd/teacher170 --tokens data/tokens --workdir /tmp/kd/quality \
        --seeds 0,1,2 --extra-seeds 0 --filter-seeds 0,1,2 --procs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from kdcache.cache.codec import decode_log_tail, decode_topk_logprobs, padded
from kdcache.cache.format import PARQUET_OPTIONS, TargetLayout
from kdcache.cache.rows import encode_table, stage_rows
from kdcache.cache.targets import next_token_ids, sparsify, to_sequence_targets
from kdcache.config.teacher import TeacherConfig
from kdcache.config.token_filter import TokenFilterConfig
from kdcache.config.train import TrainConfig
from kdcache.evaluate import Tally
from kdcache.losses import KDLossSpec, dense_kl, kd_loss
from kdcache.optim import lr_scheduler, make_optimizer
from kdcache.student import build_student
from kdcache.teacher import load_teacher, teacher_logits
from kdcache.token_data import open_tokens
from kdcache.token_filter import apply_token_filter

RESULTS = Path(__file__).parent / "results" / "kd_quality.json"
SEED_ARGS = {"core": "seeds", "extra": "extra_seeds", "token filter": "filter_seeds"}  # group -> its seeds option
TEMPERATURES = (2.0, 4.0)  # stored log-normalizers besides tau0 = 1
log = logging.getLogger("kd_quality")


def variant_table(top_k: int, samples: list[int]) -> dict[str, dict[str, Any]]:
    """name -> task settings: loss kind, target file, temperatures, token filter, beta, group (core: all seeds)."""
    tk = f"top{top_k}"
    v: dict[str, dict[str, Any]] = {"CE only": dict(kind="ce", group="core")}
    v[f"top-{top_k} renorm"] = dict(kind="topk_renorm", targets=tk, group="core")
    v[f"top-{top_k} + tail"] = dict(kind="topk_tail", targets=tk, group="core")
    for s in samples:
        v[f"sampled S={s}"] = dict(kind="sampled", targets=f"s{s}", group="core")
    v["online full KD"] = dict(kind="online", group="core")
    for tau in TEMPERATURES:
        v[f"top-{top_k} + tail, tau={tau:g}"] = dict(kind="topk_tail", targets=tk, taus=[tau], group="temperature")
    v[f"top-{top_k} + tail, tau mix {{1,2,4}}"] = dict(
        kind="topk_tail", targets=tk, taus=[1.0, *TEMPERATURES], group="temperature"
    )
    filters = [("nll", "low", 0.5), ("nll", "low", 0.8), ("entropy", "high", 0.5)]
    for by, keep, frac in filters:
        v[f"top-{top_k} + tail, KD on {keep} {by} {frac:g}"] = dict(
            kind="topk_tail", targets=tk, filter=dict(by=by, keep=keep, fraction=frac), group="token filter"
        )
    for by, keep, frac in [*filters, ("entropy", "low", 0.8)]:  # the signals a v2 sampled cache stores too
        v[f"sampled S={max(samples)}, KD on {keep} {by} {frac:g}"] = dict(
            kind="sampled",
            targets=f"s{max(samples)}",
            filter=dict(by=by, keep=keep, fraction=frac),
            group="token filter",
        )
    for kind, beta in (("reverse_kl", 0.5), ("jsd", 0.5), ("skew_kl", 0.1), ("tv", 0.5), ("hard", 0.5)):
        name = f"top-{top_k} {kind}" + (f" beta={beta:g}" if kind in ("jsd", "skew_kl") else "")
        v[name] = dict(kind=kind, targets=tk, beta=beta, group="loss menu")
    return v


# ----------------------------------------------------------------------------- phase 1: teacher -> files


def layouts(vocab: int, seq_len: int, top_k: int, samples: list[int]) -> dict[str, TargetLayout]:
    out = {
        f"top{top_k}": TargetLayout(
            kind="topk",
            vocab_size=vocab,
            seq_len=seq_len,
            top_k=top_k,
            temperatures=TEMPERATURES,
            signals=("nll", "entropy"),
        )
    }
    for s in samples:
        out[f"s{s}"] = TargetLayout(kind="sampled", vocab_size=vocab, seq_len=seq_len, samples=s, seed=0)
    return out


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Teacher forward over the train pool and val set -> memmaps + one Parquet file per target kind."""
    done = work / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    teacher = load_teacher(TeacherConfig(path=args.teacher, device="cpu", dtype="float32"))
    train, val = open_tokens(args.tokens, "train"), open_tokens(args.tokens, "val")
    V, T, P = train.vocab_size, args.seq_len, min(args.train_seqs, len(train))
    lays = layouts(V, T, args.top_k, [int(s) for s in args.samples.split(",")])
    logits_mm = np.lib.format.open_memmap(work / "train_logits.npy", "w+", np.float32, (P, T, V))
    np.save(work / "train_ids.npy", np.asarray(train.ids[:P], np.int64)[:, :T])
    rows: dict[str, list] = {name: [] for name in lays}
    t0 = time.perf_counter()
    for b0 in range(0, P, 8):
        seqs = np.arange(b0, min(P, b0 + 8))
        ids_np = np.asarray(train.ids[seqs], np.int64)[:, :T]  # (B, T)
        ids = torch.from_numpy(ids_np)
        logits = teacher_logits(teacher, ids)[..., :V].float()  # (B, T, V)
        logits_mm[seqs] = logits.numpy()
        for name, lay in lays.items():
            sparse = sparsify(logits, layout=lay, seq_indices=torch.from_numpy(seqs), next_ids=next_token_ids(ids))
            rows[name] += to_sequence_targets({k: v.cpu() for k, v in sparse.items()}, ids_np, seqs)
        log.info("teacher scored %d/%d train sequences (%.0fs)", seqs[-1] + 1, P, time.perf_counter() - t0)
    logits_mm.flush()
    sizes = {}
    for name, lay in lays.items():
        path = work / f"{name}.parquet"
        pq.write_table(encode_table(lay, rows[name]), path, **PARQUET_OPTIONS)
        sizes[name] = bytes_per_token(path, P * T) | {"layout": dataclasses.asdict(lay)}
    nv = min(args.val, len(val))
    val_ids = np.asarray(val.ids[:nv], np.int64)[:, :T]
    np.save(work / "val_ids.npy", val_ids)
    val_lp = np.lib.format.open_memmap(work / "val_logprobs.npy", "w+", np.float32, (nv, T - 1, V))
    for b0 in range(0, nv, 8):
        ids = torch.from_numpy(val_ids[b0 : b0 + 8])
        val_lp[b0 : b0 + 8] = torch.log_softmax(teacher_logits(teacher, ids)[:, :-1, :V].float(), -1).numpy()
    val_lp.flush()
    teacher_metrics = evaluate(None, work)
    info = {"vocab": V, "seq_len": T, "train_seqs": P, "val_seqs": nv, "bytes_per_token": sizes}
    info |= {"teacher_metrics": teacher_metrics, "prepare_s": time.perf_counter() - t0}
    done.write_text(json.dumps(info, indent=2) + "\n")
    return info


def bytes_per_token(path: Path, tokens: int) -> dict[str, Any]:
    """Compressed Parquet bytes per token: the file, and per column (targets only = file less input_ids/seq_index)."""
    meta = pq.ParquetFile(path).metadata
    cols: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            cols[col.path_in_schema] = cols.get(col.path_in_schema, 0) + col.total_compressed_size
    per_col = {k: v / tokens for k, v in cols.items()}
    targets = sum(v for k, v in per_col.items() if k not in ("input_ids", "seq_index"))
    return {"file": path.stat().st_size / tokens, "targets": targets, "columns": per_col}


# ----------------------------------------------------------------------------- phase 2: one student per task


class Targets:
    """One target file decoded to per-sequence arrays, batched as ``CacheReader`` batches them."""

    def __init__(self, work: Path, name: str, info: dict[str, Any]) -> None:
        lay = info["bytes_per_token"][name]["layout"]
        lay = TargetLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in lay.items()})
        self.layout, P, T = lay, info["train_seqs"], lay.seq_len
        staged = stage_rows(lay, pq.read_table(work / f"{name}.parquet"))
        a = staged.arrays
        assert (staged.seq_index == np.arange(P)).all()
        if lay.has_topk:
            k = lay.top_k
            self.topk_ids = a["topk_ids"].reshape(P, T, k).astype(np.int64)
            self.codes, self.tail = a["topk_codes"].reshape(P, T, k), a["topk_tail"].reshape(P, T)
            self.log_z = a["topk_log_z"].reshape(P, len(lay.temperatures), T) if lay.temperatures else None
            self.signals = {f"teacher_{s}": a[f"teacher_{s}"].reshape(P, T).astype(np.float32) for s in lay.signals}
        else:
            lengths = a["sample_lengths"]
            self.sample_ids = padded(a["sample_ids"], lengths, lay.samples, 0).reshape(P, T, -1).astype(np.int64)
            self.counts = padded(a["sample_counts"], lengths, lay.samples, 0).reshape(P, T, -1).astype(np.float32)

    def batch(self, seqs: np.ndarray, tau: float) -> dict[str, torch.Tensor]:
        lay = self.layout
        if not lay.has_topk:
            total = np.full(self.counts.shape[:2], lay.samples, np.float32)[seqs]
            return {
                "sample_ids": torch.from_numpy(self.sample_ids[seqs]),
                "sample_counts": torch.from_numpy(self.counts[seqs]),
                "sample_total": torch.from_numpy(total),
            }
        tail = self.tail[seqs]
        out = {
            "topk_ids": torch.from_numpy(self.topk_ids[seqs]),
            "topk_logprobs": torch.from_numpy(decode_topk_logprobs(self.codes[seqs], tail, None)),
            "topk_log_tail": torch.from_numpy(decode_log_tail(tail).astype(np.float32)),
            "topk_mask": torch.ones(self.topk_ids[seqs].shape, dtype=torch.bool),
        }
        if tau != lay.temperature:
            out["topk_log_z"] = torch.from_numpy(self.log_z[seqs, lay.temperatures.index(tau)])
        return out | {k: torch.from_numpy(v[seqs]) for k, v in self.signals.items()}


def data_order(seed: int, pool: int, need: int) -> np.ndarray:
    """Sequence indices for ``need`` draws: epochs of a seeded permutation of the pool."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(pool) for _ in range(need // pool + 1)])[:need]


def run_task(job: dict[str, Any]) -> dict[str, Any]:
    """Train one student (variant, seed) and evaluate it; runs in a worker process."""
    torch.set_num_threads(1)
    work, info, v, seed, args = Path(job["work"]), job["info"], job["variant"], job["seed"], job["args"]
    cfg = TrainConfig(max_steps=args["steps"], batch_size=args["batch"], seed=seed, alpha=args["alpha"])
    student_cfg = dataclasses.replace(
        cfg.student, hidden_size=args["hidden"], num_layers=args["layers"], intermediate_size=3 * args["hidden"]
    )
    V, T, P = info["vocab"], info["seq_len"], info["train_seqs"]
    tok = load_teacher(TeacherConfig(path=args["teacher"], device="cpu", dtype="float32")).tokenizer
    torch.manual_seed(seed)  # the seed fixes the initial weights ...
    model = build_student(student_cfg, vocab_size=V, seq_len=T, tokenizer=tok).train()
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_scheduler(
        optimizer, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    order = data_order(seed, P, cfg.max_steps * cfg.batch_size)  # ... and the data order
    targets = Targets(work, v["targets"], info) if "targets" in v else None
    teacher_mm = np.load(work / "train_logits.npy", mmap_mode="r") if v["kind"] == "online" else None
    filt = TokenFilterConfig(**v["filter"]) if "filter" in v else None
    signals = {}
    if filt is not None and not targets.layout.has_topk:  # per-position teacher signals: the same columns (same
        top = next(name for name in info["bytes_per_token"] if name.startswith("top"))  # teacher and positions)
        signals = Targets(work, top, info).signals  # as the top-k file stores them
    taus = v.get("taus", [1.0])
    t0, kd_sum = time.perf_counter(), 0.0
    for step in range(cfg.max_steps):
        seqs = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        ids = torch.from_numpy(np.load(work / "train_ids.npy", mmap_mode="r")[seqs])  # (B, T)
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits  # (B, T, V)
        if v["kind"] == "online":
            loss, kd = online_loss(logits, torch.from_numpy(teacher_mm[seqs]), ids, cfg.alpha)
        else:  # as the trainer does; several temperatures: alpha * mean_tau KD_tau + (1 - alpha) * CE
            alpha, loss, kd = (cfg.alpha if len(taus) == 1 else 1.0), 0.0, 0.0
            for tau in taus:
                batch = {"input_ids": ids} | (targets.batch(seqs, tau) if targets else {})
                batch |= {k: torch.from_numpy(a[seqs]) for k, a in signals.items()}
                if filt is not None:
                    batch = apply_token_filter(batch, filt)  # narrows loss_mask: KD only where kept
                batch = {k: t for k, t in batch.items() if not k.startswith("teacher_")}
                spec = KDLossSpec(kind=v["kind"], alpha=alpha, temperature=tau, beta=v.get("beta", 0.5))
                out = kd_loss(logits, spec=spec, **batch)
                loss, kd = loss + out.loss / len(taus), kd + float(out.kd) / len(taus)
            if len(taus) > 1:
                loss = cfg.alpha * loss + (1 - cfg.alpha) * ce_term(logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        sched.step()
        kd_sum += kd
    train_s = time.perf_counter() - t0
    metrics = evaluate(model.eval(), work)
    out = {"variant": job["name"], "seed": seed, "group": v["group"], "key": job["key"], **metrics}
    return out | {"train_kd": kd_sum / cfg.max_steps, "train_s": train_s}


def ce_term(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Hard-label CE over positions 0..T-2 (what ``kd_loss`` counts as CE without masks)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))


def online_loss(logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor, alpha: float) -> tuple[Any, float]:
    """alpha * mean_t KL(p_t || q_t) over all positions + (1 - alpha) * CE: the dense teacher in the loop."""
    B, T, V = logits.shape
    flat, tflat = logits.reshape(-1, V), torch.log_softmax(t_logits.reshape(-1, V), -1)  # (N, V)
    kl = torch.cat([dense_kl(tflat[i : i + 1024], flat[i : i + 1024]) for i in range(0, B * T, 1024)]).mean()
    return alpha * kl + (1 - alpha) * ce_term(logits, ids), float(kl.detach())


@torch.inference_mode()
def evaluate(model: Any, work: Path, *, batch_size: int = 16, bins: int = 15) -> dict[str, float]:
    """CE, KL(teacher || model), top-1 agreement/accuracy, ECE, over-confidence on val positions 0..T-2;
    ``model(ids)`` returning None scores the teacher itself."""
    val_ids, t_lp_all = np.load(work / "val_ids.npy"), np.load(work / "val_logprobs.npy", mmap_mode="r")
    t = Tally(bins=bins)
    for b0 in range(0, len(val_ids), batch_size):
        ids = torch.from_numpy(val_ids[b0 : b0 + batch_size])  # (B, T)
        labels = ids[:, 1:].reshape(-1)  # (N,)
        t_lp = torch.from_numpy(np.array(t_lp_all[b0 : b0 + batch_size])).reshape(labels.numel(), -1)  # (N, V)
        out = model(input_ids=ids) if isinstance(model, torch.nn.Module) else None
        logits = t_lp if out is None else out.logits[:, :-1].reshape(labels.numel(), -1).float()
        logq = torch.log_softmax(logits, dim=-1)  # (N, V)
        conf, pred = logq.max(dim=-1)
        t.n += labels.numel()
        t.ce += float(F.nll_loss(logq, labels, reduction="sum"))
        t.kl += float(dense_kl(t_lp, logits).sum()) if out is not None else 0.0
        t.agree += int((pred == t_lp.argmax(-1)).sum())
        t.correct += int((pred == labels).sum())
        t.add_calibration(conf.exp(), pred == labels)
    return {
        "ce": t.ce / t.n,
        "kl_to_teacher": t.kl / t.n,
        "top1_agreement": t.agree / t.n,
        "top1_accuracy": t.correct / t.n,
        "ece": t.ece(),
        "overconfidence": float((t.bin_conf.sum() - t.bin_correct.sum()) / t.n),
    }


# ----------------------------------------------------------------------------- phase 3: aggregate


def summarize(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per variant: mean, std (ddof 1), min, max of each metric over its seeds."""
    out = []
    for name in names:
        got = [r for r in rows if r["variant"] == name]
        if not got:
            continue
        s: dict[str, Any] = {"variant": name, "group": got[0]["group"], "seeds": sorted(r["seed"] for r in got)}
        for m in ("ce", "kl_to_teacher", "top1_agreement", "top1_accuracy", "ece", "overconfidence", "train_s"):
            x = np.array([r[m] for r in got], np.float64)
            s[m] = {"mean": x.mean(), "std": x.std(ddof=1) if len(x) > 1 else 0.0, "min": x.min(), "max": x.max()}
        online = {r["seed"]: r for r in rows if r["variant"] == "online full KD"}
        for m in ("ce", "kl_to_teacher"):  # paired by seed (same init and data order): the seed noise cancels
            d = [100 * (r[m] / online[r["seed"]][m] - 1) for r in got if r["seed"] in online]
            s[f"{m}_vs_online_pct"] = {"mean": float(np.mean(d)), "min": min(d), "max": max(d)} if d else None
        out.append(s)
    return out


def cell(stat: dict[str, float], n: int, fmt: str = ".3f") -> str:
    if n == 1:
        return format(stat["mean"], fmt)
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}} ({stat['min']:{fmt}}–{stat['max']:{fmt}})"


def table(summary: list[dict[str, Any]], info: dict[str, Any], online: str = "online full KD") -> str:
    bpt = info["bytes_per_token"]
    lines = [
        "| variant | seeds | val CE | KL(teacher‖student) | Δ val CE vs online (paired) | "
        "top-1 agr. | ECE | target B/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    t = info["teacher_metrics"]
    lines.append(f"| teacher | – | {t['ce']:.3f} | 0 | | 1 | {t['ece']:.3f} | |")
    for s in summary:
        n = len(s["seeds"])
        d = s["ce_vs_online_pct"]
        rel = "" if d is None else f"{d['mean']:+.2f}%" + (f" ({d['min']:+.2f} to {d['max']:+.2f})" if n > 1 else "")
        bytes_ = ""
        for name, b in bpt.items():
            if name.startswith("top") and "top-" in s["variant"]:
                cols = b["columns"]
                base = sum(cols.get(c, 0.0) for c in ("topk_ids", "topk_codes", "topk_tail", "topk_lengths"))
                extra = ("tau" in s["variant"]) * cols.get("topk_log_z", 0.0) + ("KD on" in s["variant"]) * sum(
                    cols.get(c, 0.0) for c in ("teacher_nll", "teacher_entropy")
                )
                bytes_ = f"{base + extra:.1f}"
            elif name.startswith("s") and s["variant"].split(",")[0] == f"sampled S={name[1:]}":
                signals = sum(bpt[t]["columns"].get(c, 0.0) for t in bpt for c in ("teacher_nll", "teacher_entropy"))
                bytes_ = f"{b['targets'] + ('KD on' in s['variant']) * signals:.1f}"
        if s["variant"] == online:
            bytes_ = f"{4 * info['vocab']} (dense fp32, not cached)"
        lines.append(
            f"| {s['variant']} | {n} | {cell(s['ce'], n)} | {cell(s['kl_to_teacher'], n)} | {rel} | "
            f"{cell(s['top1_agreement'], n)} | {cell(s['ece'], n)} | {bytes_} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="teacher model directory (its training.json is recorded)")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--workdir", default="/tmp/kd_quality", help="teacher logits, target files, results.jsonl")
    ap.add_argument("--seq-len", type=int, default=128, help="crop of each sequence (first positions)")
    ap.add_argument("--train-seqs", type=int, default=512, help="train pool: the first N train sequences")
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=64, help="student width (intermediate = 3x); 2 layers, 4 heads")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--samples", default="8,16")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the core variants (student init + data order)")
    ap.add_argument("--extra-seeds", default="0", help="seeds of the other variants (temperature, filter, menu)")
    ap.add_argument("--filter-seeds", default="0", help="seeds of the token-filter variants")
    ap.add_argument("--only", default="", help="comma-separated groups to run (default: all)")
    ap.add_argument("--procs", type=int, default=2, help="worker processes, 1 torch thread each")
    ap.add_argument("--report-only", action="store_true", help="aggregate the finished tasks, train nothing")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    began = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("teacher", "tokens", "seq_len", "train_seqs", "val", "top_k", "samples")}
    work = Path(args.workdir) / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(args, work)
    vt = variant_table(args.top_k, [int(s) for s in args.samples.split(",")])
    seeds = {g: [int(s) for s in getattr(args, a).split(",")] for g, a in SEED_ARGS.items()}
    groups = set(args.only.split(",")) if args.only else None
    train_keys = ("steps", "batch", "alpha", "hidden", "layers")
    common = {k: getattr(args, k) for k in train_keys} | {"teacher": args.teacher}
    jobs = []
    # order: the core at its first seed, the cache-only ideas, the core's other seeds, then the loss menu
    for seed in sorted(set().union(*seeds.values())):
        for name, v in vt.items():
            if seed in seeds.get(v["group"], seeds["extra"]) and (groups is None or v["group"] in groups):
                key = hashlib.sha256(json.dumps([name, seed, common, settings], sort_keys=True).encode()).hexdigest()
                core = seeds["core"]
                rank = (0 if seed == core[0] else 1 + core.index(seed)) * 2 if v["group"] == "core" else 1
                rank = 99 if v["group"] == "loss menu" else rank
                jobs.append(
                    {"work": str(work), "info": info, "variant": v, "name": name, "seed": seed, "args": common}
                    | {"key": key[:16], "rank": rank}
                )
    jobs.sort(key=lambda j: j["rank"])  # stable: variants in table order within a rank
    done_path = work / "results.jsonl"
    done = [json.loads(x) for x in done_path.read_text().splitlines()] if done_path.exists() else []
    keys = {r["key"] for r in done}
    todo = [j for j in jobs if j["key"] not in keys] if not args.report_only else []
    log.info("%d tasks, %d already done; %d worker(s)", len(jobs), len(jobs) - len(todo), args.procs)
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for r in pool.imap_unordered(run_task, todo):
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
    wanted = {j["key"] for j in jobs}
    rows = [r for r in done if r["key"] in wanted]
    summary = summarize(rows, list(vt))
    md = table(summary, info)
    print(md)
    out = {
        "command": "python bench/kd_quality.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if k not in ("out", "report_only") and v not in ("", False)
        ),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads_per_process": 1,
            "procs": args.procs,
            "torch": torch.__version__,
            "note": "machine shared by other jobs (load average ~10 on 2 cores): times are not speeds",
        },
        "config": {
            "student": {"hidden_size": args.hidden, "num_layers": args.layers, "intermediate_size": 3 * args.hidden},
            **common,
            **settings,
            "lr": TrainConfig().lr,
            "warmup_steps": TrainConfig().warmup_steps,
        },
        "teacher": teacher_info(args.teacher) | {"val_ce_on_study_val": info["teacher_metrics"]["ce"]},
        "bytes_per_token": info["bytes_per_token"],
        "teacher_metrics": info["teacher_metrics"],
        "wall_s": time.perf_counter() - began,
        "summary": summary,
        "runs": rows,
        "table": md,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")


def teacher_info(path: str) -> dict[str, Any]:
    """How the teacher was made (the demo teacher's ``training.json``: steps, val loss), if recorded."""
    try:
        info = json.loads((Path(path) / "training.json").read_text())
    except (OSError, ValueError):
        return {"path": path}
    keys = ("steps", "stopped_by", "val_loss", "val_sequences", "tokens_seen", "elapsed_s", "config")
    return {"path": path} | {k: info.get(k) for k in keys}


if __name__ == "__main__":
    main()
