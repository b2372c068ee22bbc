"""Caches written straight to an fsspec URL (``kdcache.cache.remote``), on fsspec's real memory and local
filesystems: the published cache equals a local build file for file, the manifest is published last (a failed
publish leaves none), a rerun resumes from the shards the URL holds, and ``fetch_cache`` reads it back."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
from conftest import make_world

from kdcache.cache.build import build_cache
from kdcache.cache.format import MANIFEST_NAME, Manifest
from kdcache.cache.identity import cache_dir_for
from kdcache.cache.reader import open_cache
from kdcache.cache.remote import RemoteCache, cache_to_url, fetch_cache, is_url, publish_cache
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig
from kdcache.teacher import load_teacher
from kdcache.token_data import open_tokens

CFG = CacheConfig(targets="topk", top_k=4, batch_size=4, rows_per_shard=4)  # 12 rows: 3 shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("remote"))
    teacher = load_teacher(TeacherConfig(path=str(w["teacher"]), device="cpu", dtype="float32"))
    tokens = open_tokens(w["tokens"], "train")
    local = build_cache(teacher, tokens, CFG, out_dir=w["root"] / "local")
    return w | {"teacher_obj": teacher, "tokens_obj": tokens, "local": local}


def _files(fs, root: str) -> dict[str, bytes]:
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_cache_built_to_a_url_equals_the_local_build_and_reads_back(world, tmp_path, scheme):
    url = f"memory://kd-{uuid.uuid4().hex}" if scheme == "memory" else f"file://{tmp_path / 'bucket'}"
    manifest = cache_to_url(world["teacher_obj"], world["tokens_obj"], CFG, url=url, scratch=tmp_path / "scratch")
    local = world["root"] / "local"
    name = manifest.name  # --cache-root semantics: url/<content-derived name>
    fs, root = fsspec.core.url_to_fs(f"{url}/{name}")
    published = _files(fs, root.rstrip("/"))
    assert MANIFEST_NAME in published and not any(n.endswith(".tmp") for n in published)
    for shard in Manifest.load(local).shards:  # byte-identical shards, listed with the same sha256
        assert published[shard.file] == (local / shard.file).read_bytes()
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in Manifest.load(local).shards]
    assert not list((tmp_path / "scratch" / name).glob("shard-*")), "uploaded shards stay in scratch"
    back = fetch_cache(f"{url}/{name}", tmp_path / "fetched")
    with open_cache(back, staging_dir=tmp_path / "st1") as a, open_cache(local, staging_dir=tmp_path / "st2") as b:
        for i in (0, 11):
            assert np.array_equal(a[i]["topk_logprobs"], b[i]["topk_logprobs"])


def test_the_manifest_is_published_last_a_failed_publish_leaves_none(world, tmp_path):
    url = f"memory://kd-{uuid.uuid4().hex}"
    copy = tmp_path / "c"
    fsspec.filesystem("file").cp(str(world["root"] / "local"), str(copy), recursive=True)
    (copy / "shard-00002.parquet").unlink()  # the publish fails on its last shard
    with pytest.raises(FileNotFoundError):
        publish_cache(copy, RemoteCache(url))
    names = RemoteCache(url).names()
    assert {"shard-00000.parquet", "shard-00001.parquet"} <= names and MANIFEST_NAME not in names
    assert RemoteCache(url).manifest() is None
    with pytest.raises(ValueError, match="no manifest"):
        fetch_cache(url, tmp_path / "f")


def test_a_rerun_resumes_from_the_shards_the_url_holds(world, tmp_path, caplog):
    url = f"memory://kd-{uuid.uuid4().hex}"
    local = world["root"] / "local"
    name = cache_dir_for(world["teacher_obj"], world["tokens_obj"], CFG).name  # the content-derived name
    remote = RemoteCache(f"{url}/{name}")
    remote.put(local / "shard-00001.parquet", "shard-00001.parquet")  # a publish killed after one shard
    caplog.set_level("INFO")
    manifest = cache_to_url(world["teacher_obj"], world["tokens_obj"], CFG, url=url, scratch=tmp_path / "s")
    assert "resumed 1 shard(s)" in caplog.text and "3 shards, 1 already done" in caplog.text
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in Manifest.load(local).shards]
    assert remote.manifest().shards == manifest.shards
    assert sorted(p.name for p in (tmp_path / "s" / name).glob("shard-*")) == ["shard-00001.parquet"]  # resumed


def test_urls_are_told_from_paths_and_an_unknown_scheme_is_refused_naming_it():
    assert is_url("s3://bucket/caches") and is_url("memory://x") and not is_url("cache/demo")
    with pytest.raises(ValueError, match="nosuchfs://x: no fsspec filesystem"):
        RemoteCache("nosuchfs://x")


def test_kdcache_cache_with_a_url_cache_root_builds_in_scratch_and_publishes(world, tmp_path, capsys):
    from kdcache.cli import main

    url = f"memory://kd-{uuid.uuid4().hex}"
    args = ["cache", "--teacher", str(world["teacher"]), "--tokens", str(world["tokens"]), "--cache-root", url]
    args += ["--scratch", str(tmp_path / "scratch"), "--targets", "topk", "--top-k", "4", "--rows-per-shard", "4"]
    args += ["--batch-size", "4", "--device", "cpu", "--dtype", "float32"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(url + "/") and RemoteCache(printed).manifest().num_rows == 12
