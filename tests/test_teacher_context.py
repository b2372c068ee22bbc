"""Context distillation (cache.teacher_context): cached targets equal an independent forward of [context; row],
cut to the row's positions; the context is recorded, named and part of the resume key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_world, tiny_llama

from kdcache.cache.build import build_cache
from kdcache.cache.format import VALUE_GAMMA, VALUE_LEVELS
from kdcache.cache.identity import CacheDirError, cache_dir_for
from kdcache.cache.rows import decode_row
from kdcache.cache.verify import verify_cache
from kdcache.cache.writer import SHARD_META_KEY
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.fingerprint import sha256_file
from kdcache.teacher import load_teacher
from kdcache.teacher_context import TeacherContextError, load_teacher_context
from kdcache.token_data import open_tokens

VOCAB, T, K = 48, 16, 8
CONTEXT = "w5 w6 w7 w8 w9 w10 w11"
CFG = CacheConfig(
    targets="topk", top_k=K, batch_size=3, rows_per_shard=5, teacher_context=CONTEXT, value_encoding="rel8"
)  # rel8: codes uniform in (p / p_max) ** VALUE_GAMMA, the check below (abs8's are absolute and renormalized)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    w = make_world(tmp_path_factory.mktemp("ctx"), vocab_size=VOCAB, seq=T)
    tiny_llama(VOCAB, max_positions=64, seed=1).save_pretrained(w["teacher"])  # room for context + row
    w["loaded"] = load_teacher(TeacherConfig(path=str(w["teacher"]), device="cpu"))
    return w


def _rows(cache: Path, layout) -> dict[int, object]:
    return {
        row["seq_index"]: decode_row(layout, row)
        for shard in sorted(cache.glob("shard-*.parquet"))
        for row in pq.read_table(shard).to_pylist()
    }


def test_cached_targets_are_the_teachers_distribution_given_the_context(world, tmp_path) -> None:
    teacher, tokens = world["loaded"], open_tokens(world["tokens"], "train")
    manifest = build_cache(teacher, tokens, CFG, out_dir=tmp_path / "c")
    rows = _rows(tmp_path / "c", manifest.layout)
    context = [int(w[1:]) for w in CONTEXT.split()]  # the word tokenizer adds no special tokens
    ids = torch.from_numpy(np.asarray(tokens.ids, np.int64))  # (N, T)
    full = torch.cat([torch.tensor(context).expand(len(ids), -1), ids], dim=1)  # (N, C + T), one plain forward
    with torch.no_grad():
        dense = torch.log_softmax(teacher.model(input_ids=full).logits[:, len(context) :].double(), dim=-1)  # (N, T, V)
        bare = torch.log_softmax(teacher.model(input_ids=ids).logits.double(), dim=-1)  # (N, T, V) without context
    assert (dense - bare).abs().max() > 0.05  # the context changes the teacher's predictions
    top_ids = np.sort(dense.topk(K, dim=-1).indices.numpy(), axis=-1)  # (N, T, k) ascending, as stored
    nll = -dense[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].numpy()  # (N, T - 1): next token given context + prefix
    assert sorted(rows) == list(range(len(ids)))
    for i, row in rows.items():
        assert np.array_equal(row.input_ids, tokens.ids[i]) and np.array_equal(row.topk_ids, top_ids[i])
        want = np.take_along_axis(dense[i].numpy(), top_ids[i], axis=-1)  # (T, k)
        got = row.topk_logprobs.astype(np.float64)
        u = [np.exp(VALUE_GAMMA * (x - x.max(-1, keepdims=True))) for x in (got, want)]  # what the codes quantize
        assert np.abs(u[0] - u[1]).max() <= 0.5 / VALUE_LEVELS + 1e-5
        assert np.allclose(np.exp(got).sum(-1), np.exp(want).sum(-1), rtol=1e-3, atol=0)  # kept mass: tail codes
        assert np.allclose(row.teacher_nll[:-1], nll[i], rtol=2e-3, atol=2e-3)  # fp16 signal, position-aligned
    assert verify_cache(tmp_path / "c") == []


def test_manifest_records_the_context_and_the_name_and_key_change_with_it(world, tmp_path) -> None:
    teacher, tokens = world["loaded"], open_tokens(world["tokens"], "train")
    ctx_file = tmp_path / "system.txt"
    ctx_file.write_text("w3 w4\nw30 w31\n", encoding="utf-8")
    m_str = build_cache(teacher, tokens, CFG, out_dir=tmp_path / "s")
    assert m_str.corpus["teacher_context"] == {
        "sha256": hashlib.sha256(CONTEXT.encode()).hexdigest(),
        "num_tokens": 7,
        "source": "string",
    }
    cfg_file = CacheConfig(**{**CFG.__dict__, "teacher_context": str(ctx_file)})
    m_file = build_cache(teacher, tokens, cfg_file, out_dir=tmp_path / "f")
    assert m_file.corpus["teacher_context"] == {
        "sha256": sha256_file(ctx_file),
        "num_tokens": 4,
        "source": "file system.txt",
    }
    plain = CacheConfig(**{**CFG.__dict__, "teacher_context": ""})
    names = {cache_dir_for(teacher, tokens, c).name for c in (CFG, cfg_file, plain)}
    assert len(names) == 3 and cache_dir_for(teacher, tokens, CFG).name.endswith(
        f"-ctx{hashlib.sha256(CONTEXT.encode()).hexdigest()[:8]}"
    )
    assert "teacher_context" not in build_cache(teacher, tokens, plain, out_dir=tmp_path / "p").corpus
    keys = {
        json.loads(pq.read_metadata(next((tmp_path / d).glob("shard-*.parquet"))).metadata[SHARD_META_KEY])["build_key"]
        for d in "sfp"
    }
    assert len(keys) == 3  # each shard's footer carries a build key that includes the context


def test_resume_under_another_context_is_refused(world, tmp_path) -> None:
    teacher, tokens = world["loaded"], open_tokens(world["tokens"], "train")
    build_cache(teacher, tokens, CFG, out_dir=tmp_path / "c")
    other = CacheConfig(**{**CFG.__dict__, "teacher_context": "w20 w21"})
    with pytest.raises(CacheDirError, match="corpus.teacher_context"):
        build_cache(teacher, tokens, other, out_dir=tmp_path / "c")


def test_bad_contexts_are_refused_naming_the_field(world, tmp_path) -> None:
    teacher = world["loaded"]
    with pytest.raises(TeacherContextError, match="cache.teacher_context: 'prompts/system.txt' looks like a file path"):
        load_teacher_context("prompts/system.txt", teacher, seq_len=T)
    with pytest.raises(TeacherContextError, match="max_position_embeddings 64"):
        load_teacher_context(" ".join(["w3"] * 60), teacher, seq_len=T)
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(TeacherContextError, match="empty"):
        load_teacher_context(str(tmp_path / "empty.txt"), teacher, seq_len=T)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(TeacherContextError, match="not UTF-8 at byte 3"):
        load_teacher_context(str(tmp_path / "latin1.txt"), teacher, seq_len=T)
    assert load_teacher_context("", teacher, seq_len=T) is None
