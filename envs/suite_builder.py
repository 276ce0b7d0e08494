"""Build a task-format dataset from a suite's sources, e.g. ``envs/suites/swe_mini/``.

A suite holds ``projects/<name>/`` (small, correct Python projects with their own tests) and
``tasks/<instance_id>/`` (``task.json``: the project, a problem statement, the bug as exact find/replace edits,
FAIL_TO_PASS; ``tests/``: the test files the task's test patch adds). For each task:

- the base tree is the project with the bug edits applied: it ships as ``archives/<instance_id>.tar.gz``;
- ``patch`` (the reference solution) is the diff from the base tree back to the project;
- ``test_patch`` adds the task's test files;
- PASS_TO_PASS is every other test function of the project and the task.

Output is byte-for-byte deterministic (sorted tar entries, zero timestamps, gzip mtime 0), so the committed
``dataset/`` can be checked against its sources (tests/test_swe_mini_suite.py).
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

SUITES_DIR = Path(__file__).resolve().parent / "suites"
TEST_COMMAND = "python3 -m pytest -rA -p no:cacheprovider tests"
TIMEOUT_S = 300


class SuiteError(ValueError):
    pass


def deterministic_tar_gz(root: Path) -> bytes:
    """A .tar.gz of everything under ``root`` that is the same bytes for the same files, on any machine."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            if "__pycache__" in path.parts:
                continue
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data = path.read_bytes()
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return compressed.getvalue()


def test_ids(root: Path, files: list[Path]) -> list[str]:
    """pytest node ids of the module-level ``test_*`` functions in ``files``."""
    ids = []
    for path in files:
        tree = ast.parse(path.read_text())
        relative = path.relative_to(root).as_posix()
        ids += [
            f"{relative}::{node.name}"
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        ]
    return ids


def _git(cwd: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=suite", "-c", "user.email=suite@localhost", "-c", "core.quotepath=off", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def apply_bug(tree: Path, edits: list[dict], instance_id: str) -> None:
    for edit in edits:
        path = tree / edit["file"]
        text = path.read_text()
        if text.count(edit["find"]) != 1:
            raise SuiteError(f"{instance_id}: bug edit must match exactly once in {edit['file']}: {edit['find']!r}")
        path.write_text(text.replace(edit["find"], edit["replace"]))


def build_task(suite: Path, task_dir: Path, work: Path) -> tuple[dict, bytes]:
    """One task's task-format object and its base-tree archive."""
    instance_id = task_dir.name
    meta = json.loads((task_dir / "task.json").read_text())
    project = suite / "projects" / meta["project"]
    tree = work / instance_id
    shutil.copytree(project, tree, ignore=shutil.ignore_patterns("__pycache__"))
    apply_bug(tree, meta["bug"], instance_id)
    archive = deterministic_tar_gz(tree)

    _git(tree, "init", "-q")
    _git(tree, "add", "-A")
    _git(tree, "commit", "-q", "-m", "base")
    for edit in meta["bug"]:
        shutil.copy(project / edit["file"], tree / edit["file"])
    patch = _git(tree, "diff", "--no-color", "--no-ext-diff")
    _git(tree, "checkout", "-q", "--", ".")
    test_files = sorted(path for path in (task_dir / "tests").rglob("*.py"))
    for path in test_files:
        shutil.copy(path, tree / "tests" / path.name)
    _git(tree, "add", "-A")
    test_patch = _git(tree, "diff", "--cached", "--no-color", "--no-ext-diff")

    all_tests = test_ids(tree, sorted((tree / "tests").glob("test_*.py")))
    fail_to_pass = meta["FAIL_TO_PASS"]
    unknown = set(fail_to_pass) - set(all_tests)
    if unknown:
        raise SuiteError(f"{instance_id}: FAIL_TO_PASS names tests that do not exist: {sorted(unknown)}")
    task = {
        "instance_id": instance_id,
        "problem_statement": meta["problem_statement"],
        "repo_archive": f"archives/{instance_id}.tar.gz",
        "workdir": "/testbed",
        "setup_commands": [],
        "patch": patch,
        "test_patch": test_patch,
        "test_command": TEST_COMMAND,
        "FAIL_TO_PASS": fail_to_pass,
        "PASS_TO_PASS": [test for test in all_tests if test not in fail_to_pass],
        "timeout_s": TIMEOUT_S,
        "repo": meta["project"],
    }
    return task, archive


def build_suite(name: str, out: Path | None = None) -> Path:
    """Build suite ``name`` into ``out`` (default: its ``dataset/``); returns the path of tasks.jsonl."""
    suite = SUITES_DIR / name
    if not (suite / "tasks").is_dir():
        raise SuiteError(f"no suite {name!r} in {SUITES_DIR}")
    out = out or suite / "dataset"
    (out / "archives").mkdir(parents=True, exist_ok=True)
    lines = []
    with tempfile.TemporaryDirectory() as scratch:
        for task_dir in sorted(path for path in (suite / "tasks").iterdir() if path.is_dir()):
            task, archive = build_task(suite, task_dir, Path(scratch))
            (out / task["repo_archive"]).write_bytes(archive)
            lines.append(json.dumps(task, ensure_ascii=False, sort_keys=True))
    dataset = out / "tasks.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    return dataset
