"""DVC stage `report`: one page (Markdown + PNG plots) comparing teacher, KD student and CE-only baseline.

Reads what evaluate, train and train_baseline wrote and the cache's manifest; never loads a model.
Its per-step training curves (CSV) and plots are declared in dvc.yaml's `plots`: `dvc plots show`.
"""

import argparse
import sys
from pathlib import Path

from kdcache.config.base import load_params, load_section
from kdcache.config.paths import PathsConfig
from kdcache.entry import run, setup_logging
from kdcache.report import build_report
from kdcache.report_inputs import CALIBRATION_NAME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    paths = load_section(PathsConfig, load_params(args.params).get("paths"), section="paths")
    build_report(
        metrics=paths.metrics,
        calibration=Path(paths.plots) / CALIBRATION_NAME,
        runs={"student": paths.student, "baseline": paths.baseline},
        cache=paths.cache,
        out_dir=paths.report,
    )


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/report.py"))
