"""Celery tasks of the Environment Service (queues ``env.<pool>``): thin wrappers over envs/service.py.

Every task takes ``pool=``, which the router turns into its queue. (The episode loop's env hops,
``envs.episode_start`` and ``envs.episode_step``, are declared with the loop in orchestrator/tasks.py.)
"""

from celery import signals
from django.conf import settings

from envs import image_cache, reaper, service, validation, warm_pool
from envs.backend import get_backend
from megaflow_site.megaflow_task import megaflow_task
from megaflow_site.topology import Service, queue_name
from orchestrator import costs
from orchestrator.probe import define_probe_task

probe = define_probe_task(Service.ENV)


@megaflow_task("envs.stop_sandbox")
def stop_sandbox(pool: str, container_id: str, episode_id: int | None = None, host: str = "") -> dict:
    """Release a sandbox (after a cancel, a model failure, or an episode that ended without evaluating) on the
    host that holds it (``host=`` routes the message there); the episode is charged the seconds it held it."""
    held_s = service.release(container_id, pool)
    if episode_id is not None:
        costs.charge(episode_id, sandbox_s=held_s)
    return {"episode_id": episode_id, "container_id": container_id}


@megaflow_task("envs.validate_dataset")
def validate_dataset(validation_id: int, pool: str) -> str:
    """Gold-check a dataset on this pool's worker (``pool`` routes the message); the state it ended in."""
    return validation.validate_dataset(validation_id)


@megaflow_task("envs.reap_orphans")
def reap_orphans(pool: str, grace_s: float | None = None, host: str = "") -> dict:
    grace = settings.MEGAFLOW_REAPER_GRACE_S if grace_s is None else grace_s
    return {"pool": pool, "reaped": reaper.reap_orphans(get_backend("docker"), grace)}


@megaflow_task("envs.maintain_warm_pool")
def maintain_warm_pool(pool: str) -> dict:
    return {"pool": pool, **warm_pool.WarmPool(get_backend(), pool).maintain()}


@signals.worker_ready.connect
def _reap_and_warm_at_start(sender=None, **_) -> None:
    """An env worker that starts sends its pool a reaper pass and a warm-pool top-up."""
    consumed = {queue.name for queue in sender.task_consumer.queues} if sender and sender.task_consumer else set()
    host = settings.MEGAFLOW_ENV_HOST
    for pool in settings.MEGAFLOW_ENV_POOLS:
        if queue_name(Service.ENV, pool) in consumed:
            # The host's sandbox slots, which placement (orchestrator/placement.py) fills up to.
            image_cache.advertise_slots(host, getattr(sender, "concurrency", 0) or 0)
            if settings.MEGAFLOW_ENV_BACKEND == "docker":
                reap_orphans.apply_async(kwargs={"pool": pool, "host": host})
            if warm_pool.pool_size(pool) > 0:
                maintain_warm_pool.apply_async(kwargs={"pool": pool})
