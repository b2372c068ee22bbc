"""Cache format 2: log-normalizers at stored temperatures (exact re-tempering), per-token teacher signals,
v1 caches still read and train, unknown majors and reserved features refused."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STUDENT, make_world
from test_cache_reader import write_test_cache

from kdcache.cache.build import cache_corpus
from kdcache.cache.format import FORMAT_VERSION, Manifest, SequenceTargets
from kdcache.cache.reader import CacheError, open_cache
from kdcache.cache.signals import SIGNAL_BINS
from kdcache.cache.targets import sparsify, to_sequence_targets
from kdcache.cache.verify import verify_cache
from kdcache.config.base import ConfigError
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.token_filter import TokenFilterConfig
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.divergences import tempered_topk_targets
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.train import train

V1_CACHE = Path(__file__).parent / "data" / "v1_cache"
"""A format 1.0 cache (targets both, top-4 + 4 samples, vocab 48, 12 x 16 tokens) written by kdcache at commit
34c7991 (the last v1 writer) through its own build path: ``make_world(root, vocab_size=48, n=12, seq=16)``,
then ``cache_corpus(TeacherConfig(path, dtype="float32", device="cpu"), CacheConfig(targets="both", top_k=4,
samples=4, batch_size=4, rows_per_shard=8), tokens_dir, out_dir)``."""


@pytest.fixture(autouse=True)
def _staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))


def _train_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=100, chunk_tokens=16)
    return TrainConfig(**{**base, "student": StudentConfig(**STUDENT), **kw})


# ----------------------------------------------------------------------------- v1 and versions


def test_writers_write_2_0_and_a_v1_cache_still_verifies_reads_and_trains(tmp_path: Path) -> None:
    assert FORMAT_VERSION == "2.0"
    cache = shutil.copytree(V1_CACHE, tmp_path / "v1")
    assert Manifest.load(cache).format_version == "1.0"
    assert verify_cache(cache) == []
    with open_cache(cache, temperature=2.0) as reader:
        assert reader.layout.signals == () and reader.layout.temperatures == ()
        row = reader[0]
        assert "teacher_nll" not in row and "topk_log_z" not in row and row["topk_ids"].shape == (16, 4)
        batch = next(iter(reader.batches(4, seed=0)))
        assert {"topk_logprobs", "sample_ids"} <= set(batch) and "teacher_nll" not in batch
    summary = train(_train_cfg(loss="topk_tail"), cache_dir=cache, out_dir=tmp_path / "s")
    assert summary["complete"] and summary["steps"] == 2


def test_what_a_v1_cache_lacks_is_refused_naming_its_manifest_and_the_rebuild(tmp_path: Path) -> None:
    cache = shutil.copytree(V1_CACHE, tmp_path / "v1")
    filt = TokenFilterConfig(by="nll", fraction=0.5)
    with pytest.raises(ConfigError, match=r"v1/manifest.json: the cache has no teacher_nll \(format 1.0 predates it\)"):
        train(_train_cfg(token_filter=filt), cache_dir=cache, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"only at temperature\(s\) 1 .*cache.temperatures: \[2\]"):
        train(_train_cfg(loss="topk_tail", temperature=2.0), cache_dir=cache, out_dir=tmp_path / "b")
    assert train(_train_cfg(loss="ce", token_filter=filt), cache_dir=cache, out_dir=tmp_path / "c")["complete"]


def test_a_cache_whose_own_tokenizer_differs_from_its_manifest_is_called_damaged_not_a_student_mismatch(
    tmp_path: Path,
) -> None:
    from kdcache.train_data import TrainError

    cache = shutil.copytree(V1_CACHE, tmp_path / "v1")
    path = cache / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text().replace('"w47"', '"zz47"'))  # a hand edit: the manifest's sha256 no longer holds
    with pytest.raises(TrainError) as info:
        train(_train_cfg(), cache_dir=cache, out_dir=tmp_path / "s")
    message = str(info.value)
    assert "v1/tokenizer/: the cache's own tokenizer files load to fingerprint" in message
    assert "v1/manifest.json records tokenizer.fingerprint b68c30a3" in message
    assert "damaged or was edited by hand; run `kdcache verify" in message and "student" not in message


def test_an_unknown_major_is_refused_naming_the_file_and_the_versions_read(tmp_path: Path) -> None:
    cache = shutil.copytree(V1_CACHE, tmp_path / "v3")
    path = cache / "manifest.json"
    path.write_text(path.read_text().replace('"format_version": "1.0"', '"format_version": "3.0"'))
    with pytest.raises(CacheError, match=r"v3/manifest.json: format version 3.0 is not supported .*reads 1.x, 2.x"):
        open_cache(cache)


def test_reserved_features_are_refused_by_name_and_teacher_context_is_accepted(tmp_path: Path) -> None:
    cache = shutil.copytree(V1_CACHE, tmp_path / "c")
    path = cache / "manifest.json"
    original = json.loads(path.read_text())
    data = json.loads(path.read_text())
    data["targets"]["hidden"] = {"layers": [-1], "dim": 64, "projection": {"kind": "orthogonal", "seed": 0}}
    path.write_text(json.dumps(data))  # hidden-state targets are read since issue 11.3; a malformed record is not
    with pytest.raises(CacheError, match=r"manifest.json: targets.hidden must be .*sha256 \(64 hex digits\)"):
        open_cache(cache)
    data = original | {"corpus": original["corpus"] | {"teacher_context": {"sha256": "a" * 64, "num_tokens": 7}}}
    path.write_text(json.dumps(data))
    with pytest.raises(CacheError, match="corpus.teacher_context must be"):
        open_cache(cache)
    data["corpus"]["teacher_context"]["source"] = "prompt.txt"
    path.write_text(json.dumps(data))
    assert Manifest.load(cache).corpus["teacher_context"]["num_tokens"] == 7


# ----------------------------------------------------------------------------- built caches vs a dense forward


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return make_world(tmp_path_factory.mktemp("world"), vocab_size=48, n=8, seq=16)


@pytest.mark.parametrize(("tau0", "taus"), [(1.0, (2.0, 0.5)), (2.0, (1.0, 4.0))])
def test_built_log_normalizers_and_signals_equal_a_dense_float64_forward(world, tmp_path, tau0, taus) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "c"
    cfg = CacheConfig(targets="both", top_k=4, samples=4, temperature=tau0, temperatures=taus, batch_size=3)
    cache_corpus(TeacherConfig(path=str(world["teacher"]), device="cpu"), cfg, tokens_dir=world["tokens"], out_dir=out)
    manifest = Manifest.load(out)
    assert manifest.format_version == "2.0" and verify_cache(out) == []
    assert manifest.targets["temperatures"] == list(taus) and manifest.targets["signals"] == ["nll", "entropy"]
    model = AutoModelForCausalLM.from_pretrained(world["teacher"]).double().eval()
    nlls = []
    for tau in taus:
        with open_cache(out, temperature=tau) as reader:
            rows = [reader[i] for i in range(len(reader))]
            batch = next(iter(reader.batches(len(reader), seed=0, shuffle=False)))
        ids = batch["input_ids"]  # (B, T) int64, storage order = rows
        with torch.no_grad():
            logits = model(input_ids=ids).logits  # (B, T, V) float64
        logp1 = torch.log_softmax(logits, -1)
        logp0 = torch.log_softmax(logits / tau0, -1)
        want_z = torch.logsumexp(logp0 * tau0 / tau, -1)  # (B, T)
        torch.testing.assert_close(batch["topk_log_z"].double(), want_z, rtol=0, atol=2e-5)
        j = taus.index(tau)
        torch.testing.assert_close(
            torch.from_numpy(np.stack([r["topk_log_z"][j] for r in rows])).double(), want_z, rtol=0, atol=2e-5
        )
        nll = -logp1[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): position t predicts ids[t+1]
        entropy = -(logp1.exp() * logp1).sum(-1)  # (B, T)
        got_nll, got_h = batch["teacher_nll"].double(), batch["teacher_entropy"].double()
        assert torch.isnan(got_nll[:, -1]).all() and not torch.isnan(got_nll[:, :-1]).any()
        torch.testing.assert_close(got_nll[:, :-1], nll, rtol=1e-3, atol=2e-3)  # float16
        torch.testing.assert_close(got_h, entropy, rtol=1e-3, atol=2e-3)
        nlls.append(nll)
    stats = manifest.stats
    assert stats["nll_histogram"]["edges"] == list(SIGNAL_BINS) and sum(stats["nll_histogram"]["counts"]) == nll.numel()
    assert sum(stats["entropy_histogram"]["counts"]) == 8 * 16
    assert stats["mean_nll"] == pytest.approx(float(nlls[0].mean()), rel=1e-3)


def test_a_v2_cache_trains_at_a_stored_temperature_with_a_token_filter(world, tmp_path) -> None:
    out = tmp_path / "c"
    cfg = CacheConfig(targets="topk", top_k=4, temperatures=(2.0,), batch_size=4)
    cache_corpus(TeacherConfig(path=str(world["teacher"]), device="cpu"), cfg, tokens_dir=world["tokens"], out_dir=out)
    filt = TokenFilterConfig(by="entropy", keep="low", fraction=0.5)
    summary = train(
        _train_cfg(loss="topk_tail", temperature=2.0, token_filter=filt), cache_dir=out, out_dir=tmp_path / "s"
    )
    assert summary["complete"]
    with pytest.raises(ConfigError, match=r"only at temperature\(s\) 1, 2 .*cache.temperatures: \[4\]"):
        train(_train_cfg(loss="topk_tail", temperature=4.0), cache_dir=out, out_dir=tmp_path / "t")
    import contextlib
    import io

    from kdcache.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["inspect", str(out)]) == 0
    text = buffer.getvalue()
    for needle in (
        "format kdcache 2.0",
        "log-normalizers 2 ",
        "signals        nll, entropy",
        "bytes/token    ids ",
        "top-k ",
        "staged shard(s)",
        "mean_nll",
        "teacher NLL of the next token (nats, tau = 1; share of positions):",
        "teacher entropy (nats",
    ):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert "#" in text.split("teacher entropy")[1]  # text bars
    assert re.search(r"bytes/token    ids [0-9.]+, log-normalizers [0-9.]+, signals [0-9.]+, top-k [0-9.]+", text)


TEXTS = ["naïve café — ünïcödé 🙂 tokens", "def f(x):\n    return x  # 数据", "  spaces\tand\ttabs  ", "plain ascii"]


def test_byte_lengths_spell_each_row_with_a_byte_level_bpe_teacher(tmp_path: Path) -> None:
    from conftest import bpe_tokenizer, tiny_llama

    from kdcache.token_data import write_tokens
    from kdcache.tokenizer import token_bytes

    tok = bpe_tokenizer([t * 3 for t in TEXTS] * 5, 300)
    teacher = tmp_path / "teacher"
    tiny_llama(len(tok), max_positions=64).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    T = 48
    rows = np.full((len(TEXTS), T), tok.eos_token_id)
    for r, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"][:T]
        rows[r, : len(ids)] = ids
    fp = tokenizer_fingerprint(tok)
    write_tokens(tmp_path / "tok", {"train": rows, "val": rows[:1]}, vocab_size=len(tok), tokenizer_fingerprint=fp)
    cfg = CacheConfig(targets="both", top_k=4, samples=2, batch_size=2)
    cache_corpus(
        TeacherConfig(path=str(teacher), device="cpu"), cfg, tokens_dir=tmp_path / "tok", out_dir=tmp_path / "c"
    )
    manifest = Manifest.load(tmp_path / "c")
    spelled = token_bytes(tok)
    assert manifest.tokenizer["bytes"] == {
        "normalization": "none",
        "max_token_bytes": max(len(b) for b in spelled),
        "prefix_space": False,
    }
    with open_cache(tmp_path / "c") as reader:
        batch = next(iter(reader.batches(len(TEXTS), seed=0, shuffle=False)))
    lengths = batch["byte_lengths"]  # (B, T) int32
    assert lengths.dtype == torch.int32 and lengths[batch["input_ids"] == tok.eos_token_id].eq(0).all()
    for r, text in enumerate(TEXTS):
        ids = batch["input_ids"][r].tolist()
        assert lengths[r].tolist() == [len(spelled[i]) for i in ids]
        assert int(lengths[r].sum()) == len(text.encode())  # the row spells its text, byte for byte
        assert b"".join(spelled[i] for i in ids) == text.encode()
    # an import (here: our own NeMo export) stores the same spans, and no teacher signals
    from kdcache.interop.export import export_cache
    from kdcache.interop.ingest import import_cache

    export_cache(tmp_path / "c", to="nemo", out=tmp_path / "nemo")
    back = import_cache(tmp_path / "nemo", fmt="nemo", out=tmp_path / "back", tokenizer=teacher)
    imported = Manifest.load(back)
    assert imported.tokenizer["bytes"] == manifest.tokenizer["bytes"] and imported.targets["signals"] == []
    with open_cache(back) as reader:
        again = next(iter(reader.batches(len(TEXTS), seed=0, shuffle=False)))
    assert torch.equal(again["byte_lengths"], lengths) and "teacher_nll" not in again


def test_temperatures_are_refused_for_sampled_caches() -> None:
    with pytest.raises(ConfigError, match="cache.temperatures: needs cache.targets topk|both"):
        CacheConfig(targets="sampled", temperatures=(2.0,))
    with pytest.raises(ConfigError, match="must not repeat cache.temperature"):
        CacheConfig(targets="topk", temperatures=(1.0,))


# ----------------------------------------------------------------------------- exact re-tempering at V = 32k


def test_retempered_topk_and_tail_match_a_dense_float64_softmax_at_32k(tmp_path: Path) -> None:
    """encode -> Parquet -> stage -> reader at V = 32,768, k = 64, a real tail. At each stored tau the stored
    log-normalizer re-tempers exactly: the re-tempered top-k probabilities are within 0.1% (relative) of the
    dense tempered softmax beyond the stored values' own uint8 quantization (which re-tempering scales by
    tau0 / tau), and so is the tail mass 1 - sum_K. Through the stored (quantized) values the tail is within
    0.1% too where it is large (tau >= tau0); at tau < tau0 the tempered tail shrinks below the top-k values'
    quantization error and 1 - sum_K cannot resolve it (reported, not asserted)."""
    from kdcache.cache.format import TargetLayout

    V, B, T, k, taus = 32768, 3, 8, 64, (2.0, 4.0, 0.5)
    layout = TargetLayout(kind="topk", vocab_size=V, seq_len=T, top_k=k, temperatures=taus)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)  # (B, T, V)
    logits[..., :16] += 6.0  # a few strong ids, then a long tail
    sparse = sparsify(logits.float(), layout=layout, seq_indices=torch.arange(B), chunk_tokens=5)
    rows = to_sequence_targets(sparse, np.zeros((B, T), np.int64), list(range(B)))
    write_test_cache(tmp_path / "c", rows, layout, rows_per_shard=2)
    logp = torch.log_softmax(logits, -1)  # (B, T, V) tau0 = 1
    assert (1 - logp.topk(k, -1).values.exp().sum(-1)).min() > 0.3  # a real tail at tau0
    for tau in taus:
        with open_cache(tmp_path / "c", temperature=tau) as reader:
            batch = next(iter(reader.batches(B, seed=0, shuffle=False)))
        ids, lp, mask, log_z = (
            batch["topk_ids"],
            batch["topk_logprobs"].double(),
            batch["topk_mask"],
            batch["topk_log_z"],
        )
        want = torch.log_softmax(logits / tau, -1).gather(-1, ids).view(-1, k)  # dense tempered teacher on K
        want_tail = torch.log1p(-want.exp().sum(-1))  # (B*T,)
        exact = logp.gather(-1, ids).view(-1, k)  # the tau0 log-probs before quantization

        retempered = functools.partial(
            tempered_topk_targets, topk_mask=mask.view(-1, k), temperature=tau, vocab_size=V, log_z=log_z.reshape(-1)
        )
        got_k, got_tail = retempered(lp.view(-1, k))
        quantization = (lp.view(-1, k) - exact) / tau  # the value codes' own error, re-tempered
        assert (got_k - want - quantization).abs().max() < 1e-3  # re-tempering adds < 0.1%
        z_k, z_tail = retempered(exact)  # the stored log-normalizer alone
        assert (z_k - want).abs().max() < 1e-3 and ((z_tail - want_tail).exp() - 1).abs().max() < 1e-3, tau
        if tau >= 1.0:
            assert ((got_tail - want_tail).exp() - 1).abs().max() < 1e-3, tau


# ----------------------------------------------------------------------------- row round trip


def test_v2_columns_round_trip_through_encode_and_decode(tmp_path: Path) -> None:
    from kdcache.cache.format import TargetLayout
    from kdcache.cache.rows import decode_row, encode_row

    layout = TargetLayout(
        kind="topk",
        vocab_size=300,
        seq_len=6,
        top_k=3,
        temperatures=(2.0,),
        signals=("nll", "entropy"),
        max_token_bytes=300,
    )
    rng = np.random.default_rng(0)
    t = SequenceTargets(
        seq_index=4,
        input_ids=rng.integers(0, 300, 6),
        topk_ids=np.tile(np.arange(3), (6, 1)),
        topk_logprobs=np.log(np.full((6, 3), 0.2, np.float32)),
        topk_log_z=rng.normal(size=(1, 6)).astype(np.float32),
        teacher_nll=np.array([1.5, 0.25, 3.0, 7.5, 0.0, np.nan], np.float32),
        teacher_entropy=np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32),
        byte_lengths=np.array([0, 1, 3, 299, 4, 2]),
    )
    row = encode_row(layout, t)
    assert layout.blob_dtypes()["byte_lengths"] == np.dtype("<u2") and len(row["byte_lengths"]) == 12
    back = decode_row(layout, row)
    np.testing.assert_array_equal(back.topk_log_z, t.topk_log_z)
    np.testing.assert_array_equal(back.teacher_nll, t.teacher_nll)
    np.testing.assert_array_equal(back.byte_lengths, t.byte_lengths)
