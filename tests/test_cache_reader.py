"""The cache loader: validation on open, staging, exact decoding, epoch order, rank slices, resume."""

from __future__ import annotations

import itertools
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_cache_format import LAYOUTS, assert_same_targets, random_targets

from kdcache.cache.format import Manifest, SequenceTargets, ShardInfo, TargetLayout
from kdcache.cache.mapped import STAGED_SUFFIX
from kdcache.cache.reader import CacheError, CacheReader, open_cache
from kdcache.cache.rows import encode_table
from kdcache.cache.verify import verify_cache
from kdcache.fingerprint import sha256_file

N = 23  # sequences; 5 shards of 5, 5, 5, 5, 3 rows


def write_test_cache(
    directory: Path,
    rows: list[SequenceTargets],
    layout: TargetLayout,
    *,
    rows_per_shard: int = 5,
    tokenizer_fingerprint: str = "tok-a",
) -> Manifest:
    """A cache written by the contract alone: encode_table -> zstd Parquet with page checksums -> manifest last."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start : start + rows_per_shard]
        path = directory / f"shard-{i:05d}.parquet"
        pq.write_table(
            encode_table(layout, chunk), path, compression="zstd", write_page_checksum=True, use_dictionary=False
        )
        shards.append(
            ShardInfo(
                file=path.name,
                rows=len(chunk),
                tokens=len(chunk) * layout.seq_len,
                bytes=path.stat().st_size,
                sha256=sha256_file(path),
                first_seq=chunk[0].seq_index,
            )
        )
    manifest = Manifest(
        name=directory.name,
        teacher={"path": "tiny"},
        tokenizer={"fingerprint": tokenizer_fingerprint, "vocab_size": layout.vocab_size},
        corpus={"fingerprint": "c", "split": "train", "seq_len": layout.seq_len, "num_sequences": len(rows)},
        targets=layout.to_dict(),
        shards=shards,
        stats={},
        created_by="test",
    )
    (directory / "manifest.json").write_text(manifest.to_json())
    return manifest


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, tuple[Path, list[SequenceTargets]]]:
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for kind, layout in LAYOUTS.items():
        rows = random_targets(layout, N, seed=3)
        write_test_cache(root / kind, rows, layout)
        out[kind] = (root / kind, rows)
    return out


@pytest.fixture
def staging(tmp_path) -> Path:
    return tmp_path / "staging"


def _copy_cache(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _epoch(reader: CacheReader, b: int, **kw) -> list[dict[str, torch.Tensor]]:
    return list(reader.batches(b, **{"seed": 0, **kw}))


def _ids(batches: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    return [b["seq_index"].tolist() for b in batches]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def _concat_ranks(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rank slices -> one batch; sample tensors are padded to the widest slice first."""
    width = max((p["sample_ids"].shape[-1] for p in parts if "sample_ids" in p), default=0)

    def widen(t: torch.Tensor, key: str) -> torch.Tensor:
        padded = key in ("sample_ids", "sample_counts")  # (B, T, S): S differs per slice
        return torch.nn.functional.pad(t, (0, width - t.shape[-1])) if padded else t

    return {k: torch.cat([widen(p[k], k) for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_reader_items_equal_what_was_written(caches, staging, kind) -> None:
    path, rows = caches[kind]
    reader = open_cache(path, staging_dir=staging)
    assert len(reader) == N and reader.layout == LAYOUTS[kind] and reader.meta.num_rows == N
    assert reader.manifest["shards"][0]["file"] == "shard-00000.parquet"
    for i in (0, 4, 5, 13, N - 1, -1):
        assert_same_targets(reader[i], rows[i], LAYOUTS[kind])
    assert [x["seq_index"] for x in reader.iter_sequences(3, 9)] == list(range(3, 9))
    with pytest.raises(IndexError):
        reader[N]


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_batch_tensors_hold_the_decoded_targets_padded_like_reader_items(caches, staging, kind) -> None:
    path, _ = caches[kind]
    layout, reader = LAYOUTS[kind], open_cache(path, staging_dir=staging)
    batches = _epoch(reader, 4, epoch=1, drop_last=False)
    keys = (
        {"input_ids", "seq_index"}
        | ({"topk_ids", "topk_logprobs", "topk_log_tail", "topk_mask"} if layout.has_topk else set())
        | ({"sample_ids", "sample_counts", "sample_total"} if layout.has_samples else set())
    )
    for batch in batches:
        assert set(batch) == keys and batch["input_ids"].dtype == torch.int64
        for b, i in enumerate(batch["seq_index"].tolist()):
            item = reader[i]
            np.testing.assert_array_equal(batch["input_ids"][b].numpy(), item["input_ids"])
            if layout.has_topk:
                real = np.arange(layout.top_k) < item["topk_lengths"][:, None]  # (T, k)
                np.testing.assert_array_equal(batch["topk_mask"][b].numpy(), real)
                lp = batch["topk_logprobs"][b].numpy()
                assert lp.dtype == np.float32 and (lp[~real] == -np.inf).all()
                np.testing.assert_array_equal(lp, item["topk_logprobs"])
                tail = np.exp(batch["topk_log_tail"][b].numpy().astype(np.float64))  # (T,) the stored tail
                np.testing.assert_allclose(tail + np.exp(lp.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
                np.testing.assert_array_equal(batch["topk_ids"][b].numpy()[real], item["topk_ids"][real])
            if layout.has_samples:
                w = item["sample_ids"].shape[1]
                counts = batch["sample_counts"][b].numpy()
                np.testing.assert_array_equal(counts[:, :w], item["sample_counts"])
                np.testing.assert_array_equal(batch["sample_ids"][b].numpy()[:, :w], item["sample_ids"])
                assert (counts[:, w:] == 0).all() and (counts.sum(-1) == layout.samples).all()
        if layout.has_samples:
            assert batch["sample_ids"].shape[-1] == max(
                int(reader[i]["sample_ids"].shape[1]) for i in batch["seq_index"].tolist()
            )


def test_ids_above_65535_round_trip_through_the_reader(tmp_path, staging) -> None:
    layout = TargetLayout(kind="both", vocab_size=70_000, seq_len=4, top_k=3, samples=4)
    rows = random_targets(layout, 3, seed=5)
    write_test_cache(tmp_path / "big", rows, layout, rows_per_shard=2)
    reader = open_cache(tmp_path / "big", staging_dir=staging)
    for i in range(3):
        assert_same_targets(reader[i], rows[i], layout)
    batch = next(reader.batches(3, seed=0))
    assert int(batch["topk_ids"].max()) > 65535


# ----------------------------------------------------------------------------- epoch order, ranks, resume


@pytest.mark.parametrize("window", [1, 2, 100])
def test_an_epoch_covers_each_sequence_exactly_once(caches, staging, window) -> None:
    reader = open_cache(caches["adaptive"][0], staging_dir=staging)
    assert reader.num_batches(4) == 5 and reader.num_batches(4, drop_last=False) == 6
    full = sum(_ids(_epoch(reader, 4, drop_last=False, window=window)), [])
    assert sorted(full) == list(range(N))
    dropped = _ids(_epoch(reader, 4, window=window))
    flat = sum(dropped, [])
    assert len(dropped) == 5 and len(flat) == 20 and len(set(flat)) == 20


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("batch_size,world_size", [(3, 3), (5, 4)])  # 23 = 9+9+5 -> 2,2,1; 23 = 20+3 -> 1,1,1,0
def test_ranks_cover_each_sequence_once_even_when_counts_do_not_divide(
    caches, staging, kind, batch_size, world_size
) -> None:
    reader = open_cache(caches[kind][0], staging_dir=staging)
    per_rank = [_epoch(reader, batch_size, rank=r, world_size=world_size, drop_last=False) for r in range(world_size)]
    assert {len(p) for p in per_rank} == {reader.num_batches(batch_size, world_size, drop_last=False)}  # same steps
    seen = sum((sum(_ids(p), []) for p in per_rank), [])
    assert sorted(seen) == list(range(N))
    last = [p[-1] for p in per_rank]
    assert [len(b["seq_index"]) for b in last] == [
        len(a) for a in np.array_split(np.arange(N % (batch_size * world_size) or batch_size * world_size), world_size)
    ]
    assert all(b["input_ids"].shape[1:] == (LAYOUTS[kind].seq_len,) for b in last)  # empty slices keep their shape


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(caches, staging, tmp_path) -> None:
    path = caches["sampled"][0]
    a = _epoch(open_cache(path, staging_dir=staging), 4, seed=7, epoch=2)
    b = _epoch(open_cache(path, staging_dir=tmp_path / "other-staging"), 4, seed=7, epoch=2)
    _assert_batches_equal(a, b)
    reader = open_cache(path, staging_dir=staging)
    assert _ids(_epoch(reader, 4, seed=7, epoch=3)) != _ids(a)
    assert _ids(_epoch(reader, 4, seed=8, epoch=2)) != _ids(a)
    assert sum(_ids(_epoch(reader, 4, shuffle=False)), []) == list(range(20))


@pytest.mark.parametrize("kind", ["adaptive", "both"])
def test_two_ranks_of_b_see_exactly_one_rank_of_2b(caches, staging, kind) -> None:
    reader = open_cache(caches[kind][0], staging_dir=staging)
    for drop_last in (True, False):
        one = _epoch(reader, 6, epoch=1, drop_last=drop_last)
        ranks = [_epoch(reader, 3, epoch=1, rank=r, world_size=2, drop_last=drop_last) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == len(one)
        _assert_batches_equal(one, [_concat_ranks(list(parts)) for parts in zip(*ranks, strict=True)])


def test_resume_twice_and_at_an_epoch_boundary_equals_an_uninterrupted_run(caches, staging) -> None:
    path = caches["both"][0]
    whole = _epoch(open_cache(path, staging_dir=staging), 2, epoch=0) + _epoch(
        open_cache(path, staging_dir=staging), 2, epoch=1
    )
    per_epoch = open_cache(path, staging_dir=staging).num_batches(2)
    got = []
    for epoch, start, take in [(0, 0, 3), (0, 3, 4), (0, 7, None), (1, 0, 2), (1, 2, None)]:
        stream = open_cache(path, staging_dir=staging).batches(2, seed=0, epoch=epoch, start_batch=start)
        got += list(itertools.islice(stream, take))
    assert len(got) == 2 * per_epoch
    _assert_batches_equal(whole, got)
    reader = open_cache(path, staging_dir=staging)
    assert _epoch(reader, 2, start_batch=per_epoch) == []  # resuming exactly at the end of an epoch
    with pytest.raises(ValueError, match="start_batch"):
        reader.batches(2, seed=0, start_batch=per_epoch + 1)  # refused at the call, not at the first next()


# ----------------------------------------------------------------------------- validation and errors


def test_open_refuses_a_truncated_shard_naming_it(caches, staging, tmp_path) -> None:
    path = _copy_cache(caches["topk"][0], tmp_path / "c")
    shard = path / "shard-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError, match=f"{shard}.*truncated.*dvc pull"):
        open_cache(path, staging_dir=staging)


def test_open_refuses_a_manifest_size_that_does_not_match(caches, staging, tmp_path) -> None:
    path = _copy_cache(caches["topk"][0], tmp_path / "c")
    m = Manifest.load(path)
    m.shards[1] = ShardInfo(**{**m.shards[1].__dict__, "bytes": m.shards[1].bytes + 1})
    (path / "manifest.json").write_text(m.to_json())
    with pytest.raises(CacheError, match="shard-00001.parquet.*bytes but the manifest says"):
        open_cache(path, staging_dir=staging)


def test_a_flipped_byte_is_caught_when_staging_even_with_size_verification(caches, staging, tmp_path) -> None:
    path = _copy_cache(caches["topk"][0], tmp_path / "c")
    shard = path / "shard-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    reader = open_cache(path, staging_dir=staging)  # sizes match: open succeeds
    reader[0]  # an intact shard stages fine
    with pytest.raises(CacheError, match=f"{shard}: sha256 .* does not match"):
        reader[16]
    assert not list(staging.glob(f"{Manifest.load(path).shards[3].sha256}*"))  # nothing staged for it
    with pytest.raises(CacheError, match="shard-00003.parquet: sha256"):
        open_cache(path, staging_dir=staging, verify="full")


def test_open_refuses_a_missing_shard(caches, staging, tmp_path) -> None:
    path = _copy_cache(caches["topk"][0], tmp_path / "c")
    (path / "shard-00004.parquet").unlink()
    with pytest.raises(CacheError, match="shard-00004.parquet: shard listed in .* is missing"):
        open_cache(path, staging_dir=staging)


def test_symlinks_outside_the_cache_are_refused_inside_allowed(caches, staging, tmp_path) -> None:
    path = _copy_cache(caches["topk"][0], tmp_path / "c")
    outside = tmp_path / "elsewhere.parquet"
    os.replace(path / "shard-00000.parquet", outside)
    (path / "shard-00000.parquet").symlink_to(outside)
    with pytest.raises(CacheError, match="shard-00000.parquet: symlink to .*outside the cache directory"):
        open_cache(path, staging_dir=staging)
    (path / "store").mkdir()
    os.replace(outside, path / "store" / "s0")
    (path / "shard-00000.parquet").unlink()
    (path / "shard-00000.parquet").symlink_to(path / "store" / "s0")
    assert open_cache(path, staging_dir=staging)[0]["seq_index"] == 0


def test_hostile_shard_names_are_refused_before_any_file_is_opened(caches, staging, tmp_path) -> None:
    path = _copy_cache(caches["topk"][0], tmp_path / "c")
    text = (path / "manifest.json").read_text().replace('"shard-00001.parquet"', '"../secret.parquet"')
    (path / "manifest.json").write_text(text)
    with pytest.raises(CacheError, match="'../secret.parquet' is not of the form"):
        open_cache(path, staging_dir=staging)
    assert not staging.exists()


def test_unknown_major_version_and_empty_caches_are_refused(caches, staging, tmp_path) -> None:
    path = _copy_cache(caches["topk"][0], tmp_path / "c")
    (path / "manifest.json").write_text((path / "manifest.json").read_text().replace('"2.0"', '"3.0"'))
    with pytest.raises(CacheError, match=r"format version 3.0 is not supported by this kdcache \(reads 1.x, 2.x\)"):
        open_cache(path, staging_dir=staging)
    with pytest.raises(CacheError, match="no manifest"):
        open_cache(tmp_path / "nothing", staging_dir=staging)


def test_a_different_student_tokenizer_is_refused_naming_both_fingerprints(caches, staging) -> None:
    path = caches["topk"][0]
    assert len(open_cache(path, staging_dir=staging, expect_tokenizer="tok-a")) == N
    with pytest.raises(
        CacheError,
        match=r"student's tokenizer \(fingerprint tok-b\) differs from the cache's "
        r"\(manifest tokenizer.fingerprint tok-a\).*tokenizer/.*train.vocab_map: exact",
    ):
        open_cache(path, staging_dir=staging, expect_tokenizer="tok-b")


def _shard_file_problems(path: Path) -> list[str]:
    """verify_cache's findings about shard files themselves. The fixture caches are written from the
    contract alone (no stats, tokenizer/ or footer records, which verify reports too: tests/test_hostile.py)."""
    manifest = str(path / "manifest.json")
    return [p for p in verify_cache(path) if not p.startswith(manifest) and "no kdcache shard record" not in p]


def test_verify_cache_lists_each_bad_file(caches, tmp_path) -> None:
    assert _shard_file_problems(caches["both"][0]) == [] and _shard_file_problems(caches["adaptive"][0]) == []
    path = _copy_cache(caches["adaptive"][0], tmp_path / "c")
    (path / "shard-00001.parquet").write_bytes((path / "shard-00001.parquet").read_bytes()[:100])
    flipped = bytearray((path / "shard-00003.parquet").read_bytes())
    flipped[200] ^= 0xFF
    (path / "shard-00003.parquet").write_bytes(bytes(flipped))
    (path / "shard-00004.parquet").unlink()
    problems = _shard_file_problems(path)
    assert len(problems) == 3
    for name, what in (("shard-00001", "truncated"), ("shard-00003", "sha256"), ("shard-00004", "missing")):
        assert any(name in p and what in p for p in problems), (name, problems)


def test_verify_cache_finds_bad_values_the_format_can_hold(tmp_path) -> None:
    layout = LAYOUTS["both"]
    rows = random_targets(layout, 6, seed=9)
    rows[0].input_ids[3] = layout.vocab_size + 5  # id out of range
    rows[1].topk_ids[2, 0] = layout.vocab_size + 7  # a top-k id out of range (gap coding holds any id < 2**16)
    rows[2].sample_counts[0, 0] += 1  # 9 draws instead of 8
    rows[5].seq_index = 4  # duplicate of row 4, and not increasing
    write_test_cache(tmp_path / "bad", rows, layout, rows_per_shard=3)
    problems = "\n".join(verify_cache(tmp_path / "bad"))
    assert "shard-00000.parquet: input_ids: ids >= vocab_size 300" in problems
    assert "shard-00000.parquet: topk_ids: ids >= vocab_size 300" in problems
    assert "shard-00000.parquet: sample_counts: 1 positions do not sum to 8" in problems
    assert "shard-00001.parquet: seq_index values are not increasing" in problems
    assert "seq_index values appear more than once" in problems
    manifest = tmp_path / "bad" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"kdcache"', '"other"'))
    assert len(verify_cache(tmp_path / "bad")) == 1


# ----------------------------------------------------------------------------- staging, pickling, interop


def test_shards_are_staged_once_by_sha256_and_reused_on_reopen(caches, staging) -> None:
    path = caches["sampled"][0]
    shas = {s.sha256 for s in Manifest.load(path).shards}
    first = [open_cache(path, staging_dir=staging)[i] for i in range(N)]
    staged = {p.name: p.stat().st_ino for p in staging.glob(f"*{STAGED_SUFFIX}")}
    assert {name.split("-")[0] for name in staged} == shas and all(
        len(n.split("-")[1]) == 16 + len(STAGED_SUFFIX) for n in staged
    )
    reader = open_cache(path, staging_dir=staging)
    again = [reader[i] for i in range(N)]
    _epoch(reader, 4)
    assert {p.name: p.stat().st_ino for p in staging.glob(f"*{STAGED_SUFFIX}")} == staged  # same files, never rewritten
    assert not list(staging.glob("*.tmp")) and not list(staging.glob(".*.tmp"))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["sample_counts"], b["sample_counts"])


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_staged_file_is_set_aside_and_restaged_not_trusted(caches, staging, damage) -> None:
    from kdcache.cache import staging as staging_module

    path = caches["topk"][0]
    want = open_cache(path, staging_dir=staging)[0]
    (staged,) = staging.glob(f"{Manifest.load(path).shards[0].sha256}-*{STAGED_SUFFIX}")
    data = bytearray(staged.read_bytes())
    if damage == "truncated":
        data = data[:-64]
    else:  # same size, same inode: bytes flipped in place after staging (ids past the vocabulary, say)
        data[len(data) // 2] ^= 0xFF
    with open(staged, "r+b") as f:
        f.write(bytes(data))
        f.truncate()
    staging_module._verified.clear()  # a new process: it has hashed nothing yet
    got = open_cache(path, staging_dir=staging)[0]
    np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"])
    assert _xxh_matches_name(staged) and len(list(staging.glob("*.damaged-*"))) == 1
    assert not list(staging.glob(".*.tmp"))


def _xxh_matches_name(path) -> bool:
    import xxhash

    return xxhash.xxh3_64(path.read_bytes()).hexdigest() == path.name.split("-")[1].removesuffix(STAGED_SUFFIX)


def test_staging_is_bounded_by_evicting_the_least_recently_used_files(caches, staging) -> None:
    path = caches["topk"][0]
    reader = open_cache(path, staging_dir=staging, staging_max_bytes=1, prefetch=0)  # tiny bound: keep the newest
    rows = [reader[i] for i in range(N)]
    assert len(rows) == N and len(list(staging.glob(f"*{STAGED_SUFFIX}"))) == 1
    np.testing.assert_array_equal(reader[0]["topk_ids"], open_cache(path, staging_dir=staging / "fresh")[0]["topk_ids"])


def test_temporary_files_of_killed_stagers_are_cleaned_when_a_reader_opens(caches, staging) -> None:
    import os

    staging.mkdir(parents=True, exist_ok=True)
    dead = staging / f".{'a' * 64}.{2**22 + 12345}.deadbeef.tmp"  # no such pid
    alive = staging / f".{'b' * 64}.{os.getpid()}.cafe.tmp"  # a stager still at work
    dead.write_bytes(b"x")
    alive.write_bytes(b"y")
    open_cache(caches["topk"][0], staging_dir=staging)
    assert not dead.exists() and alive.exists()


def test_a_filesystem_without_locks_is_refused_naming_the_fix(caches, staging, monkeypatch) -> None:
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(CacheError, match="does not support file locks.*set KDCACHE_STAGING_DIR"):
        open_cache(caches["topk"][0], staging_dir=staging)[0]


def test_default_staging_dir_is_node_local_scratch_unless_the_environment_says(monkeypatch, tmp_path) -> None:
    import tempfile

    from kdcache.cache.staging import default_staging_dir

    monkeypatch.delenv("KDCACHE_STAGING_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    assert default_staging_dir().parent == tmp_path / "scratch"  # $TMPDIR, never ~/.cache (often NFS)


def test_default_staging_dir_comes_from_the_environment(caches, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "env-staging"))
    reader = open_cache(caches["topk"][0])
    reader[0]
    assert reader.staging_dir == tmp_path / "env-staging" and list(reader.staging_dir.glob(f"*{STAGED_SUFFIX}"))
    assert not list(caches["topk"][0].glob(".*"))  # nothing written into the (DVC-tracked) cache dir


def test_prefetch_stages_the_next_shards_in_the_background(caches, staging) -> None:
    path = caches["topk"][0]
    reader = open_cache(path, staging_dir=staging, prefetch=2)
    next(reader.batches(2, seed=0, shuffle=False))
    for future in list(reader._futures.values()):
        future.result(timeout=30)
    shas = [s.sha256 for s in reader.meta.shards]
    assert {p.name.split("-")[0] for p in staging.glob(f"*{STAGED_SUFFIX}")} == set(shas[:3])
    reader.close()


def test_reader_pickles_by_path_and_works_in_dataloader_workers(caches, staging) -> None:
    path, rows = caches["topk"]
    reader = open_cache(path, staging_dir=staging)
    _epoch(reader, 4)  # start the prefetch thread before workers fork
    blob = pickle.dumps(reader)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    assert clone.staging_dir == staging and len(clone) == N
    assert_same_targets(clone[7], rows[7], LAYOUTS["topk"])
    loader = torch.utils.data.DataLoader(reader, batch_size=5, num_workers=2)
    seen = torch.cat([b["seq_index"] for b in loader])
    assert seen.tolist() == list(range(N))


def test_shards_are_readable_by_datasets_pandas_pyarrow_and_duckdb(caches, tmp_path) -> None:
    import datasets
    import duckdb
    import pandas as pd

    path = caches["both"][0]
    pattern = str(path / "shard-*.parquet")
    ds = datasets.load_dataset("parquet", data_files=pattern, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == N and sorted(ds["seq_index"]) == list(range(N))
    frame = pd.concat(pd.read_parquet(p) for p in sorted(path.glob("shard-*.parquet")))
    assert list(frame.columns) == LAYOUTS["both"].columns() and len(frame) == N
    assert pq.read_table(path / "shard-00000.parquet").num_rows == 5
    assert duckdb.sql(f"SELECT count(*), max(seq_index) FROM read_parquet('{pattern}')").fetchall() == [(N, N - 1)]


# --- assembly off the training thread: worker processes, the prefetch thread ---------------------


def _same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("kind", ["both", "adaptive"])
def test_worker_processes_serve_the_same_batches_in_the_same_order(caches, staging, kind) -> None:
    with open_cache(caches[kind][0], staging_dir=staging) as reader:
        args = dict(seed=5, epoch=1, rank=1, world_size=2, start_batch=1)
        here = list(reader.batches(2, **args))
        assert _same_batches(list(reader.batches(2, **args, workers=2)), here)
        assert _same_batches(list(reader.batches(2, **args, pin_memory=True)), here)  # no CUDA: unchanged


def test_the_prefetcher_yields_the_same_items_and_closes_the_source_on_its_thread(caches, staging) -> None:
    from kdcache.cache.prefetch import Prefetcher

    closed_on = []

    def source():
        try:
            yield from range(100)
        finally:
            closed_on.append(threading.current_thread().name)

    with Prefetcher(source(), depth=3, transform=lambda x: x * 2) as ahead:
        assert [next(ahead) for _ in range(5)] == [0, 2, 4, 6, 8]
    assert closed_on == ["kdcache-batches"]  # stopped early: the generator was closed on the thread
    with open_cache(caches["both"][0], staging_dir=staging) as reader:
        here = list(reader.batches(3, seed=0))
        with Prefetcher(reader.batches(3, seed=0)) as ahead:
            assert _same_batches(list(ahead), here) and ahead.waited_s >= 0


def test_the_prefetcher_raises_the_sources_error_in_the_consumer() -> None:
    from kdcache.cache.prefetch import Prefetcher

    def source():
        yield 1
        raise CacheError("shard-00003.parquet: damaged")

    ahead = Prefetcher(source())
    assert next(ahead) == 1
    with pytest.raises(CacheError, match="damaged"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.close()
