"""The ``sim`` backend, for benchmarks: a fixed latency per batch and a scripted bash action.

Each reply is one bash block; after ``steps - 1`` assistant turns the action prints MEGAFLOW_SUBMIT, so an
episode against it lasts exactly ``steps`` steps. Options: ``latency_s`` (default 1.0), ``steps`` (10), and for
measuring what trainer-grade rollouts cost, ``prompt_ids_per_message`` (0: no ids) and ``completion_ids``
(200): with the first set, the backend "tokenizes" with a synthetic chat template (every system or user
message is that many ids, so each turn grows the prompt by about that much) and every completion is
``completion_ids`` ids with logprobs. The ids are a simulation's, for sizing the hot path, never a model's.
Any version "loads" (there are no weights).

Given ``tools`` (and a ``tool_choice`` other than "none"), the action is a call of the named tool, else the first
declared one, written the Hermes way and parsed by the same code as a real model's reply (modelserving/tool_calls.py):
the command goes in its ``command`` parameter, or its first string parameter.
"""

import time
import zlib

from modelserving.backend import Generation, GenerationRequest, ModelBackend, register_backend
from modelserving.tool_calls import hermes_text, with_tool_calls

BOS, EOS, NEWLINE = 1, 2, 3


@register_backend("sim")
class SimBackend(ModelBackend):
    def __init__(
        self,
        model: str,
        latency_s: float = 1.0,
        steps: int = 10,
        prompt_ids_per_message: int = 0,
        completion_ids: int = 200,
        **options,
    ):
        super().__init__(model, **options)
        self.latency_s = float(latency_s)
        self.steps = int(steps)
        self.prompt_ids_per_message = int(prompt_ids_per_message)
        self.completion_ids = int(completion_ids)
        self.tokenizes = self.prompt_ids_per_message > 0

    def text_token_ids(self, text: str) -> list[int]:
        return [10 + zlib.crc32(word.encode()) % 30_000 for word in text.split()]

    def _message_ids(self, message: dict) -> list[int]:
        content = self.text_token_ids(str(message.get("content", "")))
        if message.get("role") != "assistant":
            content = (content or [4]) * (self.prompt_ids_per_message // max(1, len(content)) + 1)
            content = content[: self.prompt_ids_per_message]
        return [BOS, *self.text_token_ids(message.get("role", "")), NEWLINE, *content, EOS, NEWLINE]

    def chat_token_ids(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        ids = [token for message in messages for token in self._message_ids(message)]
        return ids + [BOS, *self.text_token_ids("assistant"), NEWLINE] if add_generation_prompt else ids

    def load_version(self, version: str, checkpoint_path: str) -> None:
        self.version = str(version)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        started = time.monotonic()
        time.sleep(self.latency_s)  # one forward pass serves the whole batch, as on a real server
        generations = []
        for request in requests:
            turn = sum(1 for message in request.messages if message.get("role") == "assistant")
            command = "echo MEGAFLOW_SUBMIT" if turn + 1 >= self.steps else f"echo step {turn}"
            text = f"Step {turn}.\n```bash\n{command}\n```"
            if request.tools and request.tool_choice != "none":
                text = tool_call_text(request, command)
            prompt_words = sum(len(str(message.get("content") or "").split()) for message in request.messages)
            token_ids = logprobs = None
            if request.prompt_token_ids is not None:
                token_ids = [10 + (turn + index) % 30_000 for index in range(self.completion_ids - 1)] + [EOS]
                logprobs = [-0.5] * len(token_ids)
            generation = Generation(
                request_id=request.request_id,
                text=text,
                prompt_tokens=prompt_words if token_ids is None else len(request.prompt_token_ids),
                completion_tokens=len(text.split()) if token_ids is None else len(token_ids),
                token_ids=token_ids,
                logprobs=logprobs,
                latency_s=time.monotonic() - started,
                model_version=self.version,
            )
            generations.append(with_tool_calls(generation, request))
        return generations


def tool_call_text(request: GenerationRequest, command: str) -> str:
    """A call of the tool ``request`` names (or its first) that runs ``command``, as a Hermes model writes it."""
    if isinstance(request.tool_choice, dict):
        name = request.tool_choice["function"]["name"]
        tool = next(tool for tool in request.tools if tool["function"]["name"] == name)
    else:
        tool = request.tools[0]
    properties = (tool["function"].get("parameters") or {}).get("properties") or {}
    strings = [key for key, schema in properties.items() if isinstance(schema, dict) and schema.get("type") == "string"]
    parameter = "command" if "command" in properties else next(iter(strings), None)
    return hermes_text(tool["function"]["name"], {parameter: command} if parameter else {})
