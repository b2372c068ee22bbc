"""DVC stage `cache`: score the token data with the teacher once; write sparse targets + manifest.

`--teacher MODEL_DIR --out DIR` (the stages `cache_teacher@NAME`, one per params.yaml `extra_teachers` entry):
cache another teacher over the same token data, with the `teacher` section's other settings and the same
`cache` section, into DIR (README "Several teachers").

Resumable (the output is `persist: true`): completed shards are kept, the rest are redone. A cache
of other settings (the user changed `cache.*` or the teacher) is moved aside as
`<paths.cache>.moved-<UTC time>-overwritten`, never deleted, and a fresh one is built — as the train
stages move a changed run aside — so `dvc repro` after a params change just works.
Under `torchrun --nproc_per_node N stages/cache.py` the ranks first agree on which shards are
finished, then deal the missing ones round-robin (a resume keeps every rank busy); with a
tensor-parallel teacher (`teacher.tp_plan`) all ranks are one replica that scores every missing
shard in lockstep and rank 0 writes them. Rank 0 writes the manifest once every rank is done
(`kdcache.cache.build`).
"""

import argparse
import dataclasses
import sys

from kdcache.cache.build import cache_corpus
from kdcache.config.base import load_params, load_section
from kdcache.config.cache import CacheConfig
from kdcache.config.paths import PathsConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.entry import run, setup_logging, show_progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--teacher", default=None, help="cache this teacher model directory instead of teacher.path")
    ap.add_argument("--out", default=None, help="the cache directory (default: paths.cache)")
    args = ap.parse_args()
    params = load_params(args.params)
    paths = load_section(PathsConfig, params.get("paths"), section="paths")
    teacher = load_section(TeacherConfig, params.get("teacher"), section="teacher")
    cache_corpus(
        dataclasses.replace(teacher, path=args.teacher) if args.teacher else teacher,
        load_section(CacheConfig, params.get("cache"), section="cache"),
        tokens_dir=paths.tokens,
        out_dir=args.out or paths.cache,
        overwrite=True,  # only a cache of other settings (or foreign files) is moved aside; a matching one resumes
        progress=show_progress(),
    )


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/cache.py"))
