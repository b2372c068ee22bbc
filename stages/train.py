"""DVC stages `train` and `train_baseline`: train a student from the cache (no teacher needed).

`--section train` is the KD student; `--section train_baseline` the CE-only baseline with the
same architecture, steps and data order. Under `torchrun --nproc_per_node N stages/train.py ...`
training runs data-parallel (DDP; gloo on CPU, nccl on CUDA) with `batch_size` sequences per rank.
"""

import argparse
import sys

from kdcache.config.base import load_params, load_section
from kdcache.config.paths import PathsConfig
from kdcache.config.train import TrainConfig
from kdcache.distributed import process_group
from kdcache.entry import run, setup_logging, show_progress
from kdcache.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--section", default="train", choices=["train", "train_baseline"])
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = ap.parse_args()
    params = load_params(args.params)
    paths = load_section(PathsConfig, params.get("paths"), section="paths")
    cfg = load_section(TrainConfig, params.get(args.section), section=args.section)
    out = paths.student if args.section == "train" else paths.baseline
    with process_group("auto"):
        train(cfg, cache_dir=paths.cache, out_dir=out, resume=args.resume, progress=show_progress())


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/train.py"))
