"""build_cache writes shards equal to a fresh teacher forward; reruns resume byte-identically; failures seal nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import bpe_tokenizer

import kdcache.cache.writer as cache_writer
from kdcache.cache.build import build_cache
from kdcache.cache.format import VALUE_GAMMA, VALUE_LEVELS, Manifest, TargetLayout
from kdcache.cache.identity import CacheDirError, default_cache_name, target_layout
from kdcache.cache.rows import decode_row
from kdcache.cache.writer import CacheWriteError, read_shard_meta
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.fingerprint import sha256_file, tokenizer_fingerprint
from kdcache.teacher import Teacher, load_teacher
from kdcache.token_data import open_tokens, write_tokens

N, T, VOCAB = 10, 16, 300
CFG = CacheConfig(targets="topk", top_k=8, batch_size=3, rows_per_shard=4, split="train")  # shards of 4, 4, 2 rows
RARE = 299  # a token id that appears in one sequence only (NaN injection)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Teacher:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(path)
    bpe_tokenizer(Path(__file__).read_text().splitlines() * 3, VOCAB).save_pretrained(path)
    return load_teacher(TeacherConfig(path=str(path), device="cpu"))


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory, teacher) -> Path:
    ids = np.random.default_rng(0).integers(0, VOCAB - 1, size=(N, T))
    ids[7, 9] = RARE  # shard 1, second batch: its .tmp is open when the NaN appears
    path = tmp_path_factory.mktemp("tokens")
    write_tokens(
        path,
        {"train": ids, "val": ids[:2]},
        vocab_size=VOCAB,
        tokenizer_fingerprint=tokenizer_fingerprint(teacher.tokenizer),
    )
    return path


def _files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.is_file()}


def _rows(cache: Path, layout: TargetLayout) -> dict[int, object]:
    rows = {}
    for shard in sorted(cache.glob("shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            rows[row["seq_index"]] = decode_row(layout, row)
    return rows


def test_cached_values_equal_a_fresh_teacher_forward(teacher, token_dir, tmp_path):
    tokens = open_tokens(token_dir, "train")
    cfg = dataclasses.replace(CFG, value_encoding="rel8")  # the bound below is rel8's (others: test_value_codes.py)
    manifest = build_cache(teacher, tokens, cfg, out_dir=tmp_path / "c")
    rows = _rows(tmp_path / "c", manifest.layout)
    assert sorted(rows) == list(range(N))
    with torch.no_grad():
        dense = torch.log_softmax(
            teacher.model(input_ids=torch.from_numpy(np.asarray(tokens.ids, np.int64))).logits[..., :VOCAB].float(),
            dim=-1,
        )  # (N, T, V)
    top_ids = np.sort(dense.topk(8, dim=-1).indices.numpy(), axis=-1)  # (N, T, k) ascending, as stored
    for i, row in rows.items():
        assert np.array_equal(row.input_ids, tokens.ids[i]) and np.array_equal(row.topk_ids, top_ids[i])
        want = np.take_along_axis(dense[i].numpy().astype(np.float64), top_ids[i], axis=-1)  # (T, k)
        got = row.topk_logprobs.astype(np.float64)
        u = [np.exp(VALUE_GAMMA * (x - x.max(-1, keepdims=True))) for x in (got, want)]  # what the codes quantize
        assert np.abs(u[0] - u[1]).max() <= 0.5 / VALUE_LEVELS + 1e-5
        assert np.allclose(np.exp(got).sum(-1), np.exp(want).sum(-1), rtol=1e-3, atol=0)  # kept mass: tail codes


def test_manifest_describes_the_cache_and_shard_hashes_match(teacher, token_dir, tmp_path):
    tokens = open_tokens(token_dir, "train")
    out = tmp_path / "c"
    manifest = build_cache(teacher, tokens, CFG, out_dir=out)
    loaded = Manifest.load(out)
    assert loaded == manifest and manifest.name == "c" and manifest.created_by.startswith("kdcache ")
    assert manifest.teacher["sha256"] == teacher.info["sha256"] and manifest.teacher["dtype"] == "float32"
    assert (
        manifest.tokenizer["fingerprint"] == tokens.tokenizer_fingerprint and manifest.tokenizer["vocab_size"] == VOCAB
    )
    assert manifest.corpus == {
        "fingerprint": tokens.fingerprint,
        "split": "train",
        "seq_len": T,
        "num_sequences": N,
        "num_tokens": N * T,
        "packing": {"mode": "stream"},  # token data written without a packing record
    }
    assert manifest.targets["kind"] == "topk" and manifest.targets["top_k"] == 8
    assert manifest.targets["batch_size"] == 3 and manifest.targets["compute_dtype"] == "float32"
    assert [s.file for s in manifest.shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [(s.rows, s.first_seq) for s in manifest.shards] == [(4, 0), (4, 4), (2, 8)]
    for s in manifest.shards:
        assert s.sha256 == sha256_file(out / s.file) and s.bytes == (out / s.file).stat().st_size
        meta = pq.read_metadata(out / s.file)
        assert meta.row_group(0).column(1).statistics is None  # no statistics on binary blobs
    stats = manifest.stats
    assert stats["num_rows"] == N and stats["skipped_sequences"] == []
    assert 0 < stats["mean_entropy"] <= np.log(VOCAB) and 0 < stats["mean_topk_mass"] < 1
    assert stats["bytes_per_token"] == pytest.approx(stats["total_bytes"] / (N * T))
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    assert tokenizer_fingerprint(saved) == manifest.tokenizer["fingerprint"]
    assert manifest.tokenizer["files"] == {n: sha256_file(out / "tokenizer" / n) for n in manifest.tokenizer["files"]}


def test_rerun_is_a_noop_and_a_deleted_shard_is_recomputed_byte_identically(teacher, token_dir, tmp_path):
    tokens = open_tokens(token_dir, "train")
    out = tmp_path / "c"
    build_cache(teacher, tokens, CFG, out_dir=out)
    first = _files(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    build_cache(teacher, tokens, CFG, out_dir=out)
    assert _files(out) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    (out / "shard-00001.parquet").unlink()
    (out / "shard-00002.parquet.tmp").write_bytes(b"half a shard")
    build_cache(teacher, tokens, CFG, out_dir=out)
    assert _files(out) == first  # recomputed shard identical, .tmp gone, manifest unchanged
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == mtimes["shard-00000.parquet"]


def test_two_ranks_write_the_same_files_as_one(teacher, token_dir, tmp_path):
    tokens = open_tokens(token_dir, "train")
    one, two = tmp_path / "one" / "c", tmp_path / "two" / "c"
    build_cache(teacher, tokens, CFG, out_dir=one)
    assert build_cache(teacher, tokens, CFG, out_dir=two, rank=1, world_size=2) is None
    assert sorted(p.name for p in two.glob("shard-*")) == ["shard-00001.parquet"]
    assert build_cache(teacher, tokens, CFG, out_dir=two, rank=0, world_size=2) is not None
    assert _files(two) == _files(one)


def test_rank_zero_waits_for_missing_shards_of_other_ranks(teacher, token_dir, tmp_path):
    tokens = open_tokens(token_dir, "train")
    assert build_cache(teacher, tokens, CFG, out_dir=tmp_path, rank=0, world_size=2) is None
    assert not (tmp_path / "manifest.json").exists()


def test_writer_failure_propagates_and_leaves_no_manifest_or_tmp(teacher, token_dir, tmp_path, monkeypatch):
    tokens = open_tokens(token_dir, "train")
    calls = []
    real = cache_writer.encode_table

    def failing_encode(layout, rows):
        calls.append(len(rows))
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real(layout, rows)

    monkeypatch.setattr(cache_writer, "encode_table", failing_encode)
    with pytest.raises(CacheWriteError, match=f"{tmp_path / 'shard-00001.parquet'}: cannot write \\(No space left"):
        build_cache(teacher, tokens, CFG, out_dir=tmp_path)
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.parquet"]  # 2 batches: finished
    monkeypatch.setattr(cache_writer, "encode_table", real)
    assert build_cache(teacher, tokens, CFG, out_dir=tmp_path).num_rows == N


def test_other_variants_round_trip(teacher, token_dir, tmp_path):
    tokens = open_tokens(token_dir, "train")
    cfg = dataclasses.replace(CFG, targets="both", mass=0.5, samples=6, temperature=2.0)
    manifest = build_cache(teacher, tokens, cfg, out_dir=tmp_path)
    layout = manifest.layout
    assert layout.adaptive and layout.samples == 6 and layout.temperature == 2.0
    for row in _rows(tmp_path, layout).values():
        assert (row.sample_counts.sum(-1) == 6).all()
        assert row.topk_lengths.min() >= 1 and row.topk_lengths.max() <= 8


def test_tokenizer_fingerprint_mismatch_is_refused(teacher, token_dir, tmp_path):
    ids = np.asarray(open_tokens(token_dir, "train").ids)
    write_tokens(tmp_path / "tok", {"train": ids}, vocab_size=VOCAB, tokenizer_fingerprint="f" * 64)
    with pytest.raises(CacheWriteError, match="ffffffffffff.*rerun prepare with this teacher's tokenizer") as err:
        build_cache(teacher, open_tokens(tmp_path / "tok", "train"), CFG, out_dir=tmp_path / "c")
    assert tokenizer_fingerprint(teacher.tokenizer)[:12] in str(err.value)  # both fingerprints are named
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_wrong_split_and_foreign_shards_are_refused(teacher, token_dir, tmp_path):
    tokens = open_tokens(token_dir, "train")
    with pytest.raises(CacheWriteError, match="cache.split is 'val'"):
        build_cache(teacher, tokens, dataclasses.replace(CFG, split="val"), out_dir=tmp_path)
    build_cache(teacher, tokens, CFG, out_dir=tmp_path)
    with pytest.raises(CacheDirError, match=r"different teacher, corpus or settings — targets.top_k 8 \(this run: 4\)"):
        build_cache(teacher, tokens, dataclasses.replace(CFG, top_k=4), out_dir=tmp_path)  # the manifest says so
    (tmp_path / "manifest.json").unlink()  # without it, each shard's footer says so
    with pytest.raises(CacheWriteError, match="another teacher, corpus, target settings or runtime"):
        build_cache(teacher, tokens, dataclasses.replace(CFG, top_k=4), out_dir=tmp_path)
    with pytest.raises(CacheWriteError, match="belongs to another cache"):
        build_cache(teacher, tokens, dataclasses.replace(CFG, rows_per_shard=8), out_dir=tmp_path)


@pytest.fixture
def nan_teacher(teacher):
    embed = teacher.model.get_input_embeddings().weight
    saved = embed[RARE].clone()
    with torch.no_grad():
        embed[RARE] = float("nan")
    yield teacher
    with torch.no_grad():
        embed[RARE] = saved


def test_nan_logits_fail_naming_the_sequence(nan_teacher, token_dir, tmp_path):
    with pytest.raises(CacheWriteError, match=r"sequence\(s\) \[7\].*on_nan: skip"):
        build_cache(nan_teacher, open_tokens(token_dir, "train"), CFG, out_dir=tmp_path)
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("*.tmp"))


def test_nan_logits_skip_drops_the_sequence_and_records_it(nan_teacher, token_dir, tmp_path):
    cfg = dataclasses.replace(CFG, on_nan="skip")
    manifest = build_cache(nan_teacher, open_tokens(token_dir, "train"), cfg, out_dir=tmp_path)
    assert manifest.stats["skipped_sequences"] == [7] and manifest.num_rows == N - 1
    assert [s.rows for s in manifest.shards] == [4, 3, 2]
    assert 7 not in _rows(tmp_path, manifest.layout)
    assert read_shard_meta(tmp_path / "shard-00001.parquet", _build_key(tmp_path))["skipped"] == [7]


def _build_key(cache: Path) -> str:
    import json

    return json.loads(pq.read_metadata(cache / "shard-00000.parquet").metadata[b"kdcache.shard"])["build_key"]


def test_default_cache_name_is_content_addressed(teacher, token_dir):
    tokens = open_tokens(token_dir, "train")
    layout = target_layout(CFG, vocab_size=VOCAB, seq_len=T)
    name = default_cache_name(teacher.info, tokens, layout)
    assert name == f"{teacher.info['sha256'][:8]}-{tokens.fingerprint[:8]}-train-top8"
    assert name == default_cache_name(dict(teacher.info, path="/elsewhere"), tokens, layout)
    other = target_layout(
        dataclasses.replace(CFG, targets="both", samples=16, mass=0.99, temperature=2.0), vocab_size=VOCAB, seq_len=T
    )
    assert default_cache_name(teacher.info, tokens, other).endswith("-train-top8m0.99-s16seed0-t2")


RANK_SCRIPT = """
import sys
import torch.distributed as dist
import kdcache.cache.writer as cw
from kdcache.cache.build import build_cache
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens

teacher_dir, token_dir, out, fail_rank = sys.argv[1:5]
dist.init_process_group("gloo")
if dist.get_rank() == int(fail_rank):
    def broken(*args, **kwargs):
        raise OSError("injected write failure")
    cw.encode_table = broken
teacher = load_teacher(TeacherConfig(path=teacher_dir, device="cpu"))
try:
    cfg = CacheConfig(targets="topk", top_k=8, batch_size=3, rows_per_shard=4)
    m = build_cache(teacher, open_tokens(token_dir, "train"), cfg, out_dir=out)
    print("RESULT", dist.get_rank(), None if m is None else m.num_rows)
except Exception as e:
    print("ERROR", dist.get_rank(), type(e).__name__, e)
dist.destroy_process_group()
"""


def _run_two_ranks(teacher: Teacher, token_dir: Path, out: Path, *, fail_rank: int) -> list[str]:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, teacher.info["path"], str(token_dir), str(out), str(fail_rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            },
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    return sorted(line for o, _ in outs for line in o.splitlines() if line.startswith(("RESULT", "ERROR")))


def test_under_a_process_group_rank_zero_seals_after_every_rank_and_a_failed_rank_blocks_the_manifest(
    teacher, token_dir, tmp_path
):
    failed = _run_two_ranks(teacher, token_dir, tmp_path / "bad", fail_rank=1)
    assert failed[0].startswith("ERROR 0 CacheWriteError") and "another rank failed" in failed[0]
    assert failed[1].startswith("ERROR 1 CacheWriteError") and "injected write failure" in failed[1]
    assert not (tmp_path / "bad" / "manifest.json").exists()
    assert not list((tmp_path / "bad").glob("*.tmp"))
    # the success path (rank 0 seals, rank 1 returns None) runs under torchrun in tests/test_distributed.py
    assert build_cache(teacher, open_tokens(token_dir, "train"), CFG, out_dir=tmp_path / "bad").num_rows == N


def test_float16_overflow_to_inf_fails_naming_the_sequences(teacher, token_dir, tmp_path):
    fp16 = load_teacher(TeacherConfig(path=teacher.info["path"], device="cpu", dtype="float16"))
    with torch.no_grad():  # each factor fits float16; their products push logits past its 65504 -> inf
        fp16.model.model.norm.weight.mul_(1000.0)
        fp16.model.lm_head.weight.mul_(1000.0)
        logits = fp16.model(input_ids=torch.from_numpy(np.asarray(open_tokens(token_dir, "train").ids[:1], np.int64)))
    assert torch.isinf(logits.logits).any()  # a real float16 overflow, not an injected NaN
    with pytest.raises(CacheWriteError, match=r"NaN/inf logits for sequence\(s\) \[0, 1, 2\].*float16 overflows"):
        build_cache(fp16, open_tokens(token_dir, "train"), CFG, out_dir=tmp_path)
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("shard-*"))


def test_a_resume_with_other_software_or_hardware_is_refused_naming_the_difference(teacher, token_dir, tmp_path):
    """The manifest records what changes the numerics (targets.runtime); a rerun elsewhere names what differs."""
    tokens = open_tokens(token_dir, "train")
    manifest = build_cache(teacher, tokens, CFG, out_dir=tmp_path)
    runtime = manifest.targets["runtime"]
    assert set(runtime) == {"torch", "transformers", "device", "dtype", "attn_implementation", "deterministic"}
    assert runtime["device"] == "cpu" and runtime["dtype"] == "float32" and runtime["torch"] == torch.__version__
    path = tmp_path / "manifest.json"
    path.write_text(path.read_text().replace(f'"torch": "{torch.__version__}"', '"torch": "2.0.0"'))
    with pytest.raises(CacheDirError, match=r"targets.runtime .*'torch': '2.0.0'.*\(this run: .*'torch': '"):
        build_cache(teacher, tokens, CFG, out_dir=tmp_path)


def test_deterministic_mode_gives_the_same_bytes_and_is_recorded(teacher, token_dir, tmp_path):
    from kdcache.devices import use_deterministic_algorithms

    tokens = open_tokens(token_dir, "train")
    plain = build_cache(teacher, tokens, CFG, out_dir=tmp_path / "plain")
    use_deterministic_algorithms()
    try:
        det = build_cache(teacher, tokens, CFG, out_dir=tmp_path / "det")
    finally:
        torch.use_deterministic_algorithms(False)
    assert det.targets["runtime"]["deterministic"] == "True" and plain.targets["runtime"]["deterministic"] == "False"
    for a, b in zip(plain.shards, det.shards, strict=True):  # on the CPU: the same kernels, the same targets
        assert pq.read_table(tmp_path / "plain" / a.file).equals(pq.read_table(tmp_path / "det" / b.file))
