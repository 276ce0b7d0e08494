"""The ``replay`` backend: plays a task's reference solution through the action format.

It is the demo's policy when no model is configured, and says so in every reply it makes. The first reply
applies the task's ``patch`` with ``git apply`` and prints MEGAFLOW_SUBMIT; any later reply only submits. The
request's ``context`` names the task (``task_id``) or carries the ``patch`` itself.

Offered tools (a tool-calling agent framework), it answers in tool-call form instead: the same commands as a call
of the first tool that takes a string ``command`` (mini-swe-agent's ``bash``, OpenHands' ``execute_bash``), so a
tool-calling framework solves a task end to end with no GPU.
"""

import functools
import json
import time

from modelserving.backend import Generation, GenerationRequest, ModelBackend, ModelError, register_backend
from orchestrator.models import Task

LABEL = "# replay policy: applying the task's reference solution (no model is configured)"
DELIMITER = "MEGAFLOW_REPLAY_PATCH"


@functools.lru_cache(maxsize=4096)
def _patch_of(task_id: int) -> str:
    try:
        return Task.objects.values_list("patch", flat=True).get(pk=task_id)
    except Task.DoesNotExist:
        raise ModelError(f"replay: task {task_id} does not exist") from None


def replay_action(patch: str) -> str:
    """A bash block that applies ``patch`` in the workdir and submits."""
    if f"\n{DELIMITER}\n" in f"\n{patch}\n":
        raise ModelError("replay: the patch contains the heredoc delimiter")
    return (
        f"{LABEL}\n```bash\ncat > /tmp/megaflow-replay.patch <<'{DELIMITER}'\n{patch.rstrip(chr(10))}\n{DELIMITER}\n"
        f"git apply /tmp/megaflow-replay.patch && echo MEGAFLOW_SUBMIT\n```"
    )


def command_tool(tools: list[dict] | None) -> str | None:
    """The name of the first offered function that takes a string ``command``: a shell tool."""
    for tool in tools or ():
        function = tool.get("function") or {}
        command = ((function.get("parameters") or {}).get("properties") or {}).get("command") or {}
        if command.get("type") == "string":
            return function.get("name")
    return None


def as_tool_call(reply: str, tool: str, call_id: str) -> Generation:
    """``reply``'s bash block as a call of ``tool``, the label as the reply's content."""
    command = reply.split("```bash\n", 1)[1].rsplit("\n```", 1)[0]
    arguments = json.dumps({"command": command})
    call = {"id": call_id, "type": "function", "function": {"name": tool, "arguments": arguments}}
    return Generation(call_id, text=LABEL, finish_reason="tool_calls", tool_calls=[call])


@register_backend("replay")
class ReplayBackend(ModelBackend):
    def _reply(self, request: GenerationRequest) -> str:
        if any(message.get("role") == "assistant" for message in request.messages):
            return f"{LABEL}\n```bash\necho MEGAFLOW_SUBMIT\n```"
        patch = request.context.get("patch")
        if patch is None:
            if "task_id" not in request.context:
                raise ModelError("replay: the request names no task (context.task_id) and carries no patch")
            patch = _patch_of(int(request.context["task_id"]))
        return replay_action(patch)

    def _tool_reply(self, request: GenerationRequest, text: str) -> Generation | None:
        tool = command_tool(request.tools)
        if tool is None or request.tool_choice == "none":
            return None
        turn = sum(message.get("role") == "assistant" for message in request.messages)
        return as_tool_call(text, tool, f"call_replay_{turn}")

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        generations = []
        for request in requests:
            started = time.monotonic()
            try:
                text = self._reply(request)
            except ModelError as error:
                generations.append(Generation(request.request_id, finish_reason="error", error=error.reason))
                continue
            generation = self._tool_reply(request, text) or Generation(request.request_id, text=text)
            generation.request_id = request.request_id
            generation.completion_tokens = len(text.split())
            generation.latency_s = time.monotonic() - started
            generations.append(generation)
        return generations
