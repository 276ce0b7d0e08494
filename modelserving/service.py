"""The Model Service's operation: generate a batch for one model name, the plain function its task and the
episode loop call."""

from __future__ import annotations

import logging

from modelserving import versions
from modelserving.backend import ContextLengthExceeded, Generation, GenerationRequest, ModelError, get_backend
from modelserving.token_prompts import PreviousTurn, TurnPrompt, message_delta, next_prompt

logger = logging.getLogger("megaflow.modelserving")


def generate(model: str, requests: list[GenerationRequest]) -> list[Generation]:
    """One generation per request, in order. A failure that no retry fixes (an unknown model, a server down
    past its retries, a prompt over the context window) comes back as generations with ``error`` set, never as
    an exception: what it means for an episode is the caller's to record."""
    try:
        backend = get_backend(model)
        versions.follow(model, backend)
        generations = backend.generate(requests)
        for generation in generations:
            generation.model_version = generation.model_version or backend.version
        return generations
    except ModelError as error:
        kind = "context length exceeded" if isinstance(error, ContextLengthExceeded) else "model error"
        logger.warning("%s for %s: %s", kind, model, error.reason)
        return [Generation(request.request_id, finish_reason="error", error=error.reason) for request in requests]


def tokenizes(model: str) -> bool:
    """Whether ``model``'s backend renders prompts to ids itself (token in, token out)."""
    try:
        return get_backend(model).tokenizes
    except ModelError:
        return False


def turn_prompt(
    model: str, messages: list[dict], previous: PreviousTurn | None, tools: list[dict] | None = None
) -> TurnPrompt:
    """The prompt of an episode's turn (modelserving/token_prompts.py), with ``tools`` rendered by the chat
    template; without ids when the backend has no tokenizer or cannot render them (the generation then reports
    whatever is wrong)."""
    try:
        return next_prompt(get_backend(model), messages, previous, tools)
    except ModelError as error:
        logger.warning("model %s: no token ids for this turn: %s", model, error.reason)
        new, grew = message_delta(messages, previous)
        return TurnPrompt(None, None, grew, new)
