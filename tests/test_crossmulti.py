"""kdcache.crossmulti: teachers of different tokenizers combined for one student through the byte
alignment, on real caches of tiny teachers with hand-made tokenizers, against a float64 dense reference
that aligns positions by brute-force byte prefixes and mixes the projected teacher distributions."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sp_tokenizers
import torch
from conftest import tiny_llama
from test_crosstok import STUDENT_MERGES, TEACHER_MERGES, hand_made

from kdcache.cache.build import build_cache
from kdcache.cache.reader import open_cache
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.crossmulti import CrossTeachersBatches
from kdcache.crossproj import build_projection
from kdcache.crosstok import Aligner, event_map, student_row_length
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.packing import packing_of, valid_lengths
from kdcache.retokenize import retokenize_split
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens, write_tokens
from kdcache.tokenizer import token_bytes, train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("staging_one_thread")

T = 12
OTHER_MERGES = [("c", "d"), ("Ġ", "t"), ("t", "h"), ("Ġ", "c"), ("Ġc", "a")]  # "ab": A one token, B and S two
WEIGHTS = [0.7, 0.3]


def documents(n: int = 24) -> list[str]:
    rng = random.Random(0)
    words = ["abc", "the", "cat", "cd", "abcd", "then", "a", "bcd", "hat", "ab"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Lead teacher A (stream-packed rows of T tokens), teacher B over A's rows re-tokenized, a top-k cache
    of each holding the whole distribution, and a student tokenizer of a third kind."""
    root = tmp_path_factory.mktemp("crossmulti")
    a, b, s = hand_made(TEACHER_MERGES), hand_made(STUDENT_MERGES), hand_made(OTHER_MERGES)
    stream = [i for d in documents() for i in [*a(d, add_special_tokens=False)["input_ids"], a.eos_token_id]]
    rows = np.asarray(stream[: len(stream) // T * T]).reshape(-1, T)[:16]
    meta = {"packing": {"mode": "stream", "eos_id": a.eos_token_id, "prefix": [], "suffix": []}}
    fp = tokenizer_fingerprint(a)
    write_tokens(root / "tokens-a", {"train": rows}, vocab_size=len(a), tokenizer_fingerprint=fp, meta=meta)
    manifest = retokenize_split(
        root / "tokens-a", lead_tokenizer=a, tokenizer=b, out_dir=root / "tokens-b", splits=("train",)
    )
    assert manifest["retokenized_from"]["tokenizer_fingerprint"] == fp
    caches: dict[str, list] = {"topk": [], "sampled": []}
    for name, tok, seed in (("a", a, 0), ("b", b, 1)):
        tiny_llama(len(tok), max_positions=64, seed=seed).save_pretrained(root / f"teacher-{name}")
        tok.save_pretrained(root / f"teacher-{name}")
        teacher = load_teacher(TeacherConfig(path=str(root / f"teacher-{name}"), device="cpu"))
        for kind in caches:
            cfg = CacheConfig(targets=kind, top_k=len(tok), samples=8, batch_size=4, rows_per_shard=8)
            out = root / f"cache-{kind}-{name}"
            build_cache(teacher, open_tokens(root / f"tokens-{name}", "train"), cfg, out_dir=out)
            caches[kind].append(open_cache(out))
    return {"root": root, "a": a, "b": b, "s": s, "caches": caches["topk"], "sampled": caches["sampled"], "rows": rows}


def keys(ids: list[int], spelled: list[bytes]) -> np.ndarray:
    """Brute-force key of each position: bytes spelled so far + 10^4 x special tokens so far."""
    return np.cumsum([len(spelled[i]) for i in ids]) + 10_000 * np.cumsum([not spelled[i] for i in ids])


def dense(part: dict, b: int, j: int, V: int) -> np.ndarray:
    """The cached distribution at row b, position j as a dense float64 (V,) vector (sampled: draw shares)."""
    p = np.zeros(V)
    if "sample_ids" in part:
        counts = part["sample_counts"][b, j].double().numpy() / float(part["sample_total"][b, j])
        np.add.at(p, part["sample_ids"][b, j].numpy(), counts)
        return p
    mask = part["topk_mask"][b, j].numpy() if "topk_mask" in part else np.ones(part["topk_ids"].shape[-1], bool)
    ids, logp = part["topk_ids"][b, j].numpy()[mask], part["topk_logprobs"][b, j].double().numpy()[mask]
    np.add.at(p, ids, np.exp(logp))
    return p


def combiner(world: dict, tokenizers: list, weights: list[float]) -> CrossTeachersBatches:
    L = student_row_length(Aligner(world["a"], world["s"]), list(world["rows"]))
    return CrossTeachersBatches(
        tokenizers,
        world["s"],
        weights=weights,
        method="prefix",
        student_seq_len=L,
        packings=[packing_of(r.meta.corpus) for r in world["caches"][: len(tokenizers)]],
    )


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_mixed_targets_match_the_dense_float64_mixture_of_projected_teachers(world: dict, kind: str) -> None:
    a, b, s = world["a"], world["b"], world["s"]
    sb = token_bytes(s)
    tables, spelled = [], []
    for tok in (a, b):
        tb = token_bytes(tok)
        spelled.append(tb)
        tables.append(
            build_projection(
                "prefix", teacher_bytes=tb, student_tokenizer=s, student_bytes=sb, events=event_map(tok, s, tb)
            )
        )
    cross = combiner(world, [a, b], WEIGHTS)
    readers = world["caches"] if kind == "topk" else world["sampled"]
    only = [0, 0]
    checked = 0
    for parts in zip(*(r.batches(4, seed=0, shuffle=False) for r in readers), strict=True):
        out = cross.apply(parts)
        ids = out["input_ids"]
        for row in range(ids.shape[0]):
            n = int(out["ce_mask"][row].sum()) + 1
            s_ids = ids[row, :n].tolist()
            s_keys = keys(s_ids, sb)
            teacher_keys, limits = [], []
            for k, part in enumerate(parts):
                packing = packing_of(readers[k].meta.corpus)
                length = int(valid_lengths(part["input_ids"][row : row + 1], packing)[0])
                teacher_keys.append(keys(part["input_ids"][row, :length].tolist(), spelled[k]))
                limits.append(length - 1 if packing["mode"] == "documents" else length)
            for i in range(n - 1):
                P, weight = np.zeros(len(sb)), 0.0
                aligned = []
                for k, part in enumerate(parts):
                    js = [j for j in range(limits[k]) if teacher_keys[k][j] == s_keys[i]]
                    aligned.append(bool(js))
                    if js:
                        p = dense(part, row, js[0], len(spelled[k]))
                        table = tables[k].to_student
                        np.add.at(P, table[table >= 0], WEIGHTS[k] * p[table >= 0])
                        weight += WEIGHTS[k]
                assert bool(out["loss_mask"][row, i]) == any(aligned)
                if not any(aligned):
                    continue
                only[0] += aligned == [True, False]
                only[1] += aligned == [False, True]
                want = P / weight
                got = dense(out, row, i, len(sb))
                np.testing.assert_allclose(got, want, atol=2e-6)
                if kind == "topk":
                    assert float(out["topk_log_tail"][row, i].exp()) < 1e-6
                checked += 1
    assert checked > 100 and only[0] > 0 and only[1] > 0  # positions one teacher's boundaries miss
    report = cross.report()
    assert report["teachers"][1]["rows_mismatched"] == 0 and report["rows"] == len(world["rows"])


def test_a_row_the_other_teacher_cut_short_takes_the_lead_only(world: dict, tmp_path) -> None:
    a, b = world["a"], world["b"]
    retokenize_split(
        world["root"] / "tokens-a",
        lead_tokenizer=a,
        tokenizer=b,
        out_dir=tmp_path / "tok",
        splits=("train",),
        seq_len=6,
    )
    teacher = load_teacher(TeacherConfig(path=str(world["root"] / "teacher-b"), device="cpu"))
    cfg = CacheConfig(targets="topk", top_k=len(b), batch_size=4, rows_per_shard=8)
    build_cache(teacher, open_tokens(tmp_path / "tok", "train"), cfg, out_dir=tmp_path / "cache")
    readers = [world["caches"][0], open_cache(tmp_path / "cache")]
    cross, lead_only = combiner(world, [a, b], WEIGHTS), combiner(world, [a], [1.0])
    for parts in zip(*(r.batches(4, seed=0, shuffle=False) for r in readers), strict=True):
        out, ref = cross.apply(parts), lead_only.apply(parts[:1])
        assert torch.equal(out["loss_mask"], ref["loss_mask"]) and bool(ref["loss_mask"].any())
        for key in ("topk_ids", "topk_mask", "topk_logprobs"):
            torch.testing.assert_close(out[key], ref[key])
    assert cross.report()["teachers"][1]["rows_mismatched"] == len(world["rows"])


def test_uld_is_refused_with_several_teachers(world: dict) -> None:
    with pytest.raises(ValueError, match="uld compares sorted probabilities, which do not mix"):
        CrossTeachersBatches(
            [world["a"], world["b"]], world["s"], weights=WEIGHTS, method="uld", student_seq_len=8, packings=[{}, {}]
        )


def test_the_trainer_distills_one_student_from_two_teachers_of_different_tokenizers(world: dict, tmp_path) -> None:
    import json
    import math
    from dataclasses import replace

    from kdcache.config.base import ConfigError
    from kdcache.config.train import CacheSourceConfig, StudentConfig, TrainConfig
    from kdcache.train import train

    world["s"].save_pretrained(tmp_path / "student_tokenizer")
    caches = tuple(CacheSourceConfig(path=str(r.path), weight=w) for r, w in zip(world["caches"], WEIGHTS, strict=True))
    cfg = TrainConfig(
        max_steps=2,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        checkpoint_every=2,
        log_every=100,
        student=StudentConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        cross_tokenizer="prefix",
        student_tokenizer=str(tmp_path / "student_tokenizer"),
        caches=caches,
    )
    summary = train(cfg, cache_dir=world["caches"][0].path, out_dir=tmp_path / "s")
    assert summary["complete"] and math.isfinite(summary["final_loss"])
    report = json.loads((tmp_path / "s" / "training.json").read_text())["vocab_map"]
    assert len(report["teachers"]) == 2 and all(t["rows_mismatched"] == 0 for t in report["teachers"])
    assert report["soft_target_fraction"] >= max(t["soft_target_fraction_used"] for t in report["teachers"]) > 0.3
    with pytest.raises(ConfigError, match="uld with several train.caches"):
        train(replace(cfg, cross_tokenizer="uld"), cache_dir=caches[0].path, out_dir=tmp_path / "u")


def test_cross_caches_open_as_one_reader_zipping_their_batches(world: dict) -> None:
    from kdcache.cache.shards import CacheError
    from kdcache.multi_cache import open_caches, unzip_parts

    paths = [r.path for r in world["caches"]]
    with pytest.raises(CacheError, match="tokenizer.fingerprint differs"):
        open_caches(paths, WEIGHTS)  # combined per token id: refused
    with pytest.raises(CacheError, match="train.combine=min_nll: .*set train.combine: mixture"):
        open_caches(paths, WEIGHTS, cross=True, combine="min_nll")
    with open_caches(paths, WEIGHTS, cross=True) as reader:
        batch = next(iter(reader.batches(4, seed=0, shuffle=False)))
        parts = [next(iter(r.batches(4, seed=0, shuffle=False))) for r in world["caches"]]
        for got, want in zip(unzip_parts(batch, 2), parts, strict=True):
            assert set(got) == set(want)
            for k in want:  # teacher_nll is NaN where there is no next token
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True)


def test_retokenized_rows_spell_the_lead_rows_text_on_adversarial_text(tmp_path) -> None:
    """Rows cut inside multi-byte characters, whitespace runs, byte-fallback pieces: each re-tokenized row
    spells the lead row's bytes without the broken characters at its edges, with its special tokens."""
    from test_crosstok import ADVERSARIAL

    from kdcache.retokenize import retokenize_rows

    lead, other = train_bpe_tokenizer(ADVERSARIAL * 3, vocab_size=300), sp_tokenizers.metaspace_bpe(ADVERSARIAL, 300)
    stream = [i for d in ADVERSARIAL for i in [*lead(d, add_special_tokens=False)["input_ids"], lead.eos_token_id]]
    rows = np.asarray(stream[: len(stream) // 9 * 9]).reshape(-1, 9)
    ids, cut = retokenize_rows(rows, packing={"mode": "stream"}, aligner=Aligner(lead, other), seq_len=64, pad_id=-1)
    lb, ob = token_bytes(lead), token_bytes(other)
    for row, new in zip(rows, ids, strict=True):
        new = [i for i in new.tolist() if i >= 0]
        want = [_with_dummy_prefix(_whole_characters(seg)) for seg in _segments(row.tolist(), lb)]
        assert _segments(new, ob) == want  # the same text between the same special tokens
    assert cut["tokens_cut"] == 0 and cut["lost_bytes"] > 0  # some rows start or end inside a character


def _whole_characters(data: bytes) -> list[bytes]:
    from kdcache.crosstok import utf8_pieces

    return [data[a:b] for a, b in utf8_pieces(data)]


def _with_dummy_prefix(pieces: list[bytes]) -> bytes:
    """A Metaspace (prepend_scheme: always) tokenizer spells each piece it encodes with a leading space
    unless the piece starts with one."""
    return b"".join(p if p.startswith(b" ") else b" " + p for p in pieces)


def _segments(ids: list[int], spelled: list[bytes]) -> list[bytes]:
    """The bytes between special (zero-byte) tokens."""
    out = [b""]
    for i in ids:
        if spelled[i]:
            out[-1] += spelled[i]
        else:
            out.append(b"")
    return out


def test_kdcache_retokenize_writes_the_same_token_data_and_refuses_a_wrong_lead_tokenizer(
    world: dict, tmp_path
) -> None:
    from kdcache.cli import main

    root = world["root"]
    for name in ("a", "b"):
        assert (root / f"teacher-{name}" / "tokenizer.json").is_file()
    argv = ["retokenize", "--tokens", str(root / "tokens-a"), "--tokenizer", str(root / "teacher-b")]
    assert (
        main([*argv, "--lead-tokenizer", str(root / "teacher-a"), "--out", str(tmp_path / "b"), "--splits", "train"])
        == 0
    )
    assert np.array_equal(open_tokens(tmp_path / "b", "train").ids, open_tokens(root / "tokens-b", "train").ids)
    wrong = main(
        [*argv, "--lead-tokenizer", str(root / "teacher-b"), "--out", str(tmp_path / "c"), "--splits", "train"]
    )
    assert wrong == 1 and not (tmp_path / "c" / "manifest.json").exists()
