"""DVC stage `prepare`: tokenize the corpus with the teacher's tokenizer, pack, split by document."""

import argparse
import sys

from kdcache.config.base import load_params, load_section
from kdcache.config.corpus import CorpusConfig
from kdcache.config.paths import PathsConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.corpus import prepare_tokens
from kdcache.entry import run, setup_logging, show_progress
from kdcache.outputs import hold_output_dir
from kdcache.token_data import OUTPUT_KIND, is_token_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params)
    teacher = load_section(TeacherConfig, params.get("teacher"), section="teacher")
    corpus = load_section(CorpusConfig, params.get("corpus"), section="corpus")
    prepare = load_section(PrepareConfig, params.get("prepare"), section="prepare")
    out = load_section(PathsConfig, params.get("paths"), section="paths").tokens
    inputs = {"teacher.path": teacher.path, "corpus.paths": corpus.paths}
    with hold_output_dir(out, kind=OUTPUT_KIND, inputs=inputs, legacy=is_token_dir):
        prepare_tokens(corpus, prepare, tokenizer_dir=teacher.path, out_dir=out, progress=show_progress())


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/prepare.py"))
