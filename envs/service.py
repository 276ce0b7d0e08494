"""The Environment Service's operations on episodes: the plain functions its Celery tasks call.

Each takes an episode id, does its work through the configured backend, records the outcome on the episode
(container, worker, status, reward, and the reason of any failure) and returns a JSON-able dict, which the
task returns for whatever callback is linked to it. A ``SandboxError`` never escapes: it fails the episode
with its reason and destroys the sandbox, so one broken task never takes a worker or a run down.
"""

from __future__ import annotations

import logging
import socket

from django.conf import settings
from django.utils import timezone

from envs import task_sandbox, warm_pool
from envs.backend import SandboxError, get_backend
from orchestrator import episodes
from orchestrator.db import release_connection
from orchestrator.models import Episode

logger = logging.getLogger("megaflow.envs")

WORKER_NAME = socket.gethostname()


def _episode(episode_id: int) -> Episode:
    return Episode.objects.select_related("task").get(pk=episode_id)


def _update(episode_id: int, **fields) -> None:
    Episode.objects.filter(pk=episode_id).update(updated_at=timezone.now(), **fields)


def _release(container_id: str, pool: str) -> None:
    """Give the container back to its warm pool, or destroy it."""
    if not container_id:
        return
    try:
        if warm_pool.pool_size(pool) > 0:
            warm_pool.WarmPool(get_backend(), pool).release(container_id)
        else:
            get_backend().destroy(container_id)
    except SandboxError as error:
        logger.warning("could not release container %s: %s", container_id[:12], error.reason)


def fail_episode(
    episode_id: int, reason: str, pool: str, status: str = Episode.Status.FAILED, retryable: bool = False
) -> dict:
    """Record a failure with its reason (a retryable one requeues the episode for another attempt) and release
    the episode's sandbox."""
    container_id = Episode.objects.filter(pk=episode_id).values_list("container_id", flat=True).first() or ""
    outcome = episodes.fail_or_retry(episode_id, reason, retryable, status)
    _release(container_id, pool)
    logger.info("episode %s %s (%s): %s", episode_id, status, outcome, reason)
    return {"ok": False, "episode_id": episode_id, "error": reason, "outcome": outcome}


def start_sandbox(episode_id: int, pool: str) -> dict:
    """Give the episode a prepared sandbox: its repository unpacked, setup run, the base tree recorded.

    Idempotent: a redelivered message finds the episode's live container and returns it.
    """
    episode = _episode(episode_id)
    if episode.is_terminal:
        return {"ok": False, "episode_id": episode_id, "error": f"episode is already {episode.status}"}
    backend = get_backend()
    if episode.container_id:
        # A redelivered start: a prepared sandbox (the episode is running) is reused; one whose preparation was
        # cut short by a dying worker is replaced.
        if episode.status == Episode.Status.RUNNING and backend.is_alive(episode.container_id):
            return {"ok": True, "episode_id": episode_id, "container_id": episode.container_id, "reused": True}
        _release(episode.container_id, pool)

    _update(
        episode_id, status=Episode.Status.STARTING, worker=WORKER_NAME, failure_reason="", started_at=timezone.now()
    )
    spec = task_sandbox.sandbox_spec(episode.task, episode.id, episode.run_id, pool=pool)
    release_connection()  # starting and preparing a sandbox takes seconds; the database is not needed meanwhile
    try:
        if warm_pool.pool_size(pool) > 0:
            container_id, warm = warm_pool.WarmPool(backend, pool).acquire(spec)
        else:
            container_id, warm = backend.create(spec), False
        _update(episode_id, container_id=container_id)
        task_sandbox.prepare(backend, container_id, episode.task)
    except SandboxError as error:
        return fail_episode(episode_id, error.reason, pool, retryable=error.retryable)
    _update(episode_id, status=Episode.Status.RUNNING)
    return {"ok": True, "episode_id": episode_id, "container_id": container_id, "warm": warm}


def exec_command(episode_id: int, command: str, pool: str, timeout_s: float | None = None) -> dict:
    """Run one agent command in the episode's sandbox; the result carries the observation to show the agent."""
    episode = _episode(episode_id)
    if episode.is_terminal or not episode.container_id:
        return {"ok": False, "episode_id": episode_id, "error": f"episode has no running sandbox ({episode.status})"}
    timeout_s = min(timeout_s or settings.MEGAFLOW_EXEC_TIMEOUT_S, episode.task.timeout_s)
    return run_command(episode_id, episode.container_id, command, pool, timeout_s, episode.task.workdir)


def run_command(episode_id: int, container_id: str, command: str, pool: str, timeout_s: float, workdir: str) -> dict:
    """``exec_command`` for a caller that has just read the episode (the episode loop's hot path)."""
    release_connection()  # nothing needs the database while the command runs
    try:
        result = get_backend().exec(container_id, command, timeout_s, workdir=workdir)
    except SandboxError as error:
        return fail_episode(episode_id, error.reason, pool, retryable=error.retryable)
    return {"ok": True, "episode_id": episode_id, "observation": result.observation(), **result.as_dict()}


def evaluate_episode(episode_id: int, pool: str) -> dict:
    """Grade the agent's final tree, record the reward, finish the episode and release its sandbox."""
    episode = _episode(episode_id)
    if episode.is_terminal:
        return {"ok": False, "episode_id": episode_id, "error": f"episode is already {episode.status}"}
    if not episode.container_id:
        return fail_episode(episode_id, "no sandbox to evaluate", pool)
    _update(episode_id, status=Episode.Status.EVALUATING)
    release_connection()  # the tests may run for minutes
    try:
        evaluation = get_backend().evaluate(episode.container_id, episode.task)
    except SandboxError as error:
        return fail_episode(episode_id, f"evaluation failed: {error.reason}", pool, retryable=error.retryable)
    finished = Episode.objects.filter(pk=episode_id, status=Episode.Status.EVALUATING)
    finished.update(
        status=Episode.Status.SUCCEEDED,
        reward=evaluation.reward,
        finished_at=timezone.now(),
        updated_at=timezone.now(),
        failure_reason=evaluation.error,
    )  # fmt: skip
    _release(episode.container_id, pool)
    return {"ok": True, "episode_id": episode_id, **evaluation.as_dict()}


def stop_sandbox(episode_id: int, pool: str, container_id: str | None = None) -> dict:
    """Release the episode's sandbox, or the given one of its earlier attempt (after a cancel, a model failure,
    or when the agent loop ends without evaluating)."""
    if container_id is None:
        container_id = Episode.objects.filter(pk=episode_id).values_list("container_id", flat=True).first() or ""
    _release(container_id, pool)
    return {"ok": True, "episode_id": episode_id, "container_id": container_id}
