"""DVC stage `check_params`: validate every section of params.yaml before any other stage runs.

DVC deletes a stage's outputs before it runs the stage, so a bad value in `train:` would cost the
student directory before stages/train.py could refuse it. Every stage depends on this stage's
output, so `dvc repro` runs it first and stops here with the outputs intact. Its output never
changes, so a stage still reruns only when its own params or deps change.
"""

import argparse
import sys
from pathlib import Path

from kdcache.config.base import load_params, load_section
from kdcache.config.cache import CacheConfig
from kdcache.config.corpus import CorpusConfig
from kdcache.config.demo_teacher import DemoTeacherConfig
from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.extra_teachers import check_cache_sources, load_extra_teachers
from kdcache.config.generate import GenerateConfig
from kdcache.config.paths import PathsConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import TrainConfig
from kdcache.entry import run, setup_logging
from kdcache.files import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", required=True, help="the file written when every section is valid")
    args = ap.parse_args()
    params = load_params(args.params)
    paths = load_section(PathsConfig, params.get("paths"), section="paths")
    load_section(CorpusConfig, params.get("corpus"), section="corpus")
    load_section(DemoTeacherConfig, params.get("demo_teacher"), section="demo_teacher")
    load_section(TeacherConfig, params.get("teacher"), section="teacher")
    load_section(PrepareConfig, params.get("prepare"), section="prepare")
    load_section(CacheConfig, params.get("cache"), section="cache")
    load_section(TrainConfig, params.get("train"), section="train")
    load_section(TrainConfig, params.get("train_baseline"), section="train_baseline")
    load_section(EvaluateConfig, params.get("evaluate"), section="evaluate")
    load_section(GenerateConfig, params.get("generate"), section="generate")
    extra = load_extra_teachers(params.get("extra_teachers"))
    check_cache_sources(extra, paths.teacher_caches, {s: params.get(s) for s in ("train", "train_baseline")})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "every section of params.yaml is valid\n")


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/check_params.py"))
