"""Local backend: a temporary directory per sandbox, for machines without Docker. NOT a security boundary.

Off by default (``MEGAFLOW_ENV_BACKEND=local`` turns it on). Commands run as the worker's own user. When
bubblewrap (``bwrap``) is installed each command runs in fresh namespaces (no network, its own /tmp, the rest of
the host read-only, the sandbox directory mounted at the task's workdir); without it they simply run in the
sandbox directory, with the host's network and files within reach. Either way there are no memory or pid
limits. Use it to develop and to run trusted tasks, never for untrusted agents.
"""

from __future__ import annotations

import io
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

from django.conf import settings

from envs.backend import EnvironmentBackend, ExecResult, OutputCapture, SandboxError, SandboxSpec, register_backend


@register_backend("local")
class LocalBackend(EnvironmentBackend):
    def __init__(self, root: Path | None = None):
        self.root = root or settings.DATA_DIR / "sandboxes"
        self.root.mkdir(parents=True, exist_ok=True)
        self.bwrap = shutil.which("bwrap")
        self.workdirs: dict[str, str] = {}

    def _dir(self, sandbox_id: str) -> Path:
        path = self.root / sandbox_id
        if not path.is_dir():
            raise SandboxError("the sandbox directory is gone")
        return path

    def create(self, spec: SandboxSpec) -> str:
        sandbox_id = f"local-{uuid.uuid4().hex[:16]}"
        (self.root / sandbox_id / "work").mkdir(parents=True)
        (self.root / sandbox_id / "tmp").mkdir()
        self.workdirs[sandbox_id] = spec.workdir
        return sandbox_id

    def _host_path(self, sandbox_id: str, path: str | None) -> Path:
        """Where a sandbox path lives on the host: the task's workdir (and what is below it) is ``work/``."""
        work = self._dir(sandbox_id) / "work"
        workdir = self.workdirs.get(sandbox_id, "/testbed")
        if path is None or path == workdir:
            return work
        if path.startswith(workdir + "/"):
            return work / path[len(workdir) + 1 :]
        return self._dir(sandbox_id) / "tmp" / path.strip("/").replace("/", "_")

    def _argv(self, sandbox_id: str, command: str, workdir: str | None) -> tuple[list[str], Path]:
        if not self.bwrap:
            return ["/bin/sh", "-c", command], self._host_path(sandbox_id, workdir)
        inside = workdir or self.workdirs.get(sandbox_id, "/testbed")
        argv = [
            self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--bind", str(self._dir(sandbox_id) / "work"), self.workdirs.get(sandbox_id, "/testbed"),
            "--unshare-all", "--die-with-parent", "--new-session", "--chdir", inside, "/bin/sh", "-c", command,
        ]  # fmt: skip
        return argv, self._dir(sandbox_id)

    def _environment(self, sandbox_id: str) -> dict[str, str]:
        """A minimal environment: nothing of the worker's (its DATABASE_URL, its secrets) reaches a task. The
        worker's own Python comes first on PATH, so "python3" in a task command is the worker's interpreter."""
        home = str(self._dir(sandbox_id) / "tmp")
        return {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": home,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def exec(
        self,
        sandbox_id: str,
        command: str,
        timeout_s: float,
        workdir: str | None = None,
        output_limit: int | None = None,
    ) -> ExecResult:
        argv, cwd = self._argv(sandbox_id, command, workdir)
        cwd.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        process = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=self._environment(sandbox_id),
        )  # fmt: skip
        capture = OutputCapture(output_limit or settings.MEGAFLOW_OUTPUT_LIMIT_BYTES)
        timed_out, killed_reason = False, ""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                remaining = started + timeout_s - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                if not selector.select(remaining):
                    continue
                chunk = os.read(process.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                capture.feed(chunk)
                if capture.total > settings.MEGAFLOW_OUTPUT_KILL_BYTES:
                    killed_reason = f"it printed more than {settings.MEGAFLOW_OUTPUT_KILL_BYTES} bytes"
                    break
        if timed_out or killed_reason:
            # The command's session: everything it started, unless something called setsid itself.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.stdout.close()
        exit_code = process.wait()
        return ExecResult.from_capture(capture, exit_code, started, timed_out, killed_reason)

    def copy_in(self, sandbox_id: str, directory: str, tar_bytes: bytes) -> None:
        target = self._host_path(sandbox_id, directory)
        target.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:*") as tar:
                tar.extractall(target, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise SandboxError(f"copying files into {directory} failed: {exc}") from None

    def destroy(self, sandbox_id: str) -> None:
        self.workdirs.pop(sandbox_id, None)
        shutil.rmtree(self.root / sandbox_id, ignore_errors=True)

    def is_alive(self, sandbox_id: str) -> bool:
        return (self.root / sandbox_id).is_dir()
