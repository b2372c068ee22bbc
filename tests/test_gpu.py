"""GPU-only checks (bf16 tolerances); skipped without a GPU. Run on a GPU box with
``KDCACHE_TEST_GPU=1 python -m pytest -q tests/test_gpu.py`` (conftest.py hides CUDA otherwise)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STUDENT, make_world

from kdcache.cache.build import build_cache
from kdcache.cache.rows import decode_row
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.config.train import StudentConfig, TrainConfig
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens
from kdcache.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (KDCACHE_TEST_GPU=1)")


def _rows(cache: Path, manifest) -> dict:
    import pyarrow.parquet as pq

    rows = {}
    for shard in manifest.shards:
        for row in pq.read_table(cache / shard.file).to_pylist():
            t = decode_row(manifest.layout, row)
            rows[t.seq_index] = t
    return rows


def test_a_bf16_cuda_cache_agrees_with_the_fp32_cpu_cache_within_bf16_error(tmp_path: Path) -> None:
    world = make_world(tmp_path, vocab_size=512, n=8, seq=64)
    tokens = open_tokens(world["tokens"], "train")
    cfg = CacheConfig(targets="topk", top_k=8, batch_size=4, rows_per_shard=4)
    built = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        teacher = load_teacher(TeacherConfig(path=str(world["teacher"]), device=device, dtype=dtype))
        out = tmp_path / device
        built[device] = _rows(out, build_cache(teacher, tokens, cfg, out_dir=out))
    agree = np.mean([np.mean(built["cpu"][i].topk_ids == built["cuda"][i].topk_ids) for i in built["cpu"]])
    assert agree > 0.9, f"top-k ids agree on {agree:.1%} of entries"
    for i, ref in built["cpu"].items():
        same = ref.topk_ids == built["cuda"][i].topk_ids  # (T, k)
        diff = np.abs(ref.topk_logprobs[same] - built["cuda"][i].topk_logprobs[same])
        assert float(diff.max()) < 0.1  # bf16 logits: ~3 significant digits


def test_training_on_cuda_runs_in_bf16_autocast_with_finite_losses(tmp_path: Path) -> None:
    world = make_world(tmp_path, vocab_size=512, n=16, seq=64)
    teacher = load_teacher(TeacherConfig(path=str(world["teacher"]), device="cuda"))
    cfg = CacheConfig(targets="topk", top_k=8, batch_size=4, rows_per_shard=8)
    build_cache(teacher, open_tokens(world["tokens"], "train"), cfg, out_dir=tmp_path / "cache")
    summary = train(
        TrainConfig(max_steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, student=StudentConfig(**STUDENT)),
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "student",
        device="cuda",
    )
    assert summary["complete"] and summary["device"].startswith("cuda") and math.isfinite(summary["final_loss"])
    assert summary["peak_memory_bytes"]["cuda"] > 0
