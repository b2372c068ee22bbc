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


# ----------------------------------------------------------------------------- the teacher the students learned from


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real cache of teacher A, a KD student and a CE baseline trained on it, and a teacher B that shares
    A's tokenizer but not its weights."""
    import os

    from conftest import STUDENT, make_world

    from kdcache.cache.build import cache_corpus
    from kdcache.config.cache import CacheConfig
    from kdcache.config.train import StudentConfig, TrainConfig
    from kdcache.train import train

    root = tmp_path_factory.mktemp("trained")
    os.environ.setdefault("KDCACHE_STAGING_DIR", str(root / "staging"))
    world = make_world(root, vocab_size=VOCAB, seq=SEQ)
    cache = cache_corpus(
        TeacherConfig(path=str(world["teacher"]), device="cpu"),
        CacheConfig(targets="topk", top_k=8, batch_size=4, rows_per_shard=8),
        tokens_dir=world["tokens"],
        out_dir=root / "cache",
    )
    base = {"batch_size": 4, "max_steps": 2, "warmup_steps": 1, "student": StudentConfig(**STUDENT)}
    for name, loss in (("student", "topk_tail"), ("baseline", "ce")):
        train(TrainConfig(loss=loss, **base), cache_dir=cache, out_dir=root / name, device="cpu")
    other = root / "teacher-b"
    shutil.copytree(world["teacher"], other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5)
    model.save_pretrained(other)
    return {**world, "cache": cache, "other": other}


def _models(t: dict, *names: str) -> dict[str, Path]:
    return {name: t["root"] / name for name in names}


def test_training_json_records_the_cache_the_student_learned_from(trained: dict) -> None:
    record = json.loads((trained["root"] / "student" / "training.json").read_text())
    manifest = json.loads((trained["cache"] / "manifest.json").read_text())
    assert record["cache"]["path"] == str(trained["cache"])
    assert record["cache"]["name"] == manifest["name"]
    assert record["cache"]["teacher_sha256"] == manifest["teacher"]["sha256"]
    assert record["cache"]["tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert record["cache"]["corpus_fingerprint"] == manifest["corpus"]["fingerprint"]


def test_evaluate_accepts_the_teacher_the_students_learned_from(trained: dict) -> None:
    m = evaluate(
        EvaluateConfig(batch_size=2),
        tokens=open_tokens(trained["tokens"], "val"),
        teacher=TeacherConfig(path=str(trained["teacher"]), device="cpu"),
        models=_models(trained, "student", "baseline"),
    )
    assert set(m["models"]) == {"teacher", "student", "baseline"}
    assert m["trained_against"]["student"]["teacher_sha256"] == m["teacher_sha256"]


def test_evaluate_refuses_another_teacher_naming_both_shas_the_record_and_the_fix(trained: dict) -> None:
    tokens = open_tokens(trained["tokens"], "val")
    record = json.loads((trained["root"] / "student" / "training.json").read_text())
    learned = record["cache"]["teacher_sha256"]
    with pytest.raises(EvaluateError) as e:
        evaluate(
            EvaluateConfig(),
            tokens=tokens,
            teacher=TeacherConfig(path=str(trained["other"]), device="cpu"),
            models=_models(trained, "student", "baseline"),
        )
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{trained['root'] / 'student' / 'training.json'}: student learned from teacher {learned[:12]}…" in msg
    assert f"{trained['cache']}" in msg and str(trained["other"]) in msg
    from kdcache.fingerprint import model_dir_fingerprint

    assert model_dir_fingerprint(trained["other"])["sha256"][:12] in msg
    assert "--allow-other-teacher (evaluate.allow_other_teacher: true)" in msg


def test_allow_other_teacher_compares_anyway(trained: dict, caplog: pytest.LogCaptureFixture) -> None:
    m = evaluate(
        EvaluateConfig(batch_size=2, allow_other_teacher=True),
        tokens=open_tokens(trained["tokens"], "val"),
        teacher=TeacherConfig(path=str(trained["other"]), device="cpu"),
        models=_models(trained, "student", "baseline"),
    )
    assert math.isfinite(m["models"]["student"]["kl_to_teacher"])
    assert "allow_other_teacher" in caplog.text and "student learned from teacher" in caplog.text


def test_the_ce_baseline_learned_nothing_from_the_teacher_so_any_teacher_of_its_tokenizer_is_fine(
    trained: dict,
) -> None:
    m = evaluate(
        EvaluateConfig(batch_size=2),
        tokens=open_tokens(trained["tokens"], "val"),
        teacher=TeacherConfig(path=str(trained["other"]), device="cpu"),
        models=_models(trained, "baseline"),
    )
    assert m["trained_against"]["baseline"]["loss"] == "ce"


def test_a_val_split_of_another_tokenizer_than_the_students_is_refused(trained: dict, tmp_path: Path) -> None:
    for name in ("student", "baseline"):  # the baseline too: its tokenizer is what it learned
        copy = shutil.copytree(trained["root"] / name, tmp_path / name)
        record = json.loads((copy / "training.json").read_text())
        record["cache"]["tokenizer_fingerprint"] = "e" * 64
        (copy / "training.json").write_text(json.dumps(record))
        with pytest.raises(EvaluateError) as e:
            evaluate(
                EvaluateConfig(),
                tokens=open_tokens(trained["tokens"], "val"),
                teacher=TeacherConfig(path=str(trained["teacher"]), device="cpu"),
                models={name: copy},
            )
        msg = str(e.value)
        assert f"{copy / 'training.json'}: {name} was trained with tokenizer eeeeeeeeeeee…" in msg
        assert f"{trained['tokens']}/val was made with tokenizer" in msg and "--allow-other-teacher" in msg


def test_a_model_without_a_training_record_is_not_checked(setup: dict) -> None:
    m = evaluate(
        EvaluateConfig(batch_size=5), tokens=setup["tokens"], teacher=teacher_cfg(setup), models=students(setup)
    )
    assert m["trained_against"] == {"student": None, "baseline": None}


def test_a_damaged_training_record_is_refused_naming_it(setup: dict, tmp_path: Path) -> None:
    copy = shutil.copytree(setup["student"], tmp_path / "student")
    (copy / "training.json").write_text("[" * 100_000)
    with pytest.raises(EvaluateError, match=rf"{copy / 'training.json'}.*retrain the model"):
        evaluate(EvaluateConfig(), tokens=setup["tokens"], teacher=teacher_cfg(setup), models={"student": copy})


# ----------------------------------------------------------------------------- bits per byte


def test_bits_per_byte_matches_a_hand_computation_in_float64(tmp_path: Path) -> None:
    """bits/byte = sum of NLL (nats) over positions whose target spells text / (ln 2 * the bytes they spell);
    <eos> targets spell nothing and count in neither sum."""
    from conftest import bpe_tokenizer

    docs = ["def add(x, y):\n    return x + y\n", "class A:\n    pass\n", "for i in range(3):\n    print(i)\n"] * 4
    tok = bpe_tokenizer(docs, 300)
    eos = tok.convert_tokens_to_ids("<eos>")
    stream = [i for d in docs for i in [*tok(d, add_special_tokens=False)["input_ids"], eos]]
    ids = np.asarray(stream[: len(stream) // SEQ * SEQ], dtype=np.int32).reshape(-1, SEQ)
    vocab = len(tok)
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
    )
    LlamaForCausalLM(cfg).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    write_tokens(tmp_path / "tokens", {"val": ids}, vocab_size=vocab, tokenizer_fingerprint=tokenizer_fingerprint(tok))
    m = evaluate(
        EvaluateConfig(batch_size=3),
        tokens=open_tokens(tmp_path / "tokens", "val"),
        teacher=TeacherConfig(path=str(teacher), device="cpu"),
        models={},
    )

    model = AutoModelForCausalLM.from_pretrained(teacher).double()
    t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=t).logits.double(), dim=-1)  # (N, T, V) float64
    nats = bytes_ = 0.0
    for row in range(t.shape[0]):
        for pos in range(SEQ - 1):
            target = int(t[row, pos + 1])
            if target == eos:
                continue
            spelled = tok.decode([target]).encode("utf-8")  # ASCII text: every token decodes whole
            assert spelled, target
            nats += -float(logp[row, pos, target])
            bytes_ += len(spelled)
    assert m["num_bytes"] == bytes_
    assert m["models"]["teacher"]["bits_per_byte"] == pytest.approx(nats / (math.log(2) * bytes_), rel=1e-5)
    text = "".join(tok.decode([int(i)]) for i in t[:, 1:].reshape(-1) if int(i) != eos)
    assert m["num_bytes"] == len(text.encode())  # the bytes of the scored text, every target once


def test_a_tokenizer_that_cannot_spell_text_gets_no_bits_per_byte(setup: dict, tmp_path: Path) -> None:
    m = evaluate(EvaluateConfig(batch_size=5), tokens=setup["tokens"], teacher=teacher_cfg(setup), models={})
    assert m["num_bytes"] is None and m["models"]["teacher"]["bits_per_byte"] is None  # word-level tokens
    write_metrics(m, metrics_path=tmp_path / "eval.json", plots_dir=tmp_path / "plots")
    assert "bits_per_byte" not in json.loads((tmp_path / "eval.json").read_text())["teacher"]
