"""The Environment Service's one backend interface, its value types, and the registry that picks a backend.

A backend runs sandboxes: ``create`` one for an episode, ``exec`` commands in it with a timeout that kills
the whole process tree, ``copy_in`` files, ``destroy`` it. Task-level work (unpacking the repository, grading
the tests) is written once over exec and copy_in in ``envs/task_sandbox.py``.

Adding a backend is adding one module that subclasses ``EnvironmentBackend`` and decorates it with
``@register_backend("name")`` in ``envs/<name>_backend.py``; ``MEGAFLOW_ENV_BACKEND`` selects it by name.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.conf import settings

from megaflow_site.backend_registry import BackendRegistry


class SandboxError(Exception):
    """The sandbox could not do what was asked; ``reason`` is what gets recorded on the episode."""

    def __init__(self, reason: str, retryable: bool = True):
        super().__init__(reason)
        self.reason = reason
        # Infrastructure trouble (a container that vanished, a daemon that did not answer) is worth another
        # attempt; what the task or the agent caused (a missing image, a failing setup, a fork bomb) is not.
        self.retryable = retryable


class ImageNotFound(SandboxError):
    def __init__(self, image: str):
        super().__init__(f"image not found: {image}", retryable=False)
        self.image = image


@dataclass(frozen=True)
class PullRecord:
    """What getting a sandbox's image cost (envs/images.py): ``pulled`` when this start pulled it, ``waited``
    when it waited on another start's pull of it; the seconds spent and the bytes downloaded."""

    image: str
    pulled: bool = False
    waited: bool = False
    seconds: float = 0.0
    bytes: int = 0


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox; defaults come from settings (README lists them)."""

    memory_mb: int = field(default_factory=lambda: settings.MEGAFLOW_SANDBOX_MEMORY_MB)
    cpus: float = field(default_factory=lambda: settings.MEGAFLOW_SANDBOX_CPUS)
    pids: int = field(default_factory=lambda: settings.MEGAFLOW_SANDBOX_PIDS)
    disk_mb: int = field(default_factory=lambda: settings.MEGAFLOW_SANDBOX_DISK_MB)
    tmp_mb: int = field(default_factory=lambda: settings.MEGAFLOW_SANDBOX_TMP_MB)


@dataclass(frozen=True)
class SandboxSpec:
    """What to start: the image, who it belongs to (for labels and the reaper), and its limits.

    ``writable_root`` is for images that carry the repository themselves (SWE-bench): their tree lives in
    the image's own filesystem, so the root cannot be read-only (see docs in envs/docker_backend.py).
    """

    image: str
    episode_id: int | None = None
    run_id: int | None = None
    workdir: str = "/testbed"
    writable_root: bool = False
    cap_add: tuple[str, ...] = ()
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    mode: str = "ephemeral"  # or "warm": owned by a warm pool, lent to one episode at a time
    pool: str = ""


@dataclass
class ExecResult:
    """One command's outcome. ``output`` is stdout and stderr interleaved, truncated to the configured size."""

    exit_code: int | None
    output: str
    duration_s: float
    timed_out: bool = False
    truncated: bool = False
    output_bytes: int = 0
    killed_reason: str = ""

    @property
    def note(self) -> str:
        """A line saying how the command ended when it did not just exit; empty when it did."""
        if self.timed_out:
            return f"[megaflow: command timed out after {self.duration_s:.0f} s and was killed]"
        if self.killed_reason:
            return f"[megaflow: command killed: {self.killed_reason}]"
        if self.exit_code == 137:
            return "[megaflow: command was killed (SIGKILL): it may have exceeded the memory limit]"
        return ""

    def observation(self) -> str:
        """The output, then the note on how the command ended (logs and error reasons; an agent renders its own
        observation from ``output`` and ``note``)."""
        return "\n".join([self.output.rstrip("\n"), self.note]).strip("\n")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_capture(cls, capture: OutputCapture, exit_code: int | None, started: float, timed_out: bool,
                     killed_reason: str) -> ExecResult:  # fmt: skip
        """The result of a command whose output went through ``capture`` and that began at ``started``
        (``time.monotonic()``)."""
        return cls(
            exit_code=exit_code,
            output=capture.text(),
            duration_s=time.monotonic() - started,
            timed_out=timed_out,
            truncated=capture.truncated,
            output_bytes=capture.total,
            killed_reason=killed_reason,
        )


class OutputCapture:
    """Keeps the first and last ``limit // 2`` bytes of a stream and counts the rest: bounded memory."""

    def __init__(self, limit: int):
        self.limit = max(64, limit)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit // 2 - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            del self.tail[: max(0, len(self.tail) - self.limit // 2)]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        head = self.head.decode(errors="replace")
        if not self.truncated:
            return head + self.tail.decode(errors="replace")
        skipped = self.total - len(self.head) - len(self.tail)
        marker = f"\n[megaflow: output truncated, {skipped} bytes omitted of {self.total}]\n"
        return head + marker + self.tail.decode(errors="replace")


class EnvironmentBackend(abc.ABC):
    """Sandboxes for episodes. Implementations must be safe to call from many threads at once."""

    name: str = ""

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> str:
        """Start a sandbox and return its id; raises ``ImageNotFound`` or ``SandboxError``."""

    @abc.abstractmethod
    def exec(
        self,
        sandbox_id: str,
        command: str,
        timeout_s: float,
        workdir: str | None = None,
        output_limit: int | None = None,
    ) -> ExecResult:
        """Run ``command`` with ``sh -c``; at ``timeout_s`` every process it started is killed. The output keeps
        ``output_limit`` bytes (default ``MEGAFLOW_OUTPUT_LIMIT_BYTES``), head and tail."""

    @abc.abstractmethod
    def copy_in(self, sandbox_id: str, directory: str, tar_bytes: bytes) -> None:
        """Unpack a tar (plain or gzip) into ``directory`` of the sandbox."""

    @abc.abstractmethod
    def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox and everything in it; a sandbox that is already gone is not an error."""

    def run_agent_command(
        self, sandbox_id: str, command: str, timeout_s: float, workdir: str | None = None,
        output_limit: int | None = None,
    ) -> ExecResult:  # fmt: skip
        """An agent's command: ``exec``'s contract, on the hot path. A backend may keep state between calls to
        make it cheaper (the docker backend's long-lived shell); everything else (setup, grading, resets) uses
        ``exec``."""
        return self.exec(sandbox_id, command, timeout_s, workdir=workdir, output_limit=output_limit)

    def is_alive(self, sandbox_id: str) -> bool:
        """Whether the sandbox still runs (the warm pool checks before lending one)."""
        return True

    def ensure_image(self, image: str, on_pull=None) -> PullRecord:
        """Make ``image`` available, pulling it if the backend has images; ``on_pull(image)`` is called before a
        pull. Backends without images (local, sim) have nothing to do."""
        return PullRecord(image)

    def holding_image(self, image: str):
        """A context in which ``image`` is not evicted from the backend's image cache."""
        return contextlib.nullcontext()


_registry = BackendRegistry("envs", Path(__file__).parent)
register_backend = _registry.register
available_backends = _registry.names


@functools.cache
def get_backend(name: str | None = None) -> EnvironmentBackend:
    """The process-wide instance of backend ``name`` (default ``MEGAFLOW_ENV_BACKEND``)."""
    name = name or settings.MEGAFLOW_ENV_BACKEND
    backend = _registry.load(name)
    if backend is None:
        raise SandboxError(f"unknown environment backend {name!r}: choose one of {', '.join(available_backends())}")
    return backend()
