"""Real ``celery worker`` subprocesses started from their ``WorkerSpec``: the test suite's workers and the
benchmark's. Each consumes one queue and is stopped by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from celery.utils.nodenames import host_format
from kombu.exceptions import OperationalError

from megaflow_site.celery import app
from megaflow_site.topology import WorkerSpec

REPO = Path(__file__).resolve().parents[2]  # tests/support/ → the repository
WORKER_START_TIMEOUT_S = 60


@dataclass
class WorkerProcess:
    spec: WorkerSpec
    node: str
    process: subprocess.Popen
    log: Path
    index: int = 1  # > 1: another worker of the same queue, beside the first


class CeleryWorkers:
    """Real ``celery worker`` subprocesses; each consumes one queue and is stopped by its pid."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "pytest"):
        self.env = env
        # Per-queue additions to ``env``: one env pool's workers may run another backend, as on their own hosts.
        self.queue_env: dict[str, dict[str, str]] = {}
        self.log_dir = log_dir
        self.name = name
        self.by_queue: dict[str, WorkerProcess] = {}  # the latest worker started for each queue
        self.extra: list[WorkerProcess] = []  # further workers of a queue (start(..., index=2))
        self.beat: subprocess.Popen | None = None

    @property
    def nodes(self) -> list[str]:
        return [worker.node for worker in self.by_queue.values()]

    def ask(self, command: str, timeout: float = 5) -> dict[str, dict]:
        """Each running worker's reply to the remote-control command ``command`` (an inspect command), by node."""
        running = [worker.node for worker in (*self.by_queue.values(), *self.extra) if worker.process.poll() is None]
        replies = app.control.broadcast(command, destination=running, reply=True, timeout=timeout)
        return {node: reply for replied in replies for node, reply in replied.items()}

    def node_for(self, queue: str) -> str:
        return self.by_queue[queue].node

    def start(self, spec: WorkerSpec, index: int = 1) -> WorkerProcess:
        """Start a worker for ``spec``; ``index`` > 1 starts another one beside the first, as a pool scales."""
        suffix = f"-{index}" if index > 1 else ""
        node = host_format(f"{spec.queue.replace('.', '-')}{suffix}@{self.name}-{os.getpid()}")
        log = self.log_dir / f"{node}.log"
        argv = spec.argv(node_name=node)
        argv[0] = str(Path(sys.executable).with_name("celery"))
        env = {**self.env, **spec.environment, **self.queue_env.get(spec.queue, {})}
        process = subprocess.Popen(
            # Appended: a worker started in place of one that died keeps its predecessor's last words.
            argv,
            cwd=REPO,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        worker = WorkerProcess(spec, node, process, log, index)
        if index > 1:
            self.extra.append(worker)
        else:
            self.by_queue[spec.queue] = worker
        return worker

    def start_beat(self, schedule: Path, loglevel: str = "INFO") -> None:
        """celery beat, as in production: admission catch-up, the episode watchdog, the reaper."""
        argv = [str(Path(sys.executable).with_name("celery")), "-A", "megaflow_site", "beat", "--loglevel", loglevel,
                "--schedule", str(schedule)]  # fmt: skip
        log = (self.log_dir / "beat.log").open("wb")
        self.beat = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def everyone(self) -> list[WorkerProcess]:
        return [*self.by_queue.values(), *self.extra]

    def replace(self, worker: WorkerProcess) -> WorkerProcess:
        """Start a new worker in the place of ``worker`` (which exited): same queue, same node name."""
        if worker in self.extra:
            self.extra.remove(worker)
        return self.start(worker.spec, worker.index)

    def wait_ready(self, workers: list[WorkerProcess]) -> None:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        pending = {worker.node: worker for worker in workers}
        # The broker may itself be down for a moment (a chaos run restarts it): keep asking until the deadline.
        # kombu re-raises the transport's connection errors as its own OperationalError.
        broker_down = (OperationalError, *app.connection_for_read().connection_errors)
        while pending:
            try:
                replies = app.control.ping(destination=list(pending), timeout=0.5)
            except broker_down:
                replies = []
                time.sleep(0.5)
            for reply in replies:
                for node in reply:
                    pending.pop(node, None)
            for worker in pending.values():
                if worker.process.poll() is not None:
                    raise RuntimeError(f"worker {worker.node} exited at start:\n{worker.log.read_text()[-3000:]}")
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(pending)} did not answer within {WORKER_START_TIMEOUT_S} s")

    def kill(self, queue: str) -> WorkerProcess:
        """kill -9 the queue's worker (its unacknowledged messages come back after the visibility timeout) and
        start a new one in its place."""
        old = self.by_queue[queue]
        old.process.kill()
        old.process.wait()
        worker = self.start(old.spec)
        self.wait_ready([worker])
        return worker

    def restart(self, queue: str) -> WorkerProcess:
        """Stop the queue's worker and start a new one in its place (worker start-up hooks run again)."""
        self.stop(self.by_queue[queue])
        worker = self.start(self.by_queue[queue].spec)
        self.wait_ready([worker])
        return worker

    def stop(self, worker: WorkerProcess, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if worker.process.poll() is None:
            worker.process.send_signal(sig)
            try:
                worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()

    def stop_all(self) -> None:
        if self.beat is not None:
            self.beat.terminate()
            self.beat.wait(20)
        everyone = self.everyone
        for worker in everyone:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in everyone:
            self.stop(worker)
