"""The layering, read from the source with `ast`: inference never pulls in the training engine, nothing below the CLI imports it.

Imports inside functions count as much as those at the top: either loads the module when the code runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cxrdx

PACKAGE = Path(cxrdx.__file__).parent
ENGINE, CLI = "cxrdx.engine", "cxrdx.cli"
# the prediction side: loads a checkpoint and predicts, explains or serves without the training loop
INFERENCE_SIDE = (
    "cxrdx.data",
    "cxrdx.models",
    "cxrdx.losses",
    "cxrdx.metrics",
    "cxrdx.stats",
    "cxrdx.inference",
    "cxrdx.runtime",
    "cxrdx.predict",
    "cxrdx.export",
    "cxrdx.explain",
    "cxrdx.serve",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The cxrdx modules `path` imports, wherever in the file; `from cxrdx import engine` counts as cxrdx.engine."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}"))
    return {name for name in found if name == "cxrdx" or name.startswith("cxrdx.")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every cxrdx module that importing `start` can load (a package's __init__ included)."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen or module not in graph:
            continue
        seen.add(module)
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        todo.extend([*graph[module], *parents])
    return seen


def test_the_parser_sees_every_kind_of_import():
    probe = PACKAGE / "explain" / "runs.py"
    assert {"cxrdx.errors", "cxrdx.predict", "cxrdx.rundir", "cxrdx.data.cache"} <= _imports(probe)  # top, TYPE_CHECKING, in functions
    assert _imports(PACKAGE / "evaluation.py") >= {"cxrdx.metrics", "cxrdx.report", "cxrdx.runtime", "cxrdx.inference"}


def test_nothing_below_the_cli_imports_it(graph):
    importers = sorted(m for m, imports in graph.items() if CLI in imports and m not in (CLI, "cxrdx.__main__"))
    assert importers == []


def test_the_inference_side_never_imports_the_engine_or_the_cli(graph):
    direct = sorted(m for m, imports in graph.items() if _within(m, INFERENCE_SIDE) and imports & {ENGINE, CLI})
    assert direct == []
    through = {m: sorted(_reachable(graph, m) & {ENGINE, CLI}) for m in graph if _within(m, INFERENCE_SIDE)}
    assert {m: found for m, found in through.items() if found} == {}


def test_the_engine_uses_the_shared_runtime_and_inference(graph):
    assert {"cxrdx.runtime", "cxrdx.inference"} <= graph[ENGINE]
    assert ENGINE not in _reachable(graph, "cxrdx.evaluation")
