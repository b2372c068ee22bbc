"""``export_cache``: write a kdcache cache in another tool's documented KD dataset layout.

Formats (``FORMATS``), all aligned like kdcache: row j's targets describe the token after ``input_ids[j]``.

- ``lists``: Parquet, the decoded native columns of ``kdcache.interop.rows`` (nothing lost but the
  value quantization already in the cache): ``part-NNNNN.parquet``, one per cache shard.
- ``axolotl``: Parquet rows of Axolotl's KD trainer (its ``kd`` integration's tokenized rows):
  ``input_ids``, ``attention_mask``, ``labels`` (= input_ids; the model shifts), per position
  ``target_token_ids`` / ``target_logprobs`` / ``target_mask`` (0 on the last position, whose next
  token lies outside the row). Log-probs are the teacher's at the cache's temperature, not
  renormalized (Axolotl renormalizes with ``kd_normalize_topk``); the tail has no place in the format.
  ``data-NNNNN.parquet`` plus ``axolotl.yaml`` (the settings to train with: ``kd_temperature`` = the
  cache's).
- ``nemo``: NeMo-Aligner's KD JSONL (``compute_topk_logits.py`` rows): ``tokens``, ``labels``
  (tokens shifted left; the last one is EOS, masked), ``loss_mask``, ``topk_logits`` (the log-probs,
  in float64 so that 1 - sum exp keeps the tail), ``topk_token_ids``, ``log_sum_exp_logits`` (0.0:
  log-probs are logits normalized to log-sum-exp 0, so NeMo's k+1-th "rest" bucket is the exact
  tail) and ``index`` (= seq_index): ``kd_with_logits_N.jsonl``, one chunk per cache shard, plus
  ``nemo.yaml`` (its ``chunked_jsonl`` data settings).

Every export also carries the cache's ``tokenizer/`` and ``kdcache_export.json`` (written last: the
source manifest's teacher/tokenizer/corpus/targets sections, the files with their sha256, and how
to read them). Only the cache's own decoder is used: the other tools' code is not needed here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from kdcache import __version__
from kdcache.cache.format import TOKENIZER_DIR, Manifest, TargetLayout
from kdcache.cache.shards import CacheError, check_shard_file
from kdcache.files import atomic_dir, atomic_write, atomic_write_text
from kdcache.fingerprint import sha256_file
from kdcache.interop import EXPORT_FORMATS
from kdcache.interop.rows import DecodedRows, decoded_batches, decoded_schema, to_arrow
from kdcache.outputs import hold_output_dir

log = logging.getLogger(__name__)
FORMATS = EXPORT_FORMATS
EXPORT_MANIFEST = "kdcache_export.json"
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "write_page_checksum": True}
AXOLOTL_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("attention_mask", pa.list_(pa.int8())),
        pa.field("labels", pa.list_(pa.int32())),
        pa.field("target_token_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("target_logprobs", pa.list_(pa.list_(pa.float32()))),
        pa.field("target_mask", pa.list_(pa.list_(pa.int8()))),
    ]
)
"""Axolotl's tokenized KD rows (``axolotl.integrations.kd``: chat_template strategy output, collator input)."""


class ExportError(ValueError):
    """The cache cannot be written in the requested format (names the cache and the fix)."""


def export_cache(
    cache: str | Path, *, to: str, out: str | Path, overwrite: bool = False, rows_per_batch: int = 64
) -> Path:
    """Write ``cache`` as ``to`` (one of ``FORMATS``) into the directory ``out``; returns ``out``.

    ``out`` follows kdcache's output rule (new, or an export of the same format kdcache made;
    ``overwrite`` moves anything else aside). Every shard is checked against its manifest sha256 as
    it is read; ``kdcache_export.json`` is written last, so a directory without it is unfinished.
    """
    if to not in FORMATS:
        raise ExportError(f"export --to must be one of {'|'.join(FORMATS)}, got {to!r}")
    root, out = Path(cache), Path(out)
    manifest = Manifest.load(root)
    layout = manifest.layout
    if to != "lists" and not layout.has_topk:
        raise ExportError(
            f"{root}: holds '{layout.kind}' targets, but {to} datasets store top-k ids and log-probs; export "
            "with --to lists (native sample_ids/sample_counts columns), or cache top-k targets (cache.targets: topk)"
        )
    for info in manifest.shards:
        check_shard_file(root, info)  # every shard present, before anything is written
    pattern, writer = WRITERS[to]
    eos_id = _eos_id(root) if to == "nemo" else 0
    with hold_output_dir(out, kind=f"{to}-export", inputs={"cache": root}, overwrite=overwrite):
        (out / EXPORT_MANIFEST).unlink(missing_ok=True)  # an earlier export here is unfinished from now on
        files = []
        for index, info in enumerate(manifest.shards):
            batches = decoded_batches(root, manifest, index, rows_per_batch=rows_per_batch, float64=to == "nemo")
            path = out / pattern.format(index)
            atomic_write(path, lambda tmp, batches=batches: writer(tmp, batches, layout=layout, eos_id=eos_id))
            files.append({"file": path.name, "rows": info.rows, "bytes": path.stat().st_size})
            files[-1]["sha256"] = sha256_file(path)
        _remove_stale(out, pattern, keep={f["file"] for f in files})
        _copy_tokenizer(root, manifest, out)
        usage = _usage(to, out, manifest, files)
        if usage is not None:
            atomic_write_text(out / f"{to}.yaml", usage)
        atomic_write_text(out / EXPORT_MANIFEST, json.dumps(_export_record(to, root, manifest, files), indent=2) + "\n")
    log.info("exported %s (%d rows) as %s to %s", root, manifest.num_rows, to, out)
    return out


def _write_lists(tmp: Path, batches: Iterator[DecodedRows], *, layout: TargetLayout, eos_id: int) -> None:
    with pq.ParquetWriter(tmp, decoded_schema(layout), **PARQUET_OPTIONS) as writer:
        for rows in batches:
            writer.write_table(to_arrow(rows))


def _write_axolotl(tmp: Path, batches: Iterator[DecodedRows], *, layout: TargetLayout, eos_id: int) -> None:
    with pq.ParquetWriter(tmp, AXOLOTL_SCHEMA, **PARQUET_OPTIONS) as writer:
        for rows in batches:
            writer.write_table(axolotl_table(rows))


def _write_nemo(tmp: Path, batches: Iterator[DecodedRows], *, layout: TargetLayout, eos_id: int) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        for rows in batches:
            for line in nemo_lines(rows, eos_id=eos_id):
                f.write(line + "\n")


WRITERS: dict[str, tuple[str, Callable[..., None]]] = {
    "lists": ("part-{:05d}.parquet", _write_lists),
    "axolotl": ("data-{:05d}.parquet", _write_axolotl),
    "nemo": ("kd_with_logits_{}.jsonl", _write_nemo),
}
"""Per format: the file name of cache shard i's rows, and the function that writes them."""


def axolotl_table(rows: DecodedRows) -> pa.Table:
    """Decoded rows -> Axolotl's KD columns (``AXOLOTL_SCHEMA``)."""
    decoded = to_arrow(rows)
    R, T = rows.input_ids.shape
    _, lengths = rows.ragged["topk_ids"]
    last = np.zeros((R, T), bool)
    last[:, -1] = True  # the last position predicts a token outside the row: masked, as Axolotl does
    mask = np.repeat(~last.reshape(-1), lengths).astype(np.int8)  # (n,) one flag per entry
    per_row = pa.array(np.arange(R + 1, dtype=np.int32) * T)
    flat_ids = decoded.column("topk_ids").combine_chunks()
    return pa.Table.from_arrays(
        [
            decoded.column("input_ids"),
            pa.ListArray.from_arrays(per_row, pa.array(np.ones(R * T, np.int8))),
            decoded.column("input_ids"),
            flat_ids,
            decoded.column("topk_logprobs"),
            pa.ListArray.from_arrays(per_row, pa.ListArray.from_arrays(flat_ids.values.offsets, pa.array(mask))),
        ],
        schema=AXOLOTL_SCHEMA,
    )


def nemo_lines(rows: DecodedRows, *, eos_id: int) -> Iterator[str]:
    """Decoded rows (float64 log-probs) -> NeMo-Aligner KD JSONL lines, one per sequence."""
    R, T = rows.input_ids.shape
    ids, lengths = rows.ragged["topk_ids"]
    values, _ = rows.ragged["topk_logprobs"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])  # (R*T+1,) entry offsets per position
    for r in range(R):
        tokens = rows.input_ids[r].tolist()
        positions = range(r * T, (r + 1) * T)
        yield json.dumps(
            {
                "tokens": tokens,
                "labels": tokens[1:] + [eos_id],
                "loss_mask": [1] * (T - 1) + [0],
                "topk_logits": [values[bounds[p] : bounds[p + 1]].tolist() for p in positions],
                "topk_token_ids": [ids[bounds[p] : bounds[p + 1]].tolist() for p in positions],
                "log_sum_exp_logits": [0.0] * T,
                "index": int(rows.seq_index[r]),
            }
        )


def _eos_id(root: Path) -> int:
    """The EOS id of the cache's tokenizer: NeMo pads ``tokens`` and ``labels`` with it."""
    from kdcache.tokenizer import load_tokenizer

    return int(load_tokenizer(root / TOKENIZER_DIR).eos_token_id)


def _remove_stale(out: Path, pattern: str, *, keep: set[str]) -> None:
    """Delete data files of an earlier export into ``out`` (ours: the directory's marker says so) not rewritten now."""
    regex = re.compile(re.escape(pattern).replace(re.escape("{:05d}"), "[0-9]{5}").replace(re.escape("{}"), "[0-9]+"))
    for path in out.iterdir():
        if path.is_file() and regex.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def _copy_tokenizer(root: Path, manifest: Manifest, out: Path) -> None:
    """Copy the cache's ``tokenizer/`` files (each checked against the manifest's sha256) to ``out/tokenizer/``."""
    recorded = manifest.tokenizer.get("files") or {}
    with atomic_dir(out / TOKENIZER_DIR, replace=True) as tmp:
        for name, digest in sorted(recorded.items()):
            source = root / TOKENIZER_DIR / name
            if Path(name).name != name or sha256_file(source) != digest:
                raise CacheError(
                    f"{source}: not the tokenizer file the manifest records (sha256 {digest}); "
                    f"run `kdcache verify {root}` and rebuild or pull the cache"
                )
            shutil.copyfile(source, tmp / name)


def _usage(to: str, out: Path, manifest: Manifest, files: list[dict[str, Any]]) -> str | None:
    """The other tool's settings for these files (``axolotl.yaml`` / ``nemo.yaml``), as YAML text."""
    layout = manifest.layout
    if to == "axolotl":
        settings = {
            "plugins": ["axolotl.integrations.kd.KDPlugin"],
            "kd_trainer": True,
            "kd_temperature": layout.temperature,
            "kd_normalize_topk": True,
            "sequence_len": layout.seq_len,
            "tokenizer_config": str(out / TOKENIZER_DIR),
            "datasets": [{"path": str(out), "ds_type": "parquet", "data_files": [str(out / f["file"]) for f in files]}],
        }
        note = "# Axolotl KD settings for this export (pre-tokenized rows: no dataset `type`).\n"
    elif to == "nemo":
        rows = manifest.targets.get("rows_per_shard", layout.seq_len)
        settings = {
            "model": {
                "data": {
                    "data_impl": "chunked_jsonl",
                    "data_prefix": {"train": [str(out / "kd_with_logits_CHUNK_ID.jsonl")]},
                    "n_chunks": len(files),
                    "n_examples_per_chunk": rows,
                    "seq_length": layout.seq_len,
                },
                "knowledge_distillation": {"target_logits_scale": 1.0},
            }
        }
        note = (
            f"# NeMo-Aligner KD settings for this export; the last chunk holds {files[-1]['rows']} rows.\n"
            f"# topk_logits are log-probs at temperature {layout.temperature}; log_sum_exp_logits are 0, so\n"
            "# 1 - sum(exp(topk_logits - log_sum_exp_logits)) is the teacher's tail (its k+1-th bucket).\n"
        )
    else:
        return None
    return note + yaml.safe_dump(settings, sort_keys=False)


def _export_record(to: str, root: Path, manifest: Manifest, files: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``kdcache_export.json`` says: the source cache's identity and targets, the files, how to read them."""
    return {
        "format": to,
        "created_by": f"kdcache {__version__}",
        "source": {
            "cache": str(root),
            "name": manifest.name,
            "format_version": manifest.format_version,
            "teacher": manifest.teacher,
            "tokenizer": {k: v for k, v in manifest.tokenizer.items() if k != "files"},
            "corpus": manifest.corpus,
            "targets": manifest.targets,
        },
        "alignment": "position j's targets describe the token after input_ids[j] (tokens[j] for nemo)",
        "values": f"log-probabilities of the teacher at temperature {manifest.layout.temperature}, "
        "decoded from the cache's 8-bit codes (their quantization error stays)",
        "tokenizer": TOKENIZER_DIR,
        "files": files,
    }
