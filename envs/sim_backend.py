"""The ``sim`` environment backend, for benchmarks: no containers, a fixed latency per command.

Every command "runs" for ``MEGAFLOW_SIM_EXEC_LATENCY_S`` seconds (default 0.5) and prints what ``echo`` would
(commands other than ``echo ...`` print nothing and exit 0), so that episodes against the ``sim`` model cost
exactly their scripted model and environment time, and what remains is orchestration. Nothing is isolated or
evaluated for real: every test counts as failed, so rewards are 0.0.

A sandbox is alive from its creation until it is destroyed in this process; one created by another worker
process counts as alive, so a pool can run several worker processes as it would with Docker.
"""

from __future__ import annotations

import shlex
import threading
import time
import uuid

from django.conf import settings

from envs.backend import EnvironmentBackend, ExecResult, SandboxError, SandboxSpec, register_backend


@register_backend("sim")
class SimBackend(EnvironmentBackend):
    def __init__(self):
        self._destroyed: set[str] = set()
        self._lock = threading.Lock()

    def create(self, spec: SandboxSpec) -> str:
        return f"sim-{uuid.uuid4().hex[:16]}"

    def exec(
        self,
        sandbox_id: str,
        command: str,
        timeout_s: float,
        workdir: str | None = None,
        output_limit: int | None = None,
    ) -> ExecResult:
        if not self.is_alive(sandbox_id):
            raise SandboxError("the sandbox container is gone")
        started = time.monotonic()
        time.sleep(min(settings.MEGAFLOW_SIM_EXEC_LATENCY_S, timeout_s))
        output = ""
        for line in command.splitlines():
            words = shlex.split(line) if line.strip() else []
            if words[:1] == ["echo"]:
                output += " ".join(words[1:]) + "\n"
        return ExecResult(exit_code=0, output=output, duration_s=time.monotonic() - started)

    def copy_in(self, sandbox_id: str, directory: str, tar_bytes: bytes) -> None:
        if not self.is_alive(sandbox_id):
            raise SandboxError("the sandbox container is gone")

    def destroy(self, sandbox_id: str) -> None:
        with self._lock:
            self._destroyed.add(sandbox_id)

    def is_alive(self, sandbox_id: str) -> bool:
        with self._lock:
            return sandbox_id.startswith("sim-") and sandbox_id not in self._destroyed
