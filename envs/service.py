"""The Environment Service's operations: the plain functions its Celery tasks and the episode loop call.

They work on sandboxes, not on episodes: each takes the task and container it needs, returns a typed value and
raises ``SandboxError`` (with its reason, and whether another attempt could help) when the sandbox cannot do
what was asked. What a failure means for an episode is the control plane's business (orchestrator/episode_loop.py
records it through orchestrator/transitions.py), so this package never writes an episode's state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from envs import task_sandbox, warm_pool
from envs.backend import ExecResult, PullRecord, SandboxError, get_backend
from envs.task_sandbox import Evaluation
from orchestrator.db import release_connection
from orchestrator.hot_state import redis_client
from orchestrator.models import Task

logger = logging.getLogger("megaflow.envs")


@dataclass(frozen=True)
class Sandbox:
    """A container lent to one episode; ``warm`` when it came from the pool's idle containers; ``pull`` is what
    getting its image cost (envs/images.py)."""

    container_id: str
    warm: bool = False
    pull: PullRecord | None = None


def _since_key(container_id: str) -> str:
    return f"megaflow:sandbox:since:{container_id}"


def create_sandbox(task: Task, episode_id: int, run_id: int, pool: str, on_pull=None) -> Sandbox:
    """A fresh (or warm) container for the episode, not yet prepared. Its image is pulled first when the host lacks
    it (``on_pull(image)`` is called before the pull), and kept from eviction until the container exists."""
    spec = task_sandbox.sandbox_spec(task, episode_id, run_id, pool=pool)
    release_connection()  # starting a sandbox takes seconds; the database is not needed meanwhile
    backend = get_backend()
    with backend.holding_image(spec.image):
        pull = backend.ensure_image(spec.image, on_pull)
        try:
            if warm_pool.pool_size(pool) > 0:
                container_id, warm = warm_pool.WarmPool(backend, pool).acquire(spec)
            else:
                container_id, warm = backend.create(spec), False
        except SandboxError as error:
            error.pull = pull  # the pull was paid for even though no container came of it
            raise
    # Since when the episode holds the container: its sandbox-seconds are counted from here to its release.
    redis_client().set(_since_key(container_id), time.time(), ex=7 * 86400)
    return Sandbox(container_id, warm, pull)


def prepare_sandbox(container_id: str, task: Task) -> None:
    """Unpack the repository, run the setup commands and record the base tree (envs/task_sandbox.py)."""
    release_connection()
    task_sandbox.prepare(get_backend(), container_id, task)


def is_alive(container_id: str) -> bool:
    return bool(container_id) and get_backend().is_alive(container_id)


def run_command(
    container_id: str, command: str, timeout_s: float, workdir: str, output_limit: int | None = None
) -> ExecResult:
    """Run one agent command in the sandbox; at ``timeout_s`` it is killed, and the output keeps
    ``output_limit`` bytes, head and tail."""
    release_connection()  # nothing needs the database while the command runs
    return get_backend().run_agent_command(container_id, command, timeout_s, workdir=workdir, output_limit=output_limit)


def evaluate(container_id: str, task: Task) -> Evaluation:
    """Grade the agent's final tree in the sandbox."""
    release_connection()  # the tests may run for minutes
    return task_sandbox.evaluate(get_backend(), container_id, task)


def release(container_id: str, pool: str, clock_stopped: bool = False) -> float:
    """Give the container back to its warm pool, or destroy it. Returns the seconds the episode held it (0.0 when
    it was released before, or when the caller stopped its clock already, ``clock_stopped``: a release is counted
    once). Never raises: a sandbox that cannot be released is logged and left to the reaper."""
    if not container_id:
        return 0.0
    held_s = 0.0 if clock_stopped else stop_clock(container_id)
    try:
        if warm_pool.pool_size(pool) > 0:
            warm_pool.WarmPool(get_backend(), pool).release(container_id)
        else:
            get_backend().destroy(container_id)
    except SandboxError as error:
        logger.warning("could not release container %s: %s", container_id[:12], error.reason)
    return held_s


def stop_clock(container_id: str) -> float:
    """The seconds the episode has held the container, once: the clock stops here (a later release counts 0)."""
    since = redis_client().getdel(_since_key(container_id)) if container_id else None
    return max(0.0, time.time() - float(since)) if since else 0.0
