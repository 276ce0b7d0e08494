"""Supervise one inference-server subprocess: start it, wait for ``/health``, restart it when it dies.

Used by the ``vllm`` backend for ``vllm serve``; anything with the same endpoints can be supervised (the tests
supervise modelserving.hf_server). Server output goes to a log file whose tail is quoted when the server fails
to come up.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from modelserving.backend import ModelError

logger = logging.getLogger("megaflow.modelserving.supervisor")


def read_metrics(base_url: str, timeout_s: float = 5) -> dict[str, float]:
    """Every sample of a Prometheus ``/metrics`` page, by sample name (labels summed)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


class ServerSupervisor:
    def __init__(
        self,
        command: list[str],
        base_url: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 900,
        restart_backoff_s: float = 2,
        check_interval_s: float = 1,
    ):
        self.command, self.base_url, self.log_path = command, base_url.rstrip("/"), log_path
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_s, self.restart_backoff_s, self.check_interval_s = (
            startup_timeout_s,
            restart_backoff_s,
            check_interval_s,
        )
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ModelError(f"cannot start the model server ({' '.join(self.command[:3])}): {exc}") from None
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.healthy():
            if self.process.poll() is not None:
                raise ModelError(
                    f"the model server exited at start (code {self.process.returncode}):\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self._kill()
                raise ModelError(
                    f"the model server was not healthy after {self.startup_timeout_s:.0f} s:\n{self._log_tail()}"
                )
            time.sleep(0.25)
        logger.info("model server up (pid %s) at %s", self.process.pid, self.base_url)

    def start(self) -> None:
        """Launch the server and return once ``/health`` answers; then keep it alive in the background."""
        with self._lock:
            self._launch()
        self._monitor = threading.Thread(target=self._watch, name="model-server-monitor", daemon=True)
        self._monitor.start()

    def ensure_running(self) -> None:
        """Restart the server now if it died (callers use this before sending it work)."""
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                self._restart()

    def relaunch(self, command: list[str]) -> None:
        """Stop the server and start ``command`` in its place (new weights); if that one does not come up, the
        old command is started again and ``ModelError`` says why."""
        with self._lock:
            previous = self.command
            self._kill()
            self.command = command
            try:
                self._launch()
            except ModelError:
                self.command = previous
                self._launch()
                raise

    def _restart(self) -> None:
        code = self.process.returncode if self.process else None
        logger.warning("model server died (exit %s); restarting, restart #%d", code, self.restarts + 1)
        time.sleep(self.restart_backoff_s)
        self.restarts += 1
        self._launch()

    def _watch(self) -> None:
        while not self._stopping.wait(self.check_interval_s):
            try:
                self.ensure_running()
            except ModelError as error:
                logger.error("model server restart failed: %s", error.reason)

    def _kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._kill()

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.base_url)
