"""Shared fixtures: the test session's Redis database and real Celery workers, one per declared queue."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from django.conf import settings

from megaflow_site.topology import all_worker_specs
from tests.support.worker_processes import CeleryWorkers

REPO = Path(__file__).resolve().parent.parent


def database_url(settings_dict: dict) -> str:
    """A DATABASE_URL for the database Django is connected to now (the test database, inside a test)."""
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    user = settings_dict.get("USER") or ""
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
    return f"postgres://{auth}{host}{port}/{settings_dict['NAME']}"


def run_manage(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python manage.py ARGS`` in a subprocess with ``env`` layered over this process's environment."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix) -> None:
    """The session's test database: a file for SQLite (worker subprocesses open it too, so it cannot live in
    memory), and on PostgreSQL a name of its own per isolation slot (tests/session_env.py)."""
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        name = str(settings.DATA_DIR / "test-megaflow.sqlite3")
    else:
        name = f"test_{database['NAME']}_{os.environ['MEGAFLOW_TEST_SLOT']}"
    database.setdefault("TEST", {})["NAME"] = name


@pytest.fixture(scope="session")
def broker() -> redis.Redis:
    """The session's own Redis database (tests/session_env.py), empty at the start and at the end."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def celery_workers(django_db_setup, django_db_blocker, broker) -> CeleryWorkers:
    """One real worker per declared queue, on the session's Redis database and the test database."""
    from django.db import connection

    log_dir = settings.DATA_DIR / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    with django_db_blocker.unblock():
        env = {**os.environ, "DATABASE_URL": database_url(connection.settings_dict)}
    workers = CeleryWorkers(env, log_dir)
    workers.start_beat(settings.DATA_DIR / "test-celerybeat-schedule")
    try:
        workers.wait_ready([workers.start(spec) for spec in all_worker_specs()])
        yield workers
    finally:
        workers.stop_all()


# --- Environment service ------------------------------------------------------------------------------------

SESSION_STARTED = time.time()


def deployment_of(database: str) -> str:
    """The ``megaflow.deployment`` label of processes using ``database`` (settings.MEGAFLOW_DEPLOYMENT)."""
    return hashlib.sha256(database.encode()).hexdigest()[:12]


@pytest.fixture(scope="session", autouse=True)
def _remove_this_sessions_containers(django_db_setup, django_db_blocker):
    """Whatever a test left behind, no container this session created outlives it (and no other session's
    container is touched: the test process and its workers have deployment labels of their own)."""
    from django.db import connection

    with django_db_blocker.unblock():
        ours = {settings.MEGAFLOW_DEPLOYMENT, deployment_of(database_url(connection.settings_dict))}
    yield
    import docker

    client = docker.from_env()
    for container in client.containers.list(all=True, filters={"label": "megaflow.managed=1"}):
        labels = container.labels
        created = float(labels.get("megaflow.created") or 0)
        if labels.get("megaflow.deployment") in ours and created >= SESSION_STARTED - 1:
            container.remove(force=True)


@pytest.fixture(scope="session")
def docker_backend():
    from envs.backend import get_backend

    return get_backend("docker")


@pytest.fixture
def sandbox(docker_backend):
    """A factory of sandboxes (``sandbox(**spec_fields)`` → id) destroyed after the test."""
    from envs.backend import SandboxSpec

    created = []

    def make(**fields) -> str:
        fields.setdefault("image", settings.MEGAFLOW_BASE_IMAGE)
        sandbox_id = docker_backend.create(SandboxSpec(**fields))
        created.append(sandbox_id)
        return sandbox_id

    yield make
    for sandbox_id in created:
        docker_backend.destroy(sandbox_id)


SWE_MINI = REPO / "envs" / "suites" / "swe_mini" / "dataset" / "tasks.jsonl"


@pytest.fixture
def swe_mini(db):
    """The bundled swe_mini suite, loaded as dataset ``swe_mini``."""
    from orchestrator.task_format import load_dataset

    return load_dataset(SWE_MINI, "swe_mini")


# --- Model service ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny causal LM built locally (random weights, a tokenizer trained on the suite's sources)."""
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(settings.DATA_DIR / "tiny-model")


def start_model_server(model_path, name: str, port: int, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "modelserving.hf_server", "--model-path", str(model_path),
            "--served-model-name", name, "--port", str(port)]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"model server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"model server at {url} not healthy after {timeout_s} s")


@pytest.fixture(scope="session")
def tiny_model_server(tiny_model):
    """modelserving.hf_server serving the tiny model as "tiny" on this session's port; yields its base URL."""
    port = int(os.environ["MEGAFLOW_TINY_MODEL_PORT"])
    url = f"http://127.0.0.1:{port}"
    log = settings.DATA_DIR / "log" / "tiny-model-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    process = start_model_server(tiny_model, "tiny", port, log)
    try:
        wait_healthy(url, process)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
