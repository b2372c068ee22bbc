"""pipeline/evaluate.py on tiny real Llama models saved with save_pretrained and real token files."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.evaluate import EvaluateError, evaluate, expected_calibration_error, write_metrics
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.token_data import open_tokens, write_tokens

VOCAB, SEQ = 48, 16


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    words = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def save_tiny_model(path: Path, *, seed: int, vocab: int = VOCAB, hidden: int = 32, rows: int | None = None) -> Path:
    """A tied Llama with ``rows`` output rows (default: one per tokenizer id) and a ``vocab``-id tokenizer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=rows or vocab,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and steady on a loaded machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(10, SEQ), dtype=np.int32)
    write_tokens(
        root / "tokens", {"val": ids}, vocab_size=VOCAB, tokenizer_fingerprint=tokenizer_fingerprint(tiny_tokenizer())
    )
    return {
        "tokens": open_tokens(root / "tokens", "val"),
        "teacher": save_tiny_model(root / "teacher", seed=0),
        "student": save_tiny_model(root / "student", seed=1, hidden=16),
        "baseline": save_tiny_model(root / "baseline", seed=2, hidden=16),
        "root": root,
    }


def test_evaluate_returns_finite_metrics_for_every_model(setup: dict) -> None:
    cfg = EvaluateConfig(batch_size=4, calibration_bins=5)
    m = evaluate(cfg, tokens=setup["tokens"], teacher=teacher_cfg(setup), models=students(setup))
    assert m["num_sequences"] == 10 and m["num_tokens"] == 10 * (SEQ - 1)
    for name, r in m["models"].items():
        for key in ("ce", "ppl", "kl_to_teacher", "top1_agreement", "top1_accuracy", "ece", "tokens_per_s"):
            assert math.isfinite(r[key]), (name, key)
        assert r["tokens_per_s"] > 0 and r["size_bytes"] > 0 and r["num_parameters"] > 0
        assert sum(row["count"] for row in r["calibration"]) == m["num_tokens"]
        assert math.isclose(r["ppl"], math.exp(r["ce"]))
    assert m["models"]["student"]["kl_to_teacher"] > 0
    assert m["models"]["student"]["num_parameters"] < m["models"]["teacher"]["num_parameters"]


def test_teacher_against_itself_has_zero_kl_and_full_agreement(setup: dict, tmp_path: Path) -> None:
    copy = shutil.copytree(setup["teacher"], tmp_path / "copy")
    m = evaluate(
        EvaluateConfig(batch_size=3), tokens=setup["tokens"], teacher=teacher_cfg(setup), models={"copy": copy}
    )
    for name in ("teacher", "copy"):
        assert abs(m["models"][name]["kl_to_teacher"]) < 1e-6
        assert m["models"][name]["top1_agreement"] == 1.0
    assert m["models"]["copy"]["ce"] == pytest.approx(m["models"]["teacher"]["ce"], abs=1e-6)


def test_cross_entropy_matches_a_direct_forward(setup: dict) -> None:
    m = evaluate(
        EvaluateConfig(batch_size=4, max_sequences=6), tokens=setup["tokens"], teacher=teacher_cfg(setup), models={}
    )
    model = AutoModelForCausalLM.from_pretrained(setup["teacher"])
    ids = torch.from_numpy(np.asarray(setup["tokens"].ids[:6], dtype=np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()
    assert m["num_sequences"] == 6
    assert m["models"]["teacher"]["ce"] == pytest.approx(expected, abs=1e-5)


def test_ece_matches_a_hand_computation() -> None:
    conf = torch.tensor([0.95, 0.85, 0.30, 0.35, 1.00])
    correct = torch.tensor([True, False, False, True, True])
    # bin [0, .5): conf .30+.35 = .65, correct 1 -> |1 - .65| = .35
    # bin [.5, 1]: conf .95+.85+1.0 = 2.8, correct 2 -> |2 - 2.8| = .8;  ECE = (.35 + .8) / 5
    assert expected_calibration_error(conf, correct, bins=2) == pytest.approx(0.23)
    assert expected_calibration_error(torch.tensor([0.5, 0.5]), torch.tensor([True, False]), bins=10) == pytest.approx(
        0.0
    )


def test_write_metrics_writes_flat_json_and_calibration_csv(setup: dict, tmp_path: Path) -> None:
    m = evaluate(
        EvaluateConfig(batch_size=5, calibration_bins=4),
        tokens=setup["tokens"],
        teacher=teacher_cfg(setup),
        models=students(setup),
    )
    write_metrics(m, metrics_path=tmp_path / "metrics" / "eval.json", plots_dir=tmp_path / "plots")
    flat = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert {"teacher", "student", "baseline", "kd_minus_baseline_ce", "num_tokens"} <= set(flat)
    assert {"ce", "ppl", "kl_to_teacher", "top1_agreement", "ece", "tokens_per_s", "num_parameters"} <= set(
        flat["student"]
    )
    assert flat["kd_minus_baseline_ce"] == pytest.approx(flat["student"]["ce"] - flat["baseline"]["ce"])
    assert all(not isinstance(v, (dict, list)) for r in ("teacher", "student") for v in flat[r].values())
    with open(tmp_path / "plots" / "calibration.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"model", "bin", "confidence", "accuracy", "count"}
    assert {r["model"] for r in rows} == {"teacher", "student", "baseline"}
    assert sum(int(r["count"]) for r in rows if r["model"] == "student") == m["num_tokens"]


def test_a_model_with_fewer_logits_than_the_teacher_tokenizer_is_refused(setup: dict, tmp_path: Path) -> None:
    other = save_tiny_model(tmp_path / "other", seed=3, vocab=VOCAB - 8)
    with pytest.raises(EvaluateError, match=rf"other: {VOCAB - 8} output logits but the teacher tokenizer has {VOCAB}"):
        evaluate(EvaluateConfig(), tokens=setup["tokens"], teacher=teacher_cfg(setup), models={"other": other})


def test_a_model_with_another_tokenizer_is_refused(setup: dict, tmp_path: Path) -> None:
    other = save_tiny_model(tmp_path / "other", seed=3, hidden=16)
    renamed = Tokenizer(models.WordLevel({"<eos>": 0, "<pad>": 1, **{f"x{i}": i for i in range(2, VOCAB)}}, "<eos>"))
    PreTrainedTokenizerFast(tokenizer_object=renamed, eos_token="<eos>", pad_token="<pad>").save_pretrained(other)
    with pytest.raises(EvaluateError, match=r"other: its tokenizer \(\w+…\) differs from the teacher's"):
        evaluate(EvaluateConfig(), tokens=setup["tokens"], teacher=teacher_cfg(setup), models={"other": other})


def test_token_data_of_another_tokenizer_is_refused_naming_both_fingerprints(setup: dict, tmp_path: Path) -> None:
    ids = np.asarray(setup["tokens"].ids)
    write_tokens(tmp_path / "tokens", {"val": ids}, vocab_size=VOCAB, tokenizer_fingerprint="f" * 64)
    theirs = tokenizer_fingerprint(tiny_tokenizer())[:12]
    with pytest.raises(
        EvaluateError, match=rf"made with tokenizer f{{12}}… but teacher .* has tokenizer {theirs}… — rerun prepare"
    ):
        evaluate(
            EvaluateConfig(), tokens=open_tokens(tmp_path / "tokens", "val"), teacher=teacher_cfg(setup), models={}
        )


def test_padded_vocab_teacher_is_compared_in_the_tokenizers_id_space(setup: dict, tmp_path: Path) -> None:
    """A Qwen2-style teacher with embedding rows past its tokenizer's ids: those logits are dropped."""
    padded = save_tiny_model(tmp_path / "padded", seed=0, rows=VOCAB + 16)
    model = AutoModelForCausalLM.from_pretrained(padded)
    with torch.no_grad():
        model.get_output_embeddings().weight[VOCAB:] = 5.0  # padding rows that would dominate any softmax
    model.save_pretrained(padded)
    m = evaluate(
        EvaluateConfig(batch_size=4),
        tokens=setup["tokens"],
        teacher=TeacherConfig(path=str(padded), device="cpu"),
        models={"student": setup["student"]},
    )
    ids = torch.from_numpy(np.asarray(setup["tokens"].ids, dtype=np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[..., :VOCAB]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()
    assert m["models"]["teacher"]["ce"] == pytest.approx(expected, abs=1e-5)
    assert math.isfinite(m["models"]["student"]["kl_to_teacher"])


def test_padding_positions_of_document_packing_are_not_scored(setup: dict, tmp_path: Path) -> None:
    ids = np.maximum(np.asarray(setup["tokens"].ids), 2)  # no <eos>/<pad> in the text
    ids[:, 10:] = 1  # <pad> after position 9: positions 0..8 predict real tokens
    meta = {"packing": {"mode": "documents", "pad_id": 1, "eos_id": 0}}
    fingerprint = tokenizer_fingerprint(tiny_tokenizer())
    write_tokens(tmp_path / "tokens", {"val": ids}, vocab_size=VOCAB, tokenizer_fingerprint=fingerprint, meta=meta)
    m = evaluate(
        EvaluateConfig(), tokens=open_tokens(tmp_path / "tokens", "val"), teacher=teacher_cfg(setup), models={}
    )
    assert m["num_tokens"] == len(ids) * 9
    model = AutoModelForCausalLM.from_pretrained(setup["teacher"])
    t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=t).logits
    expected = F.cross_entropy(logits[:, :9].reshape(-1, VOCAB), t[:, 1:10].reshape(-1)).item()
    assert m["models"]["teacher"]["ce"] == pytest.approx(expected, abs=1e-5)


def test_a_model_named_teacher_is_refused(setup: dict) -> None:
    with pytest.raises(EvaluateError, match="the name 'teacher' is taken"):
        evaluate(EvaluateConfig(), tokens=setup["tokens"], teacher=teacher_cfg(setup), models={"teacher": "x"})


def teacher_cfg(setup: dict) -> TeacherConfig:
    return TeacherConfig(path=str(setup["teacher"]), device="cpu")


def students(setup: dict) -> dict[str, Path]:
    return {"student": setup["student"], "baseline": setup["baseline"]}
