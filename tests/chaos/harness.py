"""``make chaos``: runs of many episodes through real workers while faults are injected, and the proof after.

Each fault gets its own run (``--episodes``, 200 by default) on the ``sim`` model and ``sim`` environment backend
(short fixed latencies), so that what is measured is the orchestration's recovery. The stack is the real one:
a worker per queue plus beat (the watchdog), a Redis server of its own (append-only, as a production broker
should be, so that it can be restarted without disturbing anyone else's), PostgreSQL. The Docker faults run
their episodes in real containers instead, on an env pool ``docker`` served by a dockerd of the chaos run's own
(its own socket, data root and containerd namespace), which can be restarted without touching anyone else's.

Faults: ``kill-workers`` (kill -9 a random worker of each service, repeatedly, and start a new one),
``sigterm-worker`` (SIGTERM each service's worker: Celery's warm shutdown finishes or requeues in-flight
work), ``restart-redis`` (the broker goes away mid-run and comes back), ``restart-docker`` (the Docker daemon
stops mid-run, taking every sandbox with it, and comes back), ``kill-containers`` (sandboxes killed from
outside, round after round), ``model-faults`` (the run's model, a real tiny model in modelserving/hf_server.py
behind a fault-injecting proxy, tests/support/fault_proxy.py, answers 500s, then hangs past the client's
timeout, then recovers). As systemd or Kubernetes would, a supervisor starts a new worker in place of one
that exited on its own; the report counts those as "restarted".

``--production`` runs with the shipped defaults (no shortened task time limit or visibility timeout: recovery
must come from worker liveness, megaflow_site/liveness.py), every episode in a real container, and its own
faults, each on its own run, with two workers of each model and env queue (``--workers-per-pool``), as a
deployment runs several: ``kill-every-20s`` (kill -9 a random worker of each service every 20 s, restarted
at once), ``kill-all`` (SIGKILL every worker at once, restarted 30 s later), ``redis-save`` / ``redis-nosave``
(``SHUTDOWN`` / ``SHUTDOWN NOSAVE`` of a broker without an append-only file: the second comes back empty),
``restart-docker``, and ``none`` (the fault-free time the others are compared with).

It runs on a database of its own (``MEGAFLOW_CHAOS_DATABASE_URL``, by default ``megaflow_chaos``), emptied when it
starts: a run that an earlier, killed harness left live would hold the fleet's live slots in this one.

For every fault it also reports the time to recover: from each fault to the first progress (a step, a new
status or attempt) of each episode live at that moment, p50 and p99. The harness rides out a broker that is
away in every call it makes, and prints its table whatever happened. Everything it starts (workers, beat, Redis,
dockerd, the model server) stays in its process group, and SIGTERM stops them all: whoever runs it in a session
of its own (tests/test_chaos.py) kills the group, and nothing outlives a harness that timed out.

For every fault it reports episodes, terminal, lost (not terminal when the run's deadline passed), duplicated
steps (a trajectory whose indexes are not exactly 0..n-1), retried (episodes on a second attempt) and failures
without a recorded reason, writes ``chaos-results.json``, and exits 1 if any run lost an episode, duplicated
a step or failed one without saying why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in main(), once the environment is set: it loads the Celery app
    from tests.support.worker_processes import CeleryWorkers

from tests.support.fault_proxy import FaultProxy
from tests.support.tiny_model import TINY_AGENT_CONFIG

REPO = Path(__file__).resolve().parents[2]
CHAOS_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/megaflow_chaos"
CHAOS_REDIS_PORT = 6391


def model_port(args) -> int:
    """Where the workers reach the model: the fault proxy, in front of the real server one port up."""
    return args.redis_port + 1000


def data_dir_for(args) -> Path:
    return REPO / "var" / "chaos" / str(args.redis_port)  # two chaos runs on one machine keep apart by port


def chaos_environment(args) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "megaflow_site.settings",
        "DATABASE_URL": os.environ.get("MEGAFLOW_CHAOS_DATABASE_URL", CHAOS_DATABASE_URL),
        "MEGAFLOW_REDIS_URL": f"redis://127.0.0.1:{args.redis_port}/0",
        "MEGAFLOW_DATA_DIR": str(data_dir_for(args)),
        "MEGAFLOW_MODELS": "sim,tiny" if "model-faults" in args.faults else "sim",
        # With --production every episode runs in a container: one env pool, so each kill hits a busy worker.
        "MEGAFLOW_ENV_POOLS": "docker" if args.production else "default,docker" if uses_docker(args) else "default",
        "MEGAFLOW_ENV_BACKEND": "sim",
        "MEGAFLOW_MODEL_CONFIG": json.dumps(
            {
                "sim": {"backend": "sim", "latency_s": 0.05, "steps": args.steps},
                # A real HTTP model server (modelserving/hf_server.py) behind the proxy the model-faults run drives.
                "tiny": {
                    "backend": "openai",
                    "base_url": f"http://127.0.0.1:{model_port(args)}/v1",
                    "timeout_s": 5,
                    "max_attempts": 2,
                    "backoff_s": 0.2,
                },
            }
        ),  # fmt: skip
        "MEGAFLOW_SIM_EXEC_LATENCY_S": "0.05",
        "MEGAFLOW_MAX_LIVE_EPISODES": str(args.concurrency),
        "MEGAFLOW_LOG_LEVEL": "WARNING",
    } | (
        {}  # the shipped defaults: 900 s task limit, 3,600 s visibility timeout, 30 s dead-worker window
        if args.production
        else {
            # Short enough that a message lost with a killed worker comes back, or is re-driven, within minutes.
            "MEGAFLOW_TASK_TIME_LIMIT_S": "30",
            "MEGAFLOW_VISIBILITY_TIMEOUT_S": "60",
            "MEGAFLOW_RETRY_BACKOFF_S": "1",
            "MEGAFLOW_DOCKER_RECONNECT_S": "60",
        }
    )


def uses_docker(args) -> bool:
    return args.production or bool(DOCKER_FAULTS & set(args.faults.split(",")))


def kill_leftovers(data_dir: Path) -> list[int]:
    """SIGKILL what a harness on ``data_dir`` left running when it was itself SIGKILLed: the processes that name the
    directory (its dockerd's containerd shims, which leave the harness's process group, and redis-server), and
    their children (the sandboxes the shims ran). Returns their ids."""
    marker = f"{data_dir}/".encode()
    mine = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                mine.append(int(entry.name))
        except OSError:
            continue  # it ended meanwhile, or is not ours to read
    children = []
    for pid in mine:
        try:
            children += [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            pass
    for pid in children + mine:  # a shim outlives its container's exit: the children first, then the shims
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return children + mine


class Broker:
    """A redis-server of the chaos run's own that a fault may stop and start: append-only, or (``snapshots``)
    persisted only by the snapshot ``SHUTDOWN`` writes, so that ``SHUTDOWN NOSAVE`` loses everything."""

    def __init__(self, port: int, data_dir: Path, snapshots: bool = False):
        self.port, self.data_dir, self.snapshots = port, data_dir, snapshots
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "no"] if self.snapshots else ["--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *persistence,
             "--save", "", "--dir", str(self.data_dir)],
            stdout=(self.data_dir / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.data_dir / 'redis.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis-server flushes its append-only file and exits
            self.process.wait(30)

    def shutdown(self, save: bool) -> None:
        """``SHUTDOWN SAVE`` (its data comes back) or ``SHUTDOWN NOSAVE`` (it comes back empty)."""
        subprocess.run(["redis-cli", "-p", str(self.port), "SHUTDOWN", "SAVE" if save else "NOSAVE"],
                       capture_output=True, timeout=30)  # fmt: skip
        if self.process:
            self.process.wait(30)
        if not save:
            (self.data_dir / "dump.rdb").unlink(missing_ok=True)  # no older snapshot either: a fresh replica


class DockerDaemon:
    """A dockerd of the chaos run's own: its own socket, data root, exec root and containerd namespace, no
    network (as bootstrap.sh starts the shared one). Restarting it disturbs no one else's containers."""

    def __init__(self, root: Path, namespace: str = "megaflow-chaos"):
        self.root, self.namespace = root, namespace  # two daemons on one machine need containerd namespaces apart
        self.host = f"unix://{root / 'docker.sock'}"
        self.process: subprocess.Popen | None = None

    def docker(self, *argv: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", self.host, *argv], capture_output=True, **kwargs)

    def start(self) -> None:
        (self.root / "exec").mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["dockerd", "--host", self.host, "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
             "--containerd-namespace", self.namespace, "--containerd-plugins-namespace", f"{self.namespace}-plugins",
             "--bridge=none", "--iptables=false", "--ip6tables=false"],
            # In the harness's process group, as everything it starts: killing the group leaves nothing behind.
            stdout=(self.root / "dockerd.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(300):
            if self.docker("info").returncode == 0:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"dockerd did not start; see {self.root / 'dockerd.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # stops the containers (no live-restore), as a daemon upgrade would
            self.process.wait(60)

    def ensure_image(self, image: str) -> None:
        """Copy ``image`` from the shared daemon, once (the data root outlives chaos runs)."""
        if self.docker("image", "inspect", image).returncode == 0:
            return
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        loaded = self.docker("load", stdin=save.stdout)
        save.wait()
        if save.returncode or loaded.returncode:
            raise RuntimeError(f"could not copy {image} into the chaos dockerd: {loaded.stderr.decode()[-500:]}")

    def sandboxes(self) -> list[str]:
        listed = self.docker("ps", "-q", "--filter", "label=megaflow.managed=1", text=True)
        return listed.stdout.split()


class RecoveryClock:
    """Time to recover: from each fault to the first progress (a completed step, a new status or attempt) of
    each episode that was live at that moment, sampled every half second by a thread of its own."""

    def __init__(self, run_id: int):
        self.run_id = run_id
        self.pending: dict[int, tuple[tuple, float]] = {}  # episode → (its progress marker at the fault, when)
        self.seconds: list[float] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _markers(self, **where) -> dict[int, tuple]:
        from orchestrator.models import Episode

        rows = Episode.objects.filter(**where).values_list("pk", "status", "attempt", "step_count")
        return {pk: (status, attempt, steps) for pk, status, attempt, steps in rows}

    def fault(self, since: float | None = None) -> None:
        """The fault happens now (or happened at ``since``, a ``time.monotonic()``): each live episode's clock runs
        from there until its marker moves from what it is now."""
        from orchestrator.transitions import LIVE

        at = time.monotonic() if since is None else since
        try:
            live = self._markers(run_id=self.run_id, status__in=LIVE)
        except Exception as error:  # the database is not the fault under test; never let it end the run
            print(f"recovery clock: {error!r}", flush=True)
            return
        with self.lock:
            for pk, marker in live.items():
                self.pending.setdefault(pk, (marker, at))  # an episode not yet recovered keeps its first fault

    def fault_after_kill(self, killed_at: float, patience_s: float = 5.0) -> None:
        """``fault(since=killed_at)``, with the markers read once the database stopped moving: a statement a killed
        worker had sent still commits (PostgreSQL finishes it after its client is gone), and that is the last
        move of the process that died, not progress made while it was down. Whatever still moves after
        ``patience_s`` is counted as progress."""
        from orchestrator.transitions import LIVE

        deadline, before = time.monotonic() + patience_s, None
        while time.monotonic() < deadline:
            try:
                now = self._markers(run_id=self.run_id, status__in=LIVE)
            except Exception:
                break
            if now == before:
                break
            before = now
            time.sleep(1.0)
        self.fault(since=killed_at)

    def _sample(self) -> None:
        from django.db import connection

        while not self.stopped.wait(0.5):
            self._sample_once()
        connection.close()

    def _sample_once(self) -> None:
        with self.lock:
            waiting = dict(self.pending)
        if not waiting:
            return
        try:
            now_markers, now = self._markers(pk__in=list(waiting)), time.monotonic()
        except Exception:
            return
        with self.lock:
            for pk, (marker, at) in waiting.items():
                if now_markers.get(pk, marker) != marker:
                    self.seconds.append(now - at)
                    self.pending.pop(pk, None)

    def stop(self) -> dict:
        self.stopped.set()
        self.thread.join(10)
        # A last look: the run ends the moment its slowest episode does, and when that episode's only move since
        # the fault is its last (a lost grading re-driven), the run can end between two samples.
        self._sample_once()
        return {
            "affected": len(self.seconds) + len(self.pending),
            "unrecovered": len(self.pending),
            # Which, and how each stood at its fault: status, attempt, steps.
            "unrecovered_at_fault": {pk: marker for pk, (marker, _) in self.pending.items()},
            "recover_p50_s": percentile(self.seconds, 0.50),
            "recover_p99_s": percentile(self.seconds, 0.99),
        }


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)], 1)


# --- faults ------------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """What a fault may break."""

    workers: CeleryWorkers
    broker: Broker
    model: FaultProxy | None
    docker: DockerDaemon | None
    clock: RecoveryClock | None = None


# Faults and the supervisor below both replace workers; one at a time.
WORKERS_LOCK = threading.Lock()


def supervise(workers) -> list[str]:
    """What systemd or Kubernetes does in a deployment: start a new worker in place of each one that exited, all
    at once, and keep trying while a new one cannot start (its preflight refuses an unreachable broker)."""
    with WORKERS_LOCK:
        exited = [worker for worker in workers.everyone if worker.process.poll() is not None]
        started = [workers.replace(worker) for worker in exited]
        try:
            workers.wait_ready(started)
        except RuntimeError:
            pass  # e.g. the broker is down and a worker refused to start: tried again next time
    return [f"{worker.node} (exit {worker.process.returncode})" for worker in exited]


def one_worker_at_a_time(stop: threading.Event, queues: list[str], act, label: str) -> list[str]:
    """``act(queue)`` on each queue's worker in turn, 2 s apart, until the run ends."""
    done = []
    for queue in queues:
        if stop.wait(2.0):
            return done
        with WORKERS_LOCK:
            act(queue)
        done.append(f"{label} {queue}")
    return done


def kill_workers(stack: Stack, stop: threading.Event) -> list[str]:
    queues = sorted(stack.workers.by_queue)
    rounds = [queue for _ in range(3) for queue in random.sample(queues, len(queues))]
    return one_worker_at_a_time(stop, rounds, stack.workers.kill, "kill -9")


def sigterm_worker(stack: Stack, stop: threading.Event) -> list[str]:
    return one_worker_at_a_time(stop, sorted(stack.workers.by_queue), stack.workers.restart, "SIGTERM")


def restart_redis(stack: Stack, stop: threading.Event) -> list[str]:
    if stop.wait(2.0):
        return []
    if stack.clock:
        stack.clock.fault()
    stack.broker.stop()
    time.sleep(5)
    stack.broker.start()
    return ["redis-server stopped for 5 s"]


def restart_docker(stack: Stack, stop: threading.Event) -> list[str]:
    if stop.wait(4.0):
        return []
    running = len(stack.docker.sandboxes())
    if stack.clock:
        stack.clock.fault()
    stack.docker.stop()
    time.sleep(5)
    stack.docker.start()
    return [f"dockerd stopped for 5 s with {running} sandboxes running"]


def kill_containers(stack: Stack, stop: threading.Event) -> list[str]:
    """Every 2 s, kill a few of the running sandboxes from outside (an OOM killer, an operator, a node agent)."""
    done = []
    for _ in range(5):
        if stop.wait(2.0):
            return done
        running = stack.docker.sandboxes()
        victims = random.sample(running, min(5, len(running)))
        killed = stack.docker.docker("kill", *victims, text=True).stdout.split() if victims else []
        done.append(f"docker kill: {len(killed)} of {len(running)} sandboxes")
    return done


def model_faults(stack: Stack, stop: threading.Event) -> list[str]:
    """The model server answers 500, then hangs past the client's timeout, then comes back."""
    done = []
    for fault, hold_s in (({"status": 500, "count": 40}, 4), ({"hang_s": 8, "count": 6}, 8), ({}, 0)):
        if stop.wait(1.0):
            return done
        stack.model.inject(**fault)
        done.append(f"model server: {fault or 'healthy again'}")
        stop.wait(hold_s)
    return done


def kill_every_20s(stack: Stack, stop: threading.Event) -> list[str]:
    """Every 20 s, kill -9 a random worker of each service; the supervisor (and ``kill``) start new ones."""
    done = []
    while not stop.wait(20.0):
        with WORKERS_LOCK:
            by_service: dict[str, list] = {}
            for worker in stack.workers.everyone:
                by_service.setdefault(worker.spec.service, []).append(worker)
            victims = [random.choice(workers) for workers in by_service.values()]
            stack.clock.fault()
            for worker in victims:
                worker.process.kill()
            for worker in victims:
                worker.process.wait()
        done.append(f"kill -9 {', '.join(worker.node for worker in victims)}")
    return done


def once_episodes_run(stack: Stack, stop: threading.Event, after_s: float = 3.0) -> bool:
    """Wait ``after_s``, and then until some episode of the run is live (a worker the last fault killed may still
    be starting): a one-shot fault that hits an idle run measures nothing. False if the run ended first (the
    fault is not injected, and the row shows nothing affected; the run does not wait for it)."""
    from orchestrator.models import Episode, Run
    from orchestrator.transitions import LIVE

    if stop.wait(after_s):
        return False
    while not Episode.objects.filter(run_id=stack.clock.run_id, status__in=LIVE).exists():
        if Run.objects.filter(pk=stack.clock.run_id, status__in=Run.TERMINAL).exists() or stop.wait(0.5):
            return False
    return True


def kill_all(stack: Stack, stop: threading.Event) -> list[str]:
    """SIGKILL every worker at once; they are started again 30 s later (the supervisor waits for the lock)."""
    if not once_episodes_run(stack, stop):
        return []
    with WORKERS_LOCK:
        killed_at = time.monotonic()
        everyone = stack.workers.everyone
        for worker in everyone:
            worker.process.kill()
        for worker in everyone:
            worker.process.wait()
        stack.clock.fault_after_kill(killed_at)
        time.sleep(max(0.0, killed_at + 30 - time.monotonic()))
    return [f"SIGKILL of {len(everyone)} workers, restarted 30 s later"]


def redis_shutdown(save: bool):
    def fault(stack: Stack, stop: threading.Event) -> list[str]:
        if not once_episodes_run(stack, stop):
            return []
        stack.clock.fault()
        stack.broker.shutdown(save)
        time.sleep(5)
        stack.broker.start()
        return [f"redis SHUTDOWN {'SAVE' if save else 'NOSAVE'}, back after 5 s"]

    return fault


def no_fault(stack: Stack, stop: threading.Event) -> list[str]:
    return []


FAULTS = {"kill-workers": kill_workers, "sigterm-worker": sigterm_worker, "restart-redis": restart_redis,
          "restart-docker": restart_docker, "kill-containers": kill_containers,
          "model-faults": model_faults}  # fmt: skip
PRODUCTION_FAULTS = {"none": no_fault, "kill-every-20s": kill_every_20s, "kill-all": kill_all,
                     "redis-save": redis_shutdown(True), "redis-nosave": redis_shutdown(False),
                     "restart-docker": restart_docker}  # fmt: skip
PERIODIC_FAULTS = {"kill-every-20s"}
MODEL_OF_FAULT = {"model-faults": "tiny"}
DOCKER_FAULTS = {"restart-docker", "kill-containers"}  # their episodes run in real containers, on pool "docker"


# --- one run under one fault ----------------------------------------------------------------------------------------


def audit(run) -> dict:
    """The proof: every episode terminal, no step twice, every failure with its reason."""
    from django.db.models import Count

    from orchestrator.models import Episode

    episodes = list(run.episodes.all())
    terminal = [episode for episode in episodes if episode.status in Episode.TERMINAL]
    duplicated = 0
    for episode in episodes:
        indexes = list(episode.steps.order_by("index").values_list("index", flat=True))
        duplicated += indexes != list(range(len(indexes)))
    silent = [e.pk for e in terminal if e.status != Episode.Status.SUCCEEDED and not e.failure_reason]
    return {
        "episodes": len(episodes),
        "terminal": len(terminal),
        "lost": len(episodes) - len(terminal),
        "duplicated_steps": duplicated,
        "retried": sum(episode.attempt > 1 for episode in episodes),
        "failed_without_reason": len(silent),
        "statuses": dict(run.episodes.values_list("status").annotate(n=Count("pk")).order_by()),
        "run_status": run.status,
    }


def run_under(fault: str, stack: Stack, args) -> dict:
    from megaflow_site.celery import app
    from orchestrator.models import Dataset, Run, Task

    dataset, _ = Dataset.objects.get_or_create(name="chaos")
    task, _ = Task.objects.get_or_create(
        dataset=dataset, instance_id="chaos-1",
        defaults={"problem_statement": "Chaos episode.", "test_command": "true", "fail_to_pass": ["t"]},
    )  # fmt: skip
    run = Run.objects.create(name=f"chaos {fault}", dataset=dataset, model_name=MODEL_OF_FAULT.get(fault, "sim"),
                             agent_config=TINY_AGENT_CONFIG if fault in MODEL_OF_FAULT else {},
                             env_pool="docker" if args.production or fault in DOCKER_FAULTS else "default",
                             samples_per_task=args.episodes, max_concurrent_episodes=args.concurrency,
                             max_steps=args.steps + 2, max_attempts=3)  # fmt: skip
    run.tasks.set([task])
    began = time.monotonic()
    ride_out_the_broker(lambda: app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk}))
    stop = threading.Event()
    injected: list[str] = []
    stack.clock = RecoveryClock(run.pk)
    inject = (PRODUCTION_FAULTS if args.production else FAULTS)[fault]

    def injector_body() -> None:
        try:
            injected.extend(inject(stack, stop))
        except Exception as error:  # the harness outlives its faults: note it and let the run be judged
            injected.append(f"the fault raised {error!r}")

    injector = threading.Thread(target=injector_body, daemon=True)  # a harness told to stop does not wait for it
    injector.start()
    deadline = time.monotonic() + args.timeout
    restarted: list[str] = []
    while time.monotonic() < deadline:
        try:
            restarted += supervise(stack.workers)
            run.refresh_from_db()
        except Exception as error:
            print(f"chaos: supervisor: {error!r}", flush=True)
        # A one-shot fault is always injected (the run waits for it); a periodic one ends with the run.
        if run.status in Run.TERMINAL and (not injector.is_alive() or fault in PERIODIC_FAULTS):
            break
        time.sleep(1)
    stop.set()
    injector.join()
    recovery = stack.clock.stop()
    run.refresh_from_db()
    seconds = round(time.monotonic() - began, 1)
    return {"fault": fault, "injected": injected, "supervisor_restarts": restarted, "seconds": seconds,
            **recovery, **audit(run)}  # fmt: skip


def ride_out_the_broker(call, patience_s: float = 120):
    """``call()``, again and again while the broker is away (kombu raises its OperationalError)."""
    from kombu.exceptions import OperationalError

    deadline = time.monotonic() + patience_s
    while True:
        try:
            return call()
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def start_model_server(args, log_dir: Path) -> subprocess.Popen:
    """The tiny model (random weights, built locally) in modelserving.hf_server, as the tests run it, one port
    above the fault proxy's."""
    import httpx

    from tests.support.tiny_model import build_tiny_model

    path = build_tiny_model(data_dir_for(args) / "tiny-model")
    port = model_port(args) + 1
    process = subprocess.Popen(
        [sys.executable, "-m", "modelserving.hf_server", "--model-path", str(path), "--served-model-name", "tiny",
         "--port", str(port)],
        cwd=REPO, stdout=(log_dir / "model-server.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"the model server did not start; see {log_dir / 'model-server.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    production_help = "the shipped defaults, real containers, and the faults " + ", ".join(PRODUCTION_FAULTS)
    parser.add_argument("--production", action="store_true", help=production_help)
    parser.add_argument("--faults", help=f"comma-separated, of {', '.join(FAULTS)} (or, with --production, of "
                        f"{', '.join(PRODUCTION_FAULTS)}); default: all")  # fmt: skip
    parser.add_argument("--episodes", type=int, help="per fault (default 200; 100 with --production)")
    parser.add_argument("--concurrency", type=int, help="live episodes (default 50; 32 with --production)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers-per-pool", type=int, help="workers of each model and env queue (default 1; 2 "
                        "with --production)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take before it is judged")
    parser.add_argument("--redis-port", type=int, default=CHAOS_REDIS_PORT)
    parser.add_argument("--output", default="chaos-results.json")
    args = parser.parse_args()
    catalogue = PRODUCTION_FAULTS if args.production else FAULTS
    args.faults = args.faults or ",".join(catalogue)
    args.episodes = args.episodes or (100 if args.production else 200)
    args.concurrency = args.concurrency or (32 if args.production else 50)
    args.workers_per_pool = args.workers_per_pool or (2 if args.production else 1)
    faults = args.faults.split(",")
    if unknown := set(faults) - set(catalogue):
        parser.error(f"unknown fault(s): {', '.join(sorted(unknown))}")

    # SIGTERM (tests/test_chaos.py sends it to the harness's process group on timeout) runs the cleanup below.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if args.production:  # the shipped defaults, whatever the calling environment (a test session) set
        for name in ("MEGAFLOW_TASK_TIME_LIMIT_S", "MEGAFLOW_VISIBILITY_TIMEOUT_S", "MEGAFLOW_RETRY_BACKOFF_S",
                     "MEGAFLOW_DOCKER_RECONNECT_S", "MEGAFLOW_WORKER_DEAD_S", "MEGAFLOW_WORKER_HEARTBEAT_S",
                     "MEGAFLOW_WATCHDOG_INTERVAL_S"):  # fmt: skip
            os.environ.pop(name, None)
    os.environ.update(chaos_environment(args))
    data_dir = data_dir_for(args)
    shutil.rmtree(data_dir / "redis", ignore_errors=True)  # an aborted run's queues must not replay into this one
    broker = Broker(args.redis_port, data_dir / "redis", snapshots=args.production)
    broker.start()
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from megaflow_site.topology import Service, all_worker_specs
    from tests.support.databases import ensure_database
    from tests.support.worker_processes import CeleryWorkers

    ensure_database(os.environ["DATABASE_URL"])
    call_command("migrate", verbosity=0)
    empty_the_database(settings.DATABASES["default"]["NAME"])
    log_dir = data_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = CeleryWorkers({**os.environ}, log_dir, name="chaos")
    workers.start_beat(data_dir / "celerybeat-schedule", loglevel="WARNING")
    rows = []
    model_server, model_proxy, docker = None, None, None
    try:
        if "model-faults" in faults:
            model_server = start_model_server(args, log_dir)
            model_proxy = FaultProxy(f"http://127.0.0.1:{model_port(args) + 1}", port=model_port(args)).start()
        if uses_docker(args):
            docker = DockerDaemon(data_dir / "docker")
            docker.start()
            docker.ensure_image(settings.MEGAFLOW_BASE_IMAGE)
            workers.queue_env["env.docker"] = {"MEGAFLOW_ENV_BACKEND": "docker", "DOCKER_HOST": docker.host}
        stack = Stack(workers, broker, model_proxy, docker)
        started = [workers.start(spec) for spec in all_worker_specs()]
        # A service of one worker is wholly down after each of kill-every-20s's kills: a deployment runs several.
        started += [workers.start(spec, index) for spec in all_worker_specs() if spec.service is not Service.AGENT
                    for index in range(2, args.workers_per_pool + 1)]  # fmt: skip
        workers.wait_ready(started)
        for fault in faults:
            try:
                rows.append(run_under(fault, stack, args))
            except Exception as error:  # one fault's run broke the harness: the others still run
                rows.append({"fault": fault, "error": repr(error)})
            print(format_row(rows[-1]), flush=True)
    finally:
        for stop in (workers.stop_all, broker.stop, docker and docker.stop, model_proxy and model_proxy.stop):
            try:
                if stop:
                    stop()
            except Exception as error:
                print(f"chaos: cleanup: {error!r}")
        if model_server:
            model_server.terminate()
            model_server.wait(20)
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
        print()
        print(f"chaos{' --production' if args.production else ''}: {args.episodes} episodes per fault, "
              f"concurrency {args.concurrency}")  # fmt: skip
        print(HEADER)
        baseline = next((row["seconds"] for row in rows if row.get("fault") == "none" and "seconds" in row), None)
        for row in rows:
            print(format_row(row, baseline))
        print(f"wrote {args.output}")
    broken = [row["fault"] for row in rows if row.get("error") or row["lost"] or row["duplicated_steps"]
              or row["failed_without_reason"]]  # fmt: skip
    if broken:
        print(f"chaos: FAILED under {', '.join(broken)}")
        sys.exit(1)
    print(f"chaos: {len(rows)} faults, every episode terminal, no step duplicated, every failure explained")


def empty_the_database(name: str) -> None:
    """Every run starts on an empty database of the harness's own. A harness killed at its timeout leaves its run
    live, and that run's episodes hold the fleet's live slots (``MEGAFLOW_MAX_LIVE_EPISODES``) in every later run
    on the same database, whose episodes then never start (a CI machine's chaos test waited out its 600 s so)."""
    from django.core.management import call_command

    if "chaos" not in name:
        raise SystemExit(f"chaos: the harness empties its database, and {name!r} is not named as a chaos one")
    call_command("flush", interactive=False, verbosity=0)


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


HEADER = (f"{'fault':<16} {'episodes':>8} {'terminal':>8} {'lost':>5} {'dup steps':>9} {'retried':>7} "
          f"{'no reason':>9} {'restarted':>9} {'affected':>8} {'rec p50':>7} {'rec p99':>7} {'never':>5}"
          "  run")  # fmt: skip


def format_row(row: dict, baseline: float | None = None) -> str:
    if "error" in row:
        return f"{row['fault']:<16} the harness could not run it: {row['error']}"
    times = " ".join(f"{'-' if row[key] is None else row[key]:>7}" for key in ("recover_p50_s", "recover_p99_s"))
    ratio = f" ({row['seconds'] / baseline:.2f}x fault-free)" if baseline else ""
    return (f"{row['fault']:<16} {row['episodes']:>8} {row['terminal']:>8} {row['lost']:>5} "
            f"{row['duplicated_steps']:>9} {row['retried']:>7} {row['failed_without_reason']:>9} "
            f"{len(row['supervisor_restarts']):>9} {row['affected']:>8} {times} {row['unrecovered']:>5}  "
            f"{row['run_status']} in {row['seconds']} s{ratio}")  # fmt: skip


if __name__ == "__main__":
    main()
