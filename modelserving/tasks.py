"""Celery tasks of the Model Service (queues ``model.<name>``): thin wrappers over modelserving/service.py.

``model=`` routes each task to its model's queue. A GPU worker runs many of these at once (threads), so that
its inference server always has a batch to work on.
"""

from celery import shared_task

from megaflow_site.topology import Service
from modelserving import service
from orchestrator import replies
from orchestrator.db import retry_on_database_errors
from orchestrator.probe import define_probe_task

probe = define_probe_task(Service.MODEL)


@shared_task(name="modelserving.generate")
def generate(
    model: str, requests: list[dict], episode_id: int | None = None, reply_to: str | None = None
) -> list[dict]:
    """``reply_to``: a reply inbox (orchestrator/replies.py) the generations are pushed to, for a caller that
    waits (the gateway) without the extra hop of a link callback."""
    generations = service.generate(model, requests, episode_id)
    if reply_to:
        replies.deliver(reply_to, generations)
    return generations


@shared_task(name="modelserving.episode_turn")
@retry_on_database_errors
def episode_turn(episode_id: int, step: int, model: str, attempt: int = 1) -> None:
    from agents import episode_loop

    episode_loop.episode_turn(episode_id, step, model, attempt)
