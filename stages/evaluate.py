"""DVC stage `evaluate`: teacher vs KD student vs CE-only baseline on the val split."""

import argparse
import sys

from kdcache.config.base import load_params, load_section
from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.paths import PathsConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.entry import claim_evaluate_outputs, run, setup_logging, show_progress
from kdcache.evaluate import evaluate, write_metrics
from kdcache.token_data import open_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params)
    paths = load_section(PathsConfig, params.get("paths"), section="paths")
    teacher = load_section(TeacherConfig, params.get("teacher"), section="teacher")
    inputs = {"paths.tokens": paths.tokens, "teacher.path": teacher.path}
    inputs |= {"paths.student": paths.student, "paths.baseline": paths.baseline}
    claim_evaluate_outputs(metrics=paths.metrics, plots=paths.plots, inputs=inputs)
    metrics = evaluate(
        load_section(EvaluateConfig, params.get("evaluate"), section="evaluate"),
        tokens=open_tokens(paths.tokens, "val"),
        teacher=teacher,
        models={"student": paths.student, "baseline": paths.baseline},
        progress=show_progress(),
    )
    write_metrics(metrics, metrics_path=paths.metrics, plots_dir=paths.plots)


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/evaluate.py"))
