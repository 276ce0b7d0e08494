"""``make up`` / ``make down`` / ``make status``: the one-machine MegaFlow stack, supervised by pid files.

``up`` starts whatever of the stack is not already running: migrations, one Celery worker per declared queue
(topology.all_worker_specs), celery beat (the reaper's schedule), Flower and the web app, then waits until
each answers. Every process it starts gets ``<data dir>/run/<name>.pid`` (pid, then a word of its command
line, so a recycled pid is never mistaken for ours) and ``<data dir>/log/<name>.log``. ``down`` stops exactly
the processes that have pid files there, including Redis and dockerd when deploy/bootstrap.sh started them,
and nothing else.

Run as ``python -m deploy.local_stack {up,down,status}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STOP_GRACE_S = 20
READY_TIMEOUT_S = 60


@dataclass
class Service:
    """One long-running process of the stack and how to tell that it is ready."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)


# --- pid files ---------------------------------------------------------------------------------------------


def run_dir() -> Path:
    from django.conf import settings

    return settings.DATA_DIR / "run"


def log_dir() -> Path:
    from django.conf import settings

    return settings.DATA_DIR / "log"


def read_pidfile(path: Path) -> tuple[int, str] | None:
    """(pid, command marker) from a pid file, or None when it is unreadable."""
    try:
        lines = path.read_text().split()
        return int(lines[0]), (lines[1] if len(lines) > 1 else "")
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int, marker: str) -> bool:
    """The process exists, is not a zombie, and its command line still contains ``marker``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and marker in cmdline


def running_pid(name: str) -> int | None:
    entry = read_pidfile(run_dir() / f"{name}.pid")
    return entry[0] if entry and alive(*entry) else None


def stop(name: str) -> str:
    """Stop the process named by ``<name>.pid`` (SIGTERM, then SIGKILL after a grace period)."""
    path = run_dir() / f"{name}.pid"
    entry = read_pidfile(path)
    if not entry or not alive(*entry):
        path.unlink(missing_ok=True)
        return "not running"
    pid, marker = entry
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while alive(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    outcome = "stopped"
    if alive(pid, marker):
        os.kill(pid, signal.SIGKILL)
        outcome = f"killed after {STOP_GRACE_S} s"
    path.unlink(missing_ok=True)
    return outcome


# --- the stack ---------------------------------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _worker_answers(node_name: str) -> bool:
    from celery.utils.nodenames import host_format

    from megaflow_site.celery import app

    return bool(app.control.ping(destination=[host_format(node_name)], timeout=1.0))


def _bin(name: str) -> str:
    """An executable of this virtualenv (so `make up` works without activating it)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def services() -> list[Service]:
    from django.conf import settings

    from megaflow_site.topology import all_worker_specs, flower_argv

    stack = []
    for spec in all_worker_specs():
        argv = spec.argv()
        argv[0] = _bin("celery")
        stack.append(Service(f"worker-{spec.queue}", argv, lambda node=spec.node_name: _worker_answers(node),
                             env=spec.environment))  # fmt: skip
    stack.append(Service(
        "beat",
        [_bin("celery"), "-A", "megaflow_site", "beat", "--loglevel", "INFO"],
        lambda: running_pid("beat") is not None,
    ))  # fmt: skip
    web = f"http://127.0.0.1:{settings.MEGAFLOW_WEB_PORT}"
    flower = f"http://127.0.0.1:{settings.MEGAFLOW_FLOWER_PORT}"
    stack.append(Service(
        "flower",
        flower_argv(_bin("celery"), settings.MEGAFLOW_FLOWER_PORT),
        lambda: _http_ok(f"{flower}/healthcheck"),
        url=flower,
    ))  # fmt: skip
    stack.append(Service(
        "web",
        [_bin("gunicorn"), "megaflow_site.wsgi", "--bind", f"127.0.0.1:{settings.MEGAFLOW_WEB_PORT}",
         "--workers", "2", "--threads", "32", "--access-logfile", "-"],  # a thread per gateway call in flight
        lambda: _http_ok(f"{web}/healthz"),
        url=web,
    ))  # fmt: skip
    return stack


def start(service: Service) -> int:
    log = (log_dir() / f"{service.name}.log").open("ab")
    process = subprocess.Popen(
        service.argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **service.env},
        start_new_session=True,  # `make` exiting must not take the stack with it
    )
    marker = Path(service.argv[0]).name
    (run_dir() / f"{service.name}.pid").write_text(f"{process.pid}\n{marker}\n")
    return process.pid


def up() -> None:
    from django.core.management import call_command

    from megaflow_site import preflight

    run_dir().mkdir(parents=True, exist_ok=True)
    log_dir().mkdir(parents=True, exist_ok=True)
    preflight.run_all()
    print("==> Database: applying migrations", flush=True)
    call_command("migrate", interactive=False, verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)

    started = []
    for service in services():
        if pid := running_pid(service.name):
            print(f"==> {service.name}: already running (pid {pid})")
            continue
        pid = start(service)
        started.append(service)
        print(f"==> {service.name}: started (pid {pid}, log {log_dir() / (service.name + '.log')})", flush=True)

    deadline = time.monotonic() + READY_TIMEOUT_S
    for service in started:
        while not service.ready():
            if not running_pid(service.name):
                raise SystemExit(f"megaflow: {service.name} exited at start -- see {log_dir() / service.name}.log")
            if time.monotonic() > deadline:
                raise SystemExit(f"megaflow: {service.name} not ready in {READY_TIMEOUT_S} s -- see its log")
            time.sleep(0.3)
    print_status()


def down() -> None:
    names = sorted(path.stem for path in run_dir().glob("*.pid")) if run_dir().exists() else []
    # Workers and web first, then the daemons they need.
    names.sort(key=lambda name: name in {"dockerd", "redis"})
    if not names:
        print("==> nothing started by `make up` is running")
    for name in names:
        print(f"==> {name}: {stop(name)}", flush=True)


def print_status() -> None:
    for service in services():
        pid = running_pid(service.name)
        where = f"  {service.url}" if service.url else ""
        print(f"{service.name:<24} {'running, pid ' + str(pid) if pid else 'stopped':<20}{where}")
    print("Flower's user:password is MEGAFLOW_FLOWER_BASIC_AUTH, or var/flower_auth when that is unset")


def main() -> None:
    import django

    from megaflow_site.config_errors import ConfigError, exit_with

    parser = argparse.ArgumentParser(prog="python -m deploy.local_stack", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    action = parser.parse_args().action
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "megaflow_site.settings")
    try:
        django.setup()
        {"up": up, "down": down, "status": print_status}[action]()
    except ConfigError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
