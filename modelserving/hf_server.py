"""A small OpenAI-compatible inference server over the ``hf`` backend, with dynamic batching.

It serves ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/tokenize``, ``/detokenize``,
``/health`` and ``/metrics`` (vLLM's
metric names for the numbers the ``vllm`` supervisor reads, plus the size of every batch it ran), so it stands
in for ``vllm serve`` wherever there is no GPU: the tests run the ``openai`` backend, the gateway and the vllm
supervisor against it with a real tiny model on CPU. Requests arriving within ``--batch-window-ms`` of each
other run as one batch of up to ``--max-batch``. Like ``vllm serve --tool-call-parser hermes``, it renders
``tools`` with the chat template and returns the Hermes tool calls in a reply as ``tool_calls``; ``n``,
``logprobs``/``top_logprobs`` and vLLM's ``return_token_ids`` are answered as vLLM answers them (no streaming).
``/tokenize`` renders a chat (``messages``, ``add_generation_prompt``, ``tools``) or a ``prompt`` to ids in vLLM's
request and answer shapes, so the ``openai`` backend's token in, token out runs against it as against vLLM.

    python -m modelserving.hf_server --model-path var/tiny-model --served-model-name tiny --port 8001
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from modelserving.backend import Generation, GenerationRequest, SamplingParams
from modelserving.hf_backend import HFBackend
from modelserving.openai_format import chat_completion_body, error_body, text_completion_body

ROUTES = ("/v1/chat/completions", "/v1/completions")
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")


def tokenizer_answer(backend: HFBackend, path: str, body: dict) -> dict:
    """vLLM's ``/tokenize`` (a chat by its template, or a prompt) and ``/detokenize`` answers
    (``KeyError``/``TypeError``/``ValueError`` for a body that is neither)."""
    if path == "/detokenize":
        return {"prompt": backend.tokenizer.decode([int(token) for token in body["tokens"]])}
    if "messages" in body:
        tokens = backend.chat_token_ids(
            body["messages"],
            add_generation_prompt=bool(body.get("add_generation_prompt", True)),
            tools=body.get("tools"),
        )
    else:
        special = bool(body.get("add_special_tokens", True))
        tokens = list(backend.tokenizer.encode(str(body["prompt"]), add_special_tokens=special))
    return {"count": len(tokens), "max_model_len": backend.context_length, "tokens": tokens, "token_strs": None}


def generation_requests(path: str, body: dict) -> list[GenerationRequest]:
    """The ``n`` requests of a chat or text completion body (``KeyError``/``TypeError``/``ValueError`` when it
    is not one)."""
    stop = body.get("stop") or ()
    chat = path == "/v1/chat/completions"
    logprobs = body.get("logprobs")
    top_logprobs = int(body.get("top_logprobs") or 0) if chat else int(logprobs or 0)
    sampling = SamplingParams(
        temperature=float(body.get("temperature") or 0.0),
        top_p=float(body.get("top_p") or 1.0),
        max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or (64 if chat else 16)),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        logprobs=bool(logprobs) if chat else logprobs is not None,
        top_logprobs=top_logprobs,
        return_token_ids=bool(body.get("return_token_ids")),
    )
    prompt = None if chat else body["prompt"]
    request = {
        "messages": body["messages"] if chat else [],
        "tools": body.get("tools"),
        "tool_choice": body.get("tool_choice"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "prompt": prompt if isinstance(prompt, str) else None,
        "prompt_token_ids": prompt if isinstance(prompt, list) else None,
    }
    seed = body.get("seed")
    return [
        GenerationRequest(
            uuid.uuid4().hex,
            sampling=replace(sampling, seed=None if seed is None else seed + index),
            **request,
        )
        for index in range(int(body.get("n") or 1))
    ]


class Batcher(threading.Thread):
    """Collects requests for ``window_s`` after the first one (up to ``max_batch``) and runs them together."""

    def __init__(self, backend, max_batch: int, window_s: float):
        super().__init__(daemon=True, name="batcher")
        self.backend, self.max_batch, self.window_s = backend, max_batch, window_s
        self.pending: queue.Queue[tuple[GenerationRequest, Future]] = queue.Queue()
        self.lock = threading.Lock()
        self.running = 0
        self.batches: list[int] = []
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def submit(self, request: GenerationRequest) -> Future:
        future: Future = Future()
        self.pending.put((request, future))
        return future

    def run(self) -> None:
        while True:
            batch = [self.pending.get()]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.pending.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            with self.lock:
                self.running = len(batch)
                self.batches.append(len(batch))
            try:
                generations = self.backend.generate([request for request, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting client must get an answer
                generations = [
                    Generation(request.request_id, finish_reason="error", error=str(exc)) for request, _ in batch
                ]
            with self.lock:
                self.running = 0
                self.prompt_tokens += sum(generation.prompt_tokens for generation in generations)
                self.generation_tokens += sum(generation.completion_tokens for generation in generations)
            for (_, future), generation in zip(batch, generations, strict=True):
                future.set_result(generation)

    def metrics(self) -> str:
        with self.lock:
            lines = [
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running {self.running}",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting {self.pending.qsize()}",
                "# TYPE vllm:gpu_cache_usage_perc gauge",
                f"vllm:gpu_cache_usage_perc {min(1.0, self.running / self.max_batch):.4f}",
                "# TYPE vllm:prompt_tokens_total counter",
                f"vllm:prompt_tokens_total {self.prompt_tokens}",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total {self.generation_tokens}",
                "# TYPE megaflow:batch_size summary",
                f"megaflow:batch_size_sum {sum(self.batches)}",
                f"megaflow:batch_size_count {len(self.batches)}",
            ]
        return "\n".join(lines) + "\n"


def make_handler(batcher: Batcher, served_model: str):
    tokenizer_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as separate writes; without TCP_NODELAY a keep-alive client's delayed ACK
        # holds every response back ~40 ms (uvicorn, under vLLM, sets it too).
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:  # one line per request is noise at hundreds per second
            pass

        def reply(self, status: int, body, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                self.reply(HTTPStatus.OK, "", "text/plain")
            elif self.path == "/metrics":
                self.reply(HTTPStatus.OK, batcher.metrics(), "text/plain; version=0.0.4")
            elif self.path == "/v1/models":
                self.reply(HTTPStatus.OK, {"object": "list", "data": [{"id": served_model, "object": "model"}]})
            else:
                self.reply(HTTPStatus.NOT_FOUND, error_body(f"no route {self.path}", "not_found"))

        def do_POST(self) -> None:  # noqa: N802
            if self.path in TOKENIZER_ROUTES:
                return self.tokenizer_route()
            if self.path not in ROUTES:
                return self.reply(HTTPStatus.NOT_FOUND, error_body(f"no route {self.path}", "not_found"))
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                requests = generation_requests(self.path, body)
            except (ValueError, KeyError, TypeError) as exc:
                message = f"body must be a JSON chat or text completion: {type(exc).__name__}: {exc}"
                return self.reply(HTTPStatus.BAD_REQUEST, error_body(message, "invalid_body"))
            if body.get("model") != served_model:
                message = f"The model `{body.get('model')}` does not exist."
                return self.reply(HTTPStatus.NOT_FOUND, error_body(message, "model_not_found", "model"))
            generations = [future.result() for future in [batcher.submit(request) for request in requests]]
            if failed := next((generation for generation in generations if generation.error), None):
                code = "context_length_exceeded" if "maximum context length" in failed.error else "generation_failed"
                status = (
                    HTTPStatus.BAD_REQUEST if code == "context_length_exceeded" else HTTPStatus.INTERNAL_SERVER_ERROR
                )
                return self.reply(status, error_body(failed.error, code))
            token_ids = bool(body.get("return_token_ids"))
            if self.path == "/v1/chat/completions":
                answer = chat_completion_body(
                    f"chatcmpl-{requests[0].request_id}", served_model, generations, token_ids
                )
            else:
                top = body.get("logprobs")
                answer = text_completion_body(
                    f"cmpl-{requests[0].request_id}", served_model, generations, top, token_ids
                )
            return self.reply(HTTPStatus.OK, answer)

        def tokenizer_route(self) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if body.get("model", served_model) != served_model:
                    message = f"The model `{body.get('model')}` does not exist."
                    return self.reply(HTTPStatus.NOT_FOUND, error_body(message, "model_not_found", "model"))
                with tokenizer_lock:  # a fast tokenizer refuses concurrent use ("Already borrowed")
                    answer = tokenizer_answer(batcher.backend, self.path, body)
            except Exception as exc:  # noqa: BLE001 - a body or a chat template that cannot be rendered: the client's
                message = f"cannot {self.path.strip('/')} this body: {type(exc).__name__}: {exc}"
                return self.reply(HTTPStatus.BAD_REQUEST, error_body(message, "invalid_body"))
            return self.reply(HTTPStatus.OK, answer)

    return Handler


def serve(model_path: str, served_model: str, host: str, port: int, max_batch: int, window_ms: float) -> None:
    backend = HFBackend(served_model, model_path=model_path, max_batch=max_batch)
    batcher = Batcher(backend, max_batch, window_ms / 1000)
    batcher.start()
    server = ThreadingHTTPServer((host, port), make_handler(batcher, served_model))
    server.daemon_threads = True
    print(f"serving {served_model} from {model_path} on http://{host}:{port}/v1", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    args = parser.parse_args()
    serve(args.model_path, args.served_model_name, args.host, args.port, args.max_batch, args.batch_window_ms)


if __name__ == "__main__":
    main()
