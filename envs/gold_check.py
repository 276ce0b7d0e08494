"""Gold validation, as SWE-bench does it: prove each task is solvable and its tests discriminate.

For every task, in a real sandbox: on the base tree with the test patch, every FAIL_TO_PASS test must fail and
every PASS_TO_PASS test pass; after the reference patch, every listed test must pass (reward 1.0). Tasks run
in parallel threads, each in its own container.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from envs import task_sandbox
from envs.backend import EnvironmentBackend, SandboxError
from envs.test_results import PASSED
from orchestrator.models import Task


@dataclass
class GoldResult:
    instance_id: str
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_task(backend: EnvironmentBackend, task: Task) -> GoldResult:
    result = GoldResult(task.instance_id)
    started = time.monotonic()
    sandbox_id = None
    try:
        sandbox_id = backend.create(task_sandbox.sandbox_spec(task))
        task_sandbox.prepare(backend, sandbox_id, task)

        before = task_sandbox.evaluate(backend, sandbox_id, task)
        if before.error:
            result.problems.append(f"base tree: {before.error}")
        result.problems += [f"FAIL_TO_PASS {name} passes on the base tree" for name in task.fail_to_pass
                            if before.tests.get(name) == PASSED]  # fmt: skip
        result.problems += [f"PASS_TO_PASS {name} fails on the base tree" for name in task.pass_to_pass
                            if before.tests.get(name) != PASSED]  # fmt: skip

        task_sandbox.reset_tree(backend, sandbox_id, task)
        applied = task_sandbox.apply_patch(backend, sandbox_id, task, task.patch)
        if applied.exit_code != 0:
            result.problems.append(f"reference patch does not apply: {applied.output.strip()[-300:]}")
        else:
            after = task_sandbox.evaluate(backend, sandbox_id, task)
            result.problems += [f"{name} does not pass with the reference patch ({after.tests.get(name)})"
                                for name in after.failing]  # fmt: skip
            if after.error:
                result.problems.append(f"with the reference patch: {after.error}")
    except SandboxError as error:
        result.problems.append(error.reason)
    finally:
        if sandbox_id:
            backend.destroy(sandbox_id)
        result.seconds = time.monotonic() - started
    return result


def check_tasks(
    backend: EnvironmentBackend,
    tasks: Iterable[Task],
    parallel: int = 4,
    on_done: Callable[[GoldResult], None] | None = None,
) -> list[GoldResult]:
    """Gold-check every task, ``parallel`` at a time; ``on_done`` is called as each finishes (progress bars)."""
    results = []
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(check_task, backend, task) for task in tasks]
        for future in as_completed(futures):
            results.append(future.result())
            if on_done:
                on_done(results[-1])
    return sorted(results, key=lambda result: result.instance_id)
