"""pipeline/multi_cache.py on real caches: two tiny teachers cached over the same tokens by the cache
writer, read as one; alignment refusals name the field and both values; the combined targets against
the teachers' own dense distributions (a fresh forward)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_world, tiny_llama, word_tokenizer

from kdcache.cache.build import build_cache
from kdcache.cache.reader import open_cache
from kdcache.cache.shards import CacheError
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.multi_cache import open_caches
from kdcache.multi_teacher import combine_batches, normalized_weights
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens, write_tokens

VOCAB, SEQ, N = 48, 16, 12


def teacher_dir(root: Path, seed: int) -> Path:
    path = root / f"teacher-{seed}"
    tiny_llama(VOCAB, max_positions=SEQ, seed=seed).save_pretrained(path)
    word_tokenizer(VOCAB).save_pretrained(path)
    return path


def cache_of(teacher: Path, tokens: Path, out: Path, **cfg) -> Path:
    settings = {"targets": "topk", "top_k": 6, "batch_size": 4, "rows_per_shard": 4} | cfg
    build_cache(
        load_teacher(TeacherConfig(path=str(teacher), device="cpu")),
        open_tokens(tokens, "train"),
        CacheConfig(**settings),
        out_dir=out,
    )
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi")
    w = make_world(root, vocab_size=VOCAB, n=N, seq=SEQ)
    a, b = teacher_dir(root, 1), teacher_dir(root, 2)
    return {
        **w,
        "teacher_a": a,
        "teacher_b": b,
        "a": cache_of(a, w["tokens"], root / "cache-a"),
        "b": cache_of(b, w["tokens"], root / "cache-b", top_k=4),
        "b_sampled": cache_of(b, w["tokens"], root / "cache-b-sampled", targets="sampled", samples=8),
    }


def dense_logprobs(teacher: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_teacher(TeacherConfig(path=str(teacher), device="cpu")).model
    with torch.no_grad():
        return model(input_ids=ids).logits.double().log_softmax(-1)  # (B, T, V)


def test_combined_batches_are_the_combination_of_each_caches_aligned_batch(world) -> None:
    with open_caches([world["a"], world["b"]], [0.7, 0.3]) as multi, open_cache(world["a"]) as a:
        with open_cache(world["b"]) as b:
            got = list(multi.batches(4, seed=3, epoch=1))
            parts = zip(a.batches(4, seed=3, epoch=1), b.batches(4, seed=3, epoch=1), strict=True)
            assert len(got) == multi.num_batches(4) == N // 4
            for out, pair in zip(got, parts, strict=True):
                want = combine_batches(pair, normalized_weights([0.7, 0.3]), combine="mixture", vocab_size=VOCAB)
                assert out.keys() == want.keys()
                for key in want:
                    torch.testing.assert_close(out[key], want[key], rtol=0, atol=0, equal_nan=True)
        meta = multi.meta.targets["multi_teacher"]
        assert [c["weight"] for c in meta["caches"]] == pytest.approx([0.7, 0.3]) and meta["combine"] == "mixture"
        assert multi.layout.kind == "topk" and multi.layout.top_k == 10


def test_mixture_from_real_caches_against_the_teachers_dense_distributions(world) -> None:
    """The two caches' stored targets combined vs the exact mixture of the two teachers' full distributions:
    the error is the uniform-tail approximation plus the cache's value quantization, and stays small."""
    with open_caches([world["a"], world["b"]], [0.5, 0.5]) as multi:
        batch = next(iter(multi.batches(4, seed=0, shuffle=False)))
    ids = batch["input_ids"]
    truth = 0.5 * dense_logprobs(world["teacher_a"], ids).exp() + 0.5 * dense_logprobs(world["teacher_b"], ids).exp()
    at = truth.gather(-1, batch["topk_ids"]).masked_fill(~batch["topk_mask"], 0.0)  # (B, T, W)
    got = batch["topk_logprobs"].double().exp().masked_fill(~batch["topk_mask"], 0.0)
    rest_true, rest_got = truth.sum(-1) - at.sum(-1), batch["topk_log_tail"].double().exp()
    tv = 0.5 * ((got - at).abs().sum(-1) + (rest_got - rest_true).abs())  # (B, T)
    assert float(tv.max()) < 0.05, float(tv.max())
    assert torch.allclose(got.sum(-1) + rest_got, torch.ones_like(rest_got), atol=1e-5)


@pytest.mark.parametrize("combine", ["min_nll", "min_entropy", "nll_softmax"])
def test_signal_combiners_read_the_caches_per_token_signals(world, combine) -> None:
    with open_caches([world["a"], world["b"]], [1, 1], combine=combine) as multi:
        batch = next(iter(multi.batches(4, seed=0, shuffle=False, keys=("topk_ids", "topk_logprobs", "teacher_nll"))))
    ids = batch["input_ids"]
    dense = [dense_logprobs(world[t], ids) for t in ("teacher_a", "teacher_b")]
    nll = torch.stack([-d[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) for d in dense])  # (2, B, T-1)
    entropy = torch.stack([-(d.exp() * d).sum(-1) for d in dense])  # (2, B, T)
    got = batch["teacher_nll"].double()
    assert got[:, -1].isnan().all()  # no next token
    if combine == "min_entropy":  # the picked teacher's signals; near-ties (fp16 entropies) may go either way
        torch.testing.assert_close(batch["teacher_entropy"].double(), entropy.min(0).values, atol=2e-2, rtol=2e-3)
        clear = (entropy[0] - entropy[1]).abs()[:, :-1] > 0.05
        want_nll = nll.gather(0, entropy[:, :, :-1].argmin(0, keepdim=True)).squeeze(0)
        torch.testing.assert_close(got[:, :-1][clear], want_nll[clear], atol=2e-2, rtol=2e-3)
        assert ((got[:, :-1] - nll).abs().min(0).values < 2e-2).all()
        return
    want_nll = {
        "min_nll": nll.min(0).values,
        "nll_softmax": -((-2 * nll).exp().sum(0) / (-nll).exp().sum(0)).log(),  # w_t = p_t(x) / sum p(x)
    }[combine]
    torch.testing.assert_close(got[:, :-1], want_nll, atol=2e-2, rtol=2e-3)  # fp16 signals
    assert batch["topk_mask"].any(-1).all()


def test_sampled_caches_pool_their_draws_and_mixed_kinds_keep_the_common_one(world) -> None:
    with pytest.raises(CacheError, match="no target kind is common to all caches"):
        open_caches([world["a"], world["b_sampled"]], [0.5, 0.5])
    with open_caches([world["b_sampled"], world["b_sampled"]], [0.25, 0.75]) as multi:
        batch = next(iter(multi.batches(4, seed=0)))
    assert multi.layout.kind == "sampled"
    assert torch.allclose(batch["sample_counts"].sum(-1), batch["sample_total"])  # 2 x 8 draws, reweighted
    assert (batch["sample_total"] == 16).all()


def test_caches_over_other_token_data_are_refused_naming_the_field_and_both_values(world, tmp_path) -> None:
    other = make_world(tmp_path / "other", vocab_size=VOCAB, n=N, seq=SEQ, seed=5)
    cache = cache_of(world["teacher_a"], other["tokens"], tmp_path / "cache-other")
    fp = lambda p: open_cache(p).meta.corpus["fingerprint"]  # noqa: E731
    with pytest.raises(CacheError, match=rf"corpus.fingerprint differs \('{fp(cache)}' vs '{fp(world['a'])}'\)"):
        open_caches([world["a"], cache], [1, 1])
    shards = cache_of(world["teacher_b"], world["tokens"], tmp_path / "cache-shards", rows_per_shard=6)
    with pytest.raises(CacheError, match=r"rows per shard \[6\] vs \[4\].*cache.rows_per_shard: 4"):
        open_caches([world["a"], shards], [1, 1])
    tok = word_tokenizer(VOCAB, prefix="x")
    tokens = tmp_path / "tokens-x"
    ids = np.random.default_rng(0).integers(2, VOCAB, size=(N + 2, SEQ))
    write_tokens(
        tokens, {"train": ids[:N], "val": ids[N:]}, vocab_size=VOCAB, tokenizer_fingerprint=tokenizer_fingerprint(tok)
    )
    teacher_x = tmp_path / "teacher-x"
    tiny_llama(VOCAB, max_positions=SEQ).save_pretrained(teacher_x)
    tok.save_pretrained(teacher_x)
    with pytest.raises(CacheError, match="tokenizer.fingerprint differs .*cross_tokenizer.*retokenize_split"):
        open_caches([world["a"], cache_of(teacher_x, tokens, tmp_path / "cache-x")], [1, 1])
    with pytest.raises(CacheError, match="2 caches but 1 weights"):
        open_caches([world["a"], world["b"]], [1])
    with pytest.raises(CacheError, match="weights must be finite"):
        open_caches([world["a"], world["b"]], [0, 0])


def test_a_signal_combiner_refuses_a_cache_without_the_signal(world, tmp_path) -> None:
    import json
    import shutil

    copy = tmp_path / "no-signals"
    shutil.copytree(world["b"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["targets"]["signals"] = []  # as a cache written without them (e.g. imported) declares
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"no per-token teacher signal 'teacher_nll'.*train.combine: mixture"):
        open_caches([world["a"], copy], [1, 1], combine="min_nll")
    with open_caches([world["a"], copy], [1, 1], combine="mixture") as multi:
        assert multi.layout.signals == ()


def test_command_line_weights_become_cache_sources() -> None:
    from kdcache.config.base import ConfigError
    from kdcache.multi_cache import cache_sources

    assert cache_sources(["a"], None) == []  # one cache: the single-cache path, unchanged
    assert cache_sources(["a", "b"], None) == [{"path": "a", "weight": 1.0}, {"path": "b", "weight": 1.0}]
    assert cache_sources(["a", "b"], "0.7,0.3") == [{"path": "a", "weight": 0.7}, {"path": "b", "weight": 0.3}]
    with pytest.raises(ConfigError, match=r"--weights 0.7: one weight per --cache \(2 caches, 1 weights\)"):
        cache_sources(["a", "b"], "0.7")
    with pytest.raises(ConfigError, match="--weights 0.7,x: must be comma-separated numbers"):
        cache_sources(["a", "b"], "0.7,x")


def test_a_student_trains_from_several_caches_and_records_them(world, tmp_path) -> None:
    from kdcache.config.train import CacheSourceConfig, StudentConfig, TrainConfig
    from kdcache.train import train

    tiny = StudentConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    caches = (CacheSourceConfig(path=str(world["a"]), weight=0.7), CacheSourceConfig(path=str(world["b"]), weight=0.3))
    cfg = TrainConfig(max_steps=2, batch_size=4, student=tiny, caches=caches, checkpoint_every=2)
    summary = train(cfg, cache_dir=world["a"], out_dir=tmp_path / "student")
    assert summary["complete"] and summary["loss"]["kind"] == "topk_tail"
    listed = summary["cache"]["targets"]["multi_teacher"]["caches"]
    assert [c["path"] for c in listed] == [str(world["a"]), str(world["b"])]
    assert [c["weight"] for c in listed] == pytest.approx([0.7, 0.3])


def test_picking_always_the_first_teacher_trains_exactly_like_its_cache_alone(world, tmp_path) -> None:
    """min_nll with weights (1, 0) picks the first cache at every token: the same targets (padded wider), so
    the same losses step by step as the single-cache path."""
    from kdcache.config.train import CacheSourceConfig, StudentConfig, TrainConfig
    from kdcache.train import train

    tiny = StudentConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    base = dict(max_steps=3, batch_size=4, student=tiny, checkpoint_every=3)
    train(TrainConfig(**base), cache_dir=world["a"], out_dir=tmp_path / "single")
    caches = (CacheSourceConfig(path=str(world["a"]), weight=1.0), CacheSourceConfig(path=str(world["b"]), weight=0.0))
    train(TrainConfig(**base, caches=caches, combine="min_nll"), cache_dir=world["a"], out_dir=tmp_path / "multi")
    logs = [
        [json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
        for d in ("single", "multi")
    ]
    for one, two in zip(*logs, strict=True):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-6) and one["kd"] == pytest.approx(two["kd"], rel=1e-6)


def test_cli_trains_from_several_caches_with_weights(world, tmp_path, capsys) -> None:
    from kdcache.cli import main

    student = tmp_path / "student.json"
    student.write_text(json.dumps({"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}))
    out = tmp_path / "cli-student"
    args = ["train", "--cache", str(world["a"]), "--cache", str(world["b"]), "--weights", "0.7,0.3"]
    assert main(
        [
            *args,
            "--out",
            str(out),
            "--student",
            str(student),
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--combine",
            "nll_softmax",
        ]
    ) in (0, None)
    summary = json.loads((out / "training.json").read_text())
    assert summary["config"]["caches"] == [
        {"path": str(world["a"]), "weight": 0.7},
        {"path": str(world["b"]), "weight": 0.3},
    ]
    assert summary["config"]["combine"] == "nll_softmax"
    assert main([*args[:-1], "0.7", "--out", str(tmp_path / "x"), "--student", str(student)]) == 1
    assert "--weights 0.7: one weight per --cache (2 caches, 1 weights)" in capsys.readouterr().err
