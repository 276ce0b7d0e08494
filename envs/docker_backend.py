"""Docker backend: one locked-down container per sandbox, driven through the docker SDK.

Sandbox defaults (DESIGN.md): no network, not privileged, every capability dropped (a task may add back what
it needs), ``no-new-privileges``, pids/memory/CPU limits, no host mounts, never the Docker socket, and labels
(``megaflow.episode``, ``megaflow.run``, ``megaflow.managed``, ``megaflow.deployment``) so the reaper can
find orphans.

PID 1 (``KEEPALIVE``) reaps the orphans it adopts and never forks once started: the kernel never lets
``kill -9 -1`` reach PID 1, and a fork bomb cannot make it exit. docker-init would not do: it exits when its
one child is killed.

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

An agent's commands (``run_agent_command``, the hot path) go through one long-lived shell per sandbox, opened
on first use: a request line in, the output framed by a per-shell nonce and closed with the exit status. A
command then costs a write and a read (~4 ms) instead of a docker exec's three API calls (~35-90 ms). A kill
takes that shell with everything else; the next command opens a new one. Setup, grading and resets use exec.

Commands run through exec with a host-side deadline. At the deadline, or when a command has printed more than
``MEGAFLOW_OUTPUT_KILL_BYTES``, every process in the container but PID 1 is killed (``kill -9 -1`` from a
fresh exec): that takes the whole process tree, including children that left the command's process group.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import secrets
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

# PID 1 must never need to fork: a fork bomb that holds every pid of the sandbox would make it fail, and a shell
# that cannot fork exits, taking the container down. Where the image has python3, PID 1 reaps adopted orphans
# with no fork at all; elsewhere a shell loop on ``wait`` (which forks a ``sleep`` once an hour).
_REAPER = """
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    if signal.sigwait({signal.SIGCHLD, signal.SIGTERM}) == signal.SIGTERM:
        break
"""
KEEPALIVE = [
    "/bin/sh", "-c",
    'command -v python3 >/dev/null && exec python3 -c "$0"; trap "exit 0" TERM; while :; do sleep 3600 & wait; done',
    _REAPER,
]  # fmt: skip
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
        self._shells: dict[str, _Shell] = {}
        self._shells_lock = threading.Lock()

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
        self._forget_shell(sandbox_id)
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

    def run_agent_command(
        self, sandbox_id: str, command: str, timeout_s: float, workdir: str | None = None,
        output_limit: int | None = None,
    ) -> ExecResult:  # fmt: skip
        if settings.MEGAFLOW_DOCKER_PERSISTENT_SHELL:
            with self._shell_of(sandbox_id) as shell:
                if shell is not None:
                    return shell.run(command, workdir or ".", timeout_s, output_limit)  # ".": where an exec starts
        return self.exec(sandbox_id, command, timeout_s, workdir=workdir, output_limit=output_limit)

    @contextlib.contextmanager
    def _shell_of(self, sandbox_id: str):
        """The sandbox's long-lived shell, held for one command; None while another thread holds it (a second
        command at once gets an exec of its own rather than waiting)."""
        with self._shells_lock:
            shell = self._shells.get(sandbox_id)
            if shell is None:
                shell = self._shells[sandbox_id] = _Shell(self, sandbox_id)
        if not shell.lock.acquire(blocking=False):
            yield None
            return
        try:
            yield shell
        finally:
            shell.lock.release()

    def _forget_shell(self, sandbox_id: str) -> None:
        with self._shells_lock:
            shell = self._shells.pop(sandbox_id, None)
        if shell is not None:
            shell.close()

    def copy_in(self, sandbox_id: str, directory: str, tar_bytes: bytes) -> None:
        flags = "-xzf" if tar_bytes.startswith(GZIP_MAGIC) else "-xf"
        result = self._run(
            sandbox_id, ["/bin/sh", "-c", f'mkdir -p "$1" && tar {flags} - -C "$1"', "copy_in", directory],
            timeout_s=120, stdin=tar_bytes,
        )  # fmt: skip
        if result.exit_code != 0:
            raise SandboxError(f"copying files into {directory} failed: {result.output.strip()[-500:]}")

    def _open_exec(self, sandbox_id: str, argv: list[str], workdir: str | None = None, stdin: bool = False,
                   environment: dict | None = None) -> tuple[str, socket.socket]:  # fmt: skip
        """A started exec in the sandbox and its raw stream."""
        try:
            created = daemon_call(self.api.exec_create, sandbox_id, argv, workdir=workdir, stdin=stdin,
                                  environment=environment)  # fmt: skip
            stream = self.api.exec_start(created["Id"], socket=True)
        except docker.errors.NotFound:
            raise SandboxError("the sandbox container is gone") from None
        except docker.errors.APIError as exc:
            if "is not running" in str(exc):
                raise SandboxError("the sandbox container stopped") from None
            raise SandboxError(f"could not run a command in the sandbox: {_brief(exc)}") from None
        except requests.RequestException as exc:
            raise SandboxError(f"could not run a command in the sandbox: {_brief(exc)}") from None
        return created["Id"], getattr(stream, "_sock", stream)

    def _run(
        self,
        sandbox_id: str,
        argv: list[str],
        timeout_s: float,
        workdir: str | None = None,
        stdin: bytes | None = None,
        output_limit: int | None = None,
    ) -> ExecResult:
        """One command as one exec: its stream ends when it does."""
        started = time.monotonic()
        exec_id, sock = self._open_exec(sandbox_id, argv, workdir, stdin=stdin is not None)
        reader = _CommandReader(self, sandbox_id, output_limit, started + timeout_s)
        try:
            if stdin is not None:
                sock.sendall(stdin)
                sock.shutdown(socket.SHUT_WR)
            reader.read(sock, _FrameDecoder(), reader.capture.feed)
        except OSError as exc:
            raise SandboxError(f"lost the connection to the sandbox: {exc}") from None
        finally:
            sock.close()
        killed_reason = reader.finish()
        return ExecResult.from_capture(reader.capture, self._exit_code(exec_id), started, reader.timed_out,
                                       killed_reason)  # fmt: skip

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


class _CommandReader:
    """Reads a command's output from its exec stream into a bounded capture, enforcing the deadline and the
    output kill limit: past either, every process in the sandbox but PID 1 is killed (``_Killer``) while the
    stream is drained for a moment longer."""

    def __init__(self, backend: DockerBackend, sandbox_id: str, output_limit: int | None, deadline: float):
        self.backend, self.sandbox_id, self.deadline = backend, sandbox_id, deadline
        self.capture = OutputCapture(output_limit or settings.MEGAFLOW_OUTPUT_LIMIT_BYTES)
        self.killer: _Killer | None = None
        self.timed_out, self.killed_reason = False, ""

    def read(self, sock: socket.socket, decoder: _FrameDecoder, sink) -> None:
        """Feed payloads to ``sink`` until it returns True (the command's end), the stream ends, or the drain
        after a kill runs out."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                if self.killer is not None:
                    return  # killed, and drained for as long as we are willing to
                self.timed_out = True
                self._kill()
                continue
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                return
            for payload in decoder.feed(chunk):
                if sink(payload):
                    return
            if self.killer is None and self.capture.total > settings.MEGAFLOW_OUTPUT_KILL_BYTES:
                self.killed_reason = f"it printed more than {settings.MEGAFLOW_OUTPUT_KILL_BYTES} bytes"
                self._kill()

    def _kill(self) -> None:
        self.killer = _Killer(self.backend, self.sandbox_id)
        self.deadline = time.monotonic() + _DRAIN_AFTER_KILL_S

    def finish(self) -> str:
        """Wait for a kill to complete, or kill a sandbox stuck at its pid limit; the reason it was killed."""
        if self.killer is not None:
            self.killer.join()
        elif _FORK_FAILED.search(self.capture.text()):
            # The sandbox is at its pid limit (a fork bomb, or too many background jobs) and would stay unusable.
            self.backend._kill_all(self.sandbox_id)
            return "the sandbox reached its process limit; every process in it was killed"
        return self.killed_reason


# A sandbox's long-lived shell. A request is one line, the workdir and the command base64-encoded (any bytes
# travel on one line). The shell acknowledges it (GO), runs it as ``sh -c`` with stdin closed and stderr merged
# into stdout, as an exec would, and closes its output with END and the exit status. $MEGAFLOW_MARK is a
# per-shell nonce, so no command prints a frame line by accident. Where the image has python3 the driver is a
# Python loop: a command that cannot fork (a sandbox at its pid limit) is an error it reports, where a POSIX
# shell would exit; elsewhere it is a shell loop.
_SHELL_DRIVER = """
import base64, os, subprocess, sys
mark, out = os.environ["MEGAFLOW_MARK"].encode(), sys.stdout.buffer
for line in sys.stdin.buffer:
    workdir, command = (base64.b64decode(part).decode(errors="replace") for part in line.split())
    out.write(mark + b" GO\\n")
    out.flush()
    try:
        code = subprocess.call(["/bin/sh", "-c", command], cwd=workdir, stdin=subprocess.DEVNULL, stdout=1,
                               stderr=subprocess.STDOUT)
        code = 128 - code if code < 0 else code
    except OSError as exc:
        out.write(f"megaflow: the command could not start: {exc}\\n".encode())
        code = 126
    out.write(b"\\n" + mark + b" END " + str(code).encode() + b"\\n")
    out.flush()
"""
_SHELL_LOOP = (
    'command -v python3 >/dev/null && exec python3 -c "$0"; '
    'while IFS=" " read -r wd cmd; do '
    'printf "%s GO\\n" "$MEGAFLOW_MARK"; '
    'wd=$(printf %s "$wd" | base64 -d); cmd=$(printf %s "$cmd" | base64 -d); '
    '(cd "$wd" && exec /bin/sh -c "$cmd") </dev/null 2>&1; '
    'printf "\\n%s END %s\\n" "$MEGAFLOW_MARK" "$?"; '
    "done"
)


class _Shell:
    """One long-lived ``sh`` per sandbox that runs its commands one at a time: a command costs a write and a
    read on an open stream instead of a docker exec's three API calls. Exit codes, the time limit, the output
    cap and the kill of the whole process tree work as for an exec. A kill takes the shell too (it is one of
    the sandbox's processes); the next command opens a new one."""

    def __init__(self, backend: DockerBackend, sandbox_id: str):
        self.backend, self.sandbox_id = backend, sandbox_id
        self.lock = threading.Lock()
        self.mark = f"\x1eMEGAFLOW-{secrets.token_hex(8)}"
        self.exec_id: str | None = None
        self.sock: socket.socket | None = None
        self.decoder = _FrameDecoder()

    def _open(self) -> None:
        self.exec_id, self.sock = self.backend._open_exec(
            self.sandbox_id,
            ["/bin/sh", "-c", _SHELL_LOOP, _SHELL_DRIVER],
            stdin=True,
            environment={"MEGAFLOW_MARK": self.mark},
        )
        self.decoder = _FrameDecoder()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None

    def run(self, command: str, workdir: str, timeout_s: float, output_limit: int | None) -> ExecResult:
        started = time.monotonic()
        request = b" ".join(base64.b64encode(part.encode()) for part in (workdir, command)) + b"\n"
        for _ in range(2):  # a shell that died since its last command (killed with the rest) is replaced once
            if self.sock is None:
                self._open()
            reader = _CommandReader(self.backend, self.sandbox_id, output_limit, started + timeout_s)
            frame = _ShellFrame(self.mark.encode(), reader.capture)
            try:
                self.sock.sendall(request)
                reader.read(self.sock, self.decoder, frame.feed)
            except OSError:
                pass  # a dead shell's stream: told apart below by whether the command was acknowledged
            if frame.exit_code is not None:
                break
            self.close()
            if frame.acknowledged or reader.killer is not None:
                break  # the command ran and took the shell with it (a kill, the OOM killer, ``kill -9 -1``)
        killed_reason = reader.finish()
        exit_code = frame.exit_code
        if exit_code is None:
            frame.flush()
            exit_code = self.backend._exit_code(self.exec_id) if self.exec_id else None
        return ExecResult.from_capture(reader.capture, exit_code, started, reader.timed_out, killed_reason)


class _ShellFrame:
    """Splits a shell's output into one command's: after its GO line, up to the END line with its status."""

    def __init__(self, mark: bytes, capture: OutputCapture):
        self.go, self.end = mark + b" GO\n", b"\n" + mark + b" END "
        self.capture = capture
        self.pending = bytearray()
        self.acknowledged = False
        self.exit_code: int | None = None

    def feed(self, payload: bytes) -> bool:
        self.pending += payload
        if not self.acknowledged:
            at = self.pending.find(self.go)
            if at < 0:
                return False
            del self.pending[: at + len(self.go)]
            self.acknowledged = True
        at = self.pending.find(self.end)
        if at >= 0:
            line_end = self.pending.find(b"\n", at + len(self.end))
            if line_end < 0:
                return False
            self.capture.feed(bytes(self.pending[:at]))
            self.exit_code = int(self.pending[at + len(self.end) : line_end])
            return True
        # Keep what could be the start of the END line; the rest is output.
        keep = len(self.end) - 1
        if len(self.pending) > keep:
            self.capture.feed(bytes(self.pending[:-keep]))
            del self.pending[:-keep]
        return False

    def flush(self) -> None:
        """The command's stream ended without its END line: what is pending was output."""
        if self.acknowledged and self.pending:
            self.capture.feed(bytes(self.pending))
            self.pending.clear()


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
