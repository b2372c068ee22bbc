"""Several teachers under DVC by editing params.yaml only (the real dvc, the real stages, a tiny project).

dvc.yaml's `cache_teacher` stage is a `foreach` over params.yaml `extra_teachers` ({name: model dir}; none by
default): each entry becomes a stage `cache_teacher@NAME` caching that teacher into
`<paths.teacher_caches>/NAME`, and the train stages depend on that whole directory (`teacher_caches` writes its
index, so it exists with no extra teacher). Here: no stage by default; one extra teacher and `train.caches`
listing both caches give a `dvc repro train` that builds the extra cache first and trains from both; a changed
extra teacher reruns its own cache stage only. (Five dvc calls, two stages that load torch: ~30 CPU-seconds.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import STUDENT, make_world, tiny_llama, word_tokenizer

from kdcache.cache.build import cache_corpus
from kdcache.cache.format import Manifest
from kdcache.config.cache import CacheConfig
from kdcache.config.teacher import TeacherConfig

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
VOCAB, SEQ = 48, 16
CACHE = {"targets": "topk", "top_k": 8, "batch_size": 4, "rows_per_shard": 8}
TRAIN = {"loss": "topk_tail", "max_steps": 2, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2}


def _dvc(work: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(work / "py"), "KDCACHE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env |= {"DVC_NO_ANALYTICS": "1", "KDCACHE_STAGING_DIR": str(work.parent / "staging")}
    proc = subprocess.run([*DVC, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _edit_params(work: Path, **sections: object) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(params | sections, sort_keys=False))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A git + DVC repository: the real pipeline code, dvc.yaml's teacher_caches, cache_teacher and train stages,
    token data, a main cache built from it and a second teacher with the same tokenizer."""
    world = make_world(tmp_path / "world", vocab_size=VOCAB, n=12, seq=SEQ, val=2)
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "py").mkdir()
    (work / "py" / "kdcache").symlink_to(work / "pipeline", target_is_directory=True)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    kept = {k: stages[k] for k in ("teacher_caches", "cache_teacher", "train")}
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": kept}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cache"] = {**params["cache"], **CACHE}
    params["train"] = {**params["train"], **TRAIN, "student": STUDENT}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    paths = params["paths"]
    shutil.copytree(world["tokens"], work / paths["tokens"])
    (work / "data" / "params.checked").write_text("checked\n")  # the check_params stage's output
    cache_corpus(
        TeacherConfig(path=str(world["teacher"]), device="cpu"),
        CacheConfig(**CACHE),
        tokens_dir=work / paths["tokens"],
        out_dir=work / paths["cache"],
    )
    teacher_b = work / "models" / "teacher-b"
    tiny_llama(VOCAB, max_positions=SEQ, seed=5).save_pretrained(teacher_b)
    word_tokenizer(VOCAB).save_pretrained(teacher_b)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True, capture_output=True)
    _dvc(work, "init", "-q")
    return work


def test_an_extra_teacher_in_params_yaml_is_cached_by_its_own_stage_and_trained_from(work: Path) -> None:
    assert set(json.loads(_dvc(work, "status", "--json"))) == {"teacher_caches", "train"}  # default: no extra teacher

    _edit_params(
        work,
        extra_teachers={"teacher-b": "models/teacher-b"},
        train={
            **yaml.safe_load((work / "params.yaml").read_text())["train"],
            "caches": [{"path": "cache/demo", "weight": 0.5}, {"path": "cache/teachers/teacher-b", "weight": 0.5}],
        },
    )
    ran = _dvc(work, "repro", "train")
    assert re.findall(r"Running stage '([^']+)'", ran) == ["teacher_caches", "cache_teacher@teacher-b", "train"]
    # (run in that order: train depends on the directory holding both stages' outputs)
    built = Manifest.load(work / "cache" / "teachers" / "teacher-b")
    assert built.teacher["path"].endswith("models/teacher-b") and built.targets["top_k"] == CACHE["top_k"]
    index = json.loads((work / "cache" / "teachers" / "teachers.json").read_text())
    assert index == {"teacher-b": {"teacher": "models/teacher-b", "cache": "cache/teachers/teacher-b"}}
    trained = json.loads((work / "models" / "student-run" / "training.json").read_text())
    sources = trained["cache"]["targets"]["multi_teacher"]["caches"]
    assert [s["path"] for s in sources] == ["cache/demo", "cache/teachers/teacher-b"]
    assert sources[0]["teacher_sha256"] != sources[1]["teacher_sha256"]
    assert json.loads(_dvc(work, "status", "--json")) == {}

    tiny_llama(VOCAB, max_positions=SEQ, seed=6).save_pretrained(work / "models" / "teacher-b")  # retrained
    assert set(json.loads(_dvc(work, "status", "--json"))) == {"cache_teacher@teacher-b"}  # train follows its out


def test_extra_teachers_are_validated_naming_the_key() -> None:
    from kdcache.config.base import ConfigError
    from kdcache.config.extra_teachers import check_cache_sources, load_extra_teachers

    assert load_extra_teachers(None) == {} and load_extra_teachers({}) == {}
    assert load_extra_teachers({"teacher-b": "models/b"}) == {"teacher-b": "models/b"}
    with pytest.raises(ConfigError, match=r"extra_teachers: must be a mapping of names .* got list"):
        load_extra_teachers(["models/b"])
    with pytest.raises(ConfigError, match=r"extra_teachers: name 'a/b' must be 1-64 letters"):
        load_extra_teachers({"a/b": "models/b"})
    with pytest.raises(ConfigError, match=r"extra_teachers.b: must be a teacher model directory \(a path\), got 3"):
        load_extra_teachers({"b": 3})
    train = {"caches": [{"path": "cache/demo", "weight": 1}, {"path": "cache/teachers/c", "weight": 1}]}
    check_cache_sources({"c": "models/c"}, "cache/teachers", {"train": train})
    with pytest.raises(ConfigError, match=r"train.caches\[1\].path: cache/teachers/c is in paths.teacher_caches .* "):
        check_cache_sources({"b": "models/b"}, "cache/teachers", {"train": train})
