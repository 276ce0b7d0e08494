"""OpenAI's wire format for chat and text completions (with vLLM's token-id extension), written from
generations: shared by the gateway and modelserving.hf_server."""

from __future__ import annotations

import json
import time

from modelserving.backend import Generation


def error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(generations: list[Generation]) -> dict:
    """One prompt, several completions: the prompt counts once, as vLLM and OpenAI count it for ``n``."""
    prompt = generations[0].prompt_tokens if generations else 0
    completion = sum(generation.completion_tokens for generation in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_texts(generation: Generation) -> list[str]:
    """Each completion token's text; vLLM's ``token_id:N`` where the backend knows only the id."""
    if generation.tokens is not None:
        return generation.tokens
    if generation.token_ids is not None:
        return [f"token_id:{token_id}" for token_id in generation.token_ids]
    return [""] * len(generation.logprobs or [])


def _logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(generation: Generation) -> dict | None:
    """``choices[i].logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``, or None."""
    if generation.logprobs is None:
        return None
    tops = generation.top_logprobs or [[] for _ in generation.logprobs]
    content = [
        {**_logprob(token, logprob), "top_logprobs": [_logprob(other["token"], other["logprob"]) for other in top]}
        for token, logprob, top in zip(token_texts(generation), generation.logprobs, tops, strict=True)
    ]
    return {"content": content, "refusal": None}


def legacy_logprobs(generation: Generation, top: int) -> dict | None:
    """The ``/v1/completions`` shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` (a token → logprob map
    per position, when ``top`` > 0) and ``text_offset``."""
    if generation.logprobs is None:
        return None
    tokens = token_texts(generation)
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops = None
    if top and generation.top_logprobs is not None:
        tops = [{other["token"]: other["logprob"] for other in position} for position in generation.top_logprobs]
    return {"tokens": tokens, "token_logprobs": generation.logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_message(generation: Generation) -> dict:
    """The assistant's message; its content is null when it only called tools."""
    if not generation.tool_calls:
        return {"role": "assistant", "content": generation.text}
    return {"role": "assistant", "content": generation.text or None, "tool_calls": generation.tool_calls}


def chat_completion_body(
    completion_id: str, model: str, generations: list[Generation], return_token_ids: bool = False
) -> dict:
    """A ``chat.completion`` with one choice per generation; with ``return_token_ids``, vLLM's
    ``choices[i].token_ids`` and top-level ``prompt_token_ids``."""
    choices = []
    for index, generation in enumerate(generations):
        choice = {
            "index": index,
            "message": chat_message(generation),
            "logprobs": chat_logprobs(generation),
            "finish_reason": generation.finish_reason,
        }
        if return_token_ids:
            choice["token_ids"] = generation.token_ids
        choices.append(choice)
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(generations),
    }
    if return_token_ids:
        body["prompt_token_ids"] = generations[0].prompt_token_ids
    return body


def _chat_deltas(generation: Generation) -> list[dict]:
    """One choice's deltas: the role, the content, then each tool call (its id and name, then its arguments,
    in the order OpenAI streams them)."""
    deltas = [{"role": "assistant", "content": ""}]
    if generation.text or not generation.tool_calls:
        deltas.append({"content": generation.text})
    for index, call in enumerate(generation.tool_calls or []):
        head = {"index": index, "id": call["id"], "type": "function"}
        deltas.append({"tool_calls": [{**head, "function": {"name": call["function"]["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
    return deltas


def chat_completion_chunks(
    completion_id: str,
    model: str,
    generations: list[Generation],
    include_usage: bool = False,
    return_token_ids: bool = False,
):
    """Server-sent events for ``stream: true``: per choice its deltas (logprobs and token ids ride on the first
    after the role), then its finish; with ``include_usage`` a last chunk with no choices and the usage; then
    ``[DONE]``. The worker answers whole, so the reply arrives in a few chunks, not token by token."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    if include_usage:
        base["usage"] = None
    for index, generation in enumerate(generations):
        for position, delta in enumerate(_chat_deltas(generation)):
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            extra = {}
            if position == 1:
                choice["logprobs"] = chat_logprobs(generation)
                if return_token_ids:
                    choice["token_ids"] = generation.token_ids
            if position == 0 and index == 0 and return_token_ids:
                extra["prompt_token_ids"] = generation.prompt_token_ids
            yield _event({**base, "choices": [choice], **extra})
        finish = {"index": index, "delta": {}, "logprobs": None, "finish_reason": generation.finish_reason}
        yield _event({**base, "choices": [finish]})
    if include_usage:
        yield _event({**base, "choices": [], "usage": usage(generations)})
    yield "data: [DONE]\n\n"


def text_completion_body(
    completion_id: str,
    model: str,
    generations: list[Generation],
    logprobs: int | None = None,
    return_token_ids: bool = False,
) -> dict:
    """A ``text_completion``; ``logprobs`` is the legacy parameter (None: none, N: the top N per token)."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            _text_choice(index, generation, logprobs, return_token_ids) for index, generation in enumerate(generations)
        ],
        "usage": usage(generations),
    }


def _text_choice(index: int, generation: Generation, logprobs: int | None, return_token_ids: bool) -> dict:
    choice = {
        "index": index,
        "text": generation.text,
        "logprobs": None if logprobs is None else legacy_logprobs(generation, logprobs),
        "finish_reason": generation.finish_reason,
    }
    if return_token_ids:
        choice.update(prompt_token_ids=generation.prompt_token_ids, token_ids=generation.token_ids)
    return choice


def text_completion_chunks(
    completion_id: str,
    model: str,
    generations: list[Generation],
    logprobs: int | None = None,
    include_usage: bool = False,
    return_token_ids: bool = False,
):
    """Server-sent events of a text completion: per choice its text, then its finish; the usage; ``[DONE]``."""
    base = {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model}
    if include_usage:
        base["usage"] = None
    for index, generation in enumerate(generations):
        text = {**_text_choice(index, generation, logprobs, return_token_ids), "finish_reason": None}
        yield _event({**base, "choices": [text]})
        finish = {"index": index, "text": "", "logprobs": None, "finish_reason": generation.finish_reason}
        yield _event({**base, "choices": [finish]})
    if include_usage:
        yield _event({**base, "choices": [], "usage": usage(generations)})
    yield "data: [DONE]\n\n"


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"
