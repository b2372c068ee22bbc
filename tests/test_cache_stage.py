"""The DVC cache stage (stages/cache.py) run as DVC runs it: a cache of other settings is moved aside, intact,
and a fresh one built (so `dvc repro` after a `cache.*` change just works); a matching one is resumed."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_world

from kdcache.cache.format import Manifest
from kdcache.fingerprint import sha256_file

ROOT = Path(__file__).resolve().parents[1]
CACHE = {"targets": "topk", "top_k": 4, "batch_size": 4, "rows_per_shard": 8}


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("staging_one_thread")


def _stage(params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stages/cache.py's main() in this process: `python stages/cache.py --params ...` without a new interpreter."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setattr(sys, "argv", ["stages/cache.py", "--params", str(tmp_path / "params.yaml")])
    monkeypatch.setenv("KDCACHE_NO_PROGRESS", "1")
    runpy.run_path(str(ROOT / "stages" / "cache.py"), run_name="stage")["main"]()


def test_the_cache_stage_moves_a_cache_of_other_settings_aside_intact_and_builds_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = make_world(tmp_path, n=12, seq=16, val=2)
    out = tmp_path / "cache" / "demo"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] |= {"tokens": str(world["tokens"]), "cache": str(out)}
    params["teacher"] = {**params["teacher"], "path": str(world["teacher"])}
    params["cache"] = {**params["cache"], **CACHE}
    _stage(params, tmp_path, monkeypatch)
    first = _digests(out)
    assert Manifest.load(out).targets["top_k"] == 4

    params["cache"]["top_k"] = 6  # the user edits params.yaml; `dvc repro` reruns the stage
    _stage(params, tmp_path, monkeypatch)
    moved = [p for p in out.parent.iterdir() if p.name != "demo"]
    assert [p.name.startswith("demo.moved-") and p.name.endswith("-overwritten") for p in moved] == [True]
    assert _digests(moved[0]) == first, "the old cache must be moved aside byte for byte"
    assert Manifest.load(out).targets["top_k"] == 6
    second = _digests(out)

    _stage(params, tmp_path, monkeypatch)  # same settings (e.g. `dvc repro -f`): resumed, nothing rescored or moved
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["demo", moved[0].name])
    assert _digests(out) == second
