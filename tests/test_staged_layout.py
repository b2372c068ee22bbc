"""The compact staged layout (``kdcache.cache.mapped``, version 2): every codec decodes every column of every
layout exactly, batches do not depend on the codecs staging chose, the staged copy stays within 1.5x the
Parquet bytes where the old uncompressed one did not, and staged copies of another layout version are never read."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_cache_format import LAYOUTS, WIDE, random_targets
from test_cache_reader import write_test_cache

from kdcache.cache import mapped
from kdcache.cache.format import PARQUET_OPTIONS, SequenceTargets, TargetLayout
from kdcache.cache.hidden_format import HiddenSpec
from kdcache.cache.mapped import STAGED_SUFFIX, MappedShard, map_staged, staged_columns, staged_table
from kdcache.cache.reader import CacheError, open_cache
from kdcache.cache.rows import encode_table, stage_rows
from kdcache.cache.staging import evict, staging_size

V2 = TargetLayout(
    kind="both",
    vocab_size=300,
    seq_len=6,
    top_k=3,
    samples=8,
    temperatures=(2.0,),
    signals=("nll", "entropy"),
    max_token_bytes=300,
    hidden=HiddenSpec(layers=(1, 3), dim=4, sha256="0" * 64),
)


def v2_rows(n: int, seed: int = 0) -> list[SequenceTargets]:
    """``random_targets`` plus every v2 column: log-normalizers, signals, byte lengths, hidden-state codes."""
    rng, T = np.random.default_rng(seed), V2.seq_len
    rows = random_targets(V2, n, seed=seed)
    for t in rows:
        t.topk_log_z = rng.normal(size=(1, T)).astype(np.float32)
        t.teacher_nll = rng.exponential(size=T).astype(np.float32)
        t.teacher_entropy = rng.exponential(size=T).astype(np.float32)
        t.byte_lengths = rng.integers(0, 300, T)
        t.hidden = {}
        for name, scale in V2.hidden.columns().items():
            t.hidden |= {name: rng.integers(-127, 128, (T, 4)).astype(np.int8), scale: rng.random(T).astype(np.float16)}
    return rows


def staged_rows(layout: TargetLayout, rows: list[SequenceTargets]):
    return stage_rows(layout, encode_table(layout, rows))


@functools.cache
def source(kind: str):
    """(layout, decoded rows) of 5 random sequences (made once per kind: a dense softmax at V = 70,000 is slow)."""
    layout = V2 if kind == "v2" else (LAYOUTS | WIDE)[kind]
    return layout, staged_rows(layout, v2_rows(5) if kind == "v2" else random_targets(layout, 5, seed=1))


@pytest.mark.parametrize("codec", mapped.CODECS)
@pytest.mark.parametrize("kind", [*LAYOUTS, *WIDE, "v2"])
def test_every_codec_decodes_every_column_exactly(tmp_path, kind, codec) -> None:
    layout, staged = source(kind)
    table = staged_table(staged, layout, codecs=dict.fromkeys(staged_columns(layout), codec))
    path = tmp_path / f"x{STAGED_SUFFIX}"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    shard = MappedShard.from_table(map_staged(path), layout, rows=5, where=str(path))
    assert set(shard.codec.values()) == {codec}
    R, T = staged.input_ids.shape
    for j in range(R):
        row = shard.row(j)
        np.testing.assert_array_equal(row.pop("input_ids"), staged.input_ids[j])
        assert row.pop("seq_index") == staged.seq_index[j]
        for name, values in row.items():
            if name in shard.width or name == "topk_lengths":  # per position: row j's block
                per_row = staged.arrays[name].size // R
                want = staged.arrays[name][j * per_row : (j + 1) * per_row]
            else:  # per entry: row j's entries
                lens = staged.arrays["topk_lengths" if name.startswith("topk") else "sample_lengths"].reshape(R, T)
                start = int(lens[:j].sum())
                want = staged.arrays[name][start : start + int(lens[j].sum())]
            np.testing.assert_array_equal(values, want.astype(values.dtype), err_msg=f"{kind} {codec} {name} row {j}")
            assert values.dtype == staged_columns(layout).get(name, values.dtype)


def test_the_staging_budget_compresses_the_columns_that_save_most_and_leaves_the_rest_raw() -> None:
    layout = TargetLayout(kind="topk", vocab_size=151_936, seq_len=64, top_k=64)
    rng = np.random.default_rng(0)
    codes_like = rng.normal(size=(16, 64, 65))
    rows = [
        SequenceTargets(
            seq_index=i,
            input_ids=rng.integers(0, 151_936, 64),
            topk_ids=np.sort(rng.choice(151_936, (64, 64)), axis=1),  # repeats resolved below
            topk_logprobs=codes_like[i, :, :64] - np.logaddexp.reduce(codes_like[i], axis=1, keepdims=True),
        )
        for i in range(16)
    ]
    for t in rows:
        t.topk_ids = np.stack([np.sort(rng.choice(151_936, 64, replace=False)) for _ in range(64)])
    staged = staged_rows(layout, rows)
    everything = staged_table(staged, layout)  # no budget: every column zstd shrinks by MIN_SAVING
    codecs = {n: s["codec"] for n, s in mapped._check_schema(everything, layout, 16, "t").items()}
    assert codecs["topk_ids"] == "zstd-planes" and codecs["input_ids"] != "raw"  # 18-bit ids: 3 planes of 4 bytes
    generous = staged_table(staged, layout, parquet_bytes=10**9)  # the raw copy already fits: nothing compressed
    assert {s["codec"] for s in mapped._check_schema(generous, layout, 16, "t").values()} == {"raw"}
    tight = staged_table(staged, layout, parquet_bytes=1)  # cannot fit: everything that saves anything
    assert mapped._check_schema(tight, layout, 16, "t") == mapped._check_schema(everything, layout, 16, "t")


def test_the_staged_copy_of_a_top64_cache_at_a_large_vocabulary_is_within_1_5x_its_parquet(tmp_path) -> None:
    layout = TargetLayout(kind="topk", vocab_size=151_936, seq_len=128, top_k=64)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        logits = 3.0 * rng.normal(size=(128, 65))
        lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        ids = np.sort(rng.integers(0, 2_000, (128, 1)) + np.cumsum(rng.integers(1, 400, (128, 64)), axis=1), axis=1)
        rows.append(
            SequenceTargets(
                seq_index=i,
                input_ids=rng.integers(0, 151_936, 128),
                topk_ids=ids,
                topk_logprobs=np.sort(lp, axis=1)[:, ::-1][:, :64],
            )
        )
    path = tmp_path / "shard.parquet"
    pq.write_table(encode_table(layout, rows), path, **PARQUET_OPTIONS)
    staged = stage_rows(layout, pq.read_table(path))
    compact = staged_table(staged, layout, parquet_bytes=path.stat().st_size)
    uncompressed = staged_table(staged, layout, codecs=dict.fromkeys(staged_columns(layout), "raw"))
    size = lambda t: sum(b.size for c in t.columns for chunk in c.chunks for b in chunk.buffers() if b)  # noqa: E731
    parquet = path.stat().st_size
    assert size(compact) <= 1.5 * parquet < size(uncompressed), (size(compact) / parquet, size(uncompressed) / parquet)


@pytest.fixture(params=["raw", "zstd", "zstd-planes"])
def codec_mode(request, monkeypatch) -> str:
    """Staging as it would choose if every column paid to compress (or none did), with one codec preferred."""
    if request.param == "raw":
        monkeypatch.setattr(mapped, "MIN_SAVING", 2.0)  # no column saves 200%
    else:
        monkeypatch.setattr(mapped, "MIN_SAVING", -1.0)
        monkeypatch.setattr(mapped, "TARGET_RATIO", 0.0)
        monkeypatch.setattr(mapped, "PLANES_MIN_GAIN", -np.inf if request.param == "zstd-planes" else np.inf)
    return request.param


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_batches_and_items_do_not_depend_on_the_codecs_staging_chose(tmp_path, kind, codec_mode, monkeypatch) -> None:
    layout, rows = LAYOUTS[kind], random_targets(LAYOUTS[kind], 11, seed=2)
    write_test_cache(tmp_path / "c", rows, layout, rows_per_shard=4)
    reader = open_cache(tmp_path / "c", staging_dir=tmp_path / "staging")
    got = [list(reader.batches(3, seed=0, epoch=e, drop_last=False)) for e in range(2)]
    items = [reader[i] for i in range(len(rows))]
    assert {reader._shard(0).codec[c] for c in ("input_ids", f"{'topk' if layout.has_topk else 'sample'}_ids")} == {
        codec_mode
    }
    monkeypatch.setattr(mapped, "MIN_SAVING", 2.0)  # the reference: all raw, as the uncompressed layout
    ref = open_cache(tmp_path / "c", staging_dir=tmp_path / "staging-raw")
    want = [list(ref.batches(3, seed=0, epoch=e, drop_last=False)) for e in range(2)]
    for a, b in zip(sum(got, []), sum(want, []), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for i, item in enumerate(items):
        other = ref[i]
        assert item.keys() == other.keys()
        for k, v in item.items():
            np.testing.assert_array_equal(v, other[k])


def test_a_staged_copy_of_another_layout_version_is_never_read_only_counted_and_evicted(tmp_path) -> None:
    layout, rows = LAYOUTS["topk"], random_targets(LAYOUTS["topk"], 6, seed=3)
    write_test_cache(tmp_path / "c", rows, layout, rows_per_shard=6)
    staging = tmp_path / "staging"
    staging.mkdir()
    sha = (tmp_path / "c" / "manifest.json").read_text().split('"sha256": "')[1][:64]
    legacy = staging / f"{sha}-0123456789abcdef.arrow"  # a layout-v1 name: never globbed as a staged copy
    legacy.write_bytes(b"v1 bytes")
    reader = open_cache(tmp_path / "c", staging_dir=staging)
    np.testing.assert_array_equal(reader[0]["input_ids"], rows[0].input_ids)
    (current,) = staging.glob(f"*{STAGED_SUFFIX}")
    assert legacy.read_bytes() == b"v1 bytes" and staging_size(staging) == (2, current.stat().st_size + 8)
    assert evict(staging, max_bytes=current.stat().st_size) == [legacy]  # oldest use first: the v1 copy goes
    table = map_staged(current)
    meta = table.schema.metadata | {
        mapped.META_KEY: table.schema.metadata[mapped.META_KEY].replace(b'"version": 2', b'"version": 1')
    }
    with pytest.raises(CacheError, match="(?s)staged layout v1.*expected v2"):
        MappedShard.from_table(table.replace_schema_metadata(meta), layout, rows=6, where="x")
    with pytest.raises(CacheError, match="no staged-layout metadata"):
        MappedShard.from_table(table.replace_schema_metadata({}), layout, rows=6, where="x")


def test_the_staging_ratio_comes_from_the_environment_and_bad_values_are_refused(tmp_path, monkeypatch) -> None:
    from kdcache.cache.staging import default_target_ratio

    layout, rows = LAYOUTS["sampled"], random_targets(LAYOUTS["sampled"], 6, seed=4)
    write_test_cache(tmp_path / "c", rows, layout, rows_per_shard=6)
    monkeypatch.setattr(mapped, "TARGET_RATIO", 0.0)  # the default would compress every column that pays
    monkeypatch.setenv("KDCACHE_STAGING_RATIO", "100")  # scratch to spare: nothing compressed
    assert default_target_ratio() == 100.0
    reader = open_cache(tmp_path / "c", staging_dir=tmp_path / "staging")
    assert set(reader._shard(0).codec.values()) == {"raw"}
    for bad in ("0.5", "fast"):
        monkeypatch.setenv("KDCACHE_STAGING_RATIO", bad)
        with pytest.raises(CacheError, match=f"KDCACHE_STAGING_RATIO='{bad}': need a number >= 1"):
            default_target_ratio()
