"""A task inside a sandbox, over any ``EnvironmentBackend``: prepare the tree, diff it, evaluate it.

``prepare`` unpacks the task's repository, runs its setup commands and commits the result as the git tag
``megaflow-base``; everything after that is the agent's doing. ``evaluate`` does what SWE-bench does: put the
files that ``test_patch`` touches back to the base, apply ``test_patch`` to the agent's tree, run
``test_command``, and reward 1.0 iff every FAIL_TO_PASS and PASS_TO_PASS test passed.
"""

from __future__ import annotations

import io
import re
import shlex
import tarfile
import time
from dataclasses import asdict, dataclass, field

from django.conf import settings

from envs.backend import EnvironmentBackend, ExecResult, SandboxError, SandboxSpec
from envs.test_results import PASSED, parse_test_log, unreadable_reason
from orchestrator.models import Task

BASE_TAG = "megaflow-base"
GIT = "git -c user.name=megaflow -c user.email=megaflow@localhost -c init.defaultBranch=main -c core.fileMode=false"
# The test patch travels into the workdir (the one path every backend maps the same way) and is removed
# again before the tests run.
PATCH_DIR = ".megaflow"
# Test logs are parsed, not shown to an agent: keep enough for the summary of a large suite.
TEST_LOG_LIMIT = 4 * 1024 * 1024


@dataclass
class Evaluation:
    """The verdict on an agent's final tree."""

    reward: float
    tests: dict[str, str] = field(default_factory=dict)
    failing: list[str] = field(default_factory=list)
    exit_code: int | None = None
    log: str = ""
    error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def sandbox_spec(task: Task, episode_id: int | None = None, run_id: int | None = None, pool: str = "") -> SandboxSpec:
    """The sandbox a task needs: its image (default: the base image) and, unless the image carries the
    repository itself, a read-only root with the workdir on a bounded tmpfs."""
    return SandboxSpec(
        image=task.image or settings.MEGAFLOW_BASE_IMAGE,
        episode_id=episode_id,
        run_id=run_id,
        workdir=task.workdir,
        writable_root=not task.repo_archive,
        pool=pool,
    )


def single_file_tar(name: str, text: str) -> bytes:
    data = text.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _checked(backend: EnvironmentBackend, sandbox_id: str, command: str, what: str, timeout_s: float, workdir: str):
    """Run one of the task's own commands (setup, baseline, reset); a failure is the task's, and final, unless the
    sandbox itself is gone: a container killed from outside (an OOM killer on the node, an operator, a daemon
    restart) ends its command with exit 137 too, and the episode takes a fresh sandbox on its next attempt."""
    result = backend.exec(sandbox_id, command, timeout_s, workdir=workdir)
    if result.exit_code != 0:
        failed = f"{what} failed (exit {result.exit_code}): {result.observation()[-800:]}"
        if result.exit_code >= 128 and _stops(backend, sandbox_id):  # killed by a signal, with its sandbox
            raise SandboxError(f"the sandbox stopped: {failed}", retryable=True)
        raise SandboxError(failed, retryable=False)
    return result


def _stops(backend: EnvironmentBackend, sandbox_id: str, within_s: float = 1.0) -> bool:
    """Whether the sandbox is stopped, or stops within ``within_s``: Docker ends a killed container's exec some
    tens of ms before it marks the container itself as exited."""
    deadline = time.monotonic() + within_s
    while backend.is_alive(sandbox_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def prepare(backend: EnvironmentBackend, sandbox_id: str, task: Task) -> None:
    """Unpack the repository, run the setup commands, and record the tree as ``megaflow-base``."""
    if task.repo_archive:
        with task.repo_archive.open("rb") as archive:
            backend.copy_in(sandbox_id, task.workdir, archive.read())
    for command in task.setup_commands:
        _checked(backend, sandbox_id, command, f"setup command {command!r}", task.timeout_s, task.workdir)
    baseline = (
        f"{{ [ -d .git ] || {GIT} init -q; }} && {GIT} add -A && "
        f"{GIT} commit -q --allow-empty --no-verify -m {BASE_TAG} && {GIT} tag -f {BASE_TAG} >/dev/null"
    )
    _checked(backend, sandbox_id, baseline, "recording the base tree", 120, task.workdir)


def agent_diff(backend: EnvironmentBackend, sandbox_id: str, task: Task) -> str:
    """The agent's changes to the tree since ``megaflow-base``, as a unified diff."""
    command = f"{GIT} add -A >/dev/null && {GIT} diff --cached --binary {BASE_TAG}"
    return backend.exec(sandbox_id, command, 120, workdir=task.workdir).output


def apply_patch(backend: EnvironmentBackend, sandbox_id: str, task: Task, patch: str) -> ExecResult:
    """``git apply`` a unified diff to the task's tree; the result's exit code says whether it applied."""
    backend.copy_in(sandbox_id, f"{task.workdir}/{PATCH_DIR}", single_file_tar("change.patch", patch))
    apply = f"git apply --whitespace=nowarn {PATCH_DIR}/change.patch; status=$?; rm -rf {PATCH_DIR}; exit $status"
    return backend.exec(sandbox_id, apply, 120, workdir=task.workdir)


def reset_tree(backend: EnvironmentBackend, sandbox_id: str, task: Task) -> None:
    """Put the tree back to ``megaflow-base``, untracked files included."""
    command = f"{GIT} reset -q --hard {BASE_TAG} && {GIT} clean -qffdx"
    _checked(backend, sandbox_id, command, "resetting the tree", 120, task.workdir)


_PATCH_PATH = re.compile(r"^(?:\+\+\+|---) (?:[ab]/)?(\S+)", re.MULTILINE)


def patched_paths(patch: str) -> list[str]:
    """Every file a unified diff touches."""
    return sorted({path for path in _PATCH_PATH.findall(patch) if path != "/dev/null"})


def evaluate(backend: EnvironmentBackend, sandbox_id: str, task: Task) -> Evaluation:
    """Apply ``test_patch`` to the agent's tree, run the tests, and reward the result."""
    workdir = task.workdir
    if task.test_patch:
        paths = " ".join(shlex.quote(path) for path in patched_paths(task.test_patch))
        # Files the test patch touches go back to the base first, so an agent cannot edit the tests it is graded on.
        restore = f'for f in {paths}; do {GIT} checkout -q {BASE_TAG} -- "$f" 2>/dev/null || rm -f "$f"; done'
        backend.exec(sandbox_id, restore, 120, workdir=workdir)
        applied = apply_patch(backend, sandbox_id, task, task.test_patch)
        if applied.exit_code != 0:
            return Evaluation(reward=0.0, error=f"test patch did not apply: {applied.output.strip()[-500:]}")
    run = backend.exec(sandbox_id, task.test_command, task.timeout_s, workdir=workdir, output_limit=TEST_LOG_LIMIT)
    parser = task.log_parser
    tests = parse_test_log(run.output, parser)
    graded = [*task.fail_to_pass, *task.pass_to_pass]
    failing = [name for name in graded if tests.get(name) != PASSED]
    # A log that cannot grade is not a wrong answer: say why, so neither a task author nor a trainer reads it as one.
    error = "test command timed out" if run.timed_out else unreadable_reason(run.output, tests, parser, run.exit_code)
    return Evaluation(
        reward=0.0 if failing else 1.0,
        tests={name: tests.get(name, "missing") for name in graded},
        failing=failing,
        exit_code=run.exit_code,
        log=run.observation()[-20_000:],
        error=error,
    )
