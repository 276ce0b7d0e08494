"""Celery tasks of the Agent Service (queue ``agent``): thin wrappers over agents/episode_loop.py."""

from celery import shared_task

from agents import episode_loop
from megaflow_site.topology import Service
from orchestrator.db import retry_on_database_errors
from orchestrator.probe import define_probe_task

probe = define_probe_task(Service.AGENT)


@shared_task(name="agents.start_run")
@retry_on_database_errors
def start_run(run_id: int) -> int:
    return episode_loop.start_run(run_id)


@shared_task(name="agents.episode_done")
@retry_on_database_errors
def episode_done(episode_id: int) -> None:
    episode_loop.episode_done(episode_id)


@shared_task(name="agents.watchdog")
def watchdog() -> list[int]:
    return episode_loop.watchdog()


@shared_task(name="agents.admit")
@retry_on_database_errors
def admit() -> list[int]:
    return episode_loop.admit()


@shared_task(name="agents.autoscale")
@retry_on_database_errors
def autoscale() -> dict:
    from orchestrator import autoscale

    return autoscale.tick()
