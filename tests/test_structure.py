"""The library's shape: import graph without cycles, pure tensor code kept apart from storage, small modules,
one build path for the CLI and the DVC stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("kdcache", *(p for p in parts if p != "__init__")))


def import_graph() -> dict[str, set[str]]:
    """kdcache module -> the kdcache modules it imports (anywhere in the file, lazy imports included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdcache"):
                found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        graph[name] = {m for m in found if m in modules and m != name and modules[m].name != "__init__.py"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_library_never_imports_stages_tests_or_cli_code() -> None:
    graph = import_graph()
    for name, deps in graph.items():
        if name != "kdcache.cli":
            assert "kdcache.cli" not in deps and "kdcache.entry" not in deps, name
    for path in PACKAGE.rglob("*.py"):
        assert "import stages" not in path.read_text() and "from stages" not in path.read_text(), path
        if path.name != "cli.py":
            assert "import argparse" not in path.read_text(), f"{path}: argparse belongs to cli.py and stages/"


def test_sparsification_is_pure_tensor_code() -> None:
    """cache/targets.py turns logits into targets on the device: no storage, no Parquet/Arrow, no file I/O."""
    storage = {
        "kdcache.cache.writer",
        "kdcache.cache.reader",
        "kdcache.cache.staging",
        "kdcache.cache.shards",
        "kdcache.cache.codec",
        "kdcache.cache.verify",
        "kdcache.cache.mapped",
        "kdcache.files",
    }
    assert not (import_graph()["kdcache.cache.targets"] & storage)
    text = (PACKAGE / "cache" / "targets.py").read_text()
    assert "pyarrow" not in text and "open(" not in text


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path}: split it by job (STYLE.md: modules ~400 lines)"


def test_the_cli_and_the_stage_build_caches_through_one_function() -> None:
    for path in (PACKAGE / "cli.py", ROOT / "stages" / "cache.py"):
        text = path.read_text()
        assert "cache_corpus(" in text and "build_cache(" not in text, path
