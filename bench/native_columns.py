"""Benchmark: Parquet-native list columns vs the v1 blob encoding, on the same cached targets (issue 14).

For each ``--vocabs`` size: a tiny random Llama (its init scale calibrated so its mean entropy is
``--entropy`` nats on random input ids) scores ``--sequences`` x ``--seq-len`` tokens through
``build_cache`` (targets ``both``: top-64 and S=16 samples in one pass). The v1 shard's columns are
split into a top-64 table and a sampled table (each what a ``topk`` / ``sampled`` cache stores), and
re-encoded from the same staged arrays as native columns:

- ``native (issue)``: ids as per-row ``list<uint16|uint32>`` gaps with DELTA_BINARY_PACKED, value
  codes / counts / lengths ``list<uint8>``, tail ``list<uint16>``, input_ids ``list<uint16|uint32>``
- ``native, plain gaps``: the same, gaps PLAIN (zstd sees the gaps, not their differences)
- ``native, BSS gaps``: ids, input_ids and tails BYTE_STREAM_SPLIT (Parquet's own byte planes; a
  uint16 is stored as a 4-byte INT32, so two of its four planes are zeros)
- ``native, BSS gaps + BSS 1-byte codes``: codes, counts and lengths too (their INT32 values' three
  zero planes apart from the byte that matters)
- ``native, absolute ids``: ids as stored values (SQL reads them with no decode), DELTA_BINARY_PACKED
- ``nested, absolute ids``: ``list<list<uint16|uint32>>`` per position (the most readable form)

All with zstd 3, no dictionary, page checksums (``kdcache.cache.format.PARQUET_OPTIONS``). Measured
side by side, one core (``use_threads=False``, Arrow CPU count 1), best of ``--repeat``:
bytes/token of the file (all columns and the footer) and decode tokens/s (Parquet bytes -> the
arrays the reader stages: absolute ids, uint8 codes, uint16 tails, lengths, counts), each decoded
array checked equal to v1's. Prints a table; writes ``bench/results/native_columns.json``.

    python bench/native_columns.py --vocabs 4096,32768 --sequences 128 --seq-len 256 --repeat 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdcache.cache.build import build_cache
from kdcache.cache.codec import decode_gaps, encode_gaps
from kdcache.cache.format import PARQUET_OPTIONS, Manifest, TargetLayout
from kdcache.cache.rows import StagedRows, stage_rows
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens, write_tokens

RESULTS = Path(__file__).parent / "results" / "native_columns.json"
TOP_K, SAMPLES = 64, 16
MIN_DECODE_TOK_S = 1_000_000
MAX_SIZE_RATIO = 1.10
"""The issue's bar for making native columns the format: within 10% of the blob bytes, >= 1M tok/s/core."""


# ----------------------------------------------------------------------------- a cache to measure on


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<eos>")


def random_llama(vocab: int, seq_len: int, std: float) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=seq_len,
        initializer_range=std,
    )
    return LlamaForCausalLM(config).eval()


def entropy_of(model: LlamaForCausalLM, ids: torch.Tensor) -> tuple[float, float]:
    """(mean entropy in nats, mean top-64 mass) of the model's next-token distributions on ``ids``."""
    with torch.no_grad():
        lp = model(ids).logits.float().log_softmax(-1)  # (B, T, V)
    return float(-(lp.exp() * lp).sum(-1).mean()), float(lp.topk(TOP_K, -1).values.exp().sum(-1).mean())


def calibrated_std(vocab: int, seq_len: int, entropy: float) -> float:
    """The init std (bisection on [0.02, 2]) whose random Llama has ``entropy`` nats on random ids."""
    ids = torch.randint(0, vocab, (2, min(seq_len, 128)), generator=torch.Generator().manual_seed(1))
    low, high = 0.02, 2.0
    for _ in range(12):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if entropy_of(random_llama(vocab, seq_len, mid), ids)[0] > entropy else (low, mid)
    return (low * high) ** 0.5


def build(root: Path, *, vocab: int, sequences: int, seq_len: int, entropy: float) -> tuple[Path, dict[str, Any]]:
    """Teacher dir + token data + a ``both`` cache (top-64, S=16) in ``root``; returns (cache, teacher info)."""
    std = calibrated_std(vocab, seq_len, entropy)
    model, tok = random_llama(vocab, seq_len, std), word_tokenizer(vocab)
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    ids = np.random.default_rng(0).integers(2, vocab, size=(sequences + 1, seq_len))
    write_tokens(
        root / "tokens",
        {"train": ids[:sequences], "val": ids[sequences:]},
        vocab_size=vocab,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    teacher = load_teacher(TeacherConfig(path=str(root / "teacher"), device="cpu", dtype="float32"))
    cfg = CacheConfig(targets="both", top_k=TOP_K, samples=SAMPLES, batch_size=8, rows_per_shard=sequences)
    build_cache(teacher, open_tokens(root / "tokens", "train"), cfg, out_dir=root / "cache")
    h, mass = entropy_of(model, torch.from_numpy(ids[:4]))
    return root / "cache", {"vocab": vocab, "init_std": std, "entropy_nats": h, "top64_mass": mass}


# ----------------------------------------------------------------------------- encodings


@dataclass
class Encoding:
    name: str
    encode: Callable[[StagedRows, TargetLayout, str], pa.Table]  # (staged, layout, "topk"|"sampled") -> table
    decode: Callable[[pa.Table, TargetLayout, str], dict[str, np.ndarray]]
    options: dict[str, Any]


def _lists(flat: np.ndarray, per_row: np.ndarray, dtype: np.dtype) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(flat, dtype)))


def _entries(staged: StagedRows, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(entries per position (R*T,), entries per row (R,)) of the ``topk`` or ``sample`` columns."""
    R, T = staged.input_ids.shape
    lengths = staged.arrays[f"{'topk' if prefix == 'topk' else 'sample'}_lengths"].astype(np.int64)
    return lengths, lengths.reshape(R, T).sum(axis=1)


def native_encoder(*, gaps: bool, nested: bool = False) -> Callable[[StagedRows, TargetLayout, str], pa.Table]:
    def encode(staged: StagedRows, layout: TargetLayout, what: str) -> pa.Table:
        R, T = staged.input_ids.shape
        ids_t, a = layout.id_dtype, staged.arrays
        per_pos = np.full(R, T)
        cols = {
            "seq_index": pa.array(staged.seq_index, pa.int64()),
            "input_ids": _lists(staged.input_ids.reshape(-1), per_pos, ids_t),
        }
        prefix = "topk" if what == "topk" else "sample"
        lengths, per_row = _entries(staged, prefix)
        ids = a[f"{prefix}_ids"]
        stored = encode_gaps(ids, lengths) if gaps else ids
        if nested:
            inner = pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), pa.array(stored.astype(ids_t))
            )
            cols[f"{prefix}_ids"] = pa.ListArray.from_arrays(pa.array((np.arange(R + 1) * T).astype(np.int32)), inner)
        else:
            cols[f"{prefix}_ids"] = _lists(stored, per_row, ids_t)
        if what == "topk":
            if layout.adaptive:
                cols["topk_lengths"] = _lists(lengths, per_pos, np.uint8)
            cols["topk_codes"] = _lists(a["topk_codes"], per_row, np.uint8)
            cols["topk_tail"] = _lists(a["topk_tail"], per_pos, np.uint16)
        else:
            cols["sample_lengths"] = _lists(lengths, per_pos, np.uint8)
            cols["sample_counts"] = _lists(a["sample_counts"], per_row, np.uint8)
        return pa.table(cols)

    return encode


def native_decoder(*, gaps: bool, nested: bool = False) -> Callable[[pa.Table, TargetLayout, str], dict]:
    def decode(t: pa.Table, layout: TargetLayout, what: str) -> dict[str, np.ndarray]:
        R, T = t.num_rows, layout.seq_len

        def flat(name: str, *, per_row: np.ndarray | None = None) -> np.ndarray:
            arr = t.column(name).combine_chunks()
            if per_row is not None and not np.array_equal(np.diff(arr.offsets.to_numpy()), per_row):
                raise ValueError(f"{name}: rows of the wrong length")
            values = arr.values
            return (values.values if nested and name in ("topk_ids", "sample_ids") else values).to_numpy()

        out = {"input_ids": flat("input_ids", per_row=np.full(R, T))}
        prefix = "topk" if what == "topk" else "sample"
        if what == "topk":
            adaptive = layout.adaptive
            lengths = flat("topk_lengths", per_row=np.full(R, T)) if adaptive else np.full(R * T, layout.top_k)
            per_row = lengths.reshape(R, T).sum(axis=1)
            out |= {"topk_codes": flat("topk_codes", per_row=per_row), "topk_tail": flat("topk_tail")}
        else:
            lengths = flat("sample_lengths", per_row=np.full(R, T))
            per_row = lengths.reshape(R, T).sum(axis=1)
            out["sample_counts"] = flat("sample_counts", per_row=per_row)
        ids = flat(f"{prefix}_ids", per_row=None if nested else per_row)
        out[f"{prefix}_ids"] = decode_gaps(ids, lengths, layout.id_dtype) if gaps else ids
        out[f"{prefix}_lengths"] = lengths
        return out

    return decode


def v1_encode(staged: StagedRows, layout: TargetLayout, what: str) -> pa.Table:
    raise AssertionError("v1 tables are the cache's own shard columns")


def v1_decode(t: pa.Table, layout: TargetLayout, what: str) -> dict[str, np.ndarray]:
    staged = stage_rows(layout, t)
    return {"input_ids": staged.input_ids.reshape(-1), **staged.arrays}


def encodings(layout: TargetLayout) -> list[Encoding]:
    delta = {"input_ids": "PLAIN", "topk_ids": "DELTA_BINARY_PACKED", "sample_ids": "DELTA_BINARY_PACKED"}
    plain = dict.fromkeys(delta, "PLAIN")
    bss = dict.fromkeys(["input_ids", "topk_ids", "sample_ids", "topk_tail"], "BYTE_STREAM_SPLIT")
    bss_all = bss | dict.fromkeys(
        ["topk_codes", "topk_lengths", "sample_lengths", "sample_counts"], "BYTE_STREAM_SPLIT"
    )
    base = {k: v for k, v in PARQUET_OPTIONS.items() if k != "use_dictionary"} | {"use_dictionary": False}
    return [
        Encoding("v1 blobs (byte planes, gaps)", v1_encode, v1_decode, dict(PARQUET_OPTIONS)),
        Encoding(
            "native (issue): gaps DELTA",
            native_encoder(gaps=True),
            native_decoder(gaps=True),
            base | {"column_encoding": delta},
        ),
        Encoding(
            "native, plain gaps",
            native_encoder(gaps=True),
            native_decoder(gaps=True),
            base | {"column_encoding": plain},
        ),
        Encoding(
            "native, BSS gaps", native_encoder(gaps=True), native_decoder(gaps=True), base | {"column_encoding": bss}
        ),
        Encoding(
            "native, BSS gaps + BSS 1-byte codes",
            native_encoder(gaps=True),
            native_decoder(gaps=True),
            base | {"column_encoding": bss_all},
        ),
        Encoding(
            "native, absolute ids DELTA",
            native_encoder(gaps=False),
            native_decoder(gaps=False),
            base | {"column_encoding": delta},
        ),
        Encoding(
            "nested list<list>, absolute ids DELTA",
            native_encoder(gaps=False, nested=True),
            native_decoder(gaps=False, nested=True),
            base | {"column_encoding": delta},
        ),
    ]


# ----------------------------------------------------------------------------- measurement


def column_subset(shard: pa.Table, layout: TargetLayout, what: str) -> tuple[pa.Table, TargetLayout]:
    """The columns (and layout) a ``topk`` or ``sampled`` cache of the same targets would store."""
    d = layout.to_dict()
    d |= {"kind": "topk", "samples": 0, "seed": 0} if what == "topk" else {"kind": "sampled", "top_k": 0, "mass": 0.0}
    sub = TargetLayout.from_dict(d)
    return shard.select(sub.columns()).cast(sub.schema()), sub


def leaf_path(field: pa.Field) -> str:
    """A column's Parquet leaf path: pyarrow's ``column_encoding`` silently ignores a list column's plain name."""
    path, kind = field.name, field.type
    while pa.types.is_list(kind):
        path, kind = f"{path}.list.element", kind.value_type
    return path


def to_bytes(table: pa.Table, options: dict[str, Any]) -> tuple[bytes, dict[str, list[str]]]:
    """Parquet bytes of ``table``, and the encodings each column really got (read back from the footer)."""
    wanted = options.get("column_encoding", {})
    leaves = {leaf_path(f): wanted[f.name] for f in table.schema if f.name in wanted}
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=1 << 20, **(options | ({"column_encoding": leaves} if wanted else {})))
    meta = pq.ParquetFile(pa.BufferReader(sink.getvalue())).metadata.row_group(0)
    used = {
        meta.column(i).path_in_schema.split(".")[0]: list(meta.column(i).encodings) for i in range(meta.num_columns)
    }
    for name, encoding in wanted.items():
        if name in used and encoding not in used[name]:
            raise AssertionError(f"{name}: asked for {encoding}, the file has {used[name]}")
    return sink.getvalue(), used


def measure_all(
    tables: list[tuple[Encoding, pa.Table]], layout: TargetLayout, what: str, repeat: int, want: dict
) -> list[dict[str, Any]]:
    """Bytes and best-of-``repeat`` decode time of each encoding; the repetitions are interleaved across
    encodings, so a busy machine slows them alike and the ratios to v1 stay fair."""
    files = [(enc, *to_bytes(table, enc.options)) for enc, table in tables]
    best = [float("inf")] * len(files)
    for _ in range(repeat):
        for i, (enc, data, _) in enumerate(files):
            t0 = time.perf_counter()
            got = enc.decode(pq.read_table(pa.BufferReader(data), use_threads=False), layout, what)
            best[i] = min(best[i], time.perf_counter() - t0)
            for key, value in want.items():  # the same arrays as v1's, or the comparison means nothing
                assert np.array_equal(np.asarray(got[key]).astype(np.int64), value.astype(np.int64)), (enc.name, key)
    tokens = tables[0][1].num_rows * layout.seq_len
    return [
        {
            "encoding": enc.name,
            "bytes": len(data),
            "bytes_per_token": len(data) / tokens,
            "decode_tok_s": tokens / t,
            "parquet_encodings": used,
        }
        for (enc, data, used), t in zip(files, best, strict=True)
    ]


def run_vocab(vocab: int, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache, info = build(
            Path(tmp), vocab=vocab, sequences=args.sequences, seq_len=args.seq_len, entropy=args.entropy
        )
        info["build_s"] = time.perf_counter() - t0
        manifest = Manifest.load(cache)
        shard = pq.read_table(cache / manifest.shards[0].file)
    rows = []
    for what, label in (("topk", f"top-{TOP_K}"), ("sampled", f"sampled S={SAMPLES}")):
        table, layout = column_subset(shard, manifest.layout, what)
        staged = stage_rows(layout, table)
        tables = [
            (enc, table if enc.encode is v1_encode else enc.encode(staged, layout, what)) for enc in encodings(layout)
        ]
        measured = measure_all(tables, layout, what, args.repeat, v1_decode(table, layout, what))
        for r in measured:
            r |= {
                "size_vs_v1": r["bytes_per_token"] / measured[0]["bytes_per_token"],
                "decode_vs_v1": r["decode_tok_s"] / measured[0]["decode_tok_s"],
            }
            r["meets_bar"] = r["size_vs_v1"] <= MAX_SIZE_RATIO and r["decode_tok_s"] >= MIN_DECODE_TOK_S
            rows.append({"vocab": vocab, "targets": label} | r)
    return info, rows


def table_text(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("vocab", "vocab", ""),
        ("targets", "targets", ""),
        ("encoding", "encoding", ""),
        ("bytes/token", "bytes_per_token", ".2f"),
        ("size vs v1", "size_vs_v1", ".3f"),
        ("decode tok/s/core", "decode_tok_s", ",.0f"),
        ("decode vs v1", "decode_vs_v1", ".2f"),
        ("≤ +10% and ≥ 1M tok/s", "meets_bar", ""),
    ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            format(r[key], fmt) if fmt else ("yes" if r[key] is True else "no" if r[key] is False else str(r[key]))
            for _, key, fmt in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="4096,32768")
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--entropy", type=float, default=5.3, help="teacher mean entropy, nats (5-minute teacher: 5.26)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    teachers, rows = [], []
    for vocab in (int(v) for v in args.vocabs.split(",") if v):
        info, vocab_rows = run_vocab(vocab, args)
        teachers.append(info)
        rows += vocab_rows
        print(
            f"vocab {vocab}: init std {info['init_std']:.3f}, entropy {info['entropy_nats']:.2f} nats, "
            f"top-64 mass {info['top64_mass']:.3f}, built in {info['build_s']:.0f} s"
        )
    print("\n" + table_text(rows))
    out = {
        "command": "python bench/native_columns.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": 1,
            "pyarrow": pa.__version__,
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "bar": {"max_size_vs_v1": MAX_SIZE_RATIO, "min_decode_tok_s": MIN_DECODE_TOK_S},
        "teachers": teachers,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
