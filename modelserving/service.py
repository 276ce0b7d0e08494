"""The Model Service's operation: generate a batch for one model name, the plain function its task and the
episode loop call."""

from __future__ import annotations

import logging

from modelserving.backend import ContextLengthExceeded, Generation, GenerationRequest, ModelError, get_backend

logger = logging.getLogger("megaflow.modelserving")


def generate(model: str, requests: list[GenerationRequest]) -> list[Generation]:
    """One generation per request, in order. A failure that no retry fixes (an unknown model, a server down
    past its retries, a prompt over the context window) comes back as generations with ``error`` set, never as
    an exception: what it means for an episode is the caller's to record."""
    try:
        return get_backend(model).generate(requests)
    except ModelError as error:
        kind = "context length exceeded" if isinstance(error, ContextLengthExceeded) else "model error"
        logger.warning("%s for %s: %s", kind, model, error.reason)
        return [Generation(request.request_id, finish_reason="error", error=error.reason) for request in requests]
