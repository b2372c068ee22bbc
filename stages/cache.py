"""DVC stage `cache`: score the token data with the teacher once; write sparse targets + manifest.

Resumable (the output is `persist: true`): completed shards are kept, the rest are redone.
Under `torchrun --nproc_per_node N stages/cache.py ...` each rank scores the shards i with
i % N == rank and rank 0 writes the manifest once every rank is done.
"""

import argparse
import sys

from kdcache.cache.writer import build_cache
from kdcache.config import CacheConfig, TeacherConfig, load_params, load_section
from kdcache.distributed import process_group
from kdcache.entry import run, setup_logging, show_progress
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens

TIMEOUT_S = 24 * 3600.0  # ranks that finish early wait at the final barrier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--out", required=True, help="cache directory, e.g. cache/demo")
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = load_section(CacheConfig, params.get("cache"), section="cache")
    teacher_cfg = load_section(TeacherConfig, params.get("teacher"), section="teacher")
    with process_group("gloo", timeout_s=TIMEOUT_S) as (rank, world):  # only collective: one barrier
        teacher, tokens = load_teacher(teacher_cfg), open_tokens(args.tokens, cfg.split)
        build_cache(
            teacher, tokens, cfg, out_dir=args.out, rank=rank, world_size=world, progress=show_progress() and rank == 0
        )  # ends with a barrier; rank 0 writes the manifest


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/cache.py"))
