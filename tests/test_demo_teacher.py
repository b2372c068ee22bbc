"""The demo teacher: tokenizer + tiny Llama trained on the train split, saved as a loadable HF directory."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import WORDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.config.corpus import CorpusConfig
from kdcache.config.demo_teacher import DemoTeacherConfig
from kdcache.corpus import read_documents, split_documents
from kdcache.demo_teacher import TRAINING_JSON, train_demo_teacher
from kdcache.fingerprint import model_dir_fingerprint, tokenizer_fingerprint
from kdcache.tokenizer import load_tokenizer, train_bpe_tokenizer


def tiny_corpus(root, n: int = 30) -> CorpusConfig:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = random.Random(i)
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(12))
        (root / f"doc{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return CorpusConfig(paths=(str(root / "*.txt"),), val_fraction=0.2)


def tiny_teacher(**kw) -> DemoTeacherConfig:
    base = dict(
        vocab_size=320,
        seq_len=32,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        max_steps=3,
        max_minutes=1.0,
    )
    return DemoTeacherConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    corpus = tiny_corpus(root / "corpus")
    info = train_demo_teacher(corpus, tiny_teacher(max_steps=20), out_dir=root / "teacher")
    return root / "teacher", info


def test_saved_teacher_loads_with_auto_classes_and_matching_special_ids(trained):
    out, info = trained
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert model.config.vocab_size == len(tok) == info["vocab_size"]
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings == 32
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert model_dir_fingerprint(out)["files"]
    assert tokenizer_fingerprint(load_tokenizer(out)) == tokenizer_fingerprint(tok)
    ids = torch.tensor([tok("def f(self):", add_special_tokens=False)["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_training_json_records_steps_loss_tokens_and_config(trained):
    out, info = trained
    saved = json.loads((out / TRAINING_JSON).read_text())
    assert saved == info
    assert info["steps"] == 20 and info["stopped_by"] == "max_steps"
    assert info["tokens_seen"] == 20 * 4 * 32
    assert info["config"]["hidden_size"] == 32 and info["corpus"]["val_fraction"] == 0.2
    assert math.isfinite(info["final_train_loss"]) and info["val_loss"] is not None
    assert not out.with_name(out.name + ".incomplete").exists()


def test_loss_decreases_over_twenty_steps(trained):
    losses = trained[1]["losses"]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5


def test_tokenizer_is_trained_on_the_train_split_only(trained):
    out, info = trained
    splits = split_documents(read_documents(tiny_corpus(out.parent / "corpus")), val_fraction=0.2)
    assert info["num_documents"] == {"train": len(splits["train"]), "val": len(splits["val"])}
    expected = train_bpe_tokenizer(splits["train"]["text"], vocab_size=320)
    assert tokenizer_fingerprint(load_tokenizer(out)) == tokenizer_fingerprint(expected)


def test_wall_clock_budget_stops_training_and_rerun_replaces_the_output(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus", n=10)
    out = tmp_path / "teacher"
    train_demo_teacher(corpus, tiny_teacher(max_steps=2), out_dir=out)
    (out / "stale.txt").write_text("old")  # in a demo teacher directory kdcache made: replaced whole
    info = train_demo_teacher(corpus, tiny_teacher(max_steps=10_000, max_minutes=0.02), out_dir=out)
    assert info["stopped_by"] == "max_minutes" and 0 < info["steps"] < 10_000
    assert not (out / "stale.txt").exists() and (out / TRAINING_JSON).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "teacher"]  # no temporary sibling left


def test_training_is_a_function_of_the_steps_not_the_clock(tmp_path, monkeypatch):
    """Same config, a slow clock: the same weights (the schedule never reads the time)."""
    import time

    from safetensors.torch import load_file

    corpus = tiny_corpus(tmp_path / "corpus", n=10)
    train_demo_teacher(corpus, tiny_teacher(max_steps=6), out_dir=tmp_path / "a")
    real = time.perf_counter
    calls = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: real() + 5.0 * next(calls))  # 5 s more per call
    train_demo_teacher(corpus, tiny_teacher(max_steps=6), out_dir=tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
