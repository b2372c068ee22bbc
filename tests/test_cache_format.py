"""The cache contract: row codecs round-trip, quantization is bounded, the manifest refuses bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipeline.cache_format import (
    LOGPROB_SCALE,
    MAX_CODE,
    CacheFormatError,
    Manifest,
    SequenceTargets,
    ShardInfo,
    TargetLayout,
    check_shard_name,
    decode_logprobs,
    decode_row,
    encode_logprobs,
    encode_table,
)

LAYOUTS = {
    "topk": TargetLayout(kind="topk", vocab_size=300, seq_len=12, top_k=8),
    "adaptive": TargetLayout(kind="topk", vocab_size=300, seq_len=12, top_k=8, mass=0.9),
    "sampled": TargetLayout(kind="sampled", vocab_size=300, seq_len=12, samples=16),
    "both": TargetLayout(kind="both", vocab_size=300, seq_len=12, top_k=4, samples=8),
}
STEP = 0.5 / LOGPROB_SCALE


def random_targets(layout: TargetLayout, n: int, *, seed: int = 0, first_seq: int = 0,
                   scale: float = 3.0) -> list[SequenceTargets]:
    """Sparse targets of n sequences from a real softmax over random logits (as the cache stage would store)."""
    rng = np.random.default_rng(seed)
    T, V = layout.seq_len, layout.vocab_size
    out = []
    for i in range(n):
        logits = rng.normal(size=(T, V)) * scale  # (T, V)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        t = SequenceTargets(seq_index=first_seq + i, input_ids=rng.integers(0, V, T))
        if layout.has_topk:
            ids = np.argsort(-logp, axis=-1, kind="stable")[:, :layout.top_k]  # (T, k)
            lp = np.take_along_axis(logp, ids, -1).astype(np.float32)  # (T, k) descending
            lengths = np.full(T, layout.top_k)
            if layout.adaptive:
                lengths = np.minimum((np.cumsum(np.exp(lp), -1) < layout.mass).sum(-1) + 1, layout.top_k)
                pad = np.arange(layout.top_k)[None, :] >= lengths[:, None]  # (T, k)
                ids, lp = np.where(pad, 0, ids), np.where(pad, -np.inf, lp).astype(np.float32)
            t.topk_ids, t.topk_logprobs, t.topk_lengths = ids, lp, lengths.astype(np.uint16)
        if layout.has_samples:
            cdf = np.cumsum(np.exp(logp), -1)  # (T, V)
            draws = [np.unique(np.minimum(np.searchsorted(c, rng.random(layout.samples) * c[-1]), V - 1),
                               return_counts=True) for c in cdf]
            width = max(len(u) for u, _ in draws)
            t.sample_ids = np.zeros((T, width), np.int64)
            t.sample_counts = np.zeros((T, width), np.int64)
            for pos, (u, c) in enumerate(draws):
                t.sample_ids[pos, :len(u)], t.sample_counts[pos, :len(u)] = u, c
        out.append(t)
    return out


def assert_same_targets(got: dict, want: SequenceTargets, layout: TargetLayout) -> None:
    """Decoded row ``got`` holds ``want``'s targets up to log-prob quantization."""
    assert got["seq_index"] == want.seq_index
    np.testing.assert_array_equal(got["input_ids"], want.input_ids)
    if layout.has_topk:
        np.testing.assert_array_equal(got["topk_ids"], want.topk_ids)
        np.testing.assert_array_equal(got["topk_lengths"], want.topk_lengths)
        finite = np.isfinite(want.topk_logprobs)
        np.testing.assert_array_equal(np.isfinite(got["topk_logprobs"]), finite)
        assert np.abs(got["topk_logprobs"][finite] - want.topk_logprobs[finite]).max() <= STEP + 1e-6
    if layout.has_samples:
        np.testing.assert_array_equal(got["sample_ids"], want.sample_ids)
        np.testing.assert_array_equal(got["sample_counts"], want.sample_counts)
        assert (got["sample_counts"].sum(-1) == layout.samples).all()


def _row_dicts(layout: TargetLayout, rows: list[SequenceTargets]) -> list[dict]:
    return encode_table(layout, rows).to_pylist()


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_encode_decode_round_trips_each_layout(kind: str) -> None:
    layout = LAYOUTS[kind]
    rows = random_targets(layout, 4, seed=1)
    table = encode_table(layout, rows)
    assert table.schema == layout.schema() and table.column_names == layout.columns()
    for got, want in zip(_row_dicts(layout, rows), rows, strict=True):
        assert_same_targets(decode_row(layout, got).as_dict(), want, layout)


def test_adaptive_rows_keep_a_variable_number_of_entries_and_pad_with_minus_inf() -> None:
    layout = LAYOUTS["adaptive"]
    rows = random_targets(layout, 3, seed=2)
    lengths = np.concatenate([r.topk_lengths for r in rows])
    assert lengths.min() < lengths.max() <= layout.top_k  # really ragged
    got = decode_row(layout, _row_dicts(layout, rows[:1])[0])
    pad = np.arange(layout.top_k)[None, :] >= got.topk_lengths[:, None]
    assert np.isneginf(got.topk_logprobs[pad]).all() and (got.topk_ids[pad] == 0).all()


def test_quantization_error_is_at_most_half_a_step() -> None:
    lp = -np.random.default_rng(0).exponential(3.0, size=100_000)  # log-probs in (-inf, 0]
    lp = lp[lp > -MAX_CODE / LOGPROB_SCALE]
    err = np.abs(decode_logprobs(encode_logprobs(lp)).astype(np.float64) - lp)
    assert err.max() <= STEP + 1e-5  # float32 rounding of values up to 32 nats adds < 4e-6


def test_logprob_codes_clip_below_minus_32_nats_and_above_zero() -> None:
    codes = encode_logprobs(np.array([-1000.0, -np.inf, 0.0, 1e-3]))
    assert codes.tolist() == [MAX_CODE, MAX_CODE, 0, 0]
    assert np.isfinite(decode_logprobs(codes)).all() and (decode_logprobs(codes) <= 0).all()


def test_ids_above_65535_use_uint32_blobs() -> None:
    small = TargetLayout(kind="topk", vocab_size=65536, seq_len=3, top_k=2)
    big = TargetLayout(kind="both", vocab_size=70_000, seq_len=3, top_k=2, samples=4)
    assert small.id_dtype == np.dtype("<u2") and big.id_dtype == np.dtype("<u4")
    t = SequenceTargets(seq_index=7, input_ids=np.array([69_999, 65_536, 1]),
                        topk_ids=np.array([[69_999, 0], [65_536, 65_535], [1, 2]]),
                        topk_logprobs=np.full((3, 2), -1.5, np.float32),
                        sample_ids=np.array([[5, 69_998], [66_000, 0], [3, 0]]),
                        sample_counts=np.array([[1, 3], [4, 0], [4, 0]]))
    row = _row_dicts(big, [t])[0]
    assert len(row["input_ids"]) == 3 * 4
    got = decode_row(big, row)
    np.testing.assert_array_equal(got.input_ids, t.input_ids)
    np.testing.assert_array_equal(got.topk_ids, t.topk_ids)
    np.testing.assert_array_equal(got.sample_ids, t.sample_ids)


def test_decode_refuses_blobs_of_the_wrong_length() -> None:
    layout = LAYOUTS["topk"]
    row = _row_dicts(layout, random_targets(layout, 1))[0]
    with pytest.raises(CacheFormatError, match="topk blobs"):
        decode_row(layout, {**row, "topk_ids": row["topk_ids"][:-2]})
    with pytest.raises(CacheFormatError, match="input_ids"):
        decode_row(layout, {**row, "input_ids": row["input_ids"] + b"\0\0"})


def test_target_layout_refuses_bad_settings() -> None:
    for bad in ({"kind": "dense"}, {"top_k": 0}, {"top_k": 301}, {"mass": 1.0}, {"temperature": 0.0},
                {"vocab_size": 0}, {"seq_len": 0}):
        with pytest.raises(CacheFormatError):
            TargetLayout(**{"kind": "topk", "vocab_size": 300, "seq_len": 4, "top_k": 2, **bad})
    with pytest.raises(CacheFormatError, match="samples"):
        TargetLayout(kind="sampled", vocab_size=300, seq_len=4, samples=0)


# ----------------------------------------------------------------------------- manifest


def good_manifest() -> dict:
    layout = LAYOUTS["topk"]
    shard = ShardInfo(file="shard-00000.parquet", rows=2, tokens=24, bytes=100, sha256="ab" * 32)
    m = Manifest(name="t", teacher={"path": "x"}, tokenizer={"fingerprint": "f", "vocab_size": 300},
                 corpus={"split": "train", "seq_len": 12}, targets=layout.to_dict(), shards=[shard],
                 stats={}, created_by="test")
    return json.loads(m.to_json())


def test_manifest_json_round_trips() -> None:
    data = good_manifest()
    m = Manifest.from_dict(data)
    assert json.loads(m.to_json()) == data and m.num_rows == 2 and m.num_tokens == 24
    assert m.layout == LAYOUTS["topk"]


def _with(path: str, value) -> dict:
    data = copy.deepcopy(good_manifest())
    node, keys = data, path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[keys[-1]] = value
    return data


@pytest.mark.parametrize("path,value,message", [
    ("format_version", "2.0", "not supported"),
    ("format_version", "1", "bad format_version"),
    ("format", "other", "format is"),
    ("shards.0.file", "/etc/passwd", "not of the form"),
    ("shards.0.file", "../x.parquet", "not of the form"),
    ("shards.0.file", "a/b.parquet", "not of the form"),
    ("shards.0.file", "shard-1.parquet", "not of the form"),
    ("shards.0.file", "shard-00000.parquet/..", "not of the form"),
    ("shards.0.file", 5, "not of the form"),
    ("shards.0.rows", -1, "non-negative integer"),
    ("shards.0.rows", 1 << 62, "non-negative integer"),
    ("shards.0.rows", "2", "non-negative integer"),
    ("shards.0.rows", True, "non-negative integer"),
    ("shards.0.rows", 2.0, "non-negative integer"),
    ("shards.0.bytes", -5, "non-negative integer"),
    ("shards.0.tokens", 25, "tokens 25 != rows 2"),
    ("shards.0.sha256", "AB" * 32, "64 hex digits"),
    ("shards.0.sha256", None, "64 hex digits"),
    ("shards", {}, "must be a list"),
    ("teacher", "x", "'teacher' must be an object"),
    ("name", 3, "'name' must be a string"),
    ("targets.top_k", 0, "top_k"),
    ("targets.kind", "dense", "kind"),
    ("targets.vocab_size", 301, "differs from tokenizer.vocab_size"),
    ("targets.seq_len", 12.0, "x/manifest.json: targets.seq_len must be an integer"),
    ("targets.top_k", True, "targets.top_k must be an integer"),
    ("targets.samples", None, "targets.samples must be an integer"),
    ("targets.mass", "0.5", "targets.mass must be a number"),
])
def test_manifest_refuses_bad_fields(path: str, value, message: str) -> None:
    with pytest.raises(CacheFormatError, match=message):
        Manifest.from_dict(_with(path, value), source="cache/x/manifest.json")


def test_manifest_refuses_duplicate_files_and_non_objects() -> None:
    data = good_manifest()
    data["shards"].append(dict(data["shards"][0]))
    with pytest.raises(CacheFormatError, match="duplicate file shard-00000.parquet"):
        Manifest.from_dict(data)
    for bad in ([], "x", None):
        with pytest.raises(CacheFormatError, match="JSON object"):
            Manifest.from_dict(bad)


def test_manifest_errors_name_the_file(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(_with("format_version", "9.1")))
    with pytest.raises(CacheFormatError, match=f"{tmp_path}.*upgrade kdcache"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        Manifest.load(tmp_path)
    with pytest.raises(CacheFormatError, match="no manifest"):
        Manifest.load(tmp_path / "nowhere")


def test_check_shard_name_accepts_only_the_shard_pattern() -> None:
    assert check_shard_name("shard-00042.parquet") == "shard-00042.parquet"
    for bad in ("shard-00042.parquet\n", "..", "", "shard-00042.parquet.tmp", "./shard-00042.parquet"):
        with pytest.raises(CacheFormatError):
            check_shard_name(bad)
