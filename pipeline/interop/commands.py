"""The ``kdcache export`` and ``kdcache import`` subcommands: ``kdcache.cli.build_parser`` passes its
subparsers to ``add_interop_commands`` (argparse itself stays in cli.py)."""

from __future__ import annotations

from typing import Any

from kdcache.interop import EXPORT_FORMATS, IMPORT_FORMATS

OVERWRITE_HELP = (
    "when OUT exists and is not this command's output, move it aside to <name>.moved-<UTC time>-overwritten "
    "and write a fresh one (kdcache never deletes what it did not make)"
)


def cmd_export(args: Any) -> None:
    from kdcache.interop.export import export_cache

    print(export_cache(args.cache, to=args.to, out=args.out, overwrite=args.overwrite))


def cmd_import(args: Any) -> None:
    from kdcache.interop.ingest import import_cache

    out = import_cache(
        args.source,
        fmt=args.source_format,
        out=args.out,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        temperature=args.temperature,
        split=args.split,
        rows_per_shard=args.rows_per_shard,
        overwrite=args.overwrite,
    )
    print(out)


def add_interop_commands(sub: Any) -> None:
    """Add ``export`` and ``import`` to the ``kdcache`` subparsers ``sub``."""
    text = (
        "Write a cache as another tool's KD dataset: axolotl (Parquet rows of Axolotl's KD trainer + axolotl.yaml), "
        "nemo (NeMo-Aligner KD JSONL + nemo.yaml) or lists (Parquet with native list columns); the cache's "
        "tokenizer/ and kdcache_export.json (written last) come along."
    )
    sp = sub.add_parser("export", help=text, description=text)
    sp.set_defaults(fn=cmd_export)
    sp.add_argument("cache", metavar="CACHE", help="cache directory")
    sp.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="output format")
    sp.add_argument("out", metavar="OUT", help="output directory")
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    text = (
        "Turn an Axolotl or NeMo-Aligner KD dataset into a verified kdcache cache (manifest, sha256, fingerprints; "
        "teacher identity unknown). NeMo tails are rebuilt from log_sum_exp_logits; Axolotl values carry no tail, "
        "so the cache is marked targets.renormalized and trains with train.loss: topk_renorm (or hard)."
    )
    sp = sub.add_parser("import", help=text, description=text)
    sp.set_defaults(fn=cmd_import)
    sp.add_argument("--from", dest="source_format", required=True, choices=IMPORT_FORMATS, help="source format")
    sp.add_argument(
        "source",
        metavar="IN",
        help="a .parquet/.jsonl file, a directory of them, a glob, or a datasets.save_to_disk directory",
    )
    sp.add_argument("out", metavar="OUT", help="cache directory to create")
    sp.add_argument("--tokenizer", required=True, metavar="DIR", help="the tokenizer the source's ids come from")
    sp.add_argument(
        "--seq-len", type=int, metavar="N", help="row length (default: the longest source row; shorter rows are padded)"
    )
    sp.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="X",
        help="temperature the source's log-probs were made at (recorded in the manifest; default: 1.0)",
    )
    sp.add_argument("--split", choices=("train", "val"), default="train", help="split name recorded (default: train)")
    sp.add_argument("--rows-per-shard", type=int, default=512, metavar="N", help="sequences per shard (default: 512)")
    sp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
