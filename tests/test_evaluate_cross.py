"""pipeline/evaluate_cross.py: evaluating a model of another tokenizer, against float64 references that
re-tokenize the documents directly and align positions by brute-force byte prefixes."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sp_tokenizers
import torch
from conftest import WORDS, tiny_llama
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kdcache.config.evaluate import EvaluateConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.crossproj import build_projection
from kdcache.crosstok import event_map
from kdcache.evaluate import EvaluateError, evaluate, write_metrics
from kdcache.evaluate_cross import projected_kl, projection_for
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.token_data import open_tokens, write_tokens
from kdcache.tokenizer import token_bytes, train_bpe_tokenizer

SEQ = 40
DOCS = [
    "héllo wörld, the cat sat on the mat",
    "def f(x):\n    return x + 1  # ✓",
    "the quick brown fox jumps over the lazy dog",
    "世界 hello world again and again",
    "a cat and a dog and a fox",
    "print('🎉 done')",
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def texts() -> list[str]:
    rng = random.Random(3)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(40)] + DOCS


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A byte-level BPE teacher, a val split of one document per row (EOS, then padding), and a student of
    another byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("evalx")
    teacher_tok = train_bpe_tokenizer(texts(), vocab_size=300)
    tiny_llama(len(teacher_tok), max_positions=SEQ, seed=0).save_pretrained(root / "teacher")
    teacher_tok.save_pretrained(root / "teacher")
    rows = np.full((len(DOCS), SEQ), 1, np.int64)  # <|pad|>
    for r, doc in enumerate(DOCS):
        ids = [*teacher_tok(doc, add_special_tokens=False)["input_ids"], teacher_tok.eos_token_id]
        rows[r, : len(ids)] = ids
    meta = {"packing": {"mode": "documents", "pad_id": 1, "eos_id": teacher_tok.eos_token_id}}
    fp = tokenizer_fingerprint(teacher_tok)
    write_tokens(root / "tokens", {"val": rows}, vocab_size=len(teacher_tok), tokenizer_fingerprint=fp, meta=meta)
    student_tok = train_bpe_tokenizer(texts()[::-1], vocab_size=280)
    tiny_llama(len(student_tok), max_positions=SEQ + 8, seed=1, hidden_size=16).save_pretrained(root / "student")
    student_tok.save_pretrained(root / "student")
    return {"root": root, "teacher_tok": teacher_tok, "student_tok": student_tok, "rows": rows}


def run(world: dict, models: dict[str, Path], **cfg) -> dict:
    return evaluate(
        EvaluateConfig(batch_size=4, **cfg),
        tokens=open_tokens(world["root"] / "tokens", "val"),
        teacher=TeacherConfig(path=str(world["root"] / "teacher"), device="cpu"),
        models=models,
    )


def log_probs(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()  # (n, V)


def dense_reference(world: dict, method: str) -> dict[str, float]:
    """Float64, one document at a time: the student's own tokens of the document (+ EOS), bits per byte
    over them; student position i aligned to teacher position j when their byte prefixes are equal
    (j not the teacher's last), and there the projected teacher vs the student, loop by loop."""
    t_tok, s_tok = world["teacher_tok"], world["student_tok"]
    tb, sb = token_bytes(t_tok), token_bytes(s_tok)
    table = build_projection(
        method, teacher_bytes=tb, student_tokenizer=s_tok, student_bytes=sb, events=event_map(t_tok, s_tok, tb)
    ).to_student
    Vs = len(sb)
    image = {int(v) for v in table if v >= 0}
    teacher, student = (
        AutoModelForCausalLM.from_pretrained(world["root"] / n).double() for n in ("teacher", "student")
    )
    nats = nbytes = kl = kept = 0.0
    scored = aligned = agree = 0
    for doc in DOCS:
        t_ids = [*t_tok(doc, add_special_tokens=False)["input_ids"], t_tok.eos_token_id]
        s_ids = [*s_tok(doc, add_special_tokens=False)["input_ids"], s_tok.eos_token_id]
        lp_t, lp_s = log_probs(teacher, t_ids), log_probs(student, s_ids)
        lp_s = lp_s[:, :Vs]
        t_ends = np.cumsum([len(tb[t]) for t in t_ids]) + np.cumsum([not tb[t] for t in t_ids]) * 10_000
        s_ends = np.cumsum([len(sb[s]) for s in s_ids]) + np.cumsum([not sb[s] for s in s_ids]) * 10_000
        for i in range(len(s_ids) - 1):
            scored += 1
            target = s_ids[i + 1]
            if sb[target]:
                nats -= lp_s[i, target]
                nbytes += len(sb[target])
            js = [j for j in range(len(t_ids) - 1) if t_ends[j] == s_ends[i]]
            if not js:
                continue
            p = np.exp(lp_t[js[0]])  # (V_t,)
            P = np.zeros(Vs)
            np.add.at(P, table[table >= 0], p[table >= 0])  # P[v] = sum of p[t] over t with table[t] = v
            rest = p[table < 0].sum()
            q = np.exp(lp_s[i])
            q_rest = sum(q[v] for v in range(Vs) if v not in image)
            if len(image) == Vs:  # no student id left for the unmapped mass: renormalize the kept mass
                P, rest = P / P.sum(), 0.0
            kl += sum(P[v] * math.log(P[v] / q[v]) for v in range(Vs) if P[v] > 0)
            kl += rest * math.log(rest / q_rest) if rest > 0 else 0.0
            agree += int(np.argmax(P) == np.argmax(q))
            kept += 1 - p[table < 0].sum()
            aligned += 1
    return {
        "bits_per_byte": nats / math.log(2) / nbytes,
        "num_bytes": nbytes,
        "kl": kl / aligned,
        "kept": kept / aligned,
        "agreement": agree / aligned,
        "coverage": aligned / scored,
        "num_tokens": scored,
    }


@pytest.mark.parametrize("method", ["prefix", "exact"])
def test_a_student_of_another_tokenizer_matches_the_float64_reference(world: dict, method: str, tmp_path: Path):
    student = world["root"] / "student"
    if method == "exact":  # the projection comes from the student's training record
        student = Path(__import__("shutil").copytree(student, tmp_path / "student"))
        (student / "training.json").write_text(json.dumps({"cache": {}, "vocab_map": {"method": "exact"}}))
    m = run(world, {"student": student})
    got, ref = m["models"]["student"], dense_reference(world, method)
    cross = got["cross_tokenizer"]
    assert cross["projection"] == method and cross["num_tokens"] == ref["num_tokens"]
    assert cross["num_bytes"] == ref["num_bytes"] and cross["student_tokens_cut"] == 0
    assert got["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-5)
    assert got["kl_to_teacher"] == pytest.approx(ref["kl"], rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(ref["agreement"])
    assert got["kl_coverage"] == pytest.approx(ref["coverage"]) and 0.5 < ref["coverage"] < 1
    assert cross["teacher_mass_kept"] == pytest.approx(ref["kept"], rel=1e-5)
    assert sum(row["count"] for row in got["calibration"]) == ref["num_tokens"]
    assert m["models"]["teacher"]["bits_per_byte"] is not None and "cross_tokenizer" not in m["models"]["teacher"]


def permuted_copy(world: dict, out: Path) -> Path:
    """The teacher with its vocabulary ids permuted (the same tokens, another tokenizer fingerprint): the
    same model, so through the alignment it must agree with the teacher everywhere."""
    tok = world["teacher_tok"]
    spec = json.loads(tok.backend_tokenizer.to_str())
    specials = {a["id"] for a in spec["added_tokens"]}
    movable = sorted(set(spec["model"]["vocab"].values()) - specials)
    perm = dict(zip(movable, movable[::-1], strict=True)) | {s: s for s in specials}  # old id -> new id
    spec["model"]["vocab"] = {k: perm[v] for k, v in spec["model"]["vocab"].items()}
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=tok.eos_token, pad_token=tok.pad_token
    )
    model = AutoModelForCausalLM.from_pretrained(world["root"] / "teacher")
    order = torch.tensor([old for old, _ in sorted(perm.items(), key=lambda kv: kv[1])])  # new id -> old id
    with torch.no_grad():
        weights = {w.data_ptr(): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
        for w in weights.values():  # a tied matrix once
            w.copy_(w[order].clone())
    model.save_pretrained(out)
    other.save_pretrained(out)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    return out


def test_the_teacher_under_permuted_ids_agrees_with_itself_at_every_position(world: dict, tmp_path: Path):
    m = run(world, {"copy": permuted_copy(world, tmp_path / "copy")})
    teacher, copy = m["models"]["teacher"], m["models"]["copy"]
    assert copy["kl_coverage"] == 1.0 and copy["top1_agreement"] == 1.0 and abs(copy["kl_to_teacher"]) < 1e-5
    assert copy["bits_per_byte"] == pytest.approx(teacher["bits_per_byte"], rel=1e-5)
    assert copy["ce"] == pytest.approx(teacher["ce"], rel=1e-5)
    assert copy["cross_tokenizer"]["teacher_mass_kept"] == pytest.approx(1.0)


def test_a_sentencepiece_student_and_the_metrics_files(world: dict, tmp_path: Path):
    """A Metaspace (dummy-prefix) student and its CE baseline: bits per byte, the bits-per-byte difference
    in the flat metrics, and no nats-per-token difference across tokenizers."""
    sp = sp_tokenizers.metaspace_bpe(texts(), 300)
    for name, seed in (("student", 2), ("baseline", 3)):
        tiny_llama(len(sp), max_positions=SEQ + 16, seed=seed, hidden_size=16).save_pretrained(tmp_path / name)
        sp.save_pretrained(tmp_path / name)
    m = run(world, {"student": tmp_path / "student", "baseline": tmp_path / "baseline"})
    text_bytes = sum(len(d.encode()) for d in DOCS)
    for name in ("student", "baseline"):
        got = m["models"][name]
        assert 0.5 < got["kl_coverage"] <= 1 and math.isfinite(got["kl_to_teacher"]) and got["kl_to_teacher"] > 0
        assert 0.8 * text_bytes < got["cross_tokenizer"]["num_bytes"] < text_bytes  # first tokens are not predicted
    write_metrics(m, metrics_path=tmp_path / "eval.json", plots_dir=tmp_path / "plots")
    flat = json.loads((tmp_path / "eval.json").read_text())
    assert flat["kd_minus_baseline_bits_per_byte"] == pytest.approx(
        m["models"]["student"]["bits_per_byte"] - m["models"]["baseline"]["bits_per_byte"]
    )
    assert "kd_minus_baseline_ce" in flat and "kl_coverage" in flat["student"]


def test_rows_longer_than_the_models_positions_are_cut_and_counted(world: dict, tmp_path: Path):
    tiny_llama(len(world["student_tok"]), max_positions=12, seed=1, hidden_size=16).save_pretrained(tmp_path / "s")
    world["student_tok"].save_pretrained(tmp_path / "s")
    cross = run(world, {"s": tmp_path / "s"})["models"]["s"]["cross_tokenizer"]
    assert cross["student_tokens_cut"] > 0 and cross["lost_byte_fraction"] > 0


def test_a_model_of_another_tokenizer_with_too_few_logits_is_refused(world: dict, tmp_path: Path):
    tiny_llama(100, max_positions=SEQ, seed=1, hidden_size=16).save_pretrained(tmp_path / "s")
    world["student_tok"].save_pretrained(tmp_path / "s")
    with pytest.raises(EvaluateError, match=r"s: 100 output logits but its own tokenizer has \d+ ids"):
        run(world, {"s": tmp_path / "s"})


def test_projected_kl_equals_the_dense_float64_partition_kl():
    """Hand-made table: teacher ids 0..5 -> student ids (two merged, one unmapped); float64 loops."""
    rng = np.random.default_rng(0)
    table = np.array([0, 2, 2, -1, 3, 1])  # student id 4 is no teacher id's image
    Vs = 5
    logp = torch.log_softmax(torch.from_numpy(rng.normal(size=(7, 6))), -1)  # (7, 6) float64
    logq = torch.log_softmax(torch.from_numpy(rng.normal(size=(7, Vs))), -1)  # (7, 5)
    index = torch.from_numpy(np.where(table >= 0, table, Vs))
    outside = torch.tensor([False, False, False, False, True])
    kl, top, kept = projected_kl(logp, logq, index=index, outside=outside)
    for n in range(7):
        p, q = logp[n].exp().numpy(), logq[n].exp().numpy()
        P = [sum(p[t] for t in range(6) if table[t] == v) for v in range(Vs)]
        rest = p[3]
        want = sum(P[v] * math.log(P[v] / q[v]) for v in range(Vs) if P[v] > 0) + rest * math.log(rest / q[4])
        assert float(kl[n]) == pytest.approx(want, rel=1e-9)
        assert int(top[n]) == int(np.argmax(P)) and float(kept[n]) == pytest.approx(1 - rest)
    # every student id is an image: the unmapped mass cannot be matched, the kept mass is renormalized
    full = torch.from_numpy(np.array([0, 2, 4, -1, 3, 1]))
    index = torch.where(full >= 0, full, Vs)
    kl, _, _ = projected_kl(logp, logq, index=index, outside=torch.zeros(Vs, dtype=torch.bool))
    p, q = logp[0].exp().numpy(), logq[0].exp().numpy()
    P = np.zeros(Vs)
    for t, v in enumerate(full):
        if v >= 0:
            P[v] += p[t]
    P /= P.sum()
    assert float(kl[0]) == pytest.approx(float((P * np.log(P / q)).sum()), rel=1e-9)


def test_projection_for_reads_the_training_record():
    assert projection_for(None) == "prefix"
    assert projection_for({"vocab_map": None}) == "prefix"
    assert projection_for({"vocab_map": {"method": "exact"}}) == "exact"
    assert projection_for({"vocab_map": {"method": "uld"}}) == "prefix"
    assert projection_for({"vocab_map": {"ids_mapped": 3}}) == "exact"  # train.vocab_map: exact
