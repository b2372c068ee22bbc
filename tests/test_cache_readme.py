"""cache/README.md is the format's specification: its by-hand decoder runs against real caches and
agrees with the reader, and it documents every column and manifest field."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bpe_tokenizer

from kdcache.cache.build import build_cache
from kdcache.cache.format import Manifest
from kdcache.cache.reader import open_cache
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.fingerprint import tokenizer_fingerprint
from kdcache.teacher import Teacher, load_teacher
from kdcache.token_data import open_tokens, write_tokens

README = Path(__file__).resolve().parents[1] / "cache" / "README.md"
N, T, VOCAB = 6, 16, 300
CONFIGS = {
    "topk": CacheConfig(targets="topk", top_k=8, temperatures=(2.0, 0.5), batch_size=3, rows_per_shard=4),
    "adaptive": CacheConfig(targets="topk", top_k=8, mass=0.5, batch_size=3, rows_per_shard=4),
    "sampled": CacheConfig(targets="sampled", samples=16, batch_size=3, rows_per_shard=4),
    "both": CacheConfig(targets="both", top_k=4, samples=8, batch_size=3, rows_per_shard=4),
    "topk-rel8": CacheConfig(targets="topk", top_k=8, batch_size=3, rows_per_shard=4, value_encoding="rel8"),
    "topk-log32": CacheConfig(targets="topk", top_k=8, batch_size=3, rows_per_shard=4, value_encoding="log32"),
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Teacher:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # confident positions too: tails from ~1e-1 down to ~1e-9
    model.save_pretrained(path)
    bpe_tokenizer(Path(__file__).read_text().splitlines() * 3, VOCAB).save_pretrained(path)
    return load_teacher(TeacherConfig(path=str(path), device="cpu"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readme")
    ids = np.random.default_rng(0).integers(0, VOCAB - 1, size=(N, T))
    write_tokens(
        root / "tokens",
        {"train": ids, "val": ids[:2]},
        vocab_size=VOCAB,
        tokenizer_fingerprint=tokenizer_fingerprint(teacher.tokenizer),
    )
    tokens = open_tokens(root / "tokens", "train")
    out = {}
    for name, cfg in CONFIGS.items():
        build_cache(teacher, tokens, cfg, out_dir=root / name)
        out[name] = root / name
    return out


def readme_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Decoding a row by hand") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_readme_decoder_reads_a_real_cache_exactly_like_the_reader(caches, name) -> None:
    code = readme_snippet()
    assert re.search(r'^cache_dir = "cache/demo"', code, re.M), "the snippet must start from a cache_dir variable"
    code = re.sub(r"^cache_dir = .*$", f"cache_dir = {str(caches[name])!r}", code, count=1, flags=re.M)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README's own example, on our own cache
    with open_cache(caches[name], staging_dir=caches[name].parent / "staging") as reader:
        want = reader[0]
    manifest = Manifest.load(caches[name])
    layout = manifest.layout
    np.testing.assert_array_equal(scope["input_ids"], want["input_ids"])
    if layout.has_topk:
        keep = np.isfinite(want["topk_logprobs"])  # (T, k)
        np.testing.assert_array_equal(scope["ids"], want["topk_ids"][keep])
        np.testing.assert_allclose(scope["logprobs"], want["topk_logprobs"][keep], atol=2e-6, rtol=1e-7)  # float32
    if layout.has_samples:
        keep = want["sample_counts"] > 0
        np.testing.assert_array_equal(scope["sample_ids"], want["sample_ids"][keep])
        np.testing.assert_array_equal(scope["sample_counts"], want["sample_counts"][keep])
    assert manifest.format_version == "2.0" and layout.signals == ("nll", "entropy") and layout.max_token_bytes
    assert bool(layout.temperatures) == (name == "topk")
    for key in ("teacher_nll", "teacher_entropy", "byte_lengths") + (("log_z",) if layout.temperatures else ()):
        reader_key = "topk_log_z" if key == "log_z" else key
        np.testing.assert_array_equal(np.asarray(scope[key], want[reader_key].dtype), want[reader_key])


def test_the_readme_documents_every_column_and_manifest_field(caches) -> None:
    text = README.read_text(encoding="utf-8")
    for path in caches.values():
        manifest = Manifest.load(path)
        for column in manifest.layout.columns():
            assert f"`{column}`" in text, column
        raw = manifest.to_json()
        for section in ("teacher", "tokenizer", "corpus", "targets", "stats"):
            for key in getattr(manifest, section):
                assert f"`{key}`" in text, f"{section}.{key}"
        for key in (
            "file",
            "rows",
            "tokens",
            "bytes",
            "sha256",
            "first_seq",
            "format",
            "format_version",
            "created_by",
            "name",
        ):
            assert f"`{key}`" in text and f'"{key}"' in raw, key
