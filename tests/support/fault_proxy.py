"""A fault-injecting HTTP proxy in front of a real model server, for the retry tests and ``make chaos``.

The runtime server carries no test endpoint: faults are injected here, between the client and the server.
``inject(status=500, count=2)`` makes the next two completions answer 500 without reaching the server;
``inject(hang_s=30, count=1)`` holds the next one for 30 s (past the client's timeout) and then forwards it;
``clear()`` ends both. Every other request, and every completion once the faults are used up, is forwarded
unchanged, so what the client sees is the real server.

    with FaultProxy("http://127.0.0.1:8001") as proxy:
        proxy.inject(status=503, count=4)
        ...  # point the client at proxy.url
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from modelserving.openai_format import error_body

# Headers that describe one connection, not the message: each side of the proxy sets its own.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"}
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


class FaultProxy:
    """Listens on ``host:port`` (0: any free port) and forwards to ``upstream``; ``url`` is where to point a client."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port or 80
        self.lock = threading.Lock()
        self.status, self.hang_s, self.count = 0, 0.0, 0
        self.stopping = threading.Event()
        self.server = QuietServer((host, port), make_handler(self))
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fault-proxy")

    def inject(self, status: int = 0, hang_s: float = 0.0, count: int = 0) -> None:
        """The next ``count`` completions answer ``status`` (if set) after a hang of ``hang_s`` seconds (if set)."""
        with self.lock:
            self.status, self.hang_s, self.count = int(status), float(hang_s), int(count)

    def clear(self) -> None:
        self.inject()

    @property
    def pending(self) -> int:
        """How many completions the injected fault has still to answer."""
        with self.lock:
            return self.count

    def take(self) -> tuple[int, float]:
        """The fault for one completion: (status or 0, seconds to hang)."""
        with self.lock:
            if self.count <= 0:
                return 0, 0.0
            self.count -= 1
            return self.status, self.hang_s

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # requests held by a hang let go at once
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up during a hang
            super().handle_error(request, client_address)


def make_handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        """One client connection; it keeps one connection of its own to the server while it lasts."""

        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as hf_server: a keep-alive client's delayed ACK would add ~40 ms
        upstream: http.client.HTTPConnection | None = None

        def log_message(self, *args) -> None:
            pass

        def finish(self) -> None:
            super().finish()
            if self.upstream:
                self.upstream.close()

        def reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def forward(self, body: bytes) -> None:
            headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
            while True:
                reused = self.upstream is not None
                if not reused:
                    self.upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=300)
                try:
                    self.upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = self.upstream.getresponse()
                    data = response.read()
                    break
                except (OSError, http.client.HTTPException) as exc:
                    self.upstream.close()
                    self.upstream = None
                    if not reused:  # a reused connection may just have been closed while idle: one more, fresh
                        message = f"fault proxy: upstream unreachable: {exc}"
                        return self.reply(HTTPStatus.BAD_GATEWAY, *json_error(message, "upstream_unreachable"))
            passed = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
            self.reply(response.status, data, passed)

        def do_request(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "POST" and self.path in COMPLETION_PATHS:
                status, hang_s = proxy.take()
                if hang_s and proxy.stopping.wait(hang_s):
                    self.close_connection = True
                    return
                if status:
                    return self.reply(status, *json_error(f"injected fault: HTTP {status}", "injected_fault"))
            self.forward(body)

        do_GET = do_POST = do_request  # noqa: N815 - http.server's naming

    return Handler


def json_error(message: str, code: str) -> tuple[bytes, list[tuple[str, str]]]:
    return json.dumps(error_body(message, code)).encode(), [("Content-Type", "application/json")]
