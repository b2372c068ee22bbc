"""Hidden-state (feature) targets on the demo teacher (issue 11.3): bytes/token they add, and the student's val CE
with and without the feature loss at the same steps.

1. Bytes: a default (sampled S = 16) cache of the val split with ``cache.hidden_layers: [-1]``, ``hidden_dim: 64``;
   each column group's compressed size from the Parquet footers (``kdcache.cache.shards.column_bytes``).
2. Quality: a cache of the first ``--train-sequences`` train sequences with the same hidden targets, one per
   ``--projections`` entry (``cache.hidden_projection``); per ``--seeds`` entry, one student per variant
   (feature_weight 0 unless ``--no-baseline``, then each ``--variants`` entry ``loss:weight`` on each
   projection's cache), same seed, steps, batch and data order; val CE of each exported student over the val
   split (next-token CE, nats/token).

    python bench/hidden_targets.py --teacher models/demo-teacher --tokens data/tokens --train-sequences 256 \
        --steps 100 --batch 8 --variants mse:1,cosine:1 --json bench/results/hidden_targets.json
    python bench/hidden_targets.py --skip-bytes --projections orthogonal,pca --seeds 0,1 --variants mse:1 \
        --no-baseline --steps 60 --json bench/results/hidden_pca.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.cache.build import cache_corpus
from kdcache.cache.format import Manifest
from kdcache.cache.shards import column_bytes
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import TrainConfig
from kdcache.token_data import open_tokens, write_tokens
from kdcache.train import train


def cache_bytes(teacher: str, tokens: str, cfg: CacheConfig, out: Path) -> dict:
    began = time.perf_counter()
    cache_corpus(TeacherConfig(path=teacher, device="cpu", dtype="float32"), cfg, tokens_dir=tokens, out_dir=out)
    seconds = time.perf_counter() - began
    m = Manifest.load(out)
    groups = column_bytes(out, m.shards)
    return {
        "split": cfg.split,
        "hidden_layers": m.targets.get("hidden", {}).get("layers"),
        "hidden_dim": cfg.hidden_dim,
        "tokens": m.num_tokens,
        "build_s": round(seconds, 1),
        "bytes_per_token": {g: round(n / m.num_tokens, 3) for g, n in sorted(groups.items())}
        | {"file total": round(sum(s.bytes for s in m.shards) / m.num_tokens, 3)},
        "projection_bytes": (out / "hidden_projection.safetensors").stat().st_size,
    }


def val_ce(student: Path, ids: np.ndarray, batch: int = 16) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids), batch):
            x = torch.from_numpy(np.asarray(ids[b : b + batch], np.int64))  # (B, T)
            logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total, count = total + float(ce), count + x[:, 1:].numel()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/demo-teacher")
    p.add_argument("--tokens", default="data/tokens")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--train-sequences", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--variants", default="mse:1,cosine:1", help="loss:weight,... (feature_weight 0 always runs)")
    p.add_argument("--seeds", default="0", help="train.seed values (student init and data order), comma-separated")
    p.add_argument("--projections", default="orthogonal", help="cache.hidden_projection values, comma-separated")
    p.add_argument("--no-baseline", action="store_true", help="skip the feature_weight 0 student")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-bytes", action="store_true", help="skip part 1 (the val cache's bytes/token)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads or max(1, torch.get_num_threads()))
    hidden = {"hidden_layers": (-1,), "hidden_dim": a.dim}
    projections = [x for x in a.projections.split(",") if x]
    result: dict = {
        "command": "python bench/hidden_targets.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None)
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not a.skip_bytes:
            result["bytes"] = cache_bytes(a.teacher, a.tokens, CacheConfig(split="val", **hidden), root / "val")
            print(json.dumps(result["bytes"], indent=1), flush=True)
        src = open_tokens(a.tokens, "train")
        val = open_tokens(a.tokens, "val")
        sub = root / "tokens"
        write_tokens(
            sub,
            {"train": np.asarray(src.ids[: a.train_sequences]), "val": np.asarray(val.ids)},
            vocab_size=src.vocab_size,
            tokenizer_fingerprint=src.tokenizer_fingerprint,
            meta={k: v for k, v in src.manifest.items() if k in ("packing", "corpus")},
        )
        result["train_cache"] = {}
        for proj in projections:
            cfg = CacheConfig(split="train", hidden_projection=proj, **hidden)
            result["train_cache"][proj] = cache_bytes(a.teacher, str(sub), cfg, root / f"train-{proj}")
            print(json.dumps(result["train_cache"][proj], indent=1), flush=True)
        variants = [(v.split(":")[0], float(v.split(":")[1])) for v in a.variants.split(",") if v]
        runs = [] if a.no_baseline else [("none", 0.0, projections[0])]
        runs += [(loss, weight, proj) for loss, weight in variants for proj in projections]
        result["runs"] = []
        for seed, (loss, weight, proj) in ((int(x), r) for x in a.seeds.split(",") for r in runs):
            cfg = TrainConfig(
                max_steps=a.steps,
                seed=seed,
                batch_size=a.batch,
                warmup_steps=max(1, a.steps // 10),
                checkpoint_every=a.steps,
                log_every=max(1, a.steps // 5),
                feature_weight=weight,
                feature_loss="mse" if loss == "none" else loss,
            )
            began = time.perf_counter()
            out = root / f"student-{loss}-{weight:g}-{proj}-seed{seed}"
            summary = train(cfg, cache_dir=root / f"train-{proj}", out_dir=out)
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            run = {
                "seed": seed,
                "projection": proj if weight else None,
                "feature_loss": loss,
                "feature_weight": weight,
                "steps": summary["steps"],
                "train_s": round(time.perf_counter() - began, 1),
                "final_train_loss": round(log[-1]["loss"], 4),
                "final_train_ce": round(log[-1]["ce"], 4),
                "val_ce": round(val_ce(out, np.asarray(val.ids)), 4),
            }
            run["val_ppl"] = round(math.exp(run["val_ce"]), 2)
            print(json.dumps(run), flush=True)
            result["runs"].append(run)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
