"""teacher.tp_plan (transformers' own tensor parallelism), the lockstep cache build, the loader's refusals.

Tensor parallelism runs here for real: 2 ranks under `torchrun` with gloo on the CPU, a tiny Llama
loaded with ``tp_plan: auto`` (its weights become DTensors sharded over the ranks), compared with
the same model loaded whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_world

from kdcache.config.base import ConfigError, load_section
from kdcache.config.teacher import TeacherConfig
from kdcache.teacher import TeacherError, load_teacher

BIN = Path(sys.executable).parent
SCRIPT = """
import json, os, sys
import torch
from kdcache.cache.build import cache_corpus
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.distributed import process_group
from kdcache.files import set_crash_hook
from kdcache.teacher import load_teacher, logit_rows, teacher_hidden, teacher_logits

path, out, tokens, cache_out, fail = sys.argv[1:6]
torch.set_num_threads(1)
with process_group("gloo", device="cpu") as (rank, world):
    # 1. the probe: the sharded teacher against the same model loaded whole
    tp = load_teacher(TeacherConfig(path=path, device="cpu", tp_plan="auto"))  # the head probe runs in here
    whole = load_teacher(TeacherConfig(path=path, device="cpu"))
    ids = (torch.arange(48) * 7919 % 48).reshape(3, 16)
    want = teacher_logits(whole, ids).float()  # (3, 16, V)
    got = teacher_logits(tp, ids).float()
    rows = logit_rows(tp, teacher_hidden(tp, ids))(slice(0, 48))  # (48, V): the cache path, chunked head
    weight = tp.model.get_output_embeddings().weight
    json.dump({
        "world": world,
        "sharded": type(weight).__name__,
        "local_rows": int(weight.to_local().shape[0]) if hasattr(weight, "to_local") else None,
        "forward": float((got - want).abs().max()),
        "head": float((rows - want.reshape(48, -1)).abs().max()),
        "vocab": tp.vocab_size,
        "params": [tp.info["num_parameters"], whole.info["num_parameters"]],
    }, open(f"{out}/rank{rank}.json", "w"))
    del tp, whole

    # 2. a lockstep cache build in the same ranks (cache_corpus joins this process group)
    def disk_full(name):
        if name == fail:
            raise OSError(28, "No space left on device")

    if rank == 0:  # rank 0's writer thread fails once shard 1 is on disk, as a full disk would
        set_crash_hook(disk_full)
    cfg = CacheConfig(targets="both", top_k=8, samples=8, batch_size=3, rows_per_shard=4)
    try:
        cache_corpus(TeacherConfig(path=path, device="cpu", tp_plan="auto"), cfg, tokens_dir=tokens, out_dir=cache_out)
    except Exception as e:
        print(f"rank {rank}: {type(e).__name__}: {e}", flush=True)
        sys.exit(3)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("tp"), vocab_size=48, seq=16)


@pytest.fixture(scope="module")
def tp_run(world) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-rank torchrun for two checks (each rank imports torch and transformers once): the probe, then
    a lockstep cache build of ``tp/cache`` whose rank 0 fails with a full disk once shard 1 is on disk."""
    out = world["root"] / "tp-run"
    out.mkdir()
    (out / "run.py").write_text(SCRIPT)
    args = [str(out / "run.py"), str(world["teacher"]), str(out), str(world["tokens"]), str(out / "tp" / "cache")]
    return out, _torchrun(*args, "after_shard:1", cwd=out)


def test_tp_plan_auto_shards_the_teacher_over_two_gloo_ranks_and_computes_the_same_logits(tp_run):
    out, proc = tp_run
    for rank in (0, 1):
        assert (out / f"rank{rank}.json").is_file(), proc.stderr[-4000:]
        r = json.loads((out / f"rank{rank}.json").read_text())
        assert r["world"] == 2 and r["sharded"] == "DTensor" and r["local_rows"] == 24  # half the head per rank
        assert r["forward"] < 1e-5 and r["head"] < 1e-5, r  # fp32: sharded matmuls sum in another order
        assert r["vocab"] == 48 and r["params"][0] == r["params"][1]


def test_tp_plan_outside_torchrun_is_refused_naming_the_launch(world) -> None:
    with pytest.raises(TeacherError, match=r"^teacher.tp_plan: auto shards .* not one of several ranks — launch"):
        load_teacher(TeacherConfig(path=str(world["teacher"]), device="cpu", tp_plan="auto"))


def test_tp_plan_of_a_model_type_without_a_plan_is_refused(tmp_path) -> None:
    from conftest import word_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(tmp_path)
    word_tokenizer(48).save_pretrained(tmp_path)
    with pytest.raises(
        TeacherError, match=r"model_type 'gpt2' has no tensor-parallel plan in transformers .* teacher.device_map$"
    ):
        load_teacher(TeacherConfig(path=str(tmp_path), device="cpu", tp_plan="auto"))


def test_tp_plan_with_a_device_map_or_an_unknown_plan_is_refused() -> None:
    with pytest.raises(ConfigError, match="teacher.tp_plan: and device_map are exclusive"):
        load_section(TeacherConfig, {"tp_plan": "auto", "device_map": "auto"}, section="teacher")
    with pytest.raises(ConfigError, match="teacher.tp_plan: .*fits none"):
        load_section(TeacherConfig, {"tp_plan": "colwise"}, section="teacher")


@pytest.mark.parametrize("trust", [False, True])
def test_a_config_json_nested_too_deep_is_one_line_naming_the_file_and_the_fix(world, tmp_path, trust) -> None:
    import shutil

    teacher = shutil.copytree(world["teacher"], tmp_path / "teacher")
    (teacher / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(TeacherError) as e:
        load_teacher(TeacherConfig(path=str(teacher), device="cpu", trust_remote_code=trust))
    msg = str(e.value)
    assert msg.startswith(f"{teacher / 'config.json'}: cannot load the model config (RecursionError: ")
    assert msg.endswith("replace it with the model's own config.json (copy the model directory again)")
    assert "\n" not in msg


def test_a_bare_cuda_device_under_torchrun_is_refused_before_the_teacher_loads(world, monkeypatch) -> None:
    """Issue 9.4: under torchrun each rank takes cuda:LOCAL_RANK (or spans GPUs with device_map/tp_plan)."""
    from kdcache.cache.build import cache_corpus
    from kdcache.config.cache import CacheConfig
    from kdcache.distributed import DistributedError

    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    cfg = TeacherConfig(path=str(world["teacher"]), device="cuda:1", tp_plan="auto")
    with pytest.raises(DistributedError, match="'cuda:1' under torchrun with 2 ranks would put every rank on one GPU"):
        cache_corpus(cfg, CacheConfig(), tokens_dir=world["tokens"], out_dir=world["root"] / "never")
    assert not (world["root"] / "never").exists()


CACHE_FLAGS = ["--device", "cpu", "--targets", "both", "--top-k", "8", "--samples", "8", "--batch-size", "3"]
CACHE_FLAGS += ["--rows-per-shard", "4"]  # 12 sequences: 3 shards of batches of 3 and 1 sequence


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_NO_PROGRESS": "1"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _targets(path: Path) -> list[dict]:
    from kdcache.cache.reader import open_cache
    from kdcache.cache.verify import verify_cache

    assert verify_cache(path) == []
    reader = open_cache(path, staging_dir=path.parent / "staging")
    return [reader[i] for i in range(len(reader))]


def test_a_tensor_parallel_teacher_builds_the_cache_in_lockstep_and_resumes_after_a_failed_rank(
    world, tp_run, tmp_path, monkeypatch
):
    """Issue 9.4: both ranks run every batch, rank 0 writes; the targets equal a one-process build's."""
    import torch

    from kdcache.cli import main as kdcache

    out, failed = tp_run  # the build half of the torchrun above
    tp, one = out / "tp" / "cache", tmp_path / "one" / "cache"  # same leaf name: the manifest records it
    teacher, tokens = str(world["teacher"]), str(world["tokens"])
    monkeypatch.setenv("KDCACHE_NO_PROGRESS", "1")
    monkeypatch.setenv("KDCACHE_STAGING_DIR", str(tmp_path / "staging"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank and the old one-process subprocess (OMP_NUM_THREADS=1)
    try:
        assert kdcache(["cache", "--teacher", teacher, "--tokens", tokens, "--out", str(one), *CACHE_FLAGS]) == 0
    finally:
        torch.set_num_threads(threads)

    assert failed.returncode != 0, "a failed rank fails the job"
    said = failed.stdout
    assert "rank 0: CacheWriteError: " in said and "No space left on device" in said, said
    assert "rank 1: RankFailed: another rank failed (see its error); no manifest written" in said, said
    assert sorted(p.name for p in tp.glob("shard-*")) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not (tp / "manifest.json").exists()
    first = (tp / "shard-00000.parquet").stat().st_mtime_ns

    cmd = ["--no-python", str(BIN / "kdcache"), "cache", "--teacher", teacher, "--tokens", tokens, "--out", str(tp)]
    proc = _torchrun(*cmd, *CACHE_FLAGS, "--tp-plan", "auto", cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines() == [str(tp)], "rank 0 alone prints the cache path"
    assert (tp / "shard-00000.parquet").stat().st_mtime_ns == first, "the resume scored only the missing shard"
    got, want = _targets(tp), _targets(one)
    assert len(got) == len(want) == 12
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g["input_ids"], w["input_ids"]) and g["seq_index"] == w["seq_index"]
        lg, lw = g["topk_logprobs"], w["topk_logprobs"]
        same = (g["topk_ids"] == w["topk_ids"]).all(axis=1)  # (T,) positions with the same top-8 ids
        assert np.abs(lg - lw)[same].max() < 1e-4  # fp32: the sharded matmuls sum in another order
        # elsewhere only a near-tie at the k-th entry may differ: the smallest kept log-probs agree
        assert np.abs(lg.min(axis=1) - lw.min(axis=1)).max() < 1e-4
        for key in ("teacher_nll", "teacher_entropy"):
            assert np.allclose(g[key], w[key], atol=1e-4, equal_nan=True), key
        # draws differ only where a uniform falls within rounding of a CDF step: none or next to none here
        drawn = (g["sample_ids"] != w["sample_ids"]) | (g["sample_counts"] != w["sample_counts"])
        assert drawn.any(axis=1).sum() <= 1, drawn.any(axis=1).nonzero()


def test_a_tensor_parallel_group_smaller_than_the_world_is_refused(tmp_path) -> None:
    """One TP group must span all ranks (TP x data parallel is out of scope): a 1-rank mesh in a 2-rank world."""
    import types

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_module

    from kdcache.cache.lockstep import tensor_parallel
    from kdcache.cache.writer import CacheWriteError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = distribute_module(torch.nn.Linear(4, 4), init_device_mesh("cpu", (1,)))  # DTensor weights
        assert tensor_parallel(types.SimpleNamespace(model=model), 1, tmp_path) is True
        assert tensor_parallel(types.SimpleNamespace(model=torch.nn.Linear(4, 4)), 2, tmp_path) is False
        with pytest.raises(CacheWriteError, match=r"tensor-parallel over 1 ranks of 2; .* --nproc_per_node equal"):
            tensor_parallel(types.SimpleNamespace(model=model), 2, tmp_path)
    finally:
        dist.destroy_process_group()
