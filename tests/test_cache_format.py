"""The cache contract: every encoding round-trips, decoded values stay within the quantization bound
of a dense fp32 reference, malformed blobs and unknown encodings are refused, the manifest is strict."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pytest

from kdcache.cache.format import (
    TAIL_EMPTY,
    TAIL_SCALE,
    VALUE_GAMMA,
    VALUE_LEVELS,
    CacheFormatError,
    Manifest,
    SequenceTargets,
    ShardInfo,
    TargetLayout,
    check_shard_name,
    decode_gaps,
    decode_log_mass,
    decode_topk_logprobs,
    encode_gaps,
    encode_tail,
    encode_values,
    from_planes,
    to_planes,
)
from kdcache.cache.rows import decode_row, encode_table, stage_rows

LAYOUTS = {
    "topk": TargetLayout(kind="topk", vocab_size=300, seq_len=12, top_k=8),
    "adaptive": TargetLayout(kind="topk", vocab_size=300, seq_len=12, top_k=8, mass=0.9),
    "sampled": TargetLayout(kind="sampled", vocab_size=300, seq_len=12, samples=16),
    "both": TargetLayout(kind="both", vocab_size=300, seq_len=12, top_k=4, samples=8),
}
WIDE = {  # uint32 ids, uint16 lengths and counts (top_k / samples > 255)
    "wide-topk": TargetLayout(kind="topk", vocab_size=70_000, seq_len=5, top_k=300, mass=0.95),
    "wide-sampled": TargetLayout(kind="sampled", vocab_size=70_000, seq_len=5, samples=400),
}
U_STEP = 0.5 / VALUE_LEVELS
"""Max error of (p / p_max) ** gamma for a stored entry (half a code step; the last code is half wide)."""


def dense_logprobs(rng: np.random.Generator, T: int, V: int, scale: float) -> np.ndarray:
    """(T, V) float64 log-softmax of random logits."""
    logits = rng.normal(size=(T, V)) * scale
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def random_targets(
    layout: TargetLayout, n: int, *, seed: int = 0, first_seq: int = 0, scale: float = 3.0, with_tail: bool = False
) -> list[SequenceTargets]:
    """Sparse targets of n sequences from a real softmax over random logits, top-k in probability
    order (as a caller may pass them; the cache stores ascending ids)."""
    rng = np.random.default_rng(seed)
    T, V = layout.seq_len, layout.vocab_size
    out = []
    for i in range(n):
        logp = dense_logprobs(rng, T, V, scale)  # (T, V)
        t = SequenceTargets(seq_index=first_seq + i, input_ids=rng.integers(0, V, T))
        if layout.has_topk:
            ids = np.argsort(-logp, axis=-1, kind="stable")[:, : layout.top_k]  # (T, k)
            lp = np.take_along_axis(logp, ids, -1).astype(np.float32)  # (T, k) descending
            lengths = np.full(T, layout.top_k)
            if layout.adaptive:
                lengths = np.minimum((np.cumsum(np.exp(lp), -1) < layout.mass).sum(-1) + 1, layout.top_k)
            pad = np.arange(layout.top_k)[None, :] >= lengths[:, None]  # (T, k)
            ids, lp = np.where(pad, 0, ids), np.where(pad, -np.inf, lp).astype(np.float32)
            t.topk_ids, t.topk_logprobs, t.topk_lengths = ids, lp, lengths.astype(np.uint16)
            if with_tail:
                dropped = np.ones_like(logp, bool)
                np.put_along_axis(dropped, ids, pad, -1)  # kept ids -> False (padding id 0 stays as is)
                t.topk_log_tail = np.logaddexp.reduce(np.where(dropped, logp, -np.inf), axis=-1)
        if layout.has_samples:
            cdf = np.cumsum(np.exp(logp), -1)  # (T, V)
            draws = [
                np.unique(np.minimum(np.searchsorted(c, rng.random(layout.samples) * c[-1]), V - 1), return_counts=True)
                for c in cdf
            ]
            width = max(len(u) for u, _ in draws)
            t.sample_ids = np.zeros((T, width), np.int64)
            t.sample_counts = np.zeros((T, width), np.int64)
            for pos, (u, c) in enumerate(draws):
                t.sample_ids[pos, : len(u)], t.sample_counts[pos, : len(u)] = u, c
        out.append(t)
    return out


def by_id(ids: np.ndarray, values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of each row in ascending id order, padding last."""
    order = np.argsort(np.where(keep, ids, np.iinfo(np.int64).max), axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)


def assert_same_targets(got: dict, want: SequenceTargets, layout: TargetLayout) -> None:
    """Decoded row ``got`` holds ``want``'s targets: ids exact, log-probs within the quantization bound."""
    assert got["seq_index"] == want.seq_index
    np.testing.assert_array_equal(got["input_ids"], want.input_ids)
    if layout.has_topk:
        keep = np.isfinite(want.topk_logprobs)
        ids, lp = by_id(want.topk_ids, want.topk_logprobs.astype(np.float64), keep)
        np.testing.assert_array_equal(got["topk_lengths"], want.topk_lengths)
        np.testing.assert_array_equal(got["topk_ids"], np.where(keep, ids, 0))
        np.testing.assert_array_equal(np.isfinite(got["topk_logprobs"]), keep)
        assert_values_within_bound(got["topk_logprobs"], lp, keep)
    if layout.has_samples:
        np.testing.assert_array_equal(got["sample_ids"], want.sample_ids)
        np.testing.assert_array_equal(got["sample_counts"], want.sample_counts)
        assert (got["sample_counts"].sum(-1) == layout.samples).all()


def assert_values_within_bound(
    got: np.ndarray, want: np.ndarray, keep: np.ndarray, *, log_tail: np.ndarray | None = None
) -> None:
    """Relative to each position's max, (p / p_max) ** gamma is within half a code step; the kept
    mass matches 1 - p_tail (from ``log_tail``, else from ``want``) within half a tail-code step, or
    within 1e-7 absolute: the float32 floor of summing decoded log-probs (fp32 teacher outputs
    themselves only give 1 - sum to ~1e-7)."""
    got64 = np.where(keep, got.astype(np.float64), -np.inf)
    rel_got = got64 - got64.max(-1, keepdims=True)
    rel_want = want - np.where(keep, want, -np.inf).max(-1, keepdims=True)
    u_err = np.abs(np.exp(VALUE_GAMMA * rel_got) - np.exp(VALUE_GAMMA * rel_want))[keep]
    assert u_err.max() <= U_STEP + 1e-6
    mass_got = np.exp(got64).sum(-1)
    mass_want = np.where(keep, np.exp(want), 0).sum(-1) if log_tail is None else -np.expm1(log_tail)
    logit = lambda m: np.log1p(-m) - np.log(m)  # noqa: E731  logit of the tail, from the kept mass
    close = (np.abs(logit(mass_got) - logit(mass_want)) <= 0.5 / TAIL_SCALE + 1e-5) | (
        np.abs(mass_got - mass_want) < 1e-7
    )
    assert close.all()


def _row_dicts(layout: TargetLayout, rows: list[SequenceTargets]) -> list[dict]:
    return encode_table(layout, rows).to_pylist()


# ----------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("dtype", ["u1", "<u2", "<u4"])
def test_byte_planes_round_trip_and_put_each_byte_position_together(dtype: str) -> None:
    values = np.random.default_rng(0).integers(0, np.iinfo(np.dtype(dtype)).max, 1000).astype(dtype)
    blob = to_planes(values)
    np.testing.assert_array_equal(from_planes(blob, np.dtype(dtype)), values)
    size = np.dtype(dtype).itemsize
    assert blob[:1000] == values.view(np.uint8)[::size].tobytes()  # plane 0: every value's low byte
    with pytest.raises(CacheFormatError, match="whole number"):
        from_planes(blob[:-1], np.dtype("<u4"))


def test_gap_coding_round_trips_fixed_and_ragged_segments_for_both_id_widths() -> None:
    rng = np.random.default_rng(1)
    for vocab, dtype in ((4096, np.dtype("<u2")), (65536, np.dtype("<u2")), (200_000, np.dtype("<u4"))):
        for lengths in (np.full(50, 7), rng.integers(0, 9, 50)):
            ids = np.concatenate([np.sort(rng.choice(vocab, n, replace=False)) for n in lengths])
            gaps = encode_gaps(ids, lengths)
            assert gaps.min(initial=0) >= 0 and gaps.max(initial=0) < vocab
            np.testing.assert_array_equal(decode_gaps(gaps.astype(dtype), lengths, dtype), ids)
    with pytest.raises(CacheFormatError, match="strictly ascending"):
        encode_gaps(np.array([5, 5, 1]), np.array([2, 1]))


def test_tail_codes_keep_the_tail_to_a_relative_5e_4_from_1e_17_to_a_near_empty_top_k() -> None:
    p_tail = np.array([1e-17, 1e-12, 1e-6, 0.01, 0.5, 0.99, 1 - 1e-9])
    codes = encode_tail(np.log(p_tail), np.log1p(-p_tail))
    log_mass = decode_log_mass(codes)
    np.testing.assert_allclose(-np.expm1(log_mass), p_tail, rtol=6e-4)
    np.testing.assert_allclose(np.exp(log_mass), 1 - p_tail, rtol=6e-4)
    assert encode_tail(np.array([-np.inf, -60.0]), np.array([0.0, 0.0])).tolist() == [TAIL_EMPTY, TAIL_EMPTY]
    assert decode_log_mass(np.array([TAIL_EMPTY])).tolist() == [0.0]


def test_value_codes_are_uniform_in_p_over_p_max_to_the_gamma_and_code_0_is_the_max() -> None:
    lp = np.log(np.array([0.5, 0.25, 0.125, 1e-9, 0.3]))
    codes, log_mass = encode_values(lp, np.array([4, 1]))
    assert codes[0] == 0 and codes[4] == 0 and codes[3] == VALUE_LEVELS
    assert codes[1] == round(VALUE_LEVELS * (1 - 0.5**VALUE_GAMMA))
    np.testing.assert_allclose(np.exp(log_mass), [0.875 + 1e-9, 0.3])


# ----------------------------------------------------------------------------- rows


@pytest.mark.parametrize("kind", sorted(LAYOUTS) + sorted(WIDE))
def test_encode_decode_round_trips_each_layout(kind: str) -> None:
    layout = (LAYOUTS | WIDE)[kind]
    rows = random_targets(layout, 3, seed=1)
    table = encode_table(layout, rows)
    assert table.schema == layout.schema() and table.column_names == layout.columns()
    for got, want in zip(_row_dicts(layout, rows), rows, strict=True):
        assert_same_targets(decode_row(layout, got).as_dict(), want, layout)


@pytest.mark.parametrize("kind", ["topk", "adaptive", "wide-topk"])
@pytest.mark.parametrize("scale", [1.0, 3.0, 12.0])
def test_decoded_top_k_matches_a_dense_fp32_reference_within_the_quantization_bound(kind: str, scale: float) -> None:
    layout = (LAYOUTS | WIDE)[kind]
    rows = random_targets(layout, 2, seed=2, scale=scale, with_tail=True)
    for got, want in zip(_row_dicts(layout, rows), rows, strict=True):
        back = decode_row(layout, got)
        keep = np.isfinite(want.topk_logprobs)
        _, lp = by_id(want.topk_ids, want.topk_logprobs.astype(np.float64), keep)
        assert_values_within_bound(back.topk_logprobs, lp, keep, log_tail=want.topk_log_tail)
        # KL(stored || fp32) on the coarse (kept + tail) distribution, the tail taken as the loss takes it
        p, q = np.where(keep, np.exp(lp), 0), np.exp(back.topk_logprobs.astype(np.float64))
        t, t_stored = np.exp(want.topk_log_tail), np.clip(1 - q.sum(-1), 0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(q > 0, q * np.log(q / p), 0).sum(-1) + np.where(
                t_stored > 0, t_stored * np.log(t_stored / t), 0
            )
        assert kl.mean() < 1e-4 and kl.max() < 1e-3


def test_confident_positions_keep_their_tiny_tail_through_the_decoded_log_probs() -> None:
    layout = LAYOUTS["topk"]
    (row,) = random_targets(layout, 1, seed=3, scale=40.0, with_tail=True)  # tails ~1e-10 and below
    assert np.exp(row.topk_log_tail).min() < 1e-9
    back = decode_row(layout, _row_dicts(layout, [row])[0])
    tail = 1 - np.exp(back.topk_logprobs.astype(np.float64)).sum(-1)  # as losses.tempered_topk_targets
    big = np.exp(row.topk_log_tail) > 1e-6
    np.testing.assert_allclose(tail[big], np.exp(row.topk_log_tail[big]), rtol=2e-3)
    assert (np.abs(tail - np.exp(row.topk_log_tail)) < 1e-6).all()


def test_rows_without_a_log_tail_store_one_minus_the_kept_mass() -> None:
    layout = LAYOUTS["topk"]
    (row,) = random_targets(layout, 1, seed=4)
    back = decode_row(layout, _row_dicts(layout, [row])[0])
    want = 1 - np.exp(row.topk_logprobs.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(1 - np.exp(back.topk_logprobs.astype(np.float64)).sum(-1), want, rtol=1e-3)


def test_top_k_of_the_whole_vocabulary_stores_an_empty_tail() -> None:
    layout = TargetLayout(kind="topk", vocab_size=16, seq_len=3, top_k=16)
    (row,) = random_targets(layout, 1, seed=5, with_tail=True)
    assert np.isneginf(row.topk_log_tail).all()
    back = decode_row(layout, _row_dicts(layout, [row])[0])
    np.testing.assert_allclose(np.exp(back.topk_logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-6)


def test_adaptive_rows_keep_a_variable_number_of_entries_and_pad_with_minus_inf() -> None:
    layout = LAYOUTS["adaptive"]
    rows = random_targets(layout, 3, seed=2)
    lengths = np.concatenate([r.topk_lengths for r in rows])
    assert lengths.min() < lengths.max() <= layout.top_k  # really ragged
    got = decode_row(layout, _row_dicts(layout, rows[:1])[0])
    pad = np.arange(layout.top_k)[None, :] >= got.topk_lengths[:, None]
    assert np.isneginf(got.topk_logprobs[pad]).all() and (got.topk_ids[pad] == 0).all()
    assert len(_row_dicts(layout, rows[:1])[0]["topk_lengths"]) == layout.seq_len  # uint8 lengths


def test_decoded_logprobs_do_not_depend_on_padding_or_batch_shape() -> None:
    rng = np.random.default_rng(6)
    codes, tail = rng.integers(0, 256, (3, 5, 8)).astype(np.uint8), rng.integers(0, 60000, (3, 5)).astype(np.uint16)
    keep = np.arange(8)[None, None, :] < rng.integers(1, 9, (3, 5))[..., None]
    whole = decode_topk_logprobs(codes, tail, keep)
    assert np.array_equal(decode_topk_logprobs(codes[1], tail[1], keep[1]), whole[1])
    np.testing.assert_allclose(np.exp(whole.astype(np.float64)).sum(-1), np.exp(decode_log_mass(tail)), rtol=1e-5)


def test_ids_above_65535_use_uint32_blobs() -> None:
    big = TargetLayout(kind="both", vocab_size=70_000, seq_len=3, top_k=2, samples=4)
    assert LAYOUTS["topk"].id_dtype == np.dtype("<u2") and big.id_dtype == np.dtype("<u4")
    t = SequenceTargets(
        seq_index=7,
        input_ids=np.array([69_999, 65_536, 1]),
        topk_ids=np.array([[69_999, 0], [65_536, 65_535], [1, 2]]),
        topk_logprobs=np.full((3, 2), -1.5, np.float32),
        sample_ids=np.array([[5, 69_998], [66_000, 0], [3, 0]]),
        sample_counts=np.array([[1, 3], [4, 0], [4, 0]]),
    )
    row = _row_dicts(big, [t])[0]
    assert len(row["input_ids"]) == 3 * 4
    got = decode_row(big, row)
    np.testing.assert_array_equal(got.input_ids, t.input_ids)
    np.testing.assert_array_equal(got.topk_ids, np.sort(t.topk_ids, axis=1))
    np.testing.assert_array_equal(got.sample_ids, t.sample_ids)


def test_decode_refuses_blobs_of_the_wrong_length() -> None:
    layout = LAYOUTS["topk"]
    row = _row_dicts(layout, random_targets(layout, 1))[0]
    with pytest.raises(CacheFormatError, match="topk_ids of row 0"):
        decode_row(layout, {**row, "topk_ids": row["topk_ids"][:-2]})
    with pytest.raises(CacheFormatError, match="input_ids"):
        decode_row(layout, {**row, "input_ids": row["input_ids"] + b"\0\0"})
    with pytest.raises(CacheFormatError, match="topk_codes"):
        decode_row(layout, {**row, "topk_codes": row["topk_codes"] + b"\0"})
    adaptive = LAYOUTS["adaptive"]
    row = _row_dicts(adaptive, random_targets(adaptive, 1))[0]
    with pytest.raises(CacheFormatError, match="topk_lengths: values outside"):
        decode_row(adaptive, {**row, "topk_lengths": bytes(adaptive.seq_len)})  # zero entries kept


def test_stage_rows_refuses_a_table_of_another_layout() -> None:
    table = encode_table(LAYOUTS["topk"], random_targets(LAYOUTS["topk"], 1))
    with pytest.raises(CacheFormatError, match="columns"):
        stage_rows(LAYOUTS["sampled"], table)
    assert stage_rows(LAYOUTS["topk"], pa.Table.from_batches(table.to_batches(max_chunksize=1))).input_ids.shape == (
        1,
        12,
    )


def test_target_layout_refuses_bad_settings_and_unknown_value_encodings() -> None:
    for bad in (
        {"kind": "dense"},
        {"top_k": 0},
        {"top_k": 301},
        {"mass": 1.0},
        {"temperature": 0.0},
        {"vocab_size": 0},
        {"seq_len": 0},
    ):
        with pytest.raises(CacheFormatError):
            TargetLayout(**{"kind": "topk", "vocab_size": 300, "seq_len": 4, "top_k": 2, **bad})
    with pytest.raises(CacheFormatError, match="samples"):
        TargetLayout(kind="sampled", vocab_size=300, seq_len=4, samples=0)
    with pytest.raises(CacheFormatError, match="value_encoding.*upgrade kdcache"):
        TargetLayout(kind="topk", vocab_size=300, seq_len=4, top_k=2, value_encoding="uint16 -logprob*2048")


# ----------------------------------------------------------------------------- manifest


def good_manifest() -> dict:
    layout = LAYOUTS["topk"]
    shard = ShardInfo(file="shard-00000.parquet", rows=2, tokens=24, bytes=100, sha256="ab" * 32)
    m = Manifest(
        name="t",
        teacher={"path": "x"},
        tokenizer={"fingerprint": "f", "vocab_size": 300},
        corpus={"split": "train", "seq_len": 12},
        targets=layout.to_dict(),
        shards=[shard],
        stats={},
        created_by="test",
    )
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


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("format_version", "3.0", "not supported"),
        ("targets.temperatures", [0.0], "targets.temperatures must be a list of numbers > 0"),
        ("targets.temperatures", [2.0, 2.0], "must be distinct and differ from targets.temperature"),
        ("targets.signals", ["loss"], "targets.signals must be distinct names from"),
        ("targets.hidden", {"layers": [-1], "dim": 64}, r"targets.hidden must be \{layers, dim, projection"),
        (
            "targets.hidden",
            {"layers": [-1], "dim": 64, "projection": {"kind": "orthogonal", "seed": 0, "sha256": "a" * 64}},
            r"targets.hidden must be \{layers \(distinct integers >= 0\)",
        ),
        ("tokenizer.bytes", {"normalization": "none"}, "tokenizer.bytes must be"),
        ("tokenizer.bytes", {"max_token_bytes": 70000}, "max_token_bytes must be in"),
        ("corpus.teacher_context", {"sha256": "x"}, "corpus.teacher_context must be"),
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
    ],
)
def test_manifest_refuses_bad_fields(path: str, value, message: str) -> None:
    with pytest.raises(CacheFormatError, match=message):
        Manifest.from_dict(_with(path, value), source="cache/x/manifest.json")


def test_v1_manifests_parse_and_v2_fields_round_trip() -> None:
    v1 = _with("format_version", "1.0")
    m = Manifest.from_dict(v1)
    assert m.major == 1 and m.layout.temperatures == () and m.layout.signals == () and not m.layout.max_token_bytes
    v2 = _with("targets.temperatures", [2.0, 4.0])
    v2["targets"]["signals"] = ["nll", "entropy"]
    v2["tokenizer"]["bytes"] = {"normalization": "none", "max_token_bytes": 300, "prefix_space": False}
    layout = Manifest.from_dict(v2).layout
    assert layout.temperatures == (2.0, 4.0) and layout.signals == ("nll", "entropy")
    assert layout.columns()[-4:] == ["topk_log_z", "teacher_nll", "teacher_entropy", "byte_lengths"]
    assert layout.blob_dtypes()["byte_lengths"] == np.dtype("<u2") and "max_token_bytes" not in layout.to_dict()


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
