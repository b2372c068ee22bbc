"""The ``kdcache inspect``, ``verify`` and ``retokenize`` subcommands: tools around caches and token data
that no DVC stage runs. ``kdcache.cli.build_parser`` passes its subparsers to ``add_tool_commands``
(argparse itself stays in cli.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


def cmd_inspect(args: Any) -> None:
    from kdcache.cache.describe import describe_manifest
    from kdcache.cache.format import Manifest

    manifest = Manifest.load(args.cache)
    if args.json:
        print(
            json.dumps(
                {k: v for k, v in dataclasses.asdict(manifest).items() if k != "shards"}
                | {"num_shards": len(manifest.shards), "total_bytes": sum(s.bytes for s in manifest.shards)},
                indent=2,
            )
        )
    else:
        print(describe_manifest(manifest, cache_dir=Path(args.cache)))


def cmd_verify(args: Any) -> None:
    from kdcache.cache.verify import verify_cache

    problems = verify_cache(args.cache)
    for p in problems:
        print(f"BAD {p}")
    if problems:
        raise ValueError(
            f"{args.cache}: {len(problems)} problem(s) found; do not train on this cache — "
            "fix or rebuild the listed files (rerun the cache stage) or pull the cache again"
        )
    print(f"OK {args.cache}: the manifest's counts add up; every shard and tokenizer file matches it; nothing unlisted")


def cmd_retokenize(args: Any) -> None:
    from kdcache.outputs import hold_output_dir
    from kdcache.retokenize import retokenize_split
    from kdcache.token_data import OUTPUT_KIND, is_token_dir
    from kdcache.tokenizer import load_tokenizer

    lead = load_tokenizer(args.lead_tokenizer, field="--lead-tokenizer")
    other = load_tokenizer(args.tokenizer, field="--tokenizer", spells_bytes=True)
    inputs = {"tokens": args.tokens, "lead_tokenizer": args.lead_tokenizer, "tokenizer": args.tokenizer}
    with hold_output_dir(args.out, kind=OUTPUT_KIND, inputs=inputs, overwrite=args.overwrite, legacy=is_token_dir):
        manifest = retokenize_split(
            args.tokens,
            lead_tokenizer=lead,
            tokenizer=other,
            out_dir=args.out,
            splits=args.splits,
            seq_len=args.seq_len,
        )
    rows = ", ".join(f"{name} {entry['num_sequences']} rows" for name, entry in manifest["splits"].items())
    cut = json.dumps(manifest["retokenized_from"]["cut"])
    print(f"{args.out}: {rows} of {manifest['seq_len']} tokens; cut at the row ends: {cut}")


def add_tool_commands(sub: Any, overwrite_help: str) -> None:
    """Add ``inspect``, ``verify`` and ``retokenize`` to the ``kdcache`` subparsers ``sub``."""

    def command(name: str, fn: Any, help_: str) -> Any:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    sp = command("inspect", cmd_inspect, "Summarize a cache's manifest: teacher, tokenizer, corpus, targets, size.")
    sp.add_argument("cache", metavar="DIR")
    sp.add_argument("--json", action="store_true", help="print the manifest (without the shard list) as JSON")
    sp = command(
        "verify",
        cmd_verify,
        "Check the whole cache: the manifest's counts, every shard's size, sha256, footer and contents, the "
        "tokenizer files' sha256, and that no unlisted file sits in it.",
    )
    sp.add_argument("cache", metavar="DIR")
    sp = command(
        "retokenize",
        cmd_retokenize,
        "Make another teacher's token data from prepared token data, row by row: each row's text (bytes and "
        "special tokens) in the other teacher's tokens, so that teacher's cache holds the same text in the same "
        "rows and order and one student can learn from both (several teachers of different tokenizers; "
        "README 'Student with another tokenizer'). Cache the output with `kdcache cache --tokens OUT`.",
    )
    sp.add_argument("--tokens", required=True, metavar="DIR", help="the lead teacher's token data (kdcache prepare)")
    sp.add_argument(
        "--lead-tokenizer", required=True, metavar="DIR", help="the tokenizer that made --tokens (the lead teacher's)"
    )
    sp.add_argument("--tokenizer", required=True, metavar="DIR", help="the other teacher's tokenizer")
    sp.add_argument("--out", required=True, metavar="DIR", help="output token directory")
    sp.add_argument("--splits", nargs="+", default=["train", "val"], metavar="SPLIT", help="default: train val")
    sp.add_argument(
        "--seq-len",
        type=int,
        default=0,
        metavar="N",
        help="row length in the other tokenizer's tokens (default 0: the longest of the first 256 train rows + 5%%; "
        "a longer row loses its last tokens, counted in the output's manifest)",
    )
    sp.add_argument("--overwrite", action="store_true", help=overwrite_help)
