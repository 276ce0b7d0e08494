"""The ``replay`` backend: plays a task's reference solution through the action format.

It is the demo's policy when no model is configured, and says so in every reply it makes. The first reply
applies the task's ``patch`` with ``git apply`` and prints MEGAFLOW_SUBMIT; any later reply only submits. The
request's ``context`` names the task (``task_id``) or carries the ``patch`` itself.
"""

import functools
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

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        generations = []
        for request in requests:
            started = time.monotonic()
            try:
                text = self._reply(request)
            except ModelError as error:
                generations.append(Generation(request.request_id, finish_reason="error", error=error.reason))
                continue
            generations.append(
                Generation(
                    request_id=request.request_id,
                    text=text,
                    completion_tokens=len(text.split()),
                    latency_s=time.monotonic() - started,
                )
            )
        return generations
