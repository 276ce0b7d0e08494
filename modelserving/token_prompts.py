"""Token in, token out: an episode's next prompt as ids, grown from the previous turn's, never re-rendered.

Turn k's prompt is turn k-1's prompt + the ids the model produced + the messages added since, rendered by the
chat template as a delta (the tokens that close the assistant turn, unless the model closed it itself with its
end-of-turn token, then the new messages and the generation prompt). Re-tokenizing the conversation's text
instead gives other ids than the policy sampled: the most reported rollout bug in RL frameworks.

When the agent rewrote its history (``max_history_turns`` dropped old turns), the prompt cannot extend the
previous one: it is rendered whole and marked ``consistent=False``, with the length of the prefix it still
shares. Backends without a tokenizer get no ids at all; none are invented.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from modelserving.backend import ModelBackend, ModelError

PROBE = "MEGAFLOW"


@dataclass(frozen=True)
class PreviousTurn:
    """What the model saw and said last turn: its messages, its reply's text (its content, when it called
    tools), the tool calls it made (OpenAI's shape) and prompt + completion as ids."""

    messages: list[dict]
    reply: str
    ids: list[int] | None
    tool_calls: list[dict] | None = None

    @property
    def reply_message(self) -> dict:
        """The reply as the agent hands it back in its next request."""
        if self.tool_calls:
            return {"role": "assistant", "content": self.reply or None, "tool_calls": self.tool_calls}
        return {"role": "assistant", "content": self.reply}


@dataclass(frozen=True)
class TurnPrompt:
    """A turn's prompt: ``ids`` (None when the backend has no tokenizer), how many of them it shares with the
    previous turn's prompt + completion, whether it extends them exactly (None on the first turn), and the
    messages it added (all of them when it was rendered whole)."""

    ids: list[int] | None
    prefix_len: int | None
    consistent: bool | None
    new_messages: list[dict]

    @property
    def appended_ids(self) -> list[int] | None:
        return None if self.ids is None else self.ids[self.prefix_len or 0 :]


class ChatDelta:
    """How a backend's chat template closes an assistant turn and renders the messages after it, learnt once
    from a probe conversation (with the episode's tools, wherever the template puts them)."""

    def __init__(self, backend: ModelBackend, tools: list[dict] | None = None):
        self.backend, self.tools = backend, tools
        user = [{"role": "user", "content": PROBE}]
        head = backend.chat_token_ids(user, add_generation_prompt=True, tools=tools)
        content = backend.text_token_ids(PROBE)
        self.base_messages = [*user, {"role": "assistant", "content": PROBE}]
        self.base = backend.chat_token_ids(self.base_messages, add_generation_prompt=False, tools=tools)
        end = len(head) + len(content)
        if self.base[: len(head)] != head or self.base[len(head) : end] != content:
            raise ModelError("the chat template does not render an assistant turn as generation prompt + content")
        self.closing = self.base[end:]

    def ids(self, new_messages: list[dict], completion_ids: list[int]) -> list[int]:
        """The ids that follow ``completion_ids`` when ``new_messages`` come next."""
        full = self.backend.chat_token_ids(
            self.base_messages + new_messages, add_generation_prompt=True, tools=self.tools
        )
        if full[: len(self.base)] != self.base:
            raise ModelError("the chat template renders earlier turns differently once more messages follow")
        closing = self.closing
        if completion_ids and closing and completion_ids[-1] == closing[0]:
            closing = closing[1:]  # the model ended its turn itself
        return closing + full[len(self.base) :]


def chat_delta(backend: ModelBackend, tools: list[dict] | None = None) -> ChatDelta:
    return _chat_delta(backend, json.dumps(tools, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _chat_delta(backend: ModelBackend, tools_json: str) -> ChatDelta:
    return ChatDelta(backend, json.loads(tools_json))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for index in range(n):
        if a[index] != b[index]:
            return index
    return n


def message_delta(messages: list[dict], previous: PreviousTurn | None) -> tuple[list[dict], bool | None]:
    """The messages this turn adds to what the model saw last turn (plus its reply), and whether the
    conversation only grew; all of ``messages`` and False when the agent rewrote it."""
    if previous is None:
        return messages, None
    seen = [*previous.messages, previous.reply_message]
    if [comparable(message) for message in messages[: len(seen)]] == [comparable(message) for message in seen]:
        return messages[len(seen) :], True
    return messages, False


def comparable(message: dict) -> tuple:
    """A message as far as the prompt goes: role, text, tool calls (arguments as parsed JSON: a client may
    re-serialise them) and the call it answers. Keys a client adds (``function_call: null``, provider fields)
    and null-versus-empty content do not count."""
    calls = tuple(
        (
            call.get("id"),
            (call.get("function") or {}).get("name"),
            _canonical((call.get("function") or {}).get("arguments")),
        )
        for call in message.get("tool_calls") or ()
    )
    return message.get("role"), message.get("content") or "", calls, message.get("tool_call_id")


def _canonical(arguments):
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except (TypeError, ValueError):
        return arguments


def next_prompt(
    backend: ModelBackend, messages: list[dict], previous: PreviousTurn | None, tools: list[dict] | None = None
) -> TurnPrompt:
    """The prompt of a turn whose agent built ``messages`` (and declared ``tools``, rendered by the chat
    template), after ``previous`` (None on the first turn)."""
    new, grew = message_delta(messages, previous)
    if not backend.tokenizes:
        return TurnPrompt(None, None, grew, new)
    if previous is None:
        return TurnPrompt(backend.chat_token_ids(messages, tools=tools), 0, None, new)
    if grew and previous.ids is not None:
        try:
            delta = chat_delta(backend, tools).ids(new, previous.ids)
        except ModelError:
            delta = None
        if delta is not None:
            return TurnPrompt(previous.ids + delta, len(previous.ids), True, new)
    ids = backend.chat_token_ids(messages, tools=tools)
    return TurnPrompt(ids, 0 if previous.ids is None else common_prefix(previous.ids, ids), False, messages)
