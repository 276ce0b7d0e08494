"""Tool calls in text: the Hermes convention (Qwen, Hermes, the tiny test model), read out of a reply and
written into a prompt.

A model that calls a tool writes ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in its reply (one
block per call); the chat template renders the declared tools and earlier calls into the prompt. Backends that
return text (``hf``, ``sim``, and ``hf_server`` through ``hf``) turn such replies into OpenAI's
``tool_calls``, here, as vLLM's ``hermes`` tool parser does; the ``openai`` and ``vllm`` backends leave it to
their server.
"""

from __future__ import annotations

import json
import re
import uuid

from modelserving.backend import Generation, GenerationRequest

# An unclosed block at the end counts too: a reply cut at max_tokens inside a call is then not JSON, and the
# whole reply stays text.
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str) -> dict:
    """One call in OpenAI's shape; ``arguments`` is a JSON string."""
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_hermes(text: str) -> tuple[str, list[dict]]:
    """``(content, calls)`` of a reply: the text before the first ``<tool_call>`` and the calls in OpenAI's
    shape. A reply with a block that is not ``{"name": str, "arguments": object}`` JSON makes no calls: all of
    it is content (vLLM's parser does the same)."""
    blocks = [closed if closed is not None else unclosed for closed, unclosed in TOOL_CALL.findall(text)]
    if not blocks:
        return text, []
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except ValueError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string already
            try:
                json.loads(arguments)
            except ValueError:
                return text, []
        elif isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        else:
            return text, []
        calls.append(tool_call(call["name"], arguments))
    return text[: text.index("<tool_call>")].strip(), calls


def choose_calls(calls: list[dict], tool_choice: str | dict | None, parallel_tool_calls: bool) -> list[dict]:
    """The calls a reply may make under ``tool_choice``: all of them for "auto" and "required", those to the
    named function for a named choice, none for "none"; only the first when ``parallel_tool_calls`` is false.
    Nothing is invented: "required" or a named choice with no such call leaves the reply as text."""
    if tool_choice == "none":
        return []
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        calls = [call for call in calls if call["function"]["name"] == name]
    return calls if parallel_tool_calls else calls[:1]


def extract_tool_calls(
    text: str, tools: list[dict] | None, tool_choice: str | dict | None, parallel_tool_calls: bool = True
) -> tuple[str, list[dict]]:
    """``(content, calls)`` of a text reply to a request that declared ``tools``; the reply unchanged and no
    calls when it declared none, or when no call it may make is in it."""
    if not tools or tool_choice == "none":
        return text, []
    content, calls = parse_hermes(text)
    chosen = choose_calls(calls, tool_choice, parallel_tool_calls)
    return (content, chosen) if chosen else (text, [])


def with_tool_calls(generation: Generation, request: GenerationRequest) -> Generation:
    """``generation`` with the tool calls its text makes under ``request``'s tools and tool choice taken out of
    the text (finish reason "tool_calls"), as a text backend returns it."""
    content, calls = extract_tool_calls(
        generation.text, request.tools, request.tool_choice, request.parallel_tool_calls
    )
    if calls:
        generation.text, generation.tool_calls, generation.finish_reason = content, calls, "tool_calls"
    return generation


def hermes_text(name: str, arguments: dict) -> str:
    """A call written the Hermes way, as a model would (the sim backend's replies)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def template_messages(messages: list[dict]) -> list[dict]:
    """``messages`` as chat templates expect them: tool-call arguments as objects, not JSON strings (templates
    write them with ``tojson``), as vLLM hands them over."""
    rendered = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [
                {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ]
            message = {**message, "tool_calls": calls}
        rendered.append(message)
    return rendered
