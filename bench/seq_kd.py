"""Benchmark: sequence-level KD on the demo — a student trained on teacher-written text + its cache vs on the
original corpus + its cache, same student steps, evaluated on the ORIGINAL held-out val split.

The library's own path, stage by stage:

1. ``prepare_tokens``: the original corpus (the demo's: standard-library .py files, ``prepare`` defaults of
   params.yaml: 256-token rows, documents packing, 1,024 train / 128 val rows).
2. ``generate_corpus`` once per ``--gen-seeds`` entry: the teacher continues every train-split document's
   first 32 tokens by ``--new-tokens`` tokens (T = 1, no top-k/top-p); ``prepare_tokens`` reads all the parts
   as one corpus (its own train split; the original val documents are never prompts).
3. ``build_cache`` (params.yaml's cache settings: sampled S = 16) of each train split; ``both`` is the
   original train rows followed by the teacher-written ones, cached as one.
4. ``train`` (params.yaml's train settings: 150 steps of 16 x 256 tokens, the default student) per variant
   and ``--seeds`` entry (the seed fixes the student's init and data order), KD (``loss: auto``) or CE only.
5. ``evaluate`` (kdcache.evaluate, the evaluate stage's function) of all students on the original val split:
   val CE and KL(teacher || student), nats/token.

Every step is resumable: a rerun with the same ``--workdir`` reuses the finished outputs (results.jsonl
holds one line per finished student). Prints a Markdown table; writes ``bench/results/seq_kd.json``.

    nice -n 5 python bench/seq_kd.py --workdir /tmp/kd/seqkd --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.cache.build import build_cache
from kdcache.config.cache import CacheConfig
from kdcache.config.corpus import CorpusConfig
from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.generate import GenerateConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import TrainConfig
from kdcache.corpus import prepare_tokens
from kdcache.evaluate import evaluate
from kdcache.generate import generate_corpus
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens, read_token_manifest, write_tokens
from kdcache.train import train

RESULTS = Path(__file__).parent / "results" / "seq_kd.json"
DEMO_PREPARE = PrepareConfig(seq_len=256, max_train_sequences=1024, max_val_sequences=128)  # params.yaml prepare
VARIANTS = {  # name -> (train data, loss)
    "original + cache (KD)": ("original", "auto"),
    "teacher text + cache (KD)": ("generated", "auto"),
    "teacher text (CE only)": ("generated", "ce"),
    "original (CE only)": ("original", "ce"),
    "both + cache (KD)": ("both", "auto"),
}
log = logging.getLogger("bench.seq_kd")


def timed(timings: dict[str, float], name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - t0, 1)
    return out


def both_tokens(original: Path, generated: Path, out: Path) -> Path:
    """The original train rows then the teacher-written ones, as a token directory (the original val split)."""
    if (out / "manifest.json").exists():
        return out
    manifest = read_token_manifest(original)
    a, b = open_tokens(original, "train"), open_tokens(generated, "train")
    meta = {k: manifest[k] for k in ("corpus", "prepare", "tokenizer_dir", "packing") if k in manifest}
    rows = np.concatenate([np.asarray(a.ids), np.asarray(b.ids)])  # (Na + Nb, T)
    write_tokens(
        out,
        {"train": rows, "val": np.asarray(open_tokens(original, "val").ids)},
        vocab_size=a.vocab_size,
        tokenizer_fingerprint=a.tokenizer_fingerprint,
        meta=meta,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="models/demo-teacher")
    ap.add_argument("--workdir", default="/tmp/kdcache-seqkd")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--gen-seeds", default="0,1")
    ap.add_argument("--new-tokens", type=int, default=220)  # 32 + 220 + EOS (+ re-tokenization slack) <= 256
    ap.add_argument("--gen-batch-size", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=TrainConfig().max_steps)
    ap.add_argument("--max-prompts", type=int, default=0)  # 0 = every train-split document (a smoke test: 16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work, began = Path(args.workdir), time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    teacher_cfg = TeacherConfig(path=args.teacher, device="cpu")
    tok = {"original": work / "tokens-original", "generated": work / "tokens-generated", "both": work / "tokens-both"}
    if not (tok["original"] / "manifest.json").exists():
        timed(timings, "prepare original", prepare_tokens, CorpusConfig(), DEMO_PREPARE, tokenizer_dir=args.teacher,
              out_dir=tok["original"])  # fmt: skip
    gen_dirs, gen_stats = [], {}
    for s in (int(x) for x in args.gen_seeds.split(",")):
        cfg = GenerateConfig(
            enabled=True,
            max_new_tokens=args.new_tokens,
            seed=s,
            batch_size=args.gen_batch_size,
            max_prompts=args.max_prompts,
        )
        out = work / f"generated-seed{s}"
        if not (out / "manifest.json").exists():
            timed(timings, f"generate seed {s}", generate_corpus, teacher_cfg, cfg, out_dir=out)
        gen_stats[s] = json.loads((out / "manifest.json").read_text())["stats"]
        gen_dirs.append(out)
    if not (tok["generated"] / "manifest.json").exists():
        corpus = CorpusConfig(paths=tuple(str(d / "part-*.jsonl") for d in gen_dirs))
        timed(timings, "prepare generated", prepare_tokens, corpus, DEMO_PREPARE, tokenizer_dir=args.teacher,
              out_dir=tok["generated"])  # fmt: skip
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    results_path = work / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    for seed in (int(x) for x in args.seeds.split(",")):
        for name, (data, loss) in variants.items():
            if any(r["variant"] == name and r["seed"] == seed for r in done):
                continue
            cache = work / f"cache-{data}"
            if not (cache / "manifest.json").exists():  # built when first needed: a short run trains the first variants
                if data == "both":
                    both_tokens(tok["original"], tok["generated"], tok["both"])
                teacher = load_teacher(teacher_cfg)
                timed(timings, f"cache {data}", build_cache, teacher, open_tokens(tok[data], "train"), CacheConfig(),
                      out_dir=cache)  # fmt: skip
                del teacher
            out = work / f"student-{data}-{loss}-seed{seed}"
            cfg = TrainConfig(loss=loss, seed=seed, max_steps=args.steps, checkpoint_every=10**6)
            t0 = time.perf_counter()
            train(cfg, cache_dir=cache, out_dir=out, device="cpu", overwrite=True)
            train_s = time.perf_counter() - t0
            metrics = evaluate(EvaluateConfig(), tokens=open_tokens(tok["original"], "val"), teacher=teacher_cfg,
                               models={"student": out})["models"]  # fmt: skip
            row = {"variant": name, "seed": seed, "train_s": round(train_s, 1)}
            row |= {k: metrics["student"][k] for k in ("ce", "kl_to_teacher", "top1_agreement")}
            row["teacher_ce"] = metrics["teacher"]["ce"]
            done.append(row)
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
            with open(results_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            log.info("%s", row)
    timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    rows = {}
    for name in variants:
        got = [r for r in done if r["variant"] == name]
        rows[name] = {
            k: {"mean": statistics.fmean(r[k] for r in got), "values": [r[k] for r in got]}
            for k in ("ce", "kl_to_teacher", "top1_agreement")
        } | {"seeds": [r["seed"] for r in got]}
    sizes = {d: len(open_tokens(p, "train")) for d, p in tok.items() if (p / "manifest.json").exists()}
    result = {
        "command": "python bench/seq_kd.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "teacher": {"path": args.teacher, "val_ce": done[0]["teacher_ce"] if done else None},
        "machine": f"{platform.machine()}, {args.threads} thread(s), shared with other jobs",
        "load_average": os.getloadavg(),
        "train_rows": sizes,
        "generated": {str(s): st for s, st in gen_stats.items()},
        "results": rows,
        "timings_s": timings,
        "wall_s_this_run": round(time.perf_counter() - began, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"train rows: {sizes}; teacher val CE {result['teacher']['val_ce']}")
    print("| student (train data + loss) | val CE | KL(teacher ‖ student) | top-1 agreement | seeds |")
    print("|---|---:|---:|---:|---|")
    for name, m in rows.items():
        print(
            f"| {name} | {m['ce']['mean']:.4f} | {m['kl_to_teacher']['mean']:.4f} | "
            f"{m['top1_agreement']['mean']:.4f} | {m['seeds']} |"
        )


if __name__ == "__main__":
    main()
