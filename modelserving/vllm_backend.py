"""The ``vllm`` backend: a GPU worker that runs and supervises its own ``vllm serve`` on its GPU(s).

The worker process starts ``vllm serve <model_path>`` (``CUDA_VISIBLE_DEVICES=<gpus>``), waits for ``/health``,
restarts it if it dies, and forwards every request through the ``openai`` backend, so its 32 worker threads
keep the server's continuous batching fed; that backend also renders an episode's prompts to ids through the
server's ``/tokenize`` and generates from them (token in, token out). ``load()`` reads the server's ``/metrics``
(KV-cache usage, requests running and waiting, token throughput) for scheduling and autoscaling.
``load_version`` serves new weights through a supervised restart: new requests wait, the ones in flight finish on
the old weights, then ``vllm serve`` starts on the new checkpoint (if it does not come up, the old one is started
again and the version is refused). vllm itself is installed only on GPU workers (requirements-gpu.txt); the
backend only needs the ``vllm`` command.

Options: ``model_path``, ``port`` (8100), ``gpus`` (e.g. "0,1"), ``extra_args`` (list, e.g.
["--tensor-parallel-size", "2"]), ``tool_call_parser`` (the model's convention, e.g. "hermes" for Qwen: the server
then answers ``tools`` with ``tool_calls``; without it, vLLM refuses ``tool_choice: "auto"``), ``command``
(replaces the whole command line), ``startup_timeout_s``, and the ``openai`` backend's options.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from django.conf import settings

from modelserving.backend import Generation, GenerationRequest, ModelBackend, ModelError, register_backend
from modelserving.openai_backend import OpenAIBackend
from modelserving.supervisor import ServerSupervisor

# vLLM renamed its KV-cache gauge in v0.7; read whichever the server exports.
KV_CACHE_METRICS = ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")


@register_backend("vllm")
class VLLMBackend(ModelBackend):
    def __init__(
        self,
        model: str,
        model_path: str = "",
        port: int = 8100,
        gpus: str | None = None,
        extra_args: list[str] | None = None,
        tool_call_parser: str | None = None,
        command: list[str] | None = None,
        startup_timeout_s: float = 900,
        restart_backoff_s: float = 2,
        version: str | None = None,
        **openai_options,
    ):
        super().__init__(model)
        if version is not None:
            self.version = str(version)
        self.model_path = model_path
        base_url = f"http://127.0.0.1:{port}"
        tool_args = ["--enable-auto-tool-choice", "--tool-call-parser", tool_call_parser] if tool_call_parser else []
        command = command or [
            "vllm",
            "serve",
            model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            model,
            *tool_args,
            *(extra_args or []),
        ]
        env = {"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {}
        self.supervisor = ServerSupervisor(
            command,
            base_url,
            settings.DATA_DIR / "log" / f"model-server-{model}.log",
            env=env,
            startup_timeout_s=startup_timeout_s,
            restart_backoff_s=restart_backoff_s,
        )
        self.supervisor.start()
        self.http = OpenAIBackend(model, base_url=f"{base_url}/v1", served_model=model, **openai_options)
        self._last_tokens: tuple[float, float] | None = None
        self._gate = threading.Condition()
        self._in_flight = 0
        self._switching = False

    @property
    def tokenizes(self) -> bool:
        """Token in, token out through the server's ``/tokenize`` (vLLM has it; the openai backend asks)."""
        return self.http.tokenizes

    def chat_token_ids(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        return self.http.chat_token_ids(messages, add_generation_prompt, tools)

    def text_token_ids(self, text: str) -> list[int]:
        return self.http.text_token_ids(text)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        with self._gate:
            while self._switching:  # new weights are being loaded: wait for them
                self._gate.wait()
            self._in_flight += 1
            version = self.version
        try:
            self.supervisor.ensure_running()
            generations = self.http.generate(requests)
        finally:
            with self._gate:
                self._in_flight -= 1
                self._gate.notify_all()
        for generation in generations:
            generation.model_version = version
        return generations

    def load_version(self, version: str, checkpoint_path: str) -> None:
        if not (Path(checkpoint_path) / "config.json").is_file():
            raise ModelError(f"{checkpoint_path!r} is not a model directory this worker can read (no config.json)")
        if self.model_path and self.model_path not in self.supervisor.command:
            raise ModelError("the server's command does not name its model path: cannot swap in new weights")
        command = [checkpoint_path if part == self.model_path else part for part in self.supervisor.command]
        with self._gate:
            while self._switching:
                self._gate.wait()
            self._switching = True
            while self._in_flight:  # the turns in flight finish on the weights they started with
                self._gate.wait()
        try:
            self.supervisor.relaunch(command)
            self.version, self.model_path = str(version), checkpoint_path
        finally:
            with self._gate:
                self._switching = False
                self._gate.notify_all()

    def load(self) -> dict[str, float]:
        """The server's load now: KV-cache usage (0..1), requests running and waiting, tokens/s since the last
        call."""
        metrics = self.supervisor.metrics()
        tokens = metrics.get("vllm:generation_tokens_total", 0.0) + metrics.get("vllm:prompt_tokens_total", 0.0)
        now = time.monotonic()
        rate = 0.0
        if self._last_tokens is not None and now > self._last_tokens[0]:
            rate = (tokens - self._last_tokens[1]) / (now - self._last_tokens[0])
        self._last_tokens = (now, tokens)
        return {
            "kv_cache_usage": next((metrics[name] for name in KV_CACHE_METRICS if name in metrics), 0.0),
            "requests_running": metrics.get("vllm:num_requests_running", 0.0),
            "requests_waiting": metrics.get("vllm:num_requests_waiting", 0.0),
            "tokens_per_s": rate,
            "restarts": float(self.supervisor.restarts),
        }

    def close(self) -> None:
        self.http.close()
        self.supervisor.stop()
