"""The ``sim`` backend, for benchmarks: a fixed latency per batch and a scripted bash action.

Each reply is one bash block; after ``steps - 1`` assistant turns the action prints MEGAFLOW_SUBMIT, so an
episode against it lasts exactly ``steps`` steps. Options: ``latency_s`` (default 1.0), ``steps`` (10).
"""

import time

from modelserving.backend import Generation, GenerationRequest, ModelBackend, register_backend


@register_backend("sim")
class SimBackend(ModelBackend):
    def __init__(self, model: str, latency_s: float = 1.0, steps: int = 10, **options):
        super().__init__(model, **options)
        self.latency_s = float(latency_s)
        self.steps = int(steps)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        started = time.monotonic()
        time.sleep(self.latency_s)  # one forward pass serves the whole batch, as on a real server
        generations = []
        for request in requests:
            turn = sum(1 for message in request.messages if message.get("role") == "assistant")
            command = "echo MEGAFLOW_SUBMIT" if turn + 1 >= self.steps else f"echo step {turn}"
            text = f"Step {turn}.\n```bash\n{command}\n```"
            prompt_words = sum(len(str(message.get("content", "")).split()) for message in request.messages)
            generations.append(
                Generation(
                    request_id=request.request_id,
                    text=text,
                    prompt_tokens=prompt_words,
                    completion_tokens=len(text.split()),
                    latency_s=time.monotonic() - started,
                )
            )
        return generations
