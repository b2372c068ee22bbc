"""``kdcache`` command line: the same dataclasses as ``params.yaml``, built from flags.

Every config field becomes a flag (``CacheConfig.top_k`` -> ``--top-k``) whose help text is the
field's docstring in ``pipeline/config.py``, so the CLI and the DVC pipeline cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

from kdcache import __version__
from kdcache.cli_tools import add_tool_commands
from kdcache.config.base import ConfigError, load_params, load_section
from kdcache.config.cache import CacheConfig
from kdcache.config.corpus import CorpusConfig
from kdcache.config.demo_teacher import DemoTeacherConfig
from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.generate import GenerateConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.entry import claim_evaluate_outputs, run, setup_logging, show_progress
from kdcache.interop.commands import add_interop_commands
from kdcache.outputs import hold_output_dir

SECTIONS = {
    CorpusConfig: "corpus",
    DemoTeacherConfig: "demo_teacher",
    TeacherConfig: "teacher",
    PrepareConfig: "prepare",
    CacheConfig: "cache",
    TrainConfig: "train",
    EvaluateConfig: "evaluate",
    GenerateConfig: "generate",
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after a field) of a dataclass, as plain text."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).replace("``", "").split())
    return docs


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), rename: dict[str, str] | None = None
) -> None:
    """One flag per dataclass field; only flags the user passes are set (defaults stay in the dataclass)."""
    group = parser.add_argument_group(f"params.yaml section '{SECTIONS[cls]}' ({cls.__name__})")
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        flag = "--" + (rename or {}).get(f.name, f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {
            "dest": f"{cls.__name__}.{f.name}",
            "default": argparse.SUPPRESS,
            "help": f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%"),  # argparse formats help
        }
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `str | None`: the flag takes a str
            hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        origin = typing.get_origin(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif origin is tuple:
            kwargs["nargs"] = "+"
            element = next(iter(typing.get_args(hint)), str)
            if element in (int, float):
                kwargs["type"] = element
                kwargs["metavar"] = {int: "N", float: "X"}[element]
        elif hint in (int, float, str):
            kwargs["type"] = hint
            kwargs["metavar"] = {int: "N", float: "X"}.get(hint, f.name.upper())
        group.add_argument(flag, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build (and validate) ``cls`` from the flags the user passed."""
    prefix = f"{cls.__name__}."
    values = {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}
    return load_section(cls, {**values, **extra}, section=SECTIONS[cls])


# ----------------------------------------------------------------------------- commands


def cmd_demo_teacher(args: argparse.Namespace) -> None:
    from kdcache.demo_teacher import train_demo_teacher

    train_demo_teacher(
        config_from_args(CorpusConfig, args),
        config_from_args(DemoTeacherConfig, args),
        out_dir=args.out,
        progress=show_progress(),
        overwrite=args.overwrite,
    )


def cmd_prepare(args: argparse.Namespace) -> None:
    from kdcache.corpus import prepare_tokens
    from kdcache.token_data import OUTPUT_KIND, is_token_dir

    corpus = config_from_args(CorpusConfig, args, **({"paths": args.corpus} if args.corpus else {}))
    prepare = config_from_args(PrepareConfig, args)
    inputs = {"tokenizer": args.tokenizer, "corpus": corpus.paths}
    with hold_output_dir(args.out, kind=OUTPUT_KIND, inputs=inputs, overwrite=args.overwrite, legacy=is_token_dir):
        prepare_tokens(corpus, prepare, tokenizer_dir=args.tokenizer, out_dir=args.out, progress=show_progress())


def cmd_cache(args: argparse.Namespace) -> None:
    from kdcache.cache.build import cache_corpus

    if "://" in f"{args.cache_root} {args.out or ''}":  # an fsspec URL: build in --scratch, publish there
        from kdcache.cache.remote import cache_corpus_to_url

        print(
            cache_corpus_to_url(
                config_from_args(TeacherConfig, args, path=args.teacher),
                config_from_args(CacheConfig, args),
                tokens_dir=args.tokens,
                url=args.out or args.cache_root,
                scratch=args.scratch,
                content_named=args.out is None,
                progress=show_progress(),
                overwrite=args.overwrite,
            )
        )
        return
    out = cache_corpus(
        config_from_args(TeacherConfig, args, path=args.teacher),
        config_from_args(CacheConfig, args),
        tokens_dir=args.tokens,
        out_dir=args.out,
        cache_root=args.cache_root,
        progress=show_progress(),
        overwrite=args.overwrite,
    )
    if out is not None:
        print(out)


def cmd_generate(args: argparse.Namespace) -> None:
    from kdcache.generate import generate_corpus

    manifest = generate_corpus(
        config_from_args(TeacherConfig, args, path=args.teacher),
        config_from_args(GenerateConfig, args),
        out_dir=args.out,
        progress=show_progress(),
        overwrite=args.overwrite,
    )
    stats = manifest["stats"]
    print(f"{args.out}: {stats['documents']} documents, {stats['new_tokens']} generated tokens")


def cmd_train(args: argparse.Namespace) -> None:
    from kdcache.distributed import process_group
    from kdcache.multi_cache import cache_sources
    from kdcache.train import train

    student = _student_config(args.student) if args.student else StudentConfig()
    caches = cache_sources(args.cache, args.weights)  # [] for one --cache: the single-cache path
    cfg = config_from_args(
        TrainConfig, args, student=dataclasses.asdict(student), **({"caches": caches} if caches else {})
    )
    with process_group(device=args.device):
        train(
            cfg,
            cache_dir=args.cache[0],
            out_dir=args.out,
            resume=args.resume,
            device=args.device,
            progress=show_progress(),
            overwrite=args.overwrite,
        )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from kdcache.evaluate import evaluate, write_metrics
    from kdcache.token_data import open_tokens

    pairs = [m.partition("=") for m in args.model]
    models = {name: path for name, _, path in pairs}
    if any(not (name and eq and path) for name, eq, path in pairs) or len(models) != len(pairs):
        raise ConfigError(f"--model {' '.join(args.model)}: each must be NAME=DIR, with distinct names")
    inputs = {"--tokens": args.tokens, "--teacher": args.teacher, **{f"--model {k}": v for k, v in models.items()}}
    claim_evaluate_outputs(metrics=args.metrics, plots=args.plots, inputs=inputs, overwrite=args.overwrite)
    metrics = evaluate(
        config_from_args(EvaluateConfig, args),
        tokens=open_tokens(args.tokens, "val"),
        teacher=config_from_args(TeacherConfig, args, path=args.teacher),
        models=models,
        progress=show_progress(),
    )
    write_metrics(metrics, metrics_path=args.metrics, plots_dir=args.plots)
    print(json.dumps(metrics, indent=2, default=str))


def cmd_report(args: argparse.Namespace) -> None:
    from kdcache.report import build_report

    pairs = [r.partition("=") for r in args.run]
    runs = {name: path for name, _, path in pairs}
    if any(not (name and eq and path) for name, eq, path in pairs) or len(runs) != len(pairs):
        raise ConfigError(f"--run {' '.join(args.run)}: each must be NAME=DIR, with distinct names")
    print(
        build_report(
            metrics=args.metrics,
            calibration=args.calibration,
            runs=runs,
            cache=args.cache,
            out_dir=args.out,
            overwrite=args.overwrite,
        )
    )


def _student_config(spec: str) -> StudentConfig:
    path = Path(spec)
    if path.is_dir():
        return StudentConfig(path=str(path))
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        values = load_params(path) if path.suffix != ".json" else json.loads(path.read_text(encoding="utf-8"))
        return load_section(StudentConfig, values, section="train.student")
    raise ConfigError(f"--student {spec!r}: not a model directory nor a .json/.yaml file of student sizes")


# ----------------------------------------------------------------------------- parser

OVERWRITE_HELP = (
    "when the output exists and is not this command's output (someone else's files, another command's "
    "output, an incompatible cache), move it aside to <name>.moved-<UTC time>-overwritten and write a "
    "fresh one; kdcache never deletes what it did not make. Without it such an output is refused"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdcache",
        description="Offline teacher-logit caching and sparse knowledge "
        "distillation. Each command mirrors one stage of the DVC pipeline (params.yaml).",
    )
    p.add_argument("--version", action="version", version=f"kdcache {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    sp = command("demo-teacher", cmd_demo_teacher, "Train the small demo tokenizer + teacher on a corpus.")
    sp.add_argument("--out", required=True, help="output model directory")
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_config_flags(sp, CorpusConfig)
    add_config_flags(sp, DemoTeacherConfig, rename={"seq_len": "teacher-seq-len"})

    sp = command("prepare", cmd_prepare, "Tokenize a corpus with the teacher's tokenizer and pack it into sequences.")
    sp.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help="text/jsonl/parquet files or globs (default: the Python standard library's .py files)",
    )
    sp.add_argument("--tokenizer", required=True, metavar="DIR", help="directory with the teacher's tokenizer")
    sp.add_argument("--out", required=True, metavar="DIR", help="output token directory")
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_config_flags(sp, CorpusConfig, skip=("paths",))
    add_config_flags(sp, PrepareConfig)

    sp = command(
        "cache",
        cmd_cache,
        "Score token data with the teacher once and write sparse soft targets "
        "(Parquet shards + manifest); prints the cache directory. Resumable; under torchrun each rank "
        "scores the shards i with i mod WORLD_SIZE == RANK and rank 0 writes the manifest.",
    )
    sp.add_argument("--teacher", required=True, metavar="DIR", help="local Hugging Face causal-LM directory")
    sp.add_argument("--tokens", required=True, metavar="DIR", help="token directory written by `kdcache prepare`")
    sp.add_argument(
        "--out",
        metavar="DIR",
        help="cache directory (created; resumed if present). Default: "
        "CACHE_ROOT/<teacher sha>-<corpus sha>-<split>-<targets>, named by content so that the same "
        "inputs and settings always give the same name",
    )
    sp.add_argument(
        "--cache-root",
        default="cache",
        metavar="DIR",
        help="parent of the default --out (default: cache); --out or --cache-root may be an fsspec URL (s3://, gs://, "
        "memory://, file://): the cache is built in --scratch, resumed from the URL's shards and published there, "
        "manifest last (kdcache.cache.remote)",
    )
    sp.add_argument(
        "--scratch",
        default="cache/scratch",
        metavar="DIR",
        help="local directory a cache for a URL is built in (default: cache/scratch)",
    )
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_config_flags(sp, TeacherConfig, skip=("path",))
    add_config_flags(sp, CacheConfig)

    sp = command(
        "generate",
        cmd_generate,
        "Sequence-level KD: the teacher (loaded as the cache stage loads it) continues a set of prompts with "
        "Hugging Face generate; the result is a corpus that prepare reads (--corpus OUT/part-*.jsonl). Prompts: "
        "the train-split documents of --prompts (default: the standard library's .py files), each cut to its "
        "first --prompt-tokens tokens. Every prompt samples from its own seeded stream, so the output does not "
        "depend on the batch it lands in; each batch is one part file, written atomically, and a rerun keeps "
        "finished parts. OUT/manifest.json records the teacher's sha256, the prompts' sha256, the sampling "
        "settings and the runtime.",
    )
    sp.add_argument("--teacher", required=True, metavar="DIR", help="local Hugging Face causal-LM directory")
    sp.add_argument("--out", required=True, metavar="DIR", help="output corpus directory (created; resumed if present)")
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_config_flags(sp, TeacherConfig, skip=("path",))
    add_config_flags(sp, GenerateConfig, skip=("enabled",))

    sp = command("train", cmd_train, "Train a student from a cache (the teacher is not needed).")
    sp.add_argument(
        "--cache",
        required=True,
        action="append",
        metavar="DIR",
        help="cache directory (repeat: several teachers, train.caches)",
    )
    sp.add_argument("--weights", metavar="W1,W2", help="teacher weights for repeated --cache (default: equal)")
    sp.add_argument("--out", required=True, metavar="DIR", help="output student directory")
    sp.add_argument(
        "--student",
        metavar="CONFIG_OR_DIR",
        help="pretrained student directory, or a .json/.yaml "
        "file of StudentConfig sizes (default: a 2-layer, 128-wide Llama)",
    )
    sp.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out (refused if its run had other settings); without it, "
        "a previous run in --out is moved aside to run.moved-<UTC time>-started-without-resume/",
    )
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    sp.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default: auto)")
    add_config_flags(sp, TrainConfig, skip=("caches",))

    sp = command(
        "evaluate",
        cmd_evaluate,
        "Compare teacher and students on the val split, in the teacher tokenizer's id space. The teacher is "
        "loaded as the cache stage loads it (--device/--dtype); the other models go on the same device.",
    )
    sp.add_argument("--tokens", required=True, metavar="DIR", help="token directory (its val split is used)")
    sp.add_argument("--teacher", required=True, metavar="DIR", help="teacher model directory")
    sp.add_argument(
        "--model", action="append", default=[], metavar="NAME=DIR", help="a model to compare with it (repeat)"
    )
    sp.add_argument("--metrics", default="metrics/eval.json", help="metrics JSON path")
    sp.add_argument("--plots", default="plots", help="plot data directory")
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_config_flags(sp, TeacherConfig, skip=("path",))
    add_config_flags(sp, EvaluateConfig)

    sp = command(
        "report",
        cmd_report,
        "One page (report.md + PNG plots) comparing teacher, KD student and CE-only baseline from what evaluate, "
        "train and cache wrote: val CE/perplexity, KL to teacher, top-1 agreement, calibration, tokens/s, sizes, "
        "training curves, the cache's bytes/token and teacher signals. Loads no model; prints the page's path.",
    )
    sp.add_argument("--metrics", default="metrics/eval.json", help="the metrics JSON evaluate wrote")
    sp.add_argument(
        "--calibration", metavar="CSV_OR_DIR", help="evaluate's calibration.csv or its --plots directory (optional)"
    )
    sp.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a training run (student directory with train_log.jsonl; NAME as in the metrics) (repeat)",
    )
    sp.add_argument("--cache", metavar="DIR", help="the cache the students learned from (optional)")
    sp.add_argument("--out", default="report", metavar="DIR", help="output report directory (default: report)")
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    add_tool_commands(sub, OVERWRITE_HELP)  # inspect, verify, retokenize (kdcache.cli_tools)
    add_interop_commands(sub)  # export, import (kdcache.interop owns them)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run(lambda: args.fn(args), prog="kdcache")


if __name__ == "__main__":
    sys.exit(main())
