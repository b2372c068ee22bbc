"""kdcache.generate: a teacher-written corpus, checked against the teacher's own forward and a float64
reference Gumbel-max sampler; deterministic across batch sizes; resumable after a kill; consumed by prepare."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_world
from test_crash import cli, digests, killed

from kdcache.config.base import ConfigError, load_section
from kdcache.config.corpus import CorpusConfig
from kdcache.config.generate import GenerateConfig
from kdcache.config.prepare import PrepareConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.corpus import prepare_tokens, read_documents, split_documents
from kdcache.fingerprint import model_dir_fingerprint, sha256_file, sha256_json
from kdcache.generate import (
    MANIFEST_NAME,
    GenerateError,
    SeededSampler,
    generate_corpus,
    generate_ids,
    gumbel_noise,
    prepare_teacher_for_generate,
    prompt_generator,
    read_prompts,
)
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 48
SMALL = {"prompt_tokens": 4, "max_new_tokens": 10, "val_fraction": 0.1}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    w = make_world(tmp_path_factory.mktemp("gen"), vocab_size=VOCAB, seq=32)
    rng = random.Random(0)
    prompts = w["root"] / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for _ in range(11):
            words = [f"w{rng.randrange(2, VOCAB)}" for _ in range(rng.randrange(2, 9))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    w["prompts"] = prompts
    return w


def cfg_for(world: dict[str, Path], **kw) -> GenerateConfig:
    return GenerateConfig(prompts=(str(world["prompts"]),), **{**SMALL, **kw})


def rows_of(out: Path) -> list[str]:
    return [line for p in sorted(out.glob("part-*.jsonl")) for line in p.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- sampling


def warped(logits: np.ndarray, *, temperature: float, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """float64: tempered logits and kept ids (top-k, then top-p: the smallest most-likely set reaching top_p)."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, dtype=bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of the more likely ids
        keep[order[before >= top_p]] = False
    return z, keep


def reference_draw(logits: np.ndarray, u: np.ndarray, **settings) -> int:
    """Gumbel-max over the kept ids of the warped logits with the uniforms u (V,): float64."""
    z, keep = warped(logits, **settings)
    with np.errstate(divide="ignore"):
        return int(np.argmax(np.where(keep, z - np.log(-np.log(u)), -np.inf)))


SETTINGS = [
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    {"temperature": 0.7, "top_k": 0, "top_p": 1.0},
    {"temperature": 1.3, "top_k": 5, "top_p": 1.0},
    {"temperature": 1.0, "top_k": 0, "top_p": 0.6},
    {"temperature": 0.8, "top_k": 9, "top_p": 0.8},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampler_takes_the_gumbel_max_of_the_warped_logits(settings: dict) -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 40) * 2  # (B, V)
    cfg = GenerateConfig(**settings)
    gens = [prompt_generator(0, b) for b in range(64)]
    scores = SeededSampler(gens, cfg=cfg)(torch.zeros(64, 3, dtype=torch.long), logits)
    got = scores.argmax(-1)
    assert torch.isinf(scores).sum() == 64 * 39  # one finite (0) entry per row: greedy takes the draw
    u = [torch.rand(40, generator=prompt_generator(0, b), dtype=torch.float64).numpy() for b in range(64)]
    want = [reference_draw(logits[b].numpy(), u[b], **settings) for b in range(64)]
    assert got.tolist() == want


@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[4]])
def test_sampler_draws_follow_the_warped_distribution(settings: dict) -> None:
    """10,000 draws (2,500 streams x 4 steps) of one row: frequencies match the float64 warped softmax (chi-square)."""
    logits = torch.tensor([1.5, 0.2, -0.4, 0.9, -2.0, 0.0, -1.0, 0.6, -0.2, 0.3])  # (V=10,)
    z, keep = warped(logits.numpy(), **settings)
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    sampler = SeededSampler([prompt_generator(7, b) for b in range(2500)], cfg=GenerateConfig(**settings))
    rows = logits.expand(2500, -1)  # (2500, V)
    draws = torch.cat([sampler(torch.zeros(2500, 1, dtype=torch.long), rows).argmax(-1) for _ in range(4)])
    n, counts = len(draws), np.bincount(draws.numpy(), minlength=10)
    assert counts[~keep].sum() == 0
    chi2 = float((((counts - n * probs) ** 2)[keep] / (n * probs[keep])).sum())
    assert chi2 < 30.0, (chi2, counts, probs)  # <= 9 degrees of freedom: P(chi2 >= 30) < 5e-4


def test_prompt_streams_are_per_prompt_and_stable() -> None:
    a = gumbel_noise([prompt_generator(0, 5), prompt_generator(0, 2)], 7)  # (2, 7)
    b = gumbel_noise([prompt_generator(0, 2), prompt_generator(0, 9), prompt_generator(0, 5)], 7)
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[0])
    assert not torch.equal(gumbel_noise([prompt_generator(1, 5)], 7)[0], a[0])


def test_generated_tokens_are_draws_from_the_teachers_own_forward(world) -> None:
    """Each new token: the inverse CDF, at its prompt's uniform, of a fresh full forward over prompt + text so far."""
    teacher = load_teacher(TeacherConfig(path=str(world["teacher"])))
    prepare_teacher_for_generate(teacher)
    cfg = cfg_for(world, temperature=0.9, top_k=20)
    prompts = read_prompts(cfg, teacher.tokenizer)[:5]
    outs = generate_ids(teacher, prompts, cfg)  # one left-padded batch
    assert any(len(new) >= 5 for new, _ in outs)
    for p, (new, stopped) in zip(prompts, outs, strict=True):
        gen = prompt_generator(cfg.seed, p.index)
        seq = list(p.ids) + new + ([teacher.tokenizer.eos_token_id] if stopped else [])
        with torch.no_grad():
            logits = teacher.model(input_ids=torch.tensor([seq])).logits[0].double()  # (T, V)
        for t in range(len(seq) - len(p.ids)):
            row = logits[len(p.ids) - 1 + t].numpy()
            u = torch.rand(row.shape[0], generator=gen, dtype=torch.float64).numpy()  # (V,) step t's uniforms
            assert seq[len(p.ids) + t] == reference_draw(row, u, temperature=0.9, top_k=20, top_p=1.0)
        assert stopped or len(new) == cfg.max_new_tokens


# ----------------------------------------------------------------------------- the corpus on disk


def test_output_does_not_depend_on_the_batch_size_or_kv_cache(world, tmp_path) -> None:
    teacher = TeacherConfig(path=str(world["teacher"]))
    rows = {}
    for bs, kv in ((1, "static"), (3, "static"), (8, "static"), (3, "dynamic")):
        generate_corpus(teacher, cfg_for(world, batch_size=bs, kv_cache=kv), out_dir=tmp_path / f"b{bs}{kv}")
        rows[bs, kv] = rows_of(tmp_path / f"b{bs}{kv}")
    assert len(rows[1, "static"]) >= 8 and len({tuple(r) for r in rows.values()}) == 1
    assert len(list((tmp_path / "b3static").glob("part-*.jsonl"))) == -(-len(rows[1, "static"]) // 3)


def test_threads_apply_while_generating_and_are_restored(world, tmp_path, monkeypatch) -> None:
    seen = []
    real = generate_ids

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr("kdcache.generate.generate_ids", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate_corpus(TeacherConfig(path=str(world["teacher"])), cfg_for(world, threads=1), out_dir=tmp_path / "g")
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_manifest_records_teacher_prompts_and_settings(world, tmp_path) -> None:
    cfg = cfg_for(world, temperature=0.8, top_p=0.9, seed=3, batch_size=4)
    out = tmp_path / "gen"
    manifest = generate_corpus(TeacherConfig(path=str(world["teacher"])), cfg, out_dir=out)
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    assert manifest["teacher"]["sha256"] == model_dir_fingerprint(world["teacher"])["sha256"]
    # the prompts' hash, computed independently: the train-split documents' first 4 word ids, in sha256 order
    docs = [json.loads(line)["text"] for line in world["prompts"].read_text().splitlines()]
    train = split_documents(read_documents(CorpusConfig(paths=(str(world["prompts"]),))), val_fraction=0.1)["train"]
    texts = sorted(train["text"], key=lambda t: hashlib.sha256(t.encode()).digest())
    assert set(texts) <= set(docs)
    want = sha256_json([[int(w[1:]) for w in t.split()[:4]] for t in texts])
    assert manifest["prompts"] == {
        "source": [str(world["prompts"])],
        "sha256": want,
        "count": len(texts),
        "tokens": sum(min(4, len(t.split())) for t in texts),
    }
    assert manifest["settings"] == {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items() if k != "enabled"}
    assert manifest["created_by"].startswith("kdcache ") and manifest["format_version"] == 1
    assert manifest["runtime"]["dtype"] == "float32"
    for part in manifest["parts"]:
        assert (
            sha256_file(out / part["file"]) == part["sha256"] and (out / part["file"]).stat().st_size == part["bytes"]
        )
    rows = [json.loads(r) for r in rows_of(out)]
    assert [r["index"] for r in rows] == list(range(len(texts)))
    assert all(r["text"] == f"{r['prompt']} {r['continuation']}".strip() for r in rows)
    assert [r["prompt"] for r in rows] == [" ".join(t.split()[:4]) for t in texts]
    assert manifest["stats"]["new_tokens"] == sum(r["new_tokens"] for r in rows)


def test_killed_run_resumes_to_identical_output(world, tmp_path) -> None:
    args = ["generate", "--teacher", str(world["teacher"]), "--prompts", str(world["prompts"]), "--prompt-tokens", "4"]
    args += ["--max-new-tokens", "10", "--val-fraction", "0.1", "--batch-size", "3"]
    ref = tmp_path / "ref" / "gen"
    assert cli(*args, "--out", str(ref)).returncode == 0
    want = digests(ref)
    n = len(list(ref.glob("part-*.jsonl")))
    assert n >= 3
    out = tmp_path / "run" / "gen"
    proc = cli(*args, "--out", str(out), fault="after_part:1")
    assert killed(proc), proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl"]
    kept = {p.name: p.stat().st_ino for p in out.glob("part-*")}
    proc = cli(*args, "--out", str(out), fault="before_replace:manifest.json")
    assert killed(proc) and f"2 of {n} parts already done" in proc.stderr, proc.stderr[-3000:]
    proc = cli(*args, "--out", str(out))
    assert proc.returncode == 0 and f"{n} of {n} parts already done" in proc.stderr, proc.stderr[-3000:]
    assert digests(out) == want
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # finished parts were not rewritten


def test_rerun_with_other_settings_is_refused(world, tmp_path) -> None:
    teacher = TeacherConfig(path=str(world["teacher"]))
    generate_corpus(teacher, cfg_for(world, max_prompts=3), out_dir=tmp_path / "gen")
    with pytest.raises(GenerateError, match=r"settings\.temperature differ.*--overwrite"):
        generate_corpus(teacher, cfg_for(world, max_prompts=3, temperature=0.5), out_dir=tmp_path / "gen")
    moved = generate_corpus(
        teacher, cfg_for(world, max_prompts=3, temperature=0.5), out_dir=tmp_path / "gen", overwrite=True
    )
    assert moved["settings"]["temperature"] == 0.5 and list(tmp_path.glob("gen.moved-*-overwritten"))


def test_prepare_reads_the_generated_corpus(world, tmp_path) -> None:
    out = tmp_path / "gen"
    generate_corpus(TeacherConfig(path=str(world["teacher"])), cfg_for(world), out_dir=out)
    texts = [json.loads(r)["text"] for r in rows_of(out)]
    corpus = CorpusConfig(paths=(str(out / "part-*.jsonl"),), val_fraction=0.2)
    manifest = prepare_tokens(
        corpus, PrepareConfig(seq_len=8), tokenizer_dir=world["teacher"], out_dir=tmp_path / "tokens"
    )
    assert sum(manifest["corpus"]["num_documents"].values()) == len(texts)
    docs = read_documents(corpus)
    assert sorted(docs["text"]) == sorted(t for t in texts if t.strip())
    first = split_documents(docs, val_fraction=0.2)["train"][0]["text"].split()
    want = ([int(w[1:]) for w in first] + [0])[:8]  # the document's word ids, then EOS (id 0)
    assert np.asarray(open_tokens(tmp_path / "tokens", "train").ids[0])[: len(want)].tolist() == want


def test_disabled_stage_writes_only_its_marker(world, tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        f"paths: {{generated: {tmp_path / 'gen'}}}\nteacher: {{path: {world['teacher']}}}\ngenerate: {{}}\n"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "generate.py"), "--params", str(params)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == [
        ".kdcache-output.json",
        ".kdcache.lock",
    ]  # bookkeeping only


def test_config_refuses_bad_sampling_settings() -> None:
    for values, key in [({"top_p": 0.0}, "top_p"), ({"temperature": 0}, "temperature"), ({"top_k": -1}, "top_k")]:
        with pytest.raises(ConfigError, match=f"generate.{key}"):
            load_section(GenerateConfig, values, section="generate")


def test_a_damaged_part_is_written_again_and_the_manifest_only_describes_complete_runs(world, tmp_path) -> None:
    teacher, cfg, out = TeacherConfig(path=str(world["teacher"])), cfg_for(world, max_prompts=4, batch_size=2), tmp_path
    generate_corpus(teacher, cfg, out_dir=out / "gen")
    want = digests(out / "gen")
    (out / "gen" / "part-00001.jsonl").write_text('{"index": 2, "te', encoding="utf-8")  # torn by hand
    proc = cli(
        *[
            "generate",
            "--teacher",
            str(world["teacher"]),
            "--prompts",
            str(world["prompts"]),
            "--out",
            str(out / "gen"),
        ],
        *["--prompt-tokens", "4", "--max-new-tokens", "10", "--val-fraction", "0.1", "--max-prompts", "4"],
        *["--batch-size", "2"],
        fault="after_part:1",
    )
    assert killed(proc) and "unreadable" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "gen" / MANIFEST_NAME).exists()  # the old manifest went before the part was rewritten
    generate_corpus(teacher, cfg, out_dir=out / "gen")
    assert digests(out / "gen") == want
