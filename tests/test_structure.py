"""The package's import structure: no private names across modules, history below the one call.

Static checks over ``graphprune/``'s source (``ast``), so they fail on the line that breaks them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "graphprune"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_from(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` reads (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def private_uses(path: Path) -> list[str]:
    """``from graphprune.x import _y`` and ``x._y`` on an imported graphprune module, as ``line: text``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _imported_from(path, node)
            if not source.startswith("graphprune"):
                continue
            for alias in node.names:
                if _private(alias.name) and f"{source}.{alias.name}" != _module_name(path):
                    found.append(f"{node.lineno}: from {source} import {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and _private(node.attr)):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def graphprune_imports(path: Path) -> set[str]:
    """Every graphprune module ``path`` imports, at any depth of its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            source = _imported_from(path, node)
            out.add(source)
            out.update(f"{source}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name.startswith("graphprune")}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_uses_another_modules_private_names(path: Path) -> None:
    assert private_uses(path) == []


def test_the_private_name_check_sees_both_spellings(tmp_path: Path) -> None:
    """The check can fail: a module that imports ``_x`` and reads ``api._y`` is caught twice."""
    probe = PACKAGE / "_structure_probe.py"
    try:
        probe.write_text("from .api import _hidden\nfrom . import api\napi._other()\nfrom ._runtime import json_record\n")
        assert private_uses(probe) == ["1: from graphprune.api import _hidden", "3: api._other"]
    finally:
        probe.unlink()


@pytest.mark.parametrize("module", ["blocks/removal.py", "io.py", "sparsity/kernel_plan.py", "uniform.py",
                                    "history.py", "verify.py", "budget.py"])
def test_lower_layers_do_not_climb_into_the_one_call(module: str) -> None:
    """Depth pruning, persistence and the steps of a prune record plans through ``history``, not ``api``."""
    assert not {"graphprune.api", "graphprune.cli"} & graphprune_imports(PACKAGE / module)


def test_history_depends_on_nothing_but_errors() -> None:
    assert graphprune_imports(PACKAGE / "history.py") <= {"graphprune.errors", "graphprune.errors.InvalidArgumentError"}


MODULE_LINES, FUNCTION_LINES = 350, 60


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size_or_a_reason(path: Path) -> None:
    """Small modules: over 350 lines, the first line says why it must be (``# Over 350 lines: ...``)."""
    text = path.read_text()
    if text.count("\n") > MODULE_LINES:
        assert text.startswith("# Over 350 lines: "), f"{path.name}: {text.count(chr(10))} lines and no reason"


def long_functions(path: Path, limit: int = FUNCTION_LINES) -> list[str]:
    """Functions whose body (docstring left out) is longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
            if node.end_lineno - body[0].lineno + 1 > limit:
                found.append(f"{node.name} ({node.end_lineno - body[0].lineno + 1} lines)")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_over_60_lines(path: Path) -> None:
    assert long_functions(path) == []


def test_the_length_check_counts_the_body(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    '''doc\n\n    long\n    '''\n" + "    x = 1\n" * 61)
    assert long_functions(probe) == ["f (61 lines)"]
    assert long_functions(probe, limit=61) == []
