"""The Model Service's operation: generate a batch for one model name, the plain function its task calls."""

from __future__ import annotations

import logging

from modelserving.backend import ContextLengthExceeded, GenerationRequest, ModelError, UnknownModel, get_backend
from orchestrator import episodes

logger = logging.getLogger("megaflow.modelserving")


def generate(model: str, requests: list[dict], episode_id: int | None = None) -> list[dict]:
    """Generations for ``requests`` (dicts of GenerationRequest). A failure that no retry fixes (an unknown model,
    a server down past its retries, a prompt over the context window) is recorded on the episode, and comes
    back as generations with ``error`` set: never an exception that would leave the episode waiting."""
    parsed = [GenerationRequest.from_dict(request) for request in requests]
    try:
        generations = [generation.as_dict() for generation in get_backend(model).generate(parsed)]
    except ModelError as error:
        generations = [
            {"request_id": request.request_id, "finish_reason": "error", "error": error.reason} for request in parsed
        ]
        kind = "context length exceeded" if isinstance(error, ContextLengthExceeded) else "model error"
        logger.warning("%s for %s: %s", kind, model, error.reason)
    if episode_id is not None:
        failed = next((generation["error"] for generation in generations if generation.get("error")), "")
        if failed:
            # A server down past its retries is infrastructure; a prompt too long or a bad model name is not.
            episodes.fail_or_retry(episode_id, f"model {model}: {failed}", retryable=failed.startswith("model server"))
    return generations


def publish_generation(model: str, requests: list[dict], episode_id: int | None = None, **options) -> None:
    """Send ``requests`` to ``model.<model>`` (``options``: ``reply_to``, ``link``, ...). A model without a
    queue fails the episode with its reason, since no worker could ever answer, and raises ``UnknownModel``."""
    from megaflow_site.topology import UnknownQueue
    from modelserving.tasks import generate

    link = options.pop("link", None)
    kwargs = {"model": model, "requests": requests, "episode_id": episode_id, **options}
    try:
        generate.apply_async(kwargs=kwargs, link=link)
    except UnknownQueue:
        error = UnknownModel(model)
        if episode_id is not None:
            episodes.record_failure(episode_id, f"model {model}: {error.reason}")
        raise error from None
