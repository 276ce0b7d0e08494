"""A TCP proxy that cuts the first rollouts stream through it after ``cut_after`` bytes of the answer, so a test
sees a trainer's stream break mid-way and resume (everything else is forwarded untouched).

    with StreamCutter("127.0.0.1", 8000, cut_after=20_000) as cutter:
        ...  # point the client at cutter.url; cutter.cuts says how many streams were cut
"""

from __future__ import annotations

import socket
import threading


class StreamCutter:
    def __init__(self, upstream_host: str, upstream_port: int, cut_after: int, path: bytes = b"/rollouts"):
        self.upstream = (upstream_host, upstream_port)
        self.cut_after, self.path = cut_after, path
        self.cuts = 0  # streams chosen to be cut
        self.cut_done = 0  # streams actually cut (their answer was longer than cut_after)
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._accept, daemon=True, name="stream-cutter")

    def __enter__(self) -> StreamCutter:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        request = client.recv(65536)
        with self.lock:
            cut = self.path in request.split(b"\r\n", 1)[0] and self.cuts == 0
            if cut:
                self.cuts += 1
        upstream.sendall(request)
        threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
        self._pipe(upstream, client, self.cut_after if cut else None)

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    sink.sendall(data[: limit - sent])
                    with self.lock:
                        self.cut_done += 1
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()
