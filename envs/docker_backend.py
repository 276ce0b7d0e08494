"""Docker backend: one locked-down container per sandbox, driven through the docker SDK.

Sandbox defaults (DESIGN.md): no network, not privileged, every capability dropped (a task may add back what
it needs), ``no-new-privileges``, pids/memory/CPU limits, no host mounts, never the Docker socket, and labels
(``megaflow.episode``, ``megaflow.run``, ``megaflow.managed``, ``megaflow.deployment``) so the reaper can
find orphans.

PID 1 is a shell looping on ``wait`` (``KEEPALIVE``): the kernel never lets ``kill -9 -1`` reach PID 1, and
``wait`` reaps the orphans it adopts. docker-init would not do: it exits when its one child is killed.

Disk: Docker cannot cap a container's writable layer on overlay2 over ext4, so for tasks that bring their
repository as an archive the root filesystem is read-only and every writable path (the workdir, /tmp, $HOME,
/run) is a size-capped tmpfs, charged to the container's memory cgroup: a disk fill ends in ENOSPC inside the
sandbox and never reaches the host's disk. Images that carry their repository (SWE-bench) need a writable
root; there the disk is bounded only where the daemon supports ``storage_opt`` sizes (xfs with pquota).

Files are copied in by streaming a tar into ``tar -x`` through exec's stdin, because the archive API cannot
write into tmpfs mounts or read-only roots.

The daemon may restart under us (an upgrade, a crash). A call that cannot reach it waits for it, retrying in
place for up to ``MEGAFLOW_DOCKER_RECONNECT_S``, instead of spending one of the episode's attempts on every
second of the outage; past that it is a retryable ``SandboxError``. A daemon without live-restore kills its
containers when it stops: the episode's next command finds its sandbox stopped and the episode gets a fresh
attempt, whose sandbox waits for the daemon in the same way.

Commands run through exec with a host-side deadline. At the deadline, or when a command has printed more than
``MEGAFLOW_OUTPUT_KILL_BYTES``, every process in the container but PID 1 is killed (``kill -9 -1`` from a
fresh exec): that takes the whole process tree, including children that left the command's process group.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time

import docker
import requests
import tenacity
from django.conf import settings

from envs import images
from envs.backend import (
    EnvironmentBackend,
    ExecResult,
    ImageNotFound,
    OutputCapture,
    PullRecord,
    SandboxError,
    SandboxSpec,
    register_backend,
)
from envs.image_cache import ImageCache
from envs.startup_control import start_gate

logger = logging.getLogger("megaflow.envs.docker")

LABEL_MANAGED = "megaflow.managed"
LABEL_EPISODE = "megaflow.episode"
LABEL_RUN = "megaflow.run"
LABEL_MODE = "megaflow.mode"
LABEL_POOL = "megaflow.pool"
LABEL_CREATED = "megaflow.created"
LABEL_DEPLOYMENT = "megaflow.deployment"

KEEPALIVE = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"]
GZIP_MAGIC = b"\x1f\x8b"
_FRAME_HEADER = struct.Struct(">BxxxL")
# What shells and Python print when fork() fails with EAGAIN (the pids limit).
_FORK_FAILED = re.compile(
    r"Cannot fork|fork: (retry: )?Resource temporarily unavailable|\[Errno 11\] Resource temporarily"
)
# After a kill, how long to keep reading for the output the command printed before it died.
_DRAIN_AFTER_KILL_S = 2.0


def sandbox_labels(spec: SandboxSpec) -> dict[str, str]:
    return {
        LABEL_MANAGED: "1",
        LABEL_EPISODE: "" if spec.episode_id is None else str(spec.episode_id),
        LABEL_RUN: "" if spec.run_id is None else str(spec.run_id),
        LABEL_MODE: spec.mode,
        LABEL_POOL: spec.pool,
        LABEL_CREATED: str(int(time.time())),
        LABEL_DEPLOYMENT: settings.MEGAFLOW_DEPLOYMENT,
    }


def _unreachable(exc: BaseException) -> bool:
    """The daemon did not answer at all (not running, restarting): worth waiting for."""
    if isinstance(exc, requests.ConnectionError):
        return True
    # The client's version probe wraps whatever it met in a DockerException.
    return isinstance(exc, docker.errors.DockerException) and isinstance(exc.__cause__, requests.ConnectionError)


def _log_wait(state: tenacity.RetryCallState) -> None:
    logger.warning("Docker daemon unreachable (%s); waiting for it", _brief(state.outcome.exception()))


def _waited_long_enough(state: tenacity.RetryCallState) -> bool:
    return state.seconds_since_start >= settings.MEGAFLOW_DOCKER_RECONNECT_S


_wait_for_daemon = tenacity.Retrying(
    retry=tenacity.retry_if_exception(_unreachable),
    wait=tenacity.wait_exponential(multiplier=0.2, max=2),
    stop=_waited_long_enough,
    before_sleep=_log_wait,
    reraise=True,
)


def daemon_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` against the daemon, waiting out a restart (``MEGAFLOW_DOCKER_RECONNECT_S``)."""
    try:
        return _wait_for_daemon(fn, *args, **kwargs)
    except (requests.ConnectionError, docker.errors.DockerException) as exc:
        if not _unreachable(exc):
            raise
        raise SandboxError(
            f"the Docker daemon at {settings.DOCKER_HOST} did not answer for "
            f"{settings.MEGAFLOW_DOCKER_RECONNECT_S} s: {_brief(exc)}"
        ) from None


def container_options(spec: SandboxSpec) -> dict:
    """The docker SDK's ``containers.create`` arguments that make a sandbox (limits, no network, labels)."""
    limits = spec.limits
    options = {
        "command": KEEPALIVE,
        "detach": True,
        "network_mode": "none",
        "privileged": False,
        "cap_drop": ["ALL"],
        "cap_add": list(spec.cap_add) or None,
        "security_opt": ["no-new-privileges"],
        "pids_limit": limits.pids,
        "mem_limit": f"{limits.memory_mb}m",
        "memswap_limit": f"{limits.memory_mb}m",  # no swap: a memory hog meets the OOM killer, not the disk
        "nano_cpus": int(limits.cpus * 1e9),
        "working_dir": spec.workdir,
        "labels": sandbox_labels(spec),
        "environment": {"HOME": "/root", "PYTHONDONTWRITEBYTECODE": "1"},
    }
    if not spec.writable_root:
        options["read_only"] = True
        options["tmpfs"] = {
            spec.workdir: f"rw,exec,size={limits.disk_mb}m,mode=1777",
            "/tmp": f"rw,exec,size={limits.tmp_mb}m,mode=1777",
            "/root": "rw,exec,size=64m,mode=0700",
            "/run": "rw,size=16m",
        }
    return options


@register_backend("docker")
class DockerBackend(EnvironmentBackend):
    """Sandboxes as containers on the daemon at ``DOCKER_HOST``."""

    def __init__(self, client: docker.DockerClient | None = None):
        # One HTTP connection per concurrent call: env workers run many threads.
        self.client = client or daemon_call(
            docker.DockerClient, base_url=settings.DOCKER_HOST, timeout=120, max_pool_size=64
        )
        self.api = self.client.api

    # --- lifecycle ---------------------------------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> str:
        options = container_options(spec)
        with start_gate():
            try:
                container = daemon_call(self.client.containers.create, spec.image, **options)
            except docker.errors.ImageNotFound:
                raise ImageNotFound(spec.image) from None
            except (docker.errors.APIError, requests.RequestException) as exc:
                raise SandboxError(f"could not create a container from {spec.image}: {_brief(exc)}") from None
            try:
                daemon_call(container.start)
            except (docker.errors.APIError, requests.RequestException) as exc:
                self.destroy(container.id)
                raise SandboxError(f"container from {spec.image} did not start: {_brief(exc)}") from None
        return container.id

    def destroy(self, sandbox_id: str) -> None:
        try:
            daemon_call(self.api.remove_container, sandbox_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise SandboxError(f"could not remove container {sandbox_id[:12]}: {_brief(exc)}") from None

    def is_alive(self, sandbox_id: str) -> bool:
        try:
            return bool(daemon_call(self.api.inspect_container, sandbox_id)["State"]["Running"])
        except docker.errors.NotFound:
            return False

    # --- images (envs/images.py, envs/image_cache.py) ------------------------------------------------------------

    def ensure_image(self, image: str, on_pull=None) -> PullRecord:
        return daemon_call(images.ensure_image, self.api, image, on_pull)

    def holding_image(self, image: str):
        return ImageCache(self.api).pin(image)

    # --- commands ----------------------------------------------------------------------------------------

    def exec(
        self,
        sandbox_id: str,
        command: str,
        timeout_s: float,
        workdir: str | None = None,
        output_limit: int | None = None,
    ) -> ExecResult:
        return self._run(sandbox_id, ["/bin/sh", "-c", command], timeout_s, workdir=workdir, output_limit=output_limit)

    def copy_in(self, sandbox_id: str, directory: str, tar_bytes: bytes) -> None:
        flags = "-xzf" if tar_bytes.startswith(GZIP_MAGIC) else "-xf"
        result = self._run(
            sandbox_id, ["/bin/sh", "-c", f'mkdir -p "$1" && tar {flags} - -C "$1"', "copy_in", directory],
            timeout_s=120, stdin=tar_bytes,
        )  # fmt: skip
        if result.exit_code != 0:
            raise SandboxError(f"copying files into {directory} failed: {result.output.strip()[-500:]}")

    def _run(
        self,
        sandbox_id: str,
        argv: list[str],
        timeout_s: float,
        workdir: str | None = None,
        stdin: bytes | None = None,
        output_limit: int | None = None,
    ) -> ExecResult:
        started = time.monotonic()
        try:
            created = daemon_call(self.api.exec_create, sandbox_id, argv, workdir=workdir, stdin=stdin is not None)
            exec_id = created["Id"]
            stream = self.api.exec_start(exec_id, socket=True)
        except docker.errors.NotFound:
            raise SandboxError("the sandbox container is gone") from None
        except docker.errors.APIError as exc:
            if "is not running" in str(exc):
                raise SandboxError("the sandbox container stopped") from None
            raise SandboxError(f"could not run a command in the sandbox: {_brief(exc)}") from None
        except requests.RequestException as exc:
            raise SandboxError(f"could not run a command in the sandbox: {_brief(exc)}") from None
        sock: socket.socket = getattr(stream, "_sock", stream)
        capture = OutputCapture(output_limit or settings.MEGAFLOW_OUTPUT_LIMIT_BYTES)
        deadline = started + timeout_s
        killer: _Killer | None = None
        timed_out, killed_reason = False, ""
        decoder = _FrameDecoder()
        try:
            if stdin is not None:
                sock.sendall(stdin)
                sock.shutdown(socket.SHUT_WR)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if killer is not None:
                        break  # killed, and drained for as long as we are willing to
                    timed_out = True
                    killer = _Killer(self, sandbox_id)
                    deadline = time.monotonic() + _DRAIN_AFTER_KILL_S
                    continue
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                for payload in decoder.feed(chunk):
                    capture.feed(payload)
                if killer is None and capture.total > settings.MEGAFLOW_OUTPUT_KILL_BYTES:
                    killed_reason = f"it printed more than {settings.MEGAFLOW_OUTPUT_KILL_BYTES} bytes"
                    killer = _Killer(self, sandbox_id)
                    deadline = time.monotonic() + _DRAIN_AFTER_KILL_S
        except OSError as exc:
            raise SandboxError(f"lost the connection to the sandbox: {exc}") from None
        finally:
            sock.close()
        if killer is not None:
            killer.join()
        elif _FORK_FAILED.search(capture.text()):
            # The sandbox is at its pid limit (a fork bomb, or too many background jobs) and would stay unusable.
            self._kill_all(sandbox_id)
            killed_reason = "the sandbox reached its process limit; every process in it was killed"
        return ExecResult.from_capture(capture, self._exit_code(exec_id), started, timed_out, killed_reason)

    def _exit_code(self, exec_id: str) -> int | None:
        for _ in range(20):
            try:
                info = daemon_call(self.api.exec_inspect, exec_id)
            except docker.errors.NotFound:
                # The daemon restarted during the command and forgot it; its container went with it.
                raise SandboxError("the sandbox's command was lost when the Docker daemon restarted") from None
            if not info["Running"]:
                return info["ExitCode"]
            time.sleep(0.05)
        return None

    def _kill_all(self, sandbox_id: str) -> None:
        """Kill every process of the sandbox except PID 1; if the sandbox cannot even start ``kill`` (its pid
        limit is exhausted by a fork bomb), stop the container: the episode then fails with that reason."""
        for _ in range(5):
            try:
                exec_id = daemon_call(self.api.exec_create, sandbox_id, ["/bin/sh", "-c", "kill -9 -1"])["Id"]
                self.api.exec_start(exec_id)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                time.sleep(0.2)
        self.api.kill(sandbox_id)
        raise SandboxError(
            "the sandbox's processes could not be stopped (pid limit exhausted); sandbox killed", retryable=False
        )


class _Killer(threading.Thread):
    """Kills the sandbox's processes while the caller keeps draining the exec stream: a daemon blocked on
    writing output that nobody reads would not start the kill."""

    def __init__(self, backend: DockerBackend, sandbox_id: str):
        super().__init__(daemon=True)
        self.backend, self.sandbox_id, self.error = backend, sandbox_id, None
        self.start()

    def run(self) -> None:
        try:
            self.backend._kill_all(self.sandbox_id)
        except SandboxError as error:
            self.error = error

    def join(self, timeout: float | None = 30) -> None:
        super().join(timeout)
        if self.error:
            raise self.error


class _FrameDecoder:
    """Splits a non-TTY exec stream into payloads: each frame is an 8-byte header (stream, length) + data."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data: bytes):
        self.buffer += data
        while len(self.buffer) >= _FRAME_HEADER.size:
            _stream, length = _FRAME_HEADER.unpack_from(self.buffer)
            end = _FRAME_HEADER.size + length
            if len(self.buffer) < end:
                return
            payload = bytes(self.buffer[_FRAME_HEADER.size : end])
            del self.buffer[:end]
            yield payload


def _brief(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip().splitlines()[0][:300]
