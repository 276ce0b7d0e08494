"""The ``openai`` backend: any OpenAI-compatible server (``vllm serve``, SGLang, TGI, modelserving.hf_server).

Every worker thread hands its requests to one asyncio loop per process, which owns a pooled ``httpx``
client: a 32-thread worker keeps 32+ requests in flight over a few keep-alive connections, and the server
batches them. Connection errors, timeouts and 5xx answers are retried with jittered exponential backoff
(tenacity), a bounded number of times; 4xx answers are not retried.

Options: ``base_url`` (".../v1"), ``served_model`` (the name the server knows, default the MegaFlow name),
``api_key``, ``timeout_s`` (300), ``connect_timeout_s`` (5), ``max_attempts`` (4), ``backoff_s`` (0.5),
``max_connections`` (256).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from modelserving.backend import Generation, GenerationRequest, ModelBackend, register_backend

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def event_loop() -> asyncio.AbstractEventLoop:
    """The process's HTTP event loop, running in a daemon thread (started on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="model-http", daemon=True).start()
        return _loop


class ServerError(Exception):
    """A 5xx answer: worth retrying."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | ServerError)


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error or response.text)[:1000]
    except ValueError:
        return response.text[:1000]


def parse_completion(request_id: str, body: dict, latency_s: float) -> Generation:
    """A Generation from a chat.completion body; token ids come from vLLM's ``token_id:N`` logprob tokens or
    a top-level ``token_ids`` list, logprobs from ``choices[0].logprobs.content``."""
    choice = body["choices"][0]
    usage = body.get("usage") or {}
    content = (choice.get("logprobs") or {}).get("content") or None
    token_ids = choice.get("token_ids")
    logprobs = None
    if content:
        logprobs = [item["logprob"] for item in content]
        if token_ids is None and all(str(item.get("token", "")).startswith("token_id:") for item in content):
            token_ids = [int(item["token"].split(":", 1)[1]) for item in content]
    return Generation(
        request_id=request_id,
        text=choice["message"].get("content") or "",
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        token_ids=token_ids,
        logprobs=logprobs,
        latency_s=latency_s,
    )


@register_backend("openai")
class OpenAIBackend(ModelBackend):
    def __init__(
        self,
        model: str,
        base_url: str,
        served_model: str | None = None,
        api_key: str = "",
        timeout_s: float = 300,
        connect_timeout_s: float = 5,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        max_connections: int = 256,
        **options,
    ):
        super().__init__(model, **options)
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model or model
        self.max_attempts = int(max_attempts)
        self.backoff_s = float(backoff_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(float(timeout_s), connect=float(connect_timeout_s))
        limits = httpx.Limits(max_connections=int(max_connections), max_keepalive_connections=int(max_connections))

        async def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, limits=limits)

        self.client = asyncio.run_coroutine_threadsafe(make_client(), event_loop()).result()

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        futures = [asyncio.run_coroutine_threadsafe(self._one(request), event_loop()) for request in requests]
        return [future.result() for future in futures]

    def _body(self, request: GenerationRequest) -> dict:
        sampling = request.sampling
        body = {
            "model": self.served_model,
            "messages": request.messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.logprobs:
            body.update(logprobs=True, return_tokens_as_token_ids=True)  # the latter is vLLM's extension
        return body

    async def _post(self, body: dict) -> httpx.Response:
        response = await self.client.post("/chat/completions", json=body)
        if response.status_code >= 500:
            raise ServerError(response.status_code, _error_message(response))
        return response

    async def _one(self, request: GenerationRequest) -> Generation:
        started = time.monotonic()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential_jitter(multiplier=self.backoff_s, max=10, jitter=self.backoff_s),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        failed = Generation(request.request_id, finish_reason="error")
        try:
            response = await retrying(self._post, self._body(request))
        except httpx.TransportError as exc:
            failed.error = (
                f"model server {self.base_url} unreachable after {self.max_attempts} attempts: "
                f"{type(exc).__name__}: {exc}"
            )
            return failed
        except ServerError as exc:
            failed.error = f"model server {self.base_url} failed after {self.max_attempts} attempts: {exc}"
            return failed
        if response.status_code != 200:
            message = _error_message(response)
            kind = "context length exceeded" if "context length" in message else f"HTTP {response.status_code}"
            failed.error = f"{kind}: {message}"
            return failed
        return parse_completion(request.request_id, response.json(), time.monotonic() - started)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.aclose(), event_loop()).result()
