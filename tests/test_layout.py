"""The code's layout, read from its syntax trees: which package may import what."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIME_PACKAGES = ("agents", "envs", "modelserving", "orchestrator", "megaflow_site", "deploy")
TASK_MATERIAL = REPO / "envs" / "suites"  # the suites' projects: other people's code, with tests of their own
HARNESS = "tests"  # benchmarks, chaos, simulations and test support live under tests/ and ship with nothing


def runtime_modules() -> list[Path]:
    """Every Python module that ships: the runtime packages and manage.py."""
    modules = [REPO / "manage.py"]
    for package in RUNTIME_PACKAGES:
        modules += [path for path in sorted((REPO / package).rglob("*.py")) if not path.is_relative_to(TASK_MATERIAL)]
    return modules


def dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, module) for every absolute import, including ``importlib.import_module("literal")``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (
            isinstance(node, ast.Call)
            and dotted_name(node.func) in {"importlib.import_module", "import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def imports_harness(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    return [
        (line, module)
        for line, module in imported_modules(ast.parse(source, filename))
        if module == HARNESS or module.startswith(f"{HARNESS}.")
    ]


def test_runtime_does_not_import_harness():
    assert imports_harness("from tests.support.fault_proxy import FaultProxy\nimport tests\n") == [
        (1, "tests.support.fault_proxy"),
        (2, "tests"),
    ]
    assert imports_harness("import importlib\nimportlib.import_module('tests.bench.model')\n") == [
        (2, "tests.bench.model")
    ]
    assert imports_harness("from . import tests\nimport testsuite\n") == []
    modules = runtime_modules()
    assert {path.relative_to(REPO).parts[0] for path in modules} >= set(RUNTIME_PACKAGES)
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in modules
        for line, module in imports_harness(path.read_text(), str(path))
    ]
    assert offenders == [], "runtime code must not import the harness under tests/"
