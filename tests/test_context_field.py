"""Per-document teacher contexts (corpus.context_field): prepare stores each row's context, rows never mix
contexts, and the cached targets equal an independent forward of [that document's context; row]."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_llama, word_tokenizer

from kdcache.cache.build import build_cache
from kdcache.cache.identity import CacheDirError, cache_dir_for
from kdcache.cache.rows import decode_row
from kdcache.cache.verify import verify_cache
from kdcache.config.cache import CacheConfig
from kdcache.config.corpus import CorpusConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.corpus import prepare_tokens
from kdcache.corpus_files import CorpusError
from kdcache.teacher import load_teacher
from kdcache.teacher_context import TeacherContextError
from kdcache.token_data import TokenDataError, contexts_sha256, open_tokens, verify_tokens

VOCAB, T, K = 48, 12, 8
CONTEXTS = ["w5 w6 w7", "w8 w9", "w11 w12 w13", ""]  # two of one length, one shorter, one empty
CFG = CacheConfig(targets="topk", top_k=K, batch_size=3, rows_per_shard=4, value_encoding="log32")  # 1/4096-nat codes


def _docs(n: int, seed: int) -> list[dict]:
    """Documents of 4..9 words, each under one row (T tokens with EOS), cycling through the contexts."""
    rng = np.random.default_rng(seed)
    words = [" ".join(f"w{i}" for i in rng.integers(14, VOCAB, size=rng.integers(4, 10))) for _ in range(n)]
    return [{"body": w, "ctx": CONTEXTS[i % len(CONTEXTS)]} for i, w in enumerate(words)]


def _prepare(root: Path, docs: list[dict], *, packing: str = "documents", name: str = "tokens", **corpus) -> Path:
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    cfg = CorpusConfig(paths=(str(path),), text_field="body", val_fraction=0.3, **{"context_field": "ctx", **corpus})
    prepare_tokens(cfg, PrepareConfig(seq_len=T, packing=packing), tokenizer_dir=root / "teacher", out_dir=root / name)
    return root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ctxfield")
    tiny_llama(VOCAB, max_positions=2 * T, seed=3).save_pretrained(root / "teacher")
    word_tokenizer(VOCAB).save_pretrained(root / "teacher")
    docs = _docs(14, seed=0)
    tokens = _prepare(root, docs)
    teacher = load_teacher(TeacherConfig(path=str(root / "teacher"), device="cpu"))
    return {"root": root, "docs": docs, "tokens": tokens, "teacher": teacher}


def _ids(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]  # the word tokenizer: no special tokens


def test_rows_carry_their_documents_context(world) -> None:
    by_body = {tuple(_ids(d["body"])): d["ctx"] for d in world["docs"]}
    for split in ("train", "val"):
        tokens = open_tokens(world["tokens"], split)
        rows = tokens.contexts
        assert rows is not None and len(rows.index) == len(tokens)
        assert rows.record["source"] == "field:ctx"
        assert rows.record["sha256"] == contexts_sha256(rows.table, rows.index)
        verify_tokens(tokens)
        assert rows.record["num_tokens"] == max(len(rows.table[i]) for i in set(rows.index.tolist()))
        for i, row in enumerate(tokens.ids):
            body = tuple(int(t) for t in row[: list(row).index(0)])  # up to the document's EOS (id 0)
            assert rows.for_rows(np.array([i]))[0] == tuple(_ids(by_body[body]))


def test_cached_targets_are_the_teachers_distribution_given_each_documents_context(world, tmp_path) -> None:
    teacher, tokens = world["teacher"], open_tokens(world["tokens"], "train")
    manifest = build_cache(teacher, tokens, CFG, out_dir=tmp_path / "c")
    record = manifest.corpus["teacher_context"]
    assert record == tokens.contexts.record and record["num_contexts"] == len(CONTEXTS)
    rows = {
        r["seq_index"]: decode_row(manifest.layout, r)
        for shard in sorted((tmp_path / "c").glob("shard-*.parquet"))
        for r in pq.read_table(shard).to_pylist()
    }
    assert sorted(rows) == list(range(len(tokens)))
    changed = 0.0
    for i, row in rows.items():
        context = tokens.contexts.for_rows(np.array([i]))[0]
        ids = torch.tensor(np.asarray(tokens.ids[i], np.int64))  # (T,)
        with torch.no_grad():  # an independent plain forward of [context; row], one row at a time
            logits = teacher.model(input_ids=torch.cat([torch.tensor(context, dtype=torch.int64), ids])[None]).logits
            bare = torch.log_softmax(teacher.model(input_ids=ids[None]).logits[0].double(), dim=-1)  # (T, V)
        dense = torch.log_softmax(logits[0, len(context) :].double(), dim=-1)  # (T, V)
        changed = max(changed, float((dense - bare).abs().max()) if context else 0.0)
        top_ids = np.sort(dense.topk(K, dim=-1).indices.numpy(), axis=-1)  # (T, k) ascending, as stored
        assert np.array_equal(row.input_ids, tokens.ids[i]) and np.array_equal(row.topk_ids, top_ids)
        want = np.take_along_axis(dense.numpy(), top_ids, axis=-1)  # (T, k)
        assert np.abs(row.topk_logprobs.astype(np.float64) - want).max() <= 1 / 4096  # log32: one code step
        nll = -dense[:-1].gather(-1, ids[1:, None])[:, 0].numpy()  # (T - 1,) next token given context + prefix
        assert np.allclose(row.teacher_nll[:-1], nll, rtol=2e-3, atol=2e-3)
    assert changed > 0.05  # the contexts change the teacher's predictions
    assert verify_cache(tmp_path / "c") == []
    assert cache_dir_for(teacher, tokens, CFG).name.endswith(f"-ctx{record['sha256'][:8]}")


def test_other_contexts_change_the_identity_and_resume_is_refused(world, tmp_path) -> None:
    teacher = world["teacher"]
    other = [{**d, "ctx": "w20 w21" if d["ctx"] == "w8 w9" else d["ctx"]} for d in world["docs"]]
    tokens = open_tokens(world["tokens"], "train")
    tokens2 = open_tokens(_prepare(world["root"], other, name="other"), "train")
    assert np.array_equal(tokens.ids, tokens2.ids) and tokens.fingerprint == tokens2.fingerprint  # same rows
    assert tokens.contexts.record["sha256"] != tokens2.contexts.record["sha256"]
    swapped = replace(tokens2.contexts, record=tokens.contexts.record)  # other contexts, this manifest's sha256
    with pytest.raises(TokenDataError, match="per-document contexts"):
        verify_tokens(replace(tokens, contexts=swapped))
    build_cache(teacher, tokens, CFG, out_dir=tmp_path / "c")
    with pytest.raises(CacheDirError, match="corpus.teacher_context"):
        build_cache(teacher, tokens2, CFG, out_dir=tmp_path / "c")


def test_stream_rows_never_mix_contexts(world) -> None:
    rng = np.random.default_rng(1)
    vocab = {"w5": range(14, 30), "w6": range(30, VOCAB)}  # each context's documents use their own words
    docs = [
        {"body": " ".join(f"w{rng.choice(vocab[c])}" for _ in range(7)), "ctx": c} for c in ["w5", "w6"] * 12
    ]  # interleaved in the file
    tokens = open_tokens(_prepare(world["root"], docs, packing="stream", name="stream"), "train")
    for i, row in enumerate(tokens.ids):
        (context,) = tokens.contexts.for_rows(np.array([i]))
        assert set(row.tolist()) - {0} <= set(vocab[f"w{context[0]}"])  # 0: EOS


def test_refusals_name_the_field_and_the_fix(world, tmp_path) -> None:
    root, teacher = world["root"], world["teacher"]
    docs = world["docs"]
    with pytest.raises(CorpusError, match=r"document 2 \(row order\) has no corpus.context_field='ctx'"):
        _prepare(root, [*docs[:2], {"body": "w20 w21"}, *docs[2:]], name="missing")
    with pytest.raises(CorpusError, match="no column corpus.context_field='topic'"):
        _prepare(root, docs, name="absent", context_field="topic")
    (root / "plain.txt").write_text("w20 w21\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="text file holds no corpus.context_field"):
        cfg = CorpusConfig(paths=(str(root / "plain.txt"),), context_field="ctx")
        prepare_tokens(cfg, PrepareConfig(seq_len=T), tokenizer_dir=root / "teacher", out_dir=tmp_path / "t")
    tokens = open_tokens(world["tokens"], "train")
    both = CacheConfig(**{**CFG.__dict__, "teacher_context": "w3 w4"})
    with pytest.raises(TeacherContextError, match="set one of them"):
        build_cache(teacher, tokens, both, out_dir=tmp_path / "b")
    long = [{**d, "ctx": " ".join(["w3"] * (T + 1))} for d in docs]  # T + 1 + T > the teacher's 2 T positions
    tokens_long = open_tokens(_prepare(root, long, name="long"), "train")
    with pytest.raises(TeacherContextError, match=r"longest context \(13 tokens\).*max_position_embeddings 24"):
        build_cache(teacher, tokens_long, CFG, out_dir=tmp_path / "l")
