"""DVC stage `cache`: score the token data with the teacher once; write sparse targets + manifest.

Resumable (the output is `persist: true`): completed shards are kept, the rest are redone.
Under `torchrun`, each rank scores the shards i with i % world_size == rank.
"""

import argparse
import os
import sys

from pipeline.cache_writer import build_cache
from pipeline.config import CacheConfig, TeacherConfig, load_params, load_section
from pipeline.entry import run, setup_logging, show_progress
from pipeline.teacher import load_teacher
from pipeline.token_data import open_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--out", required=True, help="cache directory, e.g. cache/demo")
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = load_section(CacheConfig, params.get("cache"), section="cache")
    teacher = load_teacher(load_section(TeacherConfig, params.get("teacher"), section="teacher"))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    build_cache(teacher, open_tokens(args.tokens, cfg.split), cfg, out_dir=args.out,
                rank=rank, world_size=world, progress=show_progress() and rank == 0)


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/cache.py"))
