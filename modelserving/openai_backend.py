"""The ``openai`` backend: any OpenAI-compatible server (``vllm serve``, SGLang, TGI, modelserving.hf_server).

Every worker thread hands its requests to one asyncio loop per process, which owns a pooled ``httpx``
client: a 32-thread worker keeps 32+ requests in flight over a few keep-alive connections, and the server
batches them. Connection errors, timeouts and 5xx answers are retried with jittered exponential backoff
(tenacity), a bounded number of times; 4xx answers are not retried.

Tools and ``tool_choice`` go to the server, whose tool parser (``vllm serve --enable-auto-tool-choice
--tool-call-parser hermes``, hf_server's own) returns ``tool_calls``; a raw prompt (text or token ids) goes to
``/completions``. Token ids are asked for with vLLM's ``return_token_ids`` when the request wants ids or logprobs.

Token in, token out: a server with vLLM's ``/tokenize`` (probed once; a server without it stays text-only and no
ids are invented) renders chats to ids for modelserving/token_prompts.py, and a chat request that carries
``prompt_token_ids`` is generated from exactly those ids on ``/completions`` (``prompt: [ids]``, ``logprobs``,
``return_token_ids``); its tool calls are then read out of the text by the Hermes convention, as the ``hf``
backend reads them (``/completions`` runs no tool parser).

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

from modelserving.backend import Generation, GenerationRequest, ModelBackend, ModelError, register_backend
from modelserving.tool_calls import with_tool_calls

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
    """A Generation from a ``chat.completion`` or ``text_completion`` body. Token ids come from vLLM's
    ``return_token_ids`` (``choices[0].token_ids``, ``prompt_token_ids``) or its ``token_id:N`` logprob tokens;
    logprobs, token texts and top logprobs from either logprobs shape; tool calls as the server made them."""
    choice = body["choices"][0]
    usage = body.get("usage") or {}
    generation = Generation(
        request_id=request_id,
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        token_ids=choice.get("token_ids"),
        prompt_token_ids=body.get("prompt_token_ids") or choice.get("prompt_token_ids"),
        latency_s=latency_s,
    )
    if "message" in choice:
        generation.text = choice["message"].get("content") or ""
        generation.tool_calls = [_tool_call(call) for call in choice["message"].get("tool_calls") or ()] or None
        tokens, logprobs, tops = _chat_logprobs(choice.get("logprobs"))
    else:
        generation.text = choice.get("text") or ""
        tokens, logprobs, tops = _legacy_logprobs(choice.get("logprobs"))
    if logprobs is not None:
        generation.logprobs, generation.top_logprobs = logprobs, tops
        if all(token.startswith("token_id:") for token in tokens):  # vLLM's return_tokens_as_token_ids
            generation.token_ids = generation.token_ids or [int(token.split(":", 1)[1]) for token in tokens]
        else:
            generation.tokens = tokens
    return generation


def _tool_call(call: dict) -> dict:
    function = call["function"]
    return {
        "id": call["id"],
        "type": "function",
        "function": {"name": function["name"], "arguments": function["arguments"]},
    }


def _chat_logprobs(logprobs: dict | None) -> tuple[list[str], list[float] | None, list[list[dict]] | None]:
    content = (logprobs or {}).get("content")
    if not content:
        return [], None, None
    tops = [
        [_alternative(other["token"], other["logprob"]) for other in item.get("top_logprobs") or ()] for item in content
    ]
    return [item["token"] for item in content], [item["logprob"] for item in content], tops if any(tops) else None


def _legacy_logprobs(logprobs: dict | None) -> tuple[list[str], list[float] | None, list[list[dict]] | None]:
    if not logprobs or logprobs.get("token_logprobs") is None:
        return [], None, None
    tops = logprobs.get("top_logprobs")
    if tops is not None:
        tops = [[_alternative(token, logprob) for token, logprob in (position or {}).items()] for position in tops]
    return logprobs["tokens"], logprobs["token_logprobs"], tops


def _alternative(token: str, logprob: float) -> dict:
    token_id = int(token.split(":", 1)[1]) if token.startswith("token_id:") else None
    return {"token": token, "token_id": token_id, "logprob": logprob}


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
        # vLLM serves /tokenize beside /v1, not under it.
        self.server_url = self.base_url.removesuffix("/v1")
        self._tokenizes: bool | None = None
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

    @property
    def tokenizes(self) -> bool:
        """Whether the server renders prompts to ids (vLLM's ``/tokenize``): asked once, and the answer kept; a
        server that cannot be reached now is asked again next time."""
        if self._tokenizes is None:
            try:
                answer = self._tokenize({"prompt": "MEGAFLOW", "add_special_tokens": False}, probe=True)
            except ModelError:
                return False
            self._tokenizes = answer is not None
        return self._tokenizes

    def chat_token_ids(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        if tools:
            body["tools"] = tools
        return self._tokenize(body)

    def text_token_ids(self, text: str) -> list[int]:
        return self._tokenize({"prompt": text, "add_special_tokens": False})

    def _tokenize(self, body: dict, probe: bool = False) -> list[int] | None:
        """The server's ``/tokenize`` answer. ``ModelError`` when it cannot be had; on a ``probe``, None when the
        server has no such route (a 4xx) rather than an error."""
        future = asyncio.run_coroutine_threadsafe(self._tokenize_async(body), event_loop())
        try:
            response = future.result()
        except httpx.TransportError as exc:
            raise ModelError(f"model server {self.server_url} unreachable: {type(exc).__name__}: {exc}") from None
        except ServerError as exc:
            raise ModelError(f"model server {self.server_url} failed to tokenize: {exc}") from None
        if 400 <= response.status_code < 500 and probe:
            return None
        if response.status_code != 200:
            raise ModelError(f"/tokenize: HTTP {response.status_code}: {_error_message(response)}")
        tokens = response.json().get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(token, int) for token in tokens):
            if probe:
                return None
            raise ModelError("/tokenize answered without a list of token ids")
        return tokens

    async def _tokenize_async(self, body: dict) -> httpx.Response:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential_jitter(multiplier=self.backoff_s, max=10, jitter=self.backoff_s),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        return await retrying(self._post, f"{self.server_url}/tokenize", {"model": self.served_model, **body})

    def _body(self, request: GenerationRequest) -> dict:
        """The request for ``/chat/completions``, or ``/completions`` for a raw prompt: what the request asks
        for and nothing more, since a server may refuse what it does not know (vLLM's extensions included)."""
        sampling = request.sampling
        body = {
            "model": self.served_model,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if request.is_raw_completion:
            body["prompt"] = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
            if sampling.logprobs:
                body["logprobs"] = sampling.top_logprobs
        elif request.prompt_token_ids is not None:  # a chat turn rendered to ids: token in, token out
            body["prompt"] = request.prompt_token_ids
            if sampling.logprobs:
                # At least 1: some servers read 0 as "no logprobs"; the alternatives not asked for are dropped.
                body["logprobs"] = max(1, sampling.top_logprobs)
        else:
            body["messages"] = request.messages
            if request.tools:
                body.update(tools=request.tools, parallel_tool_calls=request.parallel_tool_calls)
                if request.tool_choice is not None:
                    body["tool_choice"] = request.tool_choice
            if sampling.logprobs:
                body["logprobs"] = True
            if sampling.top_logprobs:
                body["top_logprobs"] = sampling.top_logprobs
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.logprobs or sampling.return_token_ids:
            body["return_token_ids"] = True  # vLLM's extension (>= 0.10.2): the ids trainers need
        return body

    @staticmethod
    def _path(request: GenerationRequest) -> str:
        token_in = request.is_raw_completion or request.prompt_token_ids is not None
        return "/completions" if token_in else "/chat/completions"

    async def _post(self, path: str, body: dict) -> httpx.Response:
        response = await self.client.post(path, json=body)
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
            response = await retrying(self._post, self._path(request), self._body(request))
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
        generation = parse_completion(request.request_id, response.json(), time.monotonic() - started)
        if request.is_raw_completion or request.prompt_token_ids is None:
            return generation
        if not request.sampling.top_logprobs:
            generation.top_logprobs = None
        return with_tool_calls(generation, request)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.aclose(), event_loop()).result()
