"""DVC stage `demo_teacher`: train the small demo tokenizer + teacher on the default corpus.

Skipped in spirit when you bring your own teacher: set `teacher.path` in params.yaml to your
model directory and run `dvc repro evaluate` (which does not depend on this stage then).
"""

import argparse
import sys

from kdcache.config.base import load_params, load_section
from kdcache.config.corpus import CorpusConfig
from kdcache.config.demo_teacher import DemoTeacherConfig
from kdcache.config.paths import PathsConfig
from kdcache.demo_teacher import train_demo_teacher
from kdcache.entry import run, setup_logging, show_progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params)
    train_demo_teacher(
        load_section(CorpusConfig, params.get("corpus"), section="corpus"),
        load_section(DemoTeacherConfig, params.get("demo_teacher"), section="demo_teacher"),
        out_dir=load_section(PathsConfig, params.get("paths"), section="paths").demo_teacher,
        progress=show_progress(),
    )


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/demo_teacher.py"))
