"""dvc.yaml is honest: each stage depends on exactly the code it runs and only its own params."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stages() -> dict:
    """dvc.yaml's stages; a ``foreach`` stage (one per params entry) as its ``do`` template."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def module_file(module: str) -> Path | None:
    """The source file of a `kdcache.*` module (installed from the folder pipeline/), else None."""
    parts = module.split(".")
    if parts[0] != "kdcache":
        return None
    base = ROOT.joinpath("pipeline", *parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """`kdcache.*` modules a file imports anywhere (module level or inside functions), packages included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdcache":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kdcache.")}
    # importing kdcache.a.b runs kdcache/__init__ and kdcache/a/__init__ too
    return {".".join(m.split(".")[:i]) for m in found for i in range(2, len(m.split(".")) + 1)}


def _closure(script: Path) -> set[str]:
    """Repository-relative .py files a stage script runs: itself + transitive kdcache imports."""
    files, todo = {script}, [script]
    while todo:
        for module in imported_modules(todo.pop()):
            path = module_file(module)
            if path is not None and path not in files:
                files.add(path)
                todo.append(path)
    return {str(p.relative_to(ROOT)) for p in files}


def _script(cmd: str) -> Path:
    return ROOT / next(t for t in shlex.split(cmd) if t.startswith("stages/"))


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_code_deps_are_exactly_the_code_it_imports(name: str) -> None:
    stage = _stages()[name]
    declared = {d for d in stage["deps"] if isinstance(d, str) and d.endswith(".py")}
    expected = _closure(_script(stage["cmd"]))
    # package __init__ files hold a version string and docstrings only (see pipeline/__init__.py)
    expected = {f for f in expected if not f.endswith("__init__.py")}
    assert declared == expected, (
        f"stage {name}: missing {sorted(expected - declared)}, extra {sorted(declared - expected)}"
    )


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_params_are_the_sections_its_script_reads(name: str) -> None:
    stage = _stages()[name]
    script = _script(stage["cmd"]).read_text()
    read = set(re.findall(r'\.get\("(\w+)"\)', script))
    section = re.search(r"--section (\w+)", stage["cmd"])
    if section:
        read.add(section.group(1))
    declared = {p.split(".")[0] for p in stage["params"]}  # `teacher.path` counts as reading `teacher`
    assert declared == read, f"stage {name}: params {sorted(declared)} but the script reads {sorted(read)}"


def _section_classes() -> dict[str, type]:
    from kdcache.config.cache import CacheConfig
    from kdcache.config.corpus import CorpusConfig
    from kdcache.config.demo_teacher import DemoTeacherConfig
    from kdcache.config.evaluate import EvaluateConfig
    from kdcache.config.generate import GenerateConfig
    from kdcache.config.prepare import PrepareConfig
    from kdcache.config.teacher import TeacherConfig
    from kdcache.config.train import TrainConfig

    return {
        "corpus": CorpusConfig,
        "demo_teacher": DemoTeacherConfig,
        "teacher": TeacherConfig,
        "prepare": PrepareConfig,
        "cache": CacheConfig,
        "train": TrainConfig,
        "train_baseline": TrainConfig,
        "evaluate": EvaluateConfig,
        "generate": GenerateConfig,
    }


DEMO_SIZING = {"prepare.max_train_sequences", "prepare.max_val_sequences", "evaluate.max_sequences"}
"""params.yaml keys that size the demo (library default: 0 = all); every other value is the library default."""


def test_params_yaml_states_the_library_defaults() -> None:
    """One place for defaults: params.yaml repeats the dataclass defaults (but for the demo's size caps)."""
    import dataclasses

    from kdcache.config.base import load_params, to_dict

    params = load_params(ROOT / "params.yaml")
    for section, cls in _section_classes().items():
        defaults = to_dict(cls())
        for key, value in params[section].items():
            if f"{section}.{key}" in DEMO_SIZING or (section, key) == ("train_baseline", "loss"):
                continue
            if dataclasses.is_dataclass(getattr(cls(), key)):
                value = {**defaults[key], **value}
            assert value == defaults[key], f"params.yaml {section}.{key} = {value!r}, library default {defaults[key]!r}"


def test_params_yaml_sections_all_load() -> None:
    from kdcache.config.base import load_params, load_section

    params = load_params(ROOT / "params.yaml")
    classes = _section_classes()
    assert set(params) == set(classes) | {"paths", "extra_teachers"}
    for section, cls in classes.items():
        load_section(cls, params[section], section=section)
    assert params["train_baseline"]["loss"] == "ce"
    assert {k: v for k, v in params["train_baseline"].items() if k != "loss"} == {
        k: v for k, v in params["train"].items() if k != "loss"
    }, "baseline must match the KD student but for the loss"


def test_params_yaml_has_no_extra_teacher_by_default() -> None:
    """The default pipeline caches one teacher: no cache_teacher@NAME stage runs."""
    from kdcache.config.base import load_params
    from kdcache.config.extra_teachers import load_extra_teachers

    assert load_extra_teachers(load_params(ROOT / "params.yaml")["extra_teachers"]) == {}
