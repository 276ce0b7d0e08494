"""Celery tasks of the Model Service (queues ``model.<name>``): thin wrappers over modelserving/service.py.

``model=`` routes each task to its model's queue. A GPU worker runs many of these at once (threads), so that
its inference server always has a batch to work on. (The episode loop's model hop, ``modelserving.episode_turn``,
is declared with the loop in orchestrator/tasks.py.)
"""

from megaflow_site.megaflow_task import megaflow_task
from megaflow_site.topology import Service, UnknownQueue
from modelserving import service, versions
from modelserving.backend import GenerationRequest, UnknownModel
from orchestrator import replies
from orchestrator.probe import define_probe_task

probe = define_probe_task(Service.MODEL)


@megaflow_task("modelserving.generate")
def generate(model: str, requests: list[dict], reply_to: str | None = None) -> list[dict]:
    """``reply_to``: a reply inbox (orchestrator/replies.py) the generations are pushed to, for a caller that
    waits (the gateway) without the extra hop of a link callback."""
    parsed = [GenerationRequest.from_dict(request) for request in requests]
    generations = [generation.as_dict() for generation in service.generate(model, parsed)]
    if reply_to:
        replies.deliver(reply_to, generations)
    return generations


@megaflow_task("modelserving.load_version")
def load_version(model: str, version: str, checkpoint_path: str, reply_to: str | None = None) -> dict:
    """Load a published model version in this worker (``{"ok": ...}``, pushed to ``reply_to``); the model's
    other workers follow before their next batch (modelserving/versions.py)."""
    result = versions.load(model, version, checkpoint_path)
    if reply_to:
        replies.deliver(reply_to, result)
    return result


def publish_generation(model: str, requests: list[dict], **options) -> None:
    """Send ``requests`` to ``model.<model>`` (``options``: ``reply_to``, ``link``, ...); ``UnknownModel`` when
    the model has no queue, since no worker could ever answer."""
    link = options.pop("link", None)
    try:
        generate.apply_async(kwargs={"model": model, "requests": requests, **options}, link=link)
    except UnknownQueue:
        raise UnknownModel(model) from None
