"""DVC stage `generate`: the teacher writes continuations of prompts, saved as a corpus (sequence-level KD).

A no-op unless `generate.enabled: true` (DVC cannot skip a stage): then the output directory holds only its
marker. Resumable (the output is `persist: true`): finished parts are kept, the rest are written. To train
on the teacher's text, point `corpus.paths` at `${paths.generated}/part-*.jsonl` (README: "A teacher-written
corpus").
"""

import argparse
import logging
import sys

from kdcache.config.base import load_params, load_section
from kdcache.config.generate import OUTPUT_KIND, GenerateConfig
from kdcache.config.paths import PathsConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.entry import run, setup_logging, show_progress
from kdcache.outputs import hold_output_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = load_section(GenerateConfig, params.get("generate"), section="generate")
    teacher = load_section(TeacherConfig, params.get("teacher"), section="teacher")
    out = load_section(PathsConfig, params.get("paths"), section="paths").generated
    if not cfg.enabled:
        with hold_output_dir(out, kind=OUTPUT_KIND, inputs={"teacher.path": teacher.path}):
            logging.getLogger("stages.generate").info("generate.enabled is false: nothing generated (%s)", out)
        return
    from kdcache.generate import generate_corpus  # torch + transformers: only when there is work

    generate_corpus(teacher, cfg, out_dir=out, progress=show_progress())


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/generate.py"))
