"""Benchmark: one student from two specialist teachers vs a student from either one alone.

Two demo teachers (``kdcache.demo_teacher``'s model and loop, one shared BPE tokenizer) train on
different halves of the Python standard library -- top-level names a-m vs n-z -- each on its half's
train documents only.  The union corpus (a balanced sample of both halves' documents) is prepared once
(``prepare_tokens``, document packing); each teacher caches its top-k targets over the union's train
split (``cache_corpus``).  Then students of one architecture, steps and data order train with
``kdcache.train.train``: CE only, KD from teacher A's cache, from teacher B's, and from both through
``train.caches`` with each ``train.combine``.  Reported: val CE (nats/token) on the union's val split and
on each half's val documents, and -- the mixture's one approximation -- the error of the combined
targets against the TRUE dense mixture of the two teachers' full distributions on cached train rows
(coarse total variation and KL on union + rest, and the teachers' true mass hidden in their tails).

    python bench/multi_teacher.py                 # ~15 CPU-minutes on 2 cores; --work DIR keeps the models

Writes ``bench/results/multi_teacher.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache.build import cache_corpus
from kdcache.config.cache import CacheConfig
from kdcache.config.corpus import CorpusConfig
from kdcache.config.demo_teacher import DemoTeacherConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import CacheSourceConfig, StudentConfig, TrainConfig
from kdcache.corpus import prepare_tokens, read_documents, split_documents, tokenize_and_pack
from kdcache.corpus_files import default_corpus_files
from kdcache.demo_teacher import build_model, train_loop
from kdcache.multi_cache import open_caches
from kdcache.packing import packing_of, target_mask
from kdcache.token_data import open_tokens
from kdcache.tokenizer import train_bpe_tokenizer

RESULTS = Path(__file__).parent / "results" / "multi_teacher.json"
log = logging.getLogger("multi_teacher")
HALVES = {"a": ("a", "m"), "b": ("n", "z")}
VAL_FRACTION = 0.1


def write_halves(work: Path, *, union_chars: int, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every stdlib file to its half by its top-level name (a-m / n-z); ``{half}-all.jsonl`` (the teacher's
    corpus) and ``{half}-union.jsonl`` (its share of the union: files in content-hash order up to
    ``union_chars`` characters)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, list[str]] = {h: [] for h in HALVES}
    for path in default_corpus_files():
        top = path.relative_to(root).parts[0]
        if top.removesuffix(".py") in exclude:
            continue
        first = top.lstrip("_").lower()[:1]
        for half, (lo, hi) in HALVES.items():
            if lo <= first <= hi:
                docs[half].append(path.read_text(encoding="utf-8"))
    out = {}
    for half, texts in docs.items():
        (work / f"{half}-all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        order = sorted(texts, key=lambda t: hash_key("union sample " + t))  # not the split's hash order
        chosen, size = [], 0
        for t in order:
            if size >= union_chars:
                break
            chosen.append(t)
            size += len(t)
        (work / f"{half}-union.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen))
        out[half] = {
            "files": len(texts),
            "chars": sum(map(len, texts)),
            "union_files": len(chosen),
            "union_chars": size,
        }
    return out


def hash_key(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def build_teachers(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One tokenizer on both halves' train documents; one teacher per half on its own train documents."""
    splits = {
        h: split_documents(
            read_documents(CorpusConfig(paths=(str(work / f"{h}-all.jsonl"),))), val_fraction=VAL_FRACTION
        )
        for h in HALVES
    }
    tokenizer = train_bpe_tokenizer([t for h in HALVES for t in splits[h]["train"]["text"]], vocab_size=args.vocab_size)
    cfg = DemoTeacherConfig(
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        hidden_size=args.teacher_hidden,
        num_layers=args.teacher_layers,
        num_heads=4,
        intermediate_size=3 * args.teacher_hidden,
        batch_size=16,
        max_steps=args.teacher_steps,
        warmup_steps=10,
        max_minutes=30.0,
    )
    info = {}
    for half in HALVES:
        ids = tokenize_and_pack(splits[half]["train"], tokenizer, seq_len=args.seq_len, packing="stream")
        val = tokenize_and_pack(splits[half]["val"], tokenizer, seq_len=args.seq_len, packing="stream")
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer)
        stats = train_loop(model, ids, cfg)
        model.save_pretrained(work / f"teacher-{half}")
        tokenizer.save_pretrained(work / f"teacher-{half}")
        np.save(work / f"val-{half}.npy", val[: args.val_rows])
        info[half] = {k: stats[k] for k in ("steps", "final_train_loss", "tokens_seen", "elapsed_s")}
        info[half]["train_sequences"] = len(ids)
    return info


def build_union(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    corpus = CorpusConfig(paths=tuple(str(work / f"{h}-union.jsonl") for h in HALVES), val_fraction=VAL_FRACTION)
    prepare_tokens(
        corpus, PrepareConfig(seq_len=args.seq_len), tokenizer_dir=work / "teacher-a", out_dir=work / "tokens"
    )
    caches = {}
    for half in HALVES:
        start = time.perf_counter()
        cache_corpus(
            TeacherConfig(path=str(work / f"teacher-{half}"), device="cpu"),
            CacheConfig(targets="topk", top_k=args.top_k, batch_size=16),
            tokens_dir=work / "tokens",
            out_dir=work / f"cache-{half}",
        )
        caches[half] = {"seconds": round(time.perf_counter() - start, 1)}
    return caches


VARIANTS: dict[str, dict[str, Any]] = {
    "CE only": {"loss": "ce", "caches": ("a",)},
    "KD from teacher A (a-m)": {"caches": ("a",)},
    "KD from teacher B (n-z)": {"caches": ("b",)},
    "KD from A+B, mixture 0.5/0.5": {"caches": ("a", "b"), "combine": "mixture"},
    "KD from A+B, mixture 0.7/0.3": {"caches": ("a", "b"), "combine": "mixture", "weights": (0.7, 0.3)},
    "KD from A+B, min_nll": {"caches": ("a", "b"), "combine": "min_nll"},
    "KD from A+B, nll_softmax": {"caches": ("a", "b"), "combine": "nll_softmax"},
}


def train_students(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kdcache.train import train

    student = StudentConfig(
        hidden_size=args.student_hidden, num_layers=2, num_heads=4, intermediate_size=3 * args.student_hidden
    )
    out = {}
    for name, v in VARIANTS.items():
        if args.variants and not any(key in name for key in args.variants):
            continue
        weights = v.get("weights", (1.0,) * len(v["caches"]))
        caches = tuple(
            CacheSourceConfig(path=str(work / f"cache-{h}"), weight=w)
            for h, w in zip(v["caches"], weights, strict=True)
        )
        cfg = TrainConfig(
            loss=v.get("loss", "topk_tail"),
            max_steps=args.student_steps,
            batch_size=16,
            warmup_steps=10,
            checkpoint_every=args.student_steps,
            student=student,
            caches=caches if len(caches) > 1 else (),
            combine=v.get("combine", "mixture"),
        )
        start = time.perf_counter()
        model_dir = work / ("student-" + "".join(c if c.isalnum() else "-" for c in name.lower()))
        summary = train(cfg, cache_dir=caches[0].path, out_dir=model_dir, overwrite=True)
        out[name] = {
            "dir": str(model_dir),
            "train_s": round(time.perf_counter() - start, 1),
            "final_ce": summary["final_ce"],
        }
    return out


@torch.no_grad()
def val_ce(model_dir: Path, ids: np.ndarray, packing: dict[str, Any]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = count = 0.0
    for start in range(0, len(ids), 16):
        batch = torch.from_numpy(np.asarray(ids[start : start + 16], dtype=np.int64))  # (B, T)
        logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T-1)
        mask = target_mask(batch, packing)  # (B, T-1)
        total += float(nll[mask].sum())
        count += float(mask.sum())
    return total / max(count, 1.0)


@torch.no_grad()
def mixture_error(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Combined targets of the two caches vs the true mixture of the teachers' full distributions."""
    from transformers import AutoModelForCausalLM

    teachers = [AutoModelForCausalLM.from_pretrained(work / f"teacher-{h}").eval() for h in HALVES]
    tv, kl, hidden, tokens = [], [], [], 0
    with open_caches([work / "cache-a", work / "cache-b"], [0.5, 0.5]) as multi:
        for i, batch in enumerate(multi.batches(16, seed=0, shuffle=False)):
            if i >= args.error_batches:
                break
            ids = batch["input_ids"]
            dense = [t(input_ids=ids).logits.double().log_softmax(-1).exp() for t in teachers]  # (B, T, V) each
            truth = 0.5 * dense[0] + 0.5 * dense[1]
            keep = batch["topk_mask"]
            at = truth.gather(-1, batch["topk_ids"]).masked_fill(~keep, 0.0)
            got = batch["topk_logprobs"].double().exp().masked_fill(~keep, 0.0)
            rest_t, rest_g = truth.sum(-1) - at.sum(-1), batch["topk_log_tail"].double().exp()
            tv.append(0.5 * ((got - at).abs().sum(-1) + (rest_g - rest_t).abs()))
            p = torch.cat([at, rest_t.unsqueeze(-1)], -1)
            q = torch.cat([got, rest_g.unsqueeze(-1)], -1)
            kl.append(torch.where(p > 0, p * (p.log() - q.clamp_min(1e-300).log()), 0.0).sum(-1))
            in_u = torch.zeros_like(truth, dtype=torch.bool).scatter(-1, batch["topk_ids"], keep)
            h = torch.zeros_like(rest_t)
            for d in dense:  # each teacher's true mass on union ids outside its own top-k
                kth = d.topk(args.top_k, dim=-1).values[..., -1:]  # (B, T, 1)
                h += 0.5 * d.masked_fill(~in_u | (d >= kth), 0.0).sum(-1)
            hidden.append(h)
            tokens += ids.numel()
    tv_t, kl_t, h_t = torch.cat(tv), torch.cat(kl), torch.cat(hidden)
    return {
        "positions": tokens,
        "coarse_tv_mean": float(tv_t.mean()),
        "coarse_tv_p99": float(tv_t.flatten().quantile(0.99)),
        "coarse_kl_mean": float(kl_t.mean()),
        "hidden_tail_mass_on_union_mean": float(h_t.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/kdcache-bench-multi-teacher", help="models, tokens and caches go here")
    ap.add_argument("--stage", choices=["teachers", "students", "all"], default="all")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--teacher-layers", type=int, default=2)
    ap.add_argument("--teacher-steps", type=int, default=200)
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--student-steps", type=int, default=120)
    ap.add_argument("--union-chars", type=int, default=200_000, help="characters of each half in the union corpus")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--exclude", nargs="*", default=[], help="top-level stdlib names left out (e.g. pydoc_data)")
    ap.add_argument("--results", default=str(RESULTS), help="results JSON")
    ap.add_argument("--val-rows", type=int, default=96, help="val rows per half for the per-half CE")
    ap.add_argument("--error-batches", type=int, default=4)
    ap.add_argument(
        "--variants", nargs="*", default=[], help="train only the students whose name contains one of these"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    t0 = time.perf_counter()
    if args.stage in ("teachers", "all"):
        steps = (
            ("corpus", lambda: write_halves(work, union_chars=args.union_chars, exclude=tuple(args.exclude))),
            ("teachers", lambda: build_teachers(work, args)),
            ("caches", lambda: build_union(work, args)),
            ("mixture_error", lambda: mixture_error(work, args)),
        )
        for key, step in steps:  # each kept in state.json: a rerun continues
            if key not in state:
                state[key] = step()
                state_file.write_text(json.dumps(state, indent=2))
    if args.stage in ("students", "all"):
        state["students"] = state.get("students", {}) | train_students(work, args)
        tokens = open_tokens(work / "tokens", "val")
        packing = packing_of(tokens.manifest)
        vals = {h: np.load(work / f"val-{h}.npy") for h in HALVES}
        models = {f"teacher {h.upper()}": work / f"teacher-{h}" for h in HALVES}
        models |= {name: Path(s["dir"]) for name, s in state["students"].items()}
        state["val_ce"] = {}
        for name, path in models.items():
            halves = {f"half {h}": val_ce(path, vals[h], {"mode": "stream"}) for h in HALVES}
            state["val_ce"][name] = {
                "union": sum(halves.values()) / len(halves),  # equal rows of each half's held-out documents
                **halves,
                "prepared val split": val_ce(path, tokens.ids, packing),
            }
        state_file.write_text(json.dumps(state, indent=2))
    state["seconds"] = round(time.perf_counter() - t0, 1)
    state["machine"] = f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, torch {torch.__version__}"
    state["args"] = vars(args)
    Path(args.results).parent.mkdir(exist_ok=True)
    Path(args.results).write_text(json.dumps(state, indent=2) + "\n")
    if "val_ce" in state:
        print("| model | val CE union | val CE a-m | val CE n-z | prepared val split |\n|---|---|---|---|---|")
        for name, v in state["val_ce"].items():
            cells = " | ".join(f"{v[k]:.4f}" for k in ("union", "half a", "half b", "prepared val split"))
            print(f"| {name} | {cells} |")
    print(json.dumps(state.get("mixture_error"), indent=2))


if __name__ == "__main__":
    main()
