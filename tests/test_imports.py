"""Layering: imports run one way (pipelines -> medda.api -> engine -> methods ...), never backwards or in a circle.

Every module under medda/ and pipelines/ is parsed with `ast` (nothing is imported), so the check also covers
imports inside functions: a lazy import that runs backwards is still a backward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("medda", "pipelines")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of the modules (and `from X import name` targets) that `path` imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from medda import api`
    return found


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path, _module_name(path))
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


GRAPH = _graph()


def _offenders(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    """'importer -> imported' for modules under `prefix` that import anything under `forbidden`."""
    return sorted(
        f"{module} -> {name}"
        for module, names in GRAPH.items()
        if module == prefix or module.startswith(prefix + ".")
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def test_the_graph_sees_known_imports():
    """Guard the parser itself: a check over an empty graph would pass vacuously."""
    assert "medda.api" in GRAPH and "pipelines.cli" in GRAPH
    assert "medda.api" in GRAPH["pipelines.demo"]
    assert "pipelines.guard" in GRAPH["pipelines.cli"]


def test_the_library_does_not_import_its_command_line():
    assert _offenders("medda", ("pipelines",)) == []


def test_no_import_cycle_among_pipelines_modules():
    local = {m: {n for n in names if n in GRAPH and n.startswith("pipelines.")} - {m}
             for m, names in GRAPH.items() if m.startswith("pipelines")}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(local.get(module, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < len(local):
                visit(nxt, [*path, nxt])

    for start in sorted(local):
        visit(start, [start])
    assert cycles == []


def test_methods_import_no_engine_api_tracking_or_command_line():
    assert _offenders("medda.methods", ("medda.engine", "medda.api", "medda.tracking", "pipelines")) == []


def test_engine_imports_no_inference_or_api():
    assert _offenders("medda.engine", ("medda.inference", "medda.api")) == []


def test_cycle_detection_and_offenders_would_fail(monkeypatch):
    """The checks can fail: a planted backward import and a planted circle are reported."""
    planted = {**GRAPH, "medda.methods.planted": {"medda.engine.loop"}}
    monkeypatch.setitem(globals(), "GRAPH", planted)
    assert _offenders("medda.methods", ("medda.engine",)) == ["medda.methods.planted -> medda.engine.loop"]
    circle = {**GRAPH, "pipelines.guard": GRAPH["pipelines.guard"] | {"pipelines.cli"}}
    monkeypatch.setitem(globals(), "GRAPH", circle)
    with pytest.raises(AssertionError):
        test_no_import_cycle_among_pipelines_modules()
