"""DVC stages `train` and `train_baseline`: train a student from the cache (no teacher needed).

`--section train` is the KD student; `--section train_baseline` the CE-only baseline with the
same architecture, steps and data order. Under `torchrun --nproc_per_node N stages/train.py ...`
training runs data-parallel (DDP; gloo on CPU, nccl on CUDA) with `batch_size` sequences per rank.

The run (checkpoints, log, final model) lives in `paths.student_run` / `paths.baseline_run`, a
`persist` output that DVC keeps between runs; the finished model is then published to
`paths.student` / `paths.baseline`, which DVC deletes before each rerun. A rerun resumes the newest
checkpoint when its run had the same settings, cache and code (a `dvc repro` killed mid-training
continues where it stopped), and otherwise moves that run aside (`run.moved-<UTC time>-<why>/`
inside the run directory, never deleted) and starts fresh.
"""

import argparse
import sys

from kdcache.config.base import load_params, load_section
from kdcache.config.paths import PathsConfig
from kdcache.config.train import TrainConfig
from kdcache.distributed import env_rank_world, process_group
from kdcache.entry import run, setup_logging, show_progress
from kdcache.train import train
from kdcache.train_run import publish_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--section", default="train", choices=["train", "train_baseline"])
    ap.add_argument(
        "--resume", action="store_true", help="resume, refusing a checkpoint of another run instead of moving it aside"
    )
    args = ap.parse_args()
    params = load_params(args.params)
    paths = load_section(PathsConfig, params.get("paths"), section="paths")
    cfg = load_section(TrainConfig, params.get(args.section), section=args.section)
    kd = args.section == "train"
    out, run_dir = (paths.student, paths.student_run) if kd else (paths.baseline, paths.baseline_run)
    with process_group("auto"):
        resume = True if args.resume else "auto"
        train(cfg, cache_dir=paths.cache, out_dir=run_dir, resume=resume, progress=show_progress())
    if env_rank_world()[0] == 0:
        publish_run(run_dir, out)


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/train.py"))
