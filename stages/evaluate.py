"""DVC stage `evaluate`: teacher vs KD student vs CE-only baseline on the val split."""

import argparse
import sys

from kdcache.config import EvaluateConfig, load_params, load_section
from kdcache.entry import run, setup_logging, show_progress
from kdcache.evaluate import evaluate, write_metrics
from kdcache.token_data import open_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--metrics", default="metrics/eval.json")
    ap.add_argument("--plots", default="plots")
    args = ap.parse_args()
    cfg = load_section(EvaluateConfig, load_params(args.params).get("evaluate"), section="evaluate")
    metrics = evaluate(
        cfg,
        tokens=open_tokens(args.tokens, "val"),
        models={"teacher": args.teacher, "student": args.student, "baseline": args.baseline},
        progress=show_progress(),
    )
    write_metrics(metrics, metrics_path=args.metrics, plots_dir=args.plots)


if __name__ == "__main__":
    setup_logging()
    sys.exit(run(main, prog="stages/evaluate.py"))
