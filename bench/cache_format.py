"""Benchmark: cache encodings side by side on a real teacher's soft targets.

Scores ``--sequences`` train sequences with the teacher once (fp32 log-softmax, the exact tail mass
beyond the top ``max(k)`` in float64, sampled draws through ``kdcache.cache.targets.sparsify``), then
for every encoding candidate and k / mass / S measures, in one run:

- bytes/token of one Parquet shard (``--sequences`` rows, all columns incl. input_ids and footer)
- encode tokens/s (targets -> Parquet bytes; v1 gets ids in ascending order, as ``sparsify`` sorts
  them on the device) and stage tokens/s (Parquet bytes -> the arrays a reader memory-maps: ids
  absolute, values still codes), one core, best of ``--repeat``
- fidelity of what the loss sees: mean KL(p_stored || p_fp32) per token on the coarse (kept ids +
  tail) distribution, with the stored tail taken as the loss takes it (1 - sum of decoded
  probabilities, float64), and the max abs error of stored probabilities (entries and tail)
- the tail mass (mean p_tail) and kept entries per position

Then the chosen format end to end (``kdcache.cache.format`` through a real cache directory and
``open_cache``): staging to Arrow IPC and batch assembly tokens/s, vs the trainer's tokens/s from
``bench/results/train_step.json``. Prints markdown tables; writes ``bench/results/cache_format.json``.

    python bench/cache_format.py --teacher models/demo-teacher --tokens data/tokens

``--only values`` measures the top-k value encodings instead (``targets.value_encoding``: abs8, rel8, log32, plus
rank-ordered deltas and zstd 6 ids): bytes per column, KL and re-tempered probabilities / tails at tau 0.5, 2, 4
against the float64 dense log-softmax, encode / stage / decode tokens/s -> ``bench/results/value_codes.json``.
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
import zstandard

from kdcache.cache import codec
from kdcache.cache import format as cf
from kdcache.cache import rows as rows_mod
from kdcache.cache.format import SequenceTargets, TargetLayout
from kdcache.cache.targets import sparsify
from kdcache.config.teacher import TeacherConfig
from kdcache.teacher import load_teacher, teacher_logits
from kdcache.token_data import open_tokens

RESULTS = Path(__file__).parent / "results" / "cache_format.json"
VALUE_RESULTS = Path(__file__).parent / "results" / "value_codes.json"
BASE_OPTS = {"compression": "zstd", "use_dictionary": False, "write_page_checksum": True}


# ----------------------------------------------------------------------------- teacher targets


@dataclass
class Scored:
    """Teacher outputs for R sequences of T tokens (P = R*T positions)."""

    input_ids: np.ndarray  # (R, T) int64
    ids: np.ndarray  # (P, K) int64 top-K ids, descending probability
    lp: np.ndarray  # (P, K) float32 fp32 log-softmax values
    log_tail: np.ndarray  # (P,) float64 log of the mass outside the top K
    lp64: np.ndarray  # (P, K) float64 log-softmax of the same logits (the dense reference)
    log_z: np.ndarray  # (len(TAUS), P) float64 logsumexp_v(log p_v / tau), full vocabulary
    tail_tau: dict[tuple[int, float], np.ndarray]  # (k, tau) -> (P,) float64 log of the tempered mass outside the top k
    entropy: np.ndarray  # (P,) float32 nats
    samples: dict[int, tuple[np.ndarray, np.ndarray]]  # S -> (ids (P, S), counts (P, S)) padded with count 0
    vocab: int


TAUS = (0.5, 2.0, 4.0)
"""Re-tempering temperatures checked against the dense float64 computation (tau0 = 1)."""


def score(
    teacher_path: str,
    tokens_dir: str,
    *,
    sequences: int,
    k_max: int,
    samples: list[int],
    batch_size: int = 8,
    ks: tuple[int, ...] = (),
) -> Scored:
    teacher = load_teacher(TeacherConfig(path=teacher_path, device="cpu", dtype="float32"))
    split = open_tokens(tokens_dir, "train")
    ids_all = np.asarray(split.ids[:sequences], dtype=np.int64)  # (R, T)
    R, T = ids_all.shape
    V = split.vocab_size
    parts: dict[str, list] = {"ids": [], "lp": [], "tail": [], "ent": [], "lp64": [], "logz": []}
    tails: dict[tuple[int, float], list] = {(k, t): [] for k in ks for t in TAUS}
    sampled: dict[int, list] = {s: [] for s in samples}
    for b0 in range(0, R, batch_size):
        batch = torch.from_numpy(ids_all[b0 : b0 + batch_size])
        logits = teacher_logits(teacher, batch)[..., :V].float()  # (B, T, V)
        lp = torch.log_softmax(logits, dim=-1).reshape(-1, V)  # (n, V) fp32
        top_lp, top_ids = lp.topk(k_max, dim=-1)  # (n, K)
        rest = lp.double().scatter(1, top_ids, float("-inf")).logsumexp(-1)  # (n,) exact tail, float64
        parts["ids"].append(top_ids.numpy())
        parts["lp"].append(top_lp.numpy())
        parts["tail"].append(rest.numpy())
        parts["ent"].append(-(lp.exp() * lp).sum(-1).numpy())
        lp64 = torch.log_softmax(logits.double(), dim=-1).reshape(-1, V)  # the float64 dense reference
        parts["lp64"].append(lp64.gather(1, top_ids).numpy())
        parts["logz"].append(torch.stack([(lp64 / t).logsumexp(-1) for t in TAUS]).numpy())
        for k in ks:
            for t in TAUS:  # tempered mass outside the top k, exactly
                rest_t = (lp64 / t).scatter(1, top_ids[:, :k], float("-inf")).logsumexp(-1)
                tails[(k, t)].append((rest_t - (lp64 / t).logsumexp(-1)).numpy())
        seqs = torch.arange(b0, b0 + len(batch))
        for s in samples:
            lay = TargetLayout(kind="sampled", vocab_size=V, seq_len=T, samples=s, seed=0)
            out = sparsify(logits, layout=lay, seq_indices=seqs)
            sampled[s].append((out["sample_ids"].reshape(-1, s).numpy(), out["sample_counts"].reshape(-1, s).numpy()))
    return Scored(
        input_ids=ids_all,
        ids=np.concatenate(parts["ids"]).astype(np.int64),
        lp=np.concatenate(parts["lp"]),
        log_tail=np.concatenate(parts["tail"]),
        lp64=np.concatenate(parts["lp64"]),
        log_z=np.concatenate(parts["logz"], axis=1),
        tail_tau={key: np.concatenate(v) for key, v in tails.items()},
        entropy=np.concatenate(parts["ent"]),
        samples={s: tuple(np.concatenate([p[i] for p in v]) for i in (0, 1)) for s, v in sampled.items()},
        vocab=V,
    )


@dataclass
class TopK:
    """One top-k setting: the kept entries per position and the exact tail."""

    name: str
    k: int
    ids: np.ndarray  # (P, k) descending probability; padding id 0
    lp: np.ndarray  # (P, k) float32; -inf padding
    lengths: np.ndarray  # (P,) int64
    log_tail: np.ndarray  # (P,) float64
    mass: float = 0.0
    lp64: np.ndarray | None = None  # (P, k) float64 reference log-probs (-inf padding)

    def __post_init__(self) -> None:
        keep = np.arange(self.k)[None, :] < self.lengths[:, None]
        order = np.argsort(np.where(keep, self.ids, np.iinfo(np.int64).max), axis=1, kind="stable")
        self.sorted_ids = np.take_along_axis(self.ids, order, 1)
        self.sorted_lp = np.take_along_axis(self.lp, order, 1)
        self.sorted_lp64 = None if self.lp64 is None else np.take_along_axis(self.lp64, order, 1)


def topk_setting(sc: Scored, k: int, mass: float = 0.0) -> TopK:
    lp = sc.lp[:, :k].astype(np.float64)
    lengths = np.full(len(lp), k, np.int64)
    if mass > 0:
        lengths = np.minimum((np.cumsum(np.exp(lp), axis=1) < mass).sum(axis=1) + 1, k)
    drop = np.arange(sc.lp.shape[1])[None, :] >= lengths[:, None]  # (P, K) entries in the tail
    with np.errstate(divide="ignore"):
        log_tail = np.logaddexp(sc.log_tail, np.log(np.where(drop, np.exp(sc.lp.astype(np.float64)), 0).sum(1)))
    pad = np.arange(k)[None, :] >= lengths[:, None]
    return TopK(
        name=f"top{k}" + (f"-m{mass:g}" if mass else ""),
        k=k,
        ids=np.where(pad, 0, sc.ids[:, :k]),
        lp=np.where(pad, -np.inf, sc.lp[:, :k]).astype(np.float32),
        lengths=lengths,
        log_tail=log_tail,
        mass=mass,
        lp64=np.where(pad, -np.inf, sc.lp64[:, :k]),
    )


# ----------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    name: str
    encode: Callable[[TopK, np.ndarray], pa.Table]  # (setting, input_ids (R, T)) -> table
    decode: Callable[[pa.Table, TopK], tuple[np.ndarray, np.ndarray]]  # -> ids (P, k), lp (P, k) float32 (-inf pad)
    options: dict[str, Any]
    stage: Callable[[pa.Table, TopK], Any] | None = None  # table -> what a reader maps (None: zero-copy blobs)


def _blob_views(t: pa.Table, s: TopK) -> list[np.ndarray]:
    """Staging of the plain-blob candidates: every blob column as one zero-copy byte view."""
    out = []
    for name in t.column_names[1:]:
        arr = t.column(name).combine_chunks()
        out.append(np.frombuffer(arr.buffers()[2], np.uint8))
    return out


def _rows_table(cols: dict[str, list], types: dict[str, pa.DataType] | None = None) -> pa.Table:
    types = types or {}
    return pa.table(
        {c: pa.array(v, type=types.get(c, pa.int64() if c == "seq_index" else pa.binary())) for c, v in cols.items()}
    )


def _per_row(a: np.ndarray, R: int) -> list[np.ndarray]:
    return np.split(a, R) if len(a) else [a] * R


def naive_candidate(id_dtype: str, value: str) -> Candidate:
    """Ids in probability order, values as fp16 log-probs or uint16 -logprob*2048 (the pre-v1 format)."""

    def encode(s: TopK, input_ids: np.ndarray) -> pa.Table:
        R = len(input_ids)
        vals = (
            s.lp.astype(np.float16)
            if value == "fp16"
            else np.clip(np.rint(-s.lp.astype(np.float64) * 2048), 0, 65535).astype("<u2")
        )
        return _rows_table(
            {
                "seq_index": list(range(R)),
                "input_ids": [r.astype(id_dtype).tobytes() for r in input_ids],
                "topk_ids": [r.tobytes() for r in _per_row(s.ids.astype(id_dtype), R)],
                "topk_logprobs": [r.tobytes() for r in _per_row(vals, R)],
            }
        )

    def decode(t: pa.Table, s: TopK) -> tuple[np.ndarray, np.ndarray]:
        ids = np.frombuffer(b"".join(t.column("topk_ids").to_pylist()), id_dtype).reshape(-1, s.k)
        raw = b"".join(t.column("topk_logprobs").to_pylist())
        lp = (
            np.frombuffer(raw, np.float16).astype(np.float32)
            if value == "fp16"
            else np.frombuffer(raw, "<u2") * np.float32(-1 / 2048)
        )
        return ids.astype(np.int64), lp.reshape(-1, s.k)

    name = f"{'int32' if id_dtype == '<i4' else 'uint16'} ids + {value}"
    return Candidate(name, encode, decode, dict(BASE_OPTS))


def list_candidate() -> Candidate:
    """Parquet-native: list<int32> ids (sorted, DELTA_BINARY_PACKED) + list<float16> (BYTE_STREAM_SPLIT)."""

    def encode(s: TopK, input_ids: np.ndarray) -> pa.Table:
        order = np.argsort(s.ids, axis=1)
        ids, lp = (
            np.take_along_axis(s.ids, order, 1).astype(np.int32),
            np.take_along_axis(s.lp, order, 1).astype(np.float16),
        )
        R, T = input_ids.shape
        return pa.table(
            {
                "seq_index": pa.array(range(R), pa.int64()),
                "input_ids": pa.array(list(input_ids.astype(np.int32)), pa.list_(pa.int32())),
                "topk_ids": pa.array(list(ids.reshape(R, -1)), pa.list_(pa.int32())),
                "topk_logprobs": pa.array(list(lp.reshape(R, -1)), pa.list_(pa.float16())),
            }
        )

    def decode(t: pa.Table, s: TopK) -> tuple[np.ndarray, np.ndarray]:
        ids = t.column("topk_ids").combine_chunks().values.to_numpy().reshape(-1, s.k)
        lp = t.column("topk_logprobs").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.float32)
        return ids.astype(np.int64), lp.reshape(-1, s.k)

    opts = dict(
        BASE_OPTS,
        column_encoding={
            "topk_ids": "DELTA_BINARY_PACKED",
            "topk_logprobs": "BYTE_STREAM_SPLIT",
            "input_ids": "DELTA_BINARY_PACKED",
        },
    )
    return Candidate("lists: int32 DELTA ids + fp16 BSS", encode, decode, opts, stage=decode)


def gap_candidate(
    name: str,
    *,
    values: str,
    gamma: float = cf.VALUE_GAMMA,
    levels: int = 255,
    planes: bool = True,
    level: int | None = None,
) -> Candidate:
    """Sorted, gap-coded ids (+/- byte planes) with ``values``: 'u16abs' | 'pow' (uint8 companded) | 'loglin'."""
    pack = cf.to_planes if planes else (lambda a: np.ascontiguousarray(a).tobytes())
    unpack = cf.from_planes if planes else (lambda b, dt, where="": np.frombuffer(b, dt))
    step = 1 / 16  # 'loglin': uniform steps of 1/16 nat below the position's max, 255 levels (16 nats)

    def encode(s: TopK, input_ids: np.ndarray) -> pa.Table:
        R, T = input_ids.shape
        keep = np.arange(s.k)[None, :] < s.lengths[:, None]
        key = np.where(keep, s.ids, s.ids.max() + 1 + np.arange(s.k))
        order = np.argsort(key, axis=1)
        ids = np.take_along_axis(s.ids, order, 1)[keep]
        lp = np.take_along_axis(s.lp, order, 1)[keep].astype(np.float64)
        gaps = cf.encode_gaps(ids, s.lengths).astype("<u2")
        if values == "u16abs":
            vals = np.clip(np.rint(-lp * 2048), 0, 65535).astype("<u2")
        elif values == "pow":
            vals, _ = cf.encode_values(lp, s.lengths, gamma=gamma, levels=levels)
        else:
            top = np.maximum.reduceat(lp, cf.segment_starts(s.lengths))
            vals = np.clip(np.rint((np.repeat(top, s.lengths) - lp) / step), 0, 255).astype(np.uint8)
        log_mass = np.logaddexp.reduceat(lp, cf.segment_starts(s.lengths))
        per_row = s.lengths.reshape(R, T).sum(1)
        cuts = np.cumsum(per_row)[:-1]
        cols = {
            "seq_index": list(range(R)),
            "input_ids": [pack(r.astype("<u2")) for r in input_ids],
            "topk_ids": [pack(r) for r in np.split(gaps, cuts)],
            "topk_codes": [pack(r) for r in np.split(vals, cuts)],
        }
        if values != "u16abs":
            cols["topk_tail"] = [pack(r) for r in np.split(cf.encode_tail(s.log_tail, log_mass), R)]
        if s.mass:
            cols["topk_lengths"] = [r.astype(np.uint8).tobytes() for r in np.split(s.lengths, R)]
        return _rows_table(cols)

    def decode(t: pa.Table, s: TopK) -> tuple[np.ndarray, np.ndarray]:
        lengths = (
            np.frombuffer(b"".join(t.column("topk_lengths").to_pylist()), np.uint8).astype(np.int64)
            if s.mass
            else np.full(len(s.lengths), s.k, np.int64)
        )
        gaps = np.concatenate([unpack(b, np.dtype("<u2")) for b in t.column("topk_ids").to_pylist()])
        ids = cf.decode_gaps(gaps, lengths, np.dtype("<u2"))
        vdt = np.dtype("<u2") if values == "u16abs" else np.dtype("u1")
        codes = np.concatenate([unpack(b, vdt) for b in t.column("topk_codes").to_pylist()])
        if values == "u16abs":
            lp = codes * np.float32(-1 / 2048)
        else:
            tail = np.concatenate([unpack(b, np.dtype("<u2")) for b in t.column("topk_tail").to_pylist()])
            if values == "pow":
                rel, exp_rel = cf.value_table(gamma, levels)
            else:
                rel = (-step * np.arange(256)).astype(np.float32)
                exp_rel = np.exp(rel.astype(np.float64))
            offsets = cf.decode_log_mass(tail) - np.log(np.add.reduceat(exp_rel[codes], cf.segment_starts(lengths)))
            lp = (rel[codes] + np.repeat(offsets, lengths).astype(np.float32)).astype(np.float32)
        return (cf.padded(ids.astype(np.int64), lengths, s.k, 0), cf.padded(lp, lengths, s.k, -np.inf))

    def stage(t: pa.Table, s: TopK) -> list[np.ndarray]:
        lengths = (
            np.frombuffer(t.column("topk_lengths").combine_chunks().buffers()[2], np.uint8)
            if s.mass
            else np.full(len(s.lengths), s.k, np.int64)
        )
        gaps = np.concatenate([unpack(b, np.dtype("<u2")) for b in t.column("topk_ids").to_pylist()])
        return [cf.decode_gaps(gaps, lengths, np.dtype("<u2")), *_blob_views(t.select(["seq_index", "topk_codes"]), s)]

    opts = dict(BASE_OPTS, compression_level=level or cf.PARQUET_OPTIONS["compression_level"])
    return Candidate(name, encode, decode, opts, stage=stage)


def v1_candidate(
    level: int | dict[str, int] | None = None, encoding: str = cf.VALUE_ENCODING, name: str = ""
) -> Candidate:
    """The chosen format, through ``kdcache.cache.format`` itself (encode_table / stage_rows), with the value
    ``encoding`` (``targets.value_encoding``) and zstd ``level`` (an int, or per column)."""

    def layout(s: TopK, T: int, V: int) -> TargetLayout:
        return TargetLayout(kind="topk", vocab_size=V, seq_len=T, top_k=s.k, mass=s.mass, value_encoding=encoding)

    def encode(s: TopK, input_ids: np.ndarray) -> pa.Table:
        R, T = input_ids.shape
        ids, lp = s.sorted_ids, s.sorted_lp  # ascending ids, as targets.sparsify hands them to the writer
        rows = [
            SequenceTargets(
                seq_index=r,
                input_ids=input_ids[r],
                topk_ids=ids[r * T : (r + 1) * T],
                topk_logprobs=lp[r * T : (r + 1) * T],
                topk_lengths=s.lengths[r * T : (r + 1) * T],
                topk_log_tail=s.log_tail[r * T : (r + 1) * T],
            )
            for r in range(R)
        ]
        return rows_mod.encode_table(layout(s, T, VOCAB), rows)

    def decode(t: pa.Table, s: TopK) -> tuple[np.ndarray, np.ndarray]:
        lay = layout(s, len(s.lengths) // t.num_rows, VOCAB)
        st = rows_mod.stage_rows(lay, t)
        a, n = st.arrays, st.arrays["topk_lengths"]
        keep = np.arange(s.k)[None, :] < n[:, None]
        lp = cf.decode_topk_logprobs(cf.padded(a["topk_codes"], n, s.k, 0), a["topk_tail"], keep, encoding=encoding)
        return cf.padded(a["topk_ids"].astype(np.int64), n, s.k, 0), lp

    def stage(t: pa.Table, s: TopK) -> rows_mod.StagedRows:
        return rows_mod.stage_rows(layout(s, len(s.lengths) // t.num_rows, VOCAB), t)

    opts = dict(cf.PARQUET_OPTIONS) | ({"compression_level": level} if level else {})
    return Candidate(name or f"v1 (zstd {opts['compression_level']})", encode, decode, opts, stage=stage)


VOCAB = 0  # set from the scored data before candidates run


# ----------------------------------------------------------------------------- measurement


def write_parquet(table: pa.Table, options: dict[str, Any]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=1 << 20, **options)
    return sink.getvalue()


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def fidelity(s: TopK, ids: np.ndarray, lp: np.ndarray) -> dict[str, float]:
    """Mean KL(stored || fp32) on the coarse distribution and max |dp| (entries and tail), as the loss sees it."""
    V = VOCAB
    keep = np.arange(s.k)[None, :] < s.lengths[:, None]

    def by_id(i: np.ndarray, v: np.ndarray, kp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        o = np.argsort(np.where(kp, i, V + np.arange(s.k)), axis=1)
        return np.take_along_axis(i, o, 1), np.take_along_axis(v, o, 1)

    true_ids, true_lp = by_id(s.ids, s.lp.astype(np.float64) if s.lp64 is None else s.lp64, keep)  # float64 dense
    got_ids, got_lp = by_id(ids, lp.astype(np.float64), np.isfinite(lp))
    if not np.array_equal(np.where(keep, true_ids, -1), np.where(keep, got_ids, -1)):
        raise AssertionError(f"{s.name}: decoded ids differ from the encoded ids")
    p, q = np.where(keep, np.exp(true_lp), 0.0), np.where(keep, np.exp(got_lp), 0.0)  # q = stored
    t_true, t_got = np.exp(s.log_tail), np.clip(1.0 - q.sum(1), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * (np.log(q) - np.log(p)), 0.0).sum(1)
        kl += np.where(t_got > 0, t_got * (np.log(t_got) - np.log(t_true)), 0.0)
    return {
        "kl": float(kl.mean()),
        "max_abs_dp": float(max(np.abs(q - p).max(), np.abs(t_got - t_true).max())),
        "max_abs_dp_tail": float(np.abs(t_got - t_true).max()),
    }


def measure_topk(c: Candidate, s: TopK, input_ids: np.ndarray, repeat: int) -> dict[str, Any]:
    n_tok = input_ids.size
    enc_s, blob = best_time(lambda: write_parquet(c.encode(s, input_ids), c.options), repeat)
    stage = c.stage or _blob_views
    dec_s, _ = best_time(lambda: stage(pq.read_table(pa.BufferReader(blob), use_threads=False), s), repeat)
    ids, lp = c.decode(pq.read_table(pa.BufferReader(blob)), s)
    return {
        "candidate": c.name,
        "setting": s.name,
        "bytes_per_token": len(blob) / n_tok,
        "encode_tok_s": n_tok / enc_s,
        "stage_tok_s": n_tok / dec_s,
        **fidelity(s, ids, lp),
        "tail_mass": float(np.exp(s.log_tail).mean()),
        "entries_per_token": float(s.lengths.mean()),
    }


def measure_raw_frames(s: TopK, input_ids: np.ndarray, level: int, repeat: int) -> dict[str, Any]:
    """The v1 blobs per column, concatenated and compressed as one zstd frame each (no Parquet)."""
    table = v1_candidate().encode(s, input_ids)
    cols = {c: b"".join(table.column(c).to_pylist()) for c in table.column_names if c != "seq_index"}
    cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    enc_s, frames = best_time(lambda: {c: cctx.compress(v) for c, v in cols.items()}, repeat)
    dec_s, _ = best_time(lambda: {c: dctx.decompress(f) for c, f in frames.items()}, repeat)
    n_tok = input_ids.size
    return {
        "candidate": f"v1 blobs as raw zstd frames (level {level})",
        "setting": s.name,
        "bytes_per_token": (sum(len(f) for f in frames.values()) + 8 * len(input_ids)) / n_tok,
        "encode_tok_s": n_tok / enc_s,
        "decompress_only_tok_s": n_tok / dec_s,
    }


def measure_sampled(sc: Scored, S: int, repeat: int) -> list[dict[str, Any]]:
    R, T = sc.input_ids.shape
    ids, counts = sc.samples[S]
    lay = TargetLayout(kind="sampled", vocab_size=sc.vocab, seq_len=T, samples=S)
    rows = [
        SequenceTargets(
            seq_index=r,
            input_ids=sc.input_ids[r],
            sample_ids=ids[r * T : (r + 1) * T],
            sample_counts=counts[r * T : (r + 1) * T],
        )
        for r in range(R)
    ]
    n_tok, out = sc.input_ids.size, []
    enc_s, blob = best_time(lambda: write_parquet(rows_mod.encode_table(lay, rows), cf.PARQUET_OPTIONS), repeat)
    dec_s, _ = best_time(
        lambda: rows_mod.stage_rows(lay, pq.read_table(pa.BufferReader(blob), use_threads=False)), repeat
    )
    unique = float((counts > 0).sum(1).mean())
    out.append(
        {
            "candidate": "v1",
            "setting": f"S={S}",
            "bytes_per_token": len(blob) / n_tok,
            "encode_tok_s": n_tok / enc_s,
            "stage_tok_s": n_tok / dec_s,
            "entries_per_token": unique,
        }
    )
    keep = counts > 0  # naive: int32 ids + uint16 counts, unique entries only, plus uint16 lengths
    lengths = keep.sum(1)
    per_row = np.cumsum(lengths.reshape(R, T).sum(1))[:-1]
    naive = _rows_table(
        {
            "seq_index": list(range(R)),
            "input_ids": [r.astype("<i4").tobytes() for r in sc.input_ids],
            "sample_lengths": [r.astype("<u2").tobytes() for r in np.split(lengths, R)],
            "sample_ids": [r.tobytes() for r in np.split(ids[keep].astype("<i4"), per_row)],
            "sample_counts": [r.tobytes() for r in np.split(counts[keep].astype("<u2"), per_row)],
        }
    )
    out.append(
        {
            "candidate": "int32 ids + uint16 counts",
            "setting": f"S={S}",
            "bytes_per_token": len(write_parquet(naive, BASE_OPTS)) / n_tok,
            "entries_per_token": unique,
        }
    )
    return out


def loader_throughput(sc: Scored, s: TopK, *, batch_size: int, repeat: int) -> dict[str, float]:
    """The chosen format through a real cache dir: stage (Parquet -> Arrow IPC, sha-checked) and batches."""
    from kdcache.cache.reader import open_cache
    from kdcache.fingerprint import sha256_file

    R, T = sc.input_ids.shape
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        root.mkdir()
        path = root / "shard-00000.parquet"
        path.write_bytes(write_parquet(v1_candidate().encode(s, sc.input_ids), cf.PARQUET_OPTIONS))
        lay = TargetLayout(kind="topk", vocab_size=VOCAB, seq_len=T, top_k=s.k, mass=s.mass)
        shard = cf.ShardInfo(file=path.name, rows=R, tokens=R * T, bytes=path.stat().st_size, sha256=sha256_file(path))
        manifest = cf.Manifest(
            name="bench",
            teacher={},
            tokenizer={"fingerprint": "x", "vocab_size": VOCAB},
            corpus={},
            targets=lay.to_dict(),
            shards=[shard],
        )
        (root / cf.MANIFEST_NAME).write_text(manifest.to_json())
        stage_times = []
        for i in range(repeat):
            t0 = time.perf_counter()
            with open_cache(root, staging_dir=Path(tmp) / f"staging{i}", prefetch=0) as reader:
                reader[0]  # stages the shard
            stage_times.append(time.perf_counter() - t0)
        with open_cache(root, staging_dir=Path(tmp) / "staging0", prefetch=0) as reader:
            batch_s, n = best_time(
                lambda: sum(b["input_ids"].numel() for b in reader.batches(batch_size, seed=0)), repeat
            )
    return {"stage_tok_s": R * T / min(stage_times), "batch_tok_s": n / batch_s}


# ----------------------------------------------------------------------------- value encodings (issue 12.7, 10)


def rank_candidate() -> Candidate:
    """Rank-ordered deltas: ids in descending-probability order (uint16 planes, no gap coding) + ``log32`` codes
    as non-negative deltas down the ranks (uint32 planes) + the ``log32`` tail code: what sorting by probability
    buys against the ids' gap coding (same values, same precision as ``log32``)."""

    def encode(s: TopK, input_ids: np.ndarray) -> pa.Table:
        R = len(input_ids)
        lp = s.lp.astype(np.float64)  # (P, k) descending
        codes = np.rint(np.minimum((lp[:, :1] - lp) * codec.FINE_SCALE, codec.FINE_MAX_CODE)).astype(np.int64)
        deltas = np.diff(codes, axis=1, prepend=0).astype("<u4")
        log_mass = np.logaddexp.reduce(lp, axis=1)
        return _rows_table(
            {
                "seq_index": list(range(R)),
                "input_ids": [cf.to_planes(r.astype("<u2")) for r in input_ids],
                "topk_ids": [cf.to_planes(r) for r in _per_row(s.ids.astype("<u2"), R)],
                "topk_codes": [cf.to_planes(r) for r in _per_row(deltas, R)],
                "topk_tail": [cf.to_planes(r) for r in np.split(cf.encode_tail(s.log_tail, log_mass, "<u4"), R)],
            }
        )

    def decode(t: pa.Table, s: TopK) -> tuple[np.ndarray, np.ndarray]:
        def flat(name: str, dtype: str) -> np.ndarray:
            return np.concatenate([cf.from_planes(b, np.dtype(dtype)) for b in t.column(name).to_pylist()])

        ids, deltas, tail = flat("topk_ids", "<u2"), flat("topk_codes", "<u4"), flat("topk_tail", "<u4")
        codes = deltas.reshape(-1, s.k).cumsum(axis=1, dtype=np.uint32)
        lp = cf.decode_topk_logprobs(codes, tail, None, encoding=cf.FINE_ENCODING)
        return ids.reshape(-1, s.k).astype(np.int64), lp

    return Candidate("rank-ordered ids + log32 deltas", encode, decode, dict(cf.PARQUET_OPTIONS), stage=decode)


def retempering(s: TopK, sc: Scored, ids: np.ndarray, lp: np.ndarray) -> dict[str, float]:
    """Re-tempered top-k probabilities p_i(tau) = exp(log p_i / tau - L_tau) and tail mass 1 - sum_K p_i(tau), with
    the exact float64 L_tau (what ``topk_log_z`` stores to 1e-6 nats), against the dense float64 computation: max
    relative error over entries; the tail's over positions whose tempered tail is >= 1e-3."""
    order = np.argsort(ids, axis=1)
    got = np.take_along_axis(lp.astype(np.float64), order, 1)
    true = s.sorted_lp64
    out = {}
    for j, tau in enumerate(TAUS):
        log_z = sc.log_z[j][:, None]
        t_true, t_got = true / tau - log_z, got / tau - log_z
        out[f"rel_p_tau{tau:g}"] = float(np.abs(np.expm1(t_got - t_true)).max())
        tail_true = np.exp(sc.tail_tau[(s.k, tau)])
        tail_got = 1.0 - np.exp(t_got).sum(axis=1)
        big = tail_true >= 1e-3
        out[f"rel_tail_tau{tau:g}"] = float(np.abs(tail_got[big] / tail_true[big] - 1).max()) if big.any() else 0.0
    return out


def measure_values(c: Candidate, s: TopK, sc: Scored, repeat: int) -> dict[str, Any]:
    """``measure_topk`` + per-column bytes, re-tempering errors and the per-batch decode speed (codes -> log-probs)."""
    row = measure_topk(c, s, sc.input_ids, repeat)
    blob = write_parquet(c.encode(s, sc.input_ids), c.options)
    meta = pq.read_metadata(pa.BufferReader(blob)).row_group(0)
    n_tok = sc.input_ids.size
    for i in range(meta.num_columns):
        col = meta.column(i)
        row[f"bytes_{col.path_in_schema}"] = col.total_compressed_size / n_tok
    ids, lp = c.decode(pq.read_table(pa.BufferReader(blob)), s)
    row |= retempering(s, sc, ids, lp)
    encoding = cf.VALUE_ENCODINGS.get(c.name.split()[1].rstrip(",")) if c.name.startswith("v2 ") else None
    if encoding:
        T = sc.input_ids.shape[1]
        lay = TargetLayout(kind="topk", vocab_size=VOCAB, seq_len=T, top_k=s.k, value_encoding=encoding)
        st = rows_mod.stage_rows(lay, pq.read_table(pa.BufferReader(blob), use_threads=False))
        codes, tail = st.arrays["topk_codes"].reshape(-1, s.k), st.arrays["topk_tail"]
        dec_s, _ = best_time(lambda: cf.decode_topk_logprobs(codes, tail, None, encoding=encoding), repeat)
        row["decode_tok_s"] = n_tok / dec_s
        row["value_encoding"] = encoding
    return row


def value_candidates() -> list[Candidate]:
    ids6 = {"topk_ids": 6}
    return [
        naive_candidate("<i4", "fp16"),
        v1_candidate(encoding=cf.VALUE_ENCODING, name="v2 rel8 (format 2.0's first)"),
        v1_candidate(encoding=cf.ABS_ENCODING, name="v2 abs8"),
        v1_candidate(encoding=cf.FINE_ENCODING, name="v2 log32"),
        v1_candidate(level=ids6, encoding=cf.VALUE_ENCODING, name="v2 rel8, ids at zstd 6"),
        v1_candidate(level=ids6, encoding=cf.ABS_ENCODING, name="v2 abs8, ids at zstd 6"),
        rank_candidate(),
    ]


def run_values(sc: Scored, ks: list[int], repeat: int, out_path: Path, command: str) -> None:
    rows = []
    for k in ks:
        s = topk_setting(sc, k)
        for c in value_candidates():
            rows.append(measure_values(c, s, sc, repeat))
    base = {r["setting"]: r["bytes_per_token"] for r in rows if r["candidate"].startswith("int32 ids + fp16")}
    for r in rows:
        r["vs_baseline"] = r["bytes_per_token"] / base[r["setting"]]
        value_columns = ("bytes_topk_codes", "bytes_topk_code_base", "bytes_topk_tail", "bytes_topk_logprobs")
        r["bytes_values"] = sum(r.get(c, 0.0) for c in value_columns)
    cols = [
        ("encoding", "candidate", ""),
        ("targets", "setting", ""),
        ("bytes/token", "bytes_per_token", ".1f"),
        ("vs baseline", "vs_baseline", ".3f"),
        ("ids B", "bytes_topk_ids", ".1f"),
        ("values+tail B", "bytes_values", ".1f"),
        ("mean KL", "kl", ".2e"),
        ("max rel p, tau 0.5", "rel_p_tau0.5", ".1e"),
        ("tau 2", "rel_p_tau2", ".1e"),
        ("tau 4", "rel_p_tau4", ".1e"),
        ("max rel tail, tau 0.5", "rel_tail_tau0.5", ".1e"),
        ("tau 2", "rel_tail_tau2", ".1e"),
        ("tau 4", "rel_tail_tau4", ".1e"),
        ("encode tok/s", "encode_tok_s", ",.0f"),
        ("stage tok/s", "stage_tok_s", ",.0f"),
        ("decode tok/s", "decode_tok_s", ",.0f"),
    ]
    print("\n## value encodings\n\n" + table(rows, cols))
    out = {"command": command, "machine": machine_info(1), "data": data_info(sc), "taus": list(TAUS), "rows": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "pyarrow": pa.__version__,
        "load_avg_1m_at_end": os.getloadavg()[0],
    }


def data_info(sc: Scored) -> dict[str, Any]:
    return {"tokens": int(sc.input_ids.size), "vocab": sc.vocab, "mean_entropy": float(sc.entropy.mean())}


# ----------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                format(r[k], f) if isinstance(r.get(k), int | float) else str(r.get(k, "")) for _, k, f in cols
            )
            + " |"
        )
    return "\n".join(lines)


def candidates() -> list[Candidate]:
    return [
        naive_candidate("<i4", "fp16"),
        list_candidate(),
        naive_candidate("<u2", "fp16"),
        naive_candidate("<u2", "u16abs"),
        gap_candidate("gaps + uint16 abs", values="u16abs"),
        gap_candidate("gaps (no planes) + u8 pow1/3 + tail", values="pow", planes=False),
        gap_candidate("gaps + u8 loglin 1/16 + tail", values="loglin"),
        gap_candidate("gaps + u8 pow1/2 + tail", values="pow", gamma=0.5),
        gap_candidate("gaps + u8 pow1/4 + tail", values="pow", gamma=0.25),
        gap_candidate("gaps + 7-bit pow1/3 + tail", values="pow", levels=127),
        gap_candidate("gaps + 6-bit pow1/3 + tail", values="pow", levels=63),
        v1_candidate(1),
        v1_candidate(),
        v1_candidate(9),
        v1_candidate(19),
    ]


def main() -> None:
    global VOCAB
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="models/demo-teacher")
    ap.add_argument("--tokens", default="data/tokens")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--ks", default="16,32,64")
    ap.add_argument("--masses", default="0.9,0.95,0.99")
    ap.add_argument("--samples", default="8,16,32,64")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", choices=["all", "values"], default="all", help="values: the value encodings table only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pa.set_cpu_count(args.threads)
    ks, masses, samples = (
        [t(x) for x in a.split(",") if x] for t, a in ((int, args.ks), (float, args.masses), (int, args.samples))
    )
    t0 = time.perf_counter()
    values_only = args.only == "values"
    sc = score(
        args.teacher,
        args.tokens,
        sequences=args.sequences,
        k_max=max(ks),
        samples=[] if values_only else samples,
        ks=tuple(ks),
    )
    VOCAB = sc.vocab
    command = "python bench/cache_format.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out" and not (k == "only" and v == "all")
    )
    if values_only:
        out = Path(args.out) if args.out != str(RESULTS) else VALUE_RESULTS
        run_values(sc, ks, args.repeat, out, command)
        return
    print(
        f"scored {sc.input_ids.size} tokens in {time.perf_counter() - t0:.1f}s; "
        f"mean entropy {sc.entropy.mean():.3f} nats"
    )
    topk_rows = []
    for k in ks:
        s = topk_setting(sc, k)
        for c in candidates():
            topk_rows.append(measure_topk(c, s, sc.input_ids, args.repeat))
        for level in (3, 19):
            topk_rows.append(measure_raw_frames(s, sc.input_ids, level, args.repeat))
    base = {r["setting"]: r["bytes_per_token"] for r in topk_rows if r["candidate"].startswith("int32 ids + fp16")}
    for r in topk_rows:
        r["vs_baseline"] = r["bytes_per_token"] / base[r["setting"]]
    adaptive_rows = [
        measure_topk(v1_candidate(), topk_setting(sc, max(ks), m), sc.input_ids, args.repeat) for m in masses
    ]
    for r in adaptive_rows:
        r["vs_top64_baseline"] = r["bytes_per_token"] / base[f"top{max(ks)}"]
    sampled_rows = [r for S in samples for r in measure_sampled(sc, S, args.repeat)]
    for r in sampled_rows:
        r["vs_top64_baseline"] = r["bytes_per_token"] / base[f"top{max(ks)}"]
    cols = [
        ("candidate", "candidate", ""),
        ("targets", "setting", ""),
        ("bytes/token", "bytes_per_token", ".1f"),
        ("vs baseline", "vs_baseline", ".3f"),
        ("encode tok/s", "encode_tok_s", ",.0f"),
        ("stage tok/s", "stage_tok_s", ",.0f"),
        ("mean KL (nats)", "kl", ".2e"),
        ("max abs dp", "max_abs_dp", ".1e"),
        ("tail mass", "tail_mass", ".4f"),
    ]
    print("\n## top-k encodings\n\n" + table(topk_rows, cols))
    print(f"\n## adaptive top-k (k_max {max(ks)}), chosen encoding\n")
    print(
        table(
            adaptive_rows,
            [
                *cols[:2],
                ("entries/token", "entries_per_token", ".2f"),
                cols[2],
                ("vs top-64 baseline", "vs_top64_baseline", ".3f"),
                *cols[4:],
            ],
        )
    )
    print(
        "\n## sampled\n\n"
        + table(
            sampled_rows,
            [
                *cols[:2],
                ("unique ids/token", "entries_per_token", ".2f"),
                cols[2],
                ("vs top-64 baseline", "vs_top64_baseline", ".3f"),
                *cols[4:6],
            ],
        )
    )
    loader = loader_throughput(sc, topk_setting(sc, max(ks)), batch_size=16, repeat=args.repeat)
    trainer = _trainer_tokens_per_s()
    ratio = loader["batch_tok_s"] / trainer if trainer else None
    print(
        f"\nloader (chosen format, top-{max(ks)}): stage {loader['stage_tok_s']:,.0f} tok/s, batches "
        f"{loader['batch_tok_s']:,.0f} tok/s" + (f" = {ratio:.0f}x the trainer's {trainer:,.0f} tok/s" if ratio else "")
    )
    out = {
        "command": "python bench/cache_format.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "pyarrow": pa.__version__,
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "data": {"tokens": int(sc.input_ids.size), "vocab": sc.vocab, "mean_entropy": float(sc.entropy.mean())},
        "teacher": teacher_info(args.teacher),
        "topk": topk_rows,
        "adaptive": adaptive_rows,
        "sampled": sampled_rows,
        "loader": loader | {"trainer_tok_s": trainer, "batch_over_trainer": ratio},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def _trainer_tokens_per_s() -> float | None:
    path = Path(__file__).parent / "results" / "train_step.json"
    try:
        return float(json.loads(path.read_text())["trainer_tokens_per_s"]["topk_tail"])
    except (OSError, KeyError, ValueError):
        return None


def teacher_info(path: str) -> dict[str, Any]:
    """How the teacher was made (the demo teacher's ``training.json``: steps, val loss), if recorded."""
    try:
        info = json.loads((Path(path) / "training.json").read_text())
    except (OSError, ValueError):
        return {"path": path}
    return {"path": path} | {k: info.get(k) for k in ("steps", "stopped_by", "val_loss", "tokens_seen", "elapsed_s")}


if __name__ == "__main__":
    main()
