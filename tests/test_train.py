"""pipeline/train.py, student.py and checkpoint.py on tiny real caches (Parquet shards + manifest,
written here by the cache_format contract from a known bigram "teacher") and tiny Llama students."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdcache.cache.format import Manifest, SequenceTargets, ShardInfo, TargetLayout
from kdcache.cache.rows import encode_table
from kdcache.checkpoint import flatten_state, list_checkpoints, rng_state, set_rng_state, unflatten_state
from kdcache.config.base import ConfigError
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.fingerprint import sha256_file, tokenizer_fingerprint
from kdcache.outputs import BOOKKEEPING
from kdcache.student import StudentError, build_student, build_vocab_map, count_parameters
from kdcache.train import train
from kdcache.train_data import Position, batch_stream

VOCAB, SEQ = 48, 16
TINY = StudentConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def tiny_tokenizer(prefix: str = "w") -> PreTrainedTokenizerFast:
    words = {"<eos>": 0, "<pad>": 1, **{f"{prefix}{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def _position_targets(rng: np.random.Generator, logp: np.ndarray, layout: TargetLayout) -> dict[str, np.ndarray]:
    """Top-k and/or sampled targets of one sequence from its per-position teacher log-probs (T, V)."""
    out: dict[str, np.ndarray] = {}
    if layout.has_topk:
        order = np.argsort(-logp, axis=1, kind="stable")[:, : layout.top_k]  # (T, k)
        out["topk_ids"], out["topk_logprobs"] = order, np.take_along_axis(logp, order, axis=1)
        lengths = np.full(len(logp), layout.top_k)
        if layout.adaptive:
            mass = np.cumsum(np.exp(out["topk_logprobs"]), axis=1)  # (T, k)
            lengths = np.minimum((mass < layout.mass).sum(1) + 1, layout.top_k)
        out["topk_lengths"] = lengths
    if layout.has_samples:
        ids = np.zeros((len(logp), layout.samples), np.int64)
        counts = np.zeros((len(logp), layout.samples), np.int64)
        for t, row in enumerate(logp):
            u, c = np.unique(
                rng.choice(len(row), size=layout.samples, p=np.exp(row) / np.exp(row).sum()), return_counts=True
            )
            ids[t, : len(u)], counts[t, : len(u)] = u, c
        out["sample_ids"], out["sample_counts"] = ids, counts
    return out


def write_tiny_cache(
    out: Path,
    *,
    kind: str = "both",
    n: int = 8,
    k: int = 8,
    samples: int = 8,
    mass: float = 0.0,
    rows_per_shard: int = 4,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """A valid cache of a bigram teacher p(next | token) = softmax(W[token]); sequences sampled from it."""
    tokenizer = tokenizer or tiny_tokenizer()
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(VOCAB, VOCAB)) * 3.0
    logp = w - np.log(np.exp(w).sum(1, keepdims=True))  # (V, V)
    ids = np.zeros((n, SEQ), np.int64)
    ids[:, 0] = rng.integers(2, VOCAB, size=n)
    for t in range(1, SEQ):
        ids[:, t] = [rng.choice(VOCAB, p=np.exp(logp[j]) / np.exp(logp[j]).sum()) for j in ids[:, t - 1]]
    layout = TargetLayout(
        kind=kind,
        vocab_size=VOCAB,
        seq_len=SEQ,
        top_k=k if kind != "sampled" else 0,
        mass=mass,
        samples=samples if kind != "topk" else 0,
    )
    rows = [
        SequenceTargets(seq_index=i, input_ids=ids[i], **_position_targets(rng, logp[ids[i]], layout)) for i in range(n)
    ]
    out.mkdir(parents=True)
    shards = []
    for s in range(0, n, rows_per_shard):
        path = out / f"shard-{s // rows_per_shard:05d}.parquet"
        pq.write_table(encode_table(layout, rows[s : s + rows_per_shard]), path, compression="zstd")
        count = len(rows[s : s + rows_per_shard])
        shards.append(
            ShardInfo(
                file=path.name,
                rows=count,
                tokens=count * SEQ,
                bytes=path.stat().st_size,
                sha256=sha256_file(path),
                first_seq=s,
            )
        )
    manifest = Manifest(
        name=out.name,
        teacher={"path": "bigram", "sha256": "0" * 64},
        tokenizer={"fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": VOCAB},
        corpus={"fingerprint": "1" * 64, "split": "train", "seq_len": SEQ, "num_sequences": n},
        targets=layout.to_dict(),
        shards=shards,
    )
    (out / "manifest.json").write_text(manifest.to_json())
    tokenizer.save_pretrained(out / "tokenizer")
    return out


pytestmark = pytest.mark.usefixtures("staging_one_thread")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    return {
        "both": write_tiny_cache(root / "both"),
        "topk": write_tiny_cache(root / "topk", kind="topk"),
        "adaptive": write_tiny_cache(root / "adaptive", kind="topk", mass=0.9),
        "sampled": write_tiny_cache(root / "sampled", kind="sampled"),
    }


def cfg_for(**kw) -> TrainConfig:
    base = {
        "max_steps": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 2,
        "checkpoint_every": 2,
        "log_every": 100,
        "student": TINY,
        "chunk_tokens": 16,
    }
    return TrainConfig(**{**base, **kw})


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("loss", "cache"),
    [(kind, "both") for kind in ("topk_tail", "topk_renorm", "reverse_kl", "jsd", "skew_kl", "tv", "hard", "sampled")]
    + [("ce", "both"), ("topk_tail", "adaptive"), ("auto", "topk"), ("auto", "sampled")],
)
def test_each_loss_kind_trains_and_saves_a_loadable_student(
    loss: str, cache: str, caches: dict, tmp_path: Path
) -> None:
    out = tmp_path / "student"
    summary = train(cfg_for(loss=loss, max_steps=3), cache_dir=caches[cache], out_dir=out)
    assert summary["complete"] and summary["steps"] == 3 and summary["tokens"] == 3 * 4 * SEQ
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert all(math.isfinite(r[key]) for key in ("loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s", "elapsed"))
    assert (log[0]["kd"] == 0) == (loss == "ce")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == VOCAB and count_parameters(model) == summary["num_parameters"]
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(out)) == tokenizer_fingerprint(tiny_tokenizer())
    saved = json.loads((out / "training.json").read_text())
    assert saved["cache"]["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_tokenizer())
    assert saved["config"]["loss"] == loss
    if loss == "auto":
        assert saved["loss"]["kind"] == {"topk": "topk_tail", "sampled": "sampled"}[cache]


def test_loss_decreases_over_30_steps(caches: dict, tmp_path: Path) -> None:
    cfg = cfg_for(
        max_steps=30,
        warmup_steps=3,
        checkpoint_every=100,
        student=StudentConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    )
    train(cfg, cache_dir=caches["topk"], out_dir=tmp_path / "s")
    history = losses(tmp_path / "s")
    assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5]), history


def test_resume_twice_matches_an_uninterrupted_run_step_for_step(caches: dict, tmp_path: Path) -> None:
    cfg = cfg_for(max_steps=6, checkpoint_every=2)  # 8 sequences / batch 4: every other step starts an epoch
    train(cfg, cache_dir=caches["both"], out_dir=tmp_path / "full")
    part = tmp_path / "part"
    train(cfg, cache_dir=caches["both"], out_dir=part, max_steps=2)
    assert not json.loads((part / "training.json").read_text())["complete"]
    train(cfg, cache_dir=caches["both"], out_dir=part, resume=True, max_steps=4)
    summary = train(cfg, cache_dir=caches["both"], out_dir=part, resume=True)
    assert summary["complete"] and summary["steps"] == 6
    assert np.allclose(losses(part), losses(tmp_path / "full"), rtol=0, atol=1e-6), (
        losses(part),
        losses(tmp_path / "full"),
    )
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(part).state_dict()
    assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)


def test_resume_from_an_older_checkpoint_drops_the_log_lines_after_it(caches: dict, tmp_path: Path) -> None:
    cfg = cfg_for(max_steps=5, checkpoint_every=2, grad_accum=2)
    train(cfg, cache_dir=caches["both"], out_dir=tmp_path / "full")
    part = tmp_path / "part"
    train(cfg, cache_dir=caches["both"], out_dir=part, max_steps=3)  # checkpoints at 2 and 3
    newest = list_checkpoints(part)[-1]
    for f in newest.iterdir():  # a crash after step 3 was logged but before its checkpoint was renamed
        f.unlink()
    newest.rmdir()
    with open(part / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and a log line cut short
    train(cfg, cache_dir=caches["both"], out_dir=part, resume=True)
    assert [json.loads(line)["step"] for line in (part / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert np.allclose(losses(part), losses(tmp_path / "full"), rtol=0, atol=1e-6)


def test_checkpoints_hold_only_safetensors_and_json_and_keep_the_last_two(caches: dict, tmp_path: Path) -> None:
    out = tmp_path / "s"
    train(cfg_for(max_steps=7, checkpoint_every=2), cache_dir=caches["both"], out_dir=out)
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == ["step-000006", "step-000007"]
    files = [p for p in out.rglob("*") if p.is_file() and p.name not in BOOKKEEPING]  # + the empty lock file
    assert all(p.suffix in (".safetensors", ".json", ".jsonl") for p in files), files
    for p in files:
        assert b"\x80\x04\x95" not in p.read_bytes()[:64]  # no pickle protocol-4 header anywhere
    assert sorted(p.name for p in out.glob(".*")) == sorted(BOOKKEEPING)  # kdcache's marker and lock only
    assert not list((out / "checkpoints").glob(".*"))


def test_fresh_run_moves_a_previous_runs_checkpoints_and_log_aside(caches: dict, tmp_path: Path) -> None:
    out = tmp_path / "s"
    train(cfg_for(max_steps=4), cache_dir=caches["both"], out_dir=out)
    train(cfg_for(max_steps=2), cache_dir=caches["both"], out_dir=out)
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert len(losses(out)) == 2
    (moved,) = out.glob("run.moved-*-started-without-resume")  # never deleted
    assert [p.name for p in list_checkpoints(moved)] == ["step-000002", "step-000004"] and len(losses(moved)) == 4


def test_student_with_another_tokenizer_is_refused(caches: dict, tmp_path: Path) -> None:
    student_dir = tmp_path / "pretrained"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(student_dir)
    other = tiny_tokenizer(prefix="x")
    other.save_pretrained(student_dir)
    cfg = cfg_for(student=StudentConfig(path=str(student_dir)))
    with pytest.raises(StudentError, match=tokenizer_fingerprint(other)) as err:
        train(cfg, cache_dir=caches["both"], out_dir=tmp_path / "s")
    assert tokenizer_fingerprint(tiny_tokenizer()) in str(err.value) and "train.vocab_map: exact" in str(err.value)


def test_pretrained_student_with_the_caches_tokenizer_trains(caches: dict, tmp_path: Path) -> None:
    student_dir = tmp_path / "pretrained"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=SEQ,
        )
    ).save_pretrained(student_dir)
    tiny_tokenizer().save_pretrained(student_dir)
    summary = train(
        cfg_for(max_steps=2, student=StudentConfig(path=str(student_dir))),
        cache_dir=caches["both"],
        out_dir=tmp_path / "s",
    )
    assert summary["complete"]


def test_loss_the_cache_cannot_feed_is_refused(caches: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs sampled targets.*train.loss: auto \\(here: topk_tail\\)"):
        train(cfg_for(loss="sampled"), cache_dir=caches["topk"], out_dir=tmp_path / "s")
    with pytest.raises(ConfigError, match="train.loss=hard needs top-k targets"):
        train(cfg_for(loss="hard"), cache_dir=caches["sampled"], out_dir=tmp_path / "s")


def test_a_temperature_the_cache_cannot_represent_is_refused_naming_the_fix(caches: dict, tmp_path: Path) -> None:
    """A v1 cache stores no log-normalizer: the tail of the tempered teacher is unknown, so tau != 1 is refused
    for tail losses and sampled, while topk_renorm (which needs no tail) trains."""
    with pytest.raises(
        ConfigError, match=r"stores the teacher's log-normalizer only at temperature\(s\) 1 .*topk_renorm"
    ):
        train(cfg_for(loss="topk_tail", temperature=2.0, max_steps=1), cache_dir=caches["topk"], out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="supports only the cache's temperature 1.0, got 2.0"):
        train(cfg_for(loss="sampled", temperature=2.0), cache_dir=caches["sampled"], out_dir=tmp_path / "b")
    summary = train(
        cfg_for(loss="topk_renorm", temperature=2.0, max_steps=1), cache_dir=caches["topk"], out_dir=tmp_path / "c"
    )
    assert summary["complete"]


def test_data_order_depends_only_on_seed_and_rolls_over_epochs(caches: dict) -> None:
    from kdcache.cache.reader import open_cache

    with open_cache(caches["both"]) as reader:

        def seqs(pos: Position, n: int) -> list[tuple[tuple[int, int], list[int]]]:
            stream = batch_stream(reader, 4, seed=3, pos=pos, rank=0, world=1)
            got = [(nxt, batch["seq_index"].tolist()) for nxt, batch in (next(stream) for _ in range(n))]
            stream.close()
            return got

        run = seqs(Position(), 5)
        assert [nxt for nxt, _ in run] == [(0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
        assert sorted(run[0][1] + run[1][1]) == list(range(8))  # an epoch covers every sequence once
        assert run[0][1] != run[2][1] or run[1][1] != run[3][1]  # reshuffled per epoch
        assert seqs(Position(epoch=1, batch=1), 2) == run[3:]  # resuming mid-epoch continues the same order


def test_state_flattening_round_trips_optimizer_and_rng_state_without_pickle() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    skeleton, tensors = flatten_state({"optimizer": opt.state_dict(), "rng": rng_state()})
    restored = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(restored["optimizer"]["state"]) == {0, 1}
    expected = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(restored["rng"])
    assert (
        torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1] and random.random() == expected[2]
    )


def test_built_student_ties_embeddings_and_takes_special_ids_from_the_tokenizer() -> None:
    model = build_student(TINY, vocab_size=VOCAB, seq_len=SEQ, tokenizer=tiny_tokenizer())
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.config.eos_token_id == 0 and model.config.pad_token_id == 1
    assert model.config.max_position_embeddings == SEQ
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_trains_on_a_cache_built_by_the_cache_writer_and_evaluates(tmp_path: Path) -> None:
    from kdcache.cache.build import build_cache
    from kdcache.config.cache import CacheConfig
    from kdcache.config.evaluate import EvaluateConfig
    from kdcache.config.teacher import TeacherConfig
    from kdcache.evaluate import evaluate
    from kdcache.teacher import load_teacher
    from kdcache.token_data import open_tokens, write_tokens

    teacher_dir, tok = tmp_path / "teacher", tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=SEQ,
        )
    ).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    ids = np.random.default_rng(0).integers(2, VOCAB, size=(12, SEQ), dtype=np.int32)
    write_tokens(
        tmp_path / "tokens",
        {"train": ids[:8], "val": ids[8:]},
        vocab_size=VOCAB,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
    )
    build_cache(
        load_teacher(TeacherConfig(path=str(teacher_dir), device="cpu")),
        open_tokens(tmp_path / "tokens", "train"),
        CacheConfig(targets="topk", top_k=8, batch_size=4, rows_per_shard=4),
        out_dir=tmp_path / "cache",
    )
    summary = train(cfg_for(max_steps=2), cache_dir=tmp_path / "cache", out_dir=tmp_path / "student", progress=True)
    metrics = evaluate(
        EvaluateConfig(),
        tokens=open_tokens(tmp_path / "tokens", "val"),
        teacher=TeacherConfig(path=str(teacher_dir), device="cpu"),
        models={"student": tmp_path / "student"},
        progress=True,
    )
    assert summary["complete"] and summary["cache"]["teacher_sha256"]
    assert math.isfinite(metrics["models"]["student"]["kl_to_teacher"]) and metrics["num_tokens"] == 4 * (SEQ - 1)


# ----------------------------------------------------------------------------- train.vocab_map: exact

SHARED = 30  # cache ids 0..29 (<eos>, <pad>, w2..w29) exist in the student's vocabulary, w30..w47 do not


def partial_tokenizer() -> PreTrainedTokenizerFast:
    """Shares <eos>, <pad> and w2..w29 with ``tiny_tokenizer()`` (at other ids); has y0..y9 of its own."""
    words = {
        "<unk>": 0,
        "<eos>": 1,
        "<pad>": 2,
        **{f"w{i}": i + 1 for i in range(2, SHARED)},
        **{f"y{i}": SHARED + 1 + i for i in range(10)},
    }
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def test_vocab_map_exact_maps_identical_strings_and_masks_the_rest() -> None:
    vmap = build_vocab_map(tiny_tokenizer(), partial_tokenizer(), cache_vocab_size=VOCAB, student_vocab_size=41)
    assert vmap.num_mapped == SHARED and vmap.fallback_id == 0
    assert vmap.to_student[:3].tolist() == [1, 2, 3] and (vmap.to_student[SHARED:] == -1).all()
    batch = {
        "input_ids": torch.tensor([[0, 5, 40]]),  # (1, 3)
        "topk_ids": torch.tensor([[[5, 40], [31, 2], [0, 1]]]),  # (1, 3, 2)
        "topk_logprobs": torch.log(torch.tensor([[[0.5, 0.3], [0.6, 0.2], [0.7, 0.1]]])),
        "topk_log_tail": torch.log(torch.tensor([[0.2, 0.2, 0.2]])),
        "sample_ids": torch.tensor([[[5, 40], [2, 3], [0, 47]]]),
        "sample_counts": torch.tensor([[[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]]]),
    }
    out = vmap.apply(batch)
    assert out["input_ids"].tolist() == [[1, 6, 0]]  # w40 is unknown to the student: its unk token
    assert out["topk_mask"].tolist() == [[[True, False], [False, True], [True, True]]]
    assert out["topk_ids"][out["topk_mask"]].tolist() == [6, 3, 1, 2]
    assert out["sample_counts"].tolist() == [[[3.0, 0.0], [2.0, 2.0], [1.0, 0.0]]]
    # unmapped entries' probability moves into the tail: 0.2 + 0.3, 0.2 + 0.6, 0.2 (nothing dropped)
    assert torch.allclose(out["topk_log_tail"].exp(), torch.tensor([[0.5, 0.8, 0.2]]))
    # the label of position 1 is w40, which the student lacks: no CE there (and none at the last position)
    assert out["ce_mask"].tolist() == [[True, False, False]]
    with pytest.raises(StudentError, match="no token string besides special tokens shared"):
        build_vocab_map(tiny_tokenizer(), tiny_tokenizer(prefix="x"), cache_vocab_size=VOCAB, student_vocab_size=VOCAB)


@pytest.mark.parametrize("loss", ["topk_tail", "sampled"])
def test_student_with_another_tokenizer_trains_with_vocab_map_exact_and_reports_kept_mass(
    loss: str, caches: dict, tmp_path: Path
) -> None:
    from kdcache.cache.reader import open_cache

    student_dir = tmp_path / "pretrained"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=41,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=SEQ,
        )
    ).save_pretrained(student_dir)
    partial_tokenizer().save_pretrained(student_dir)
    cfg = cfg_for(loss=loss, max_steps=2, vocab_map="exact", student=StudentConfig(path=str(student_dir)))
    summary = train(cfg, cache_dir=caches["both"], out_dir=tmp_path / "s")
    assert summary["complete"] and math.isfinite(summary["final_loss"])
    report = json.loads((tmp_path / "s" / "training.json").read_text())["vocab_map"]
    with open_cache(caches["both"]) as reader:  # the same quantities, straight from the cached rows
        rows = [reader[i] for i in range(len(reader))]
    p = np.stack([np.exp(r["topk_logprobs"]) for r in rows])  # (N, T, k)
    ids = np.stack([r["topk_ids"] for r in rows])  # (N, T, k)
    draws_kept = sum(int((r["sample_counts"] * (r["sample_ids"] < SHARED)).sum()) for r in rows)
    draws = sum(int(r["sample_counts"].sum()) for r in rows)
    assert report["ids_mapped"] == SHARED and report["positions_measured"] == len(rows) * SEQ
    assert report["teacher_mass_cached"] == pytest.approx(p.sum(-1).mean(), rel=1e-6)
    assert report["teacher_mass_kept"] == pytest.approx((p * (ids < SHARED)).sum(-1).mean(), rel=1e-6)
    assert report["teacher_mass_kept_ratio"] == pytest.approx(
        report["teacher_mass_kept"] / report["teacher_mass_cached"]
    )
    assert report["draws_kept"] == pytest.approx(draws_kept / draws)
    assert report["input_tokens_mapped"] == pytest.approx(np.mean([r["input_ids"] < SHARED for r in rows]))
    assert 0 < report["teacher_mass_kept_ratio"] < 1
    saved = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(partial_tokenizer())  # the student keeps its own


def test_document_padding_is_neither_a_kd_nor_a_ce_target() -> None:
    """`prepare.packing: documents` pads a document's last row: positions whose next token is padding
    get no loss (the mask is recovered from the ids, on the loader thread)."""
    from kdcache.train_data import prepare_batch

    packing = {"mode": "documents", "pad_id": 1, "eos_id": 0}
    ids = torch.tensor([[5, 6, 0, 1, 1], [7, 8, 9, 10, 11]])  # row 0: a document, its EOS, then padding
    _, batch = prepare_batch(((0, 1), {"input_ids": ids}), vmap=None, pin=False, packing=packing)
    want = [[True, True, False, False, False], [True, True, True, True, False]]  # label of t is token t + 1
    assert batch["loss_mask"].tolist() == want and batch["ce_mask"].tolist() == want
    _, plain = prepare_batch(((0, 1), {"input_ids": ids}), vmap=None, pin=False, packing={"mode": "stream"})
    assert "loss_mask" not in plain
