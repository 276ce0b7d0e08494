"""Celery tasks of the Environment Service (queues ``env.<pool>``): thin wrappers over envs/service.py.

Every task takes ``pool=``, which the router turns into its queue, and returns a JSON-able dict for whatever
callback is linked to it. Sandbox failures are recorded on the episode, never raised.
"""

from celery import shared_task, signals

from envs import reaper, service, warm_pool
from envs.backend import get_backend
from megaflow_site.topology import Service, queue_name
from orchestrator.db import retry_on_database_errors
from orchestrator.probe import define_probe_task

probe = define_probe_task(Service.ENV)


@shared_task(name="envs.start_sandbox")
def start_sandbox(episode_id: int, pool: str) -> dict:
    return service.start_sandbox(episode_id, pool)


@shared_task(name="envs.exec_command")
def exec_command(episode_id: int, command: str, pool: str, timeout_s: float | None = None) -> dict:
    return service.exec_command(episode_id, command, pool, timeout_s)


@shared_task(name="envs.evaluate")
def evaluate(episode_id: int, pool: str) -> dict:
    return service.evaluate_episode(episode_id, pool)


@shared_task(name="envs.stop_sandbox")
@retry_on_database_errors
def stop_sandbox(episode_id: int, pool: str, container_id: str | None = None) -> dict:
    return service.stop_sandbox(episode_id, pool, container_id)


@shared_task(name="envs.reap_orphans")
def reap_orphans(pool: str, grace_s: float | None = None) -> dict:
    from django.conf import settings

    grace = settings.MEGAFLOW_REAPER_GRACE_S if grace_s is None else grace_s
    return {"pool": pool, "reaped": reaper.reap_orphans(get_backend("docker"), grace)}


@shared_task(name="envs.maintain_warm_pool")
def maintain_warm_pool(pool: str) -> dict:
    return {"pool": pool, **warm_pool.WarmPool(get_backend(), pool).maintain()}


@signals.worker_ready.connect
def _reap_and_warm_at_start(sender=None, **_) -> None:
    """An env worker that starts sends its pool a reaper pass and a warm-pool top-up."""
    from django.conf import settings

    consumed = {queue.name for queue in sender.task_consumer.queues} if sender and sender.task_consumer else set()
    for pool in settings.MEGAFLOW_ENV_POOLS:
        if queue_name(Service.ENV, pool) in consumed:
            if settings.MEGAFLOW_ENV_BACKEND == "docker":
                reap_orphans.apply_async(kwargs={"pool": pool})
            if warm_pool.pool_size(pool) > 0:
                maintain_warm_pool.apply_async(kwargs={"pool": pool})


@shared_task(name="envs.episode_start")
@retry_on_database_errors
def episode_start(episode_id: int, pool: str) -> None:
    from agents import episode_loop

    episode_loop.episode_start(episode_id, pool)


@shared_task(name="envs.episode_step")
@retry_on_database_errors
def episode_step(
    episode_id: int,
    step: int,
    reply: str,
    pool: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    model_latency_s: float = 0.0,
    attempt: int = 1,
) -> None:
    from agents import episode_loop

    episode_loop.episode_step(episode_id, step, reply, prompt_tokens, completion_tokens, model_latency_s, attempt)
