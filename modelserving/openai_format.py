"""OpenAI chat-completion wire format, shared by the gateway and modelserving.hf_server."""

from __future__ import annotations

import json
import time

from modelserving.backend import Generation


def completion_body(generation: Generation, model: str) -> dict:
    """A ``chat.completion`` object; token ids (top level) and logprobs ride along when the engine gave them."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": generation.text},
        "finish_reason": generation.finish_reason,
        "logprobs": None,
    }
    if generation.logprobs is not None:
        pairs = zip(generation.token_ids or [None] * len(generation.logprobs), generation.logprobs, strict=True)
        choice["logprobs"] = {"content": [{"token_id": token, "logprob": logprob} for token, logprob in pairs]}
    return {
        "id": f"chatcmpl-{generation.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        },
        "token_ids": generation.token_ids,
    }


def stream_events(generation: Generation, model: str):
    """Server-sent events for ``stream: true``: the whole reply in one chunk, then the finish, then [DONE]."""
    base = {
        "id": f"chatcmpl-{generation.request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    chunks = [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": generation.text}, "finish_reason": None}
            ],
        },
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": generation.finish_reason}]},
    ]
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
