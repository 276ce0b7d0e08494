"""The code's shape, read from its syntax trees: one owner of state, no import cycles, imports at the top.

No Django, database or broker needed: these read the source only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME = ("agents", "envs", "modelserving", "orchestrator", "megaflow_site", "deploy")
SERVICES = ("agents", "envs", "modelserving")
STATE_OWNER = "orchestrator/transitions.py"
WRITE_CALLS = {"update", "create", "get_or_create", "update_or_create", "bulk_create", "bulk_update"}
# Heavy optional dependencies may be imported where they are used, so that a process that never needs them
# (an env worker, the web server) never loads them.
LAZY_ALLOWED = {"torch", "transformers", "tokenizers", "vllm"}


def runtime_modules() -> dict[str, ast.Module]:
    modules = {}
    for package in RUNTIME:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO)
            if "suites" in relative.parts or "migrations" in relative.parts:
                continue  # the bundled task suites are data; migrations are frozen history
            modules[relative.as_posix()] = ast.parse(path.read_text(), filename=str(relative))
    return modules


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


STATUS_VALUES = {
    "queued",
    "starting",
    "running",
    "evaluating",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "completed",
}


def names_a_status(node: ast.AST) -> bool:
    """``Episode.Status.RUNNING`` (any attribute chain through a ``Status`` class) or a status's string value."""
    return "Status." in ast.unparse(node) or (isinstance(node, ast.Constant) and node.value in STATUS_VALUES)


def status_writes(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITE_CALLS:
            for keyword in node.keywords:
                if keyword.arg == "status":
                    found.append(f"line {node.lineno}: {ast.unparse(node)[:100]}")
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "status" and names_a_status(node.value):
                    found.append(f"line {node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_only_transitions_writes_an_episode_or_run_status():
    offenders = {
        path: writes
        for path, tree in runtime_modules().items()
        if path != STATE_OWNER and (writes := status_writes(tree))
    }
    assert offenders == {}, f"status written outside {STATE_OWNER}: {offenders}"


def test_the_state_check_sees_a_status_write():
    """The check above can fail: it finds each kind of write it looks for."""
    source = (
        "Episode.objects.filter(pk=1).update(status=Episode.Status.RUNNING)\n"
        "Run.objects.create(status=Run.Status.RUNNING)\n"
        "episode.status = Episode.Status.FAILED\n"
        "Episode.objects.filter(status=Episode.Status.QUEUED).count()\n"  # a read: not a write
    )
    assert sorted(line.split(":")[0] for line in status_writes(ast.parse(source))) == ["line 1", "line 2", "line 3"]


def imports_of(tree: ast.Module, top_level_only: bool) -> list[tuple[str, ast.AST]]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.If):  # ``if TYPE_CHECKING:`` and ``if __name__ == "__main__":`` blocks
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from package import name``: the submodule when ``name`` is one, else the module (import_graph).
            found += [(f"{node.module}.{alias.name}", node) for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = runtime_modules()
    known = {module_name(path) for path in modules}
    graph: dict[str, set[str]] = {}
    for path, tree in modules.items():
        edges = set()
        for name, _ in imports_of(tree, top_level_only=True):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module_name(path):
                edges.add(name)
        graph[module_name(path)] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return visiting[visiting.index(node) :] + [node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            if cycle := visit(target):
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return None


def test_runtime_modules_import_each_other_without_cycles():
    assert find_cycle(import_graph()) is None


def test_the_service_packages_import_each_other_without_cycles():
    packages: dict[str, set[str]] = {package: set() for package in SERVICES}
    for module, targets in import_graph().items():
        source = module.split(".")[0]
        if source in SERVICES:
            packages[source] |= {target.split(".")[0] for target in targets if target.split(".")[0] in SERVICES}
    for package in packages:
        packages[package].discard(package)
    assert find_cycle(packages) is None, packages


@pytest.mark.parametrize("graph, cyclic", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": set()}, False)])
def test_the_cycle_check_finds_a_cycle(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic


def test_imports_sit_at_the_top_except_heavy_optional_ones():
    lazy = []
    for path, tree in runtime_modules().items():
        if path.startswith("deploy/"):
            continue  # operator scripts that set Django up before they import what needs it
        top = {id(node) for _, node in imports_of(tree, top_level_only=True)}
        for name, node in imports_of(tree, top_level_only=False):
            if id(node) not in top and name.split(".")[0] not in LAZY_ALLOWED and not _in_main_guard(tree, node):
                lazy.append(f"{path}:{node.lineno} {name}")
    assert lazy == []


def _in_main_guard(tree: ast.Module, target: ast.AST) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            if any(child is target for child in ast.walk(node)):
                return True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(child is target for child in ast.walk(node)):
                return True
    return False
