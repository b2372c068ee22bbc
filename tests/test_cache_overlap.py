"""The cache stage's overlapped sparsifier writes the same files as the serial one; its errors stop the build;
the two-level sampler and the one-pass entropy/NLL equal float64 references."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import make_world

import kdcache.cache.scoring as scoring
from kdcache.cache.build import build_cache
from kdcache.cache.format import TargetLayout
from kdcache.cache.targets import SAMPLE_BLOCK, cumulative, draw, sparsify
from kdcache.cache.writer import CacheWriteError
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), vocab_size=50, n=10, seq=16)  # V = 50: a partial block


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.parquet"))}


@pytest.mark.parametrize("targets", ["sampled", "both"])
def test_overlapped_build_writes_the_serial_builds_bytes(world, tmp_path, monkeypatch, targets):
    teacher = load_teacher(TeacherConfig(path=str(world["teacher"]), device="cpu"))
    tokens = open_tokens(world["tokens"], "train")
    cfg = CacheConfig(targets=targets, top_k=4, samples=8, batch_size=3, rows_per_shard=4, split="train")
    monkeypatch.setattr(scoring, "SPARSIFY_THREADS", 1)  # a worker even where no core is spare
    serial = build_cache(teacher, tokens, cfg, out_dir=tmp_path / "serial", overlap=False)
    overlapped = build_cache(teacher, tokens, cfg, out_dir=tmp_path / "overlap", overlap=True)
    assert len(_digests(tmp_path / "serial")) == 3
    assert _digests(tmp_path / "serial") == _digests(tmp_path / "overlap")
    assert serial.shards == overlapped.shards and serial.stats == overlapped.stats


def test_a_worker_error_stops_the_build_and_seals_nothing(world, tmp_path, monkeypatch):
    teacher = load_teacher(TeacherConfig(path=str(world["teacher"]), device="cpu"))
    tokens = open_tokens(world["tokens"], "train")
    calls = []
    finish = scoring.finish_batch

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise CacheWriteError("injected: sparsify failed on batch 2")
        return finish(*args, **kwargs)

    monkeypatch.setattr(scoring, "SPARSIFY_THREADS", 1)
    monkeypatch.setattr(scoring, "finish_batch", failing)
    cfg = CacheConfig(batch_size=2, rows_per_shard=4, split="train")
    with pytest.raises(CacheWriteError, match="injected"):
        build_cache(teacher, tokens, cfg, out_dir=tmp_path / "c", overlap=True)
    assert len(calls) == 2  # stopped at the failing batch: later forwards never handed on
    assert not (tmp_path / "c" / "manifest.json").exists() and not list((tmp_path / "c").glob("*.tmp"))


@pytest.mark.parametrize("V", [50, SAMPLE_BLOCK * 7, 1000])  # partial last block, whole blocks
def test_draws_invert_the_float64_cdf_and_never_pick_zero_probability_ids(V):
    gen = torch.Generator().manual_seed(V)
    logits = torch.randn(6, V, generator=gen) * 4  # (6, V)
    logits[:, ::7] = float("-inf")  # probability exactly 0, in every block and the partial last one
    logits[:, -1] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    uniforms = torch.rand(6, 4096, generator=gen, dtype=torch.float64)
    ids = draw(probs, uniforms)  # (6, 4096)
    cdf = cumulative(probs)  # (6, V) float64
    assert torch.equal(ids, torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True))
    assert (probs.gather(1, ids) > 0).all()
    implied = torch.diff(cdf, prepend=cdf.new_zeros(6, 1)) / cdf[:, -1:]  # (6, V)
    true = torch.softmax(logits.double(), dim=-1)
    assert 0.5 * (implied - true).abs().sum(-1).max() <= 1e-6
    assert torch.equal(draw(probs[2:3], uniforms[2:3]), ids[2:3])  # one row alone: the same draws


def test_entropy_and_nll_of_peaked_and_flat_rows_equal_float64_and_stay_non_negative():
    V, T = 300, 6
    logits = torch.randn(2, T, V, generator=torch.Generator().manual_seed(1))  # (2, T, V)
    logits[0, :, 7] += 90.0  # a near one-hot row: entropy ~ 1e-37
    logits[1] *= 0.01  # near uniform: entropy ~ log V
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    nxt = torch.full((2, T), -1)
    nxt[:, :-1] = ids[:, 1:]
    for tau0 in (1.0, 2.0):
        layout = TargetLayout(
            kind="sampled", vocab_size=V, seq_len=T, samples=4, temperature=tau0, signals=("nll", "entropy")
        )
        out = sparsify(logits, layout=layout, seq_indices=torch.arange(2), next_ids=nxt)
        logp0 = torch.log_softmax(logits.double() / tau0, -1)
        logp1 = torch.log_softmax(logits.double(), -1)
        assert (out["entropy"] >= 0).all() and (out["teacher_entropy"] >= 0).all()
        torch.testing.assert_close(out["entropy"].double(), -(logp0.exp() * logp0).sum(-1), atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(
            out["teacher_entropy"].double(), -(logp1.exp() * logp1).sum(-1), atol=2e-6, rtol=1e-6
        )
        want = -logp1[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        torch.testing.assert_close(out["teacher_nll"][:, :-1].double(), want, atol=1e-4, rtol=1e-6)
        assert torch.isnan(out["teacher_nll"][:, -1]).all()
