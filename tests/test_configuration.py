"""Celery's delivery guarantees, and bad configuration stopping with one clear line instead of a traceback."""

import os
import subprocess
import sys

import pytest
from django.conf import settings

from megaflow_site.celery import app
from megaflow_site.topology import Service, WorkerSpec
from tests.conftest import REPO, run_manage


def test_celery_task_defaults_give_at_least_once_delivery_with_json_only():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    # Task events are the agent queue's only (its workers start with --task-events); the hot queues send none.
    assert conf.worker_send_task_events is False and conf.task_send_sent_event is False
    assert "--task-events" in WorkerSpec(Service.AGENT).argv()
    assert "--task-events" not in WorkerSpec(Service.ENV).argv()
    assert conf.task_ignore_result is True
    assert conf.task_create_missing_queues is False


def test_the_gevent_pool_goes_only_to_queues_whose_backend_runs_on_greenlets(settings):
    settings.MEGAFLOW_HOT_QUEUE_POOL = "gevent"
    settings.MEGAFLOW_ENV_BACKEND = "sim"
    greenlets = {spec.queue for spec in [WorkerSpec(Service.MODEL, "sim"), WorkerSpec(Service.MODEL, "replay"),
                                         WorkerSpec(Service.MODEL, "tiny"), WorkerSpec(Service.ENV, "default"),
                                         WorkerSpec(Service.AGENT)] if "gevent" in spec.argv()}  # fmt: skip
    assert greenlets == {"model.sim", "model.replay", "env.default"}  # tiny is served over HTTP on an asyncio loop
    settings.MEGAFLOW_ENV_BACKEND = "docker"
    assert "gevent" in WorkerSpec(Service.ENV, "default").argv()
    settings.MEGAFLOW_ENV_BACKEND = "local"
    assert "gevent" not in WorkerSpec(Service.ENV, "default").argv()
    settings.MEGAFLOW_HOT_QUEUE_POOL = "threads"
    assert "gevent" not in WorkerSpec(Service.MODEL, "sim").argv()


def test_hard_time_limit_sits_well_below_the_visibility_timeout():
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    assert app.conf.task_soft_time_limit < app.conf.task_time_limit <= visibility // 2


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single ``megaflow:`` line a failed command printed; fails the test on a traceback or several lines."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("megaflow:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


BAD_CONFIGURATIONS = {
    "redis unreachable": (
        {"MEGAFLOW_REDIS_URL": "redis://127.0.0.1:1/0"},
        ["megaflow", "preflight", "--only", "redis"],
        "Redis is unreachable at redis://127.0.0.1:1/0",
    ),
    "docker daemon absent": (
        {"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
        ["megaflow", "preflight", "--only", "docker"],
        "the Docker daemon is not reachable at unix:///nonexistent/docker.sock",
    ),
    "base image absent": (
        {"MEGAFLOW_BASE_IMAGE": "megaflow/no-such-image:never"},
        ["megaflow", "preflight", "--only", "docker"],
        "the base environment image megaflow/no-such-image:never is missing",
    ),
    "DATABASE_URL with an unknown scheme": (
        {"DATABASE_URL": "postgress://user:hunter2@db/megaflow"},
        ["check"],
        "DATABASE_URL 'postgress://user:***@db/megaflow' is not a database URL",
    ),
    "DATABASE_URL pointing nowhere": (
        {"DATABASE_URL": "postgres://postgres:hunter2@127.0.0.1:1/megaflow"},
        ["megaflow", "preflight", "--only", "database"],
        "cannot open the database postgres://postgres:***@127.0.0.1:1/megaflow",
    ),
    "time limit that is not a number": (
        {"MEGAFLOW_TASK_TIME_LIMIT_S": "ten"},
        ["check"],
        "MEGAFLOW_TASK_TIME_LIMIT_S='ten' is not a whole number",
    ),
    "hop window ceiling below its floor": (
        {"MEGAFLOW_HOP_BATCH_WINDOW_MS": "20", "MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS": "5"},
        ["check"],
        "MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS (5) is below MEGAFLOW_HOP_BATCH_WINDOW_MS (20)",
    ),
    "time limit above the visibility timeout": (
        {"MEGAFLOW_TASK_TIME_LIMIT_S": "3000", "MEGAFLOW_VISIBILITY_TIMEOUT_S": "3600"},
        ["check"],
        "must be between 20 s and half the visibility timeout",
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", BAD_CONFIGURATIONS, ids=list(BAD_CONFIGURATIONS))
def test_bad_configuration_stops_with_one_clear_line(case):
    env, args, problem = BAD_CONFIGURATIONS[case]
    line = one_line_error(run_manage(*args, env=env))
    assert problem in line
    assert " -- " in line, "the line must say how to fix it"
    assert "hunter2" not in line


def run_worker(env: dict[str, str]) -> subprocess.CompletedProcess:
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    argv = [celery, "-A", "megaflow_site", "worker", "-Q", "agent", "-n", "bad@config", "--pool", "threads"]
    return subprocess.run(argv, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"MEGAFLOW_REDIS_URL": "redis://127.0.0.1:1/0"}, "Redis is unreachable"),
        ({"DATABASE_URL": "nosuch://x/y"}, "is not a database URL"),
    ],
    ids=["redis unreachable", "bad DATABASE_URL"],
)
def test_a_worker_with_bad_configuration_refuses_to_start_with_one_line(env, problem):
    assert problem in one_line_error(run_worker(env))


@pytest.mark.integration
def test_preflight_passes_on_the_test_machine():
    result = run_manage("megaflow", "preflight", env={"DATABASE_URL": settings.DATABASE_URL})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok:", "database", "ok:", "redis", "ok:", "docker"]


def test_beat_runs_the_reaper_on_every_pools_queue():
    from megaflow_site.topology import route_task

    schedule = app.conf.beat_schedule
    for pool in settings.MEGAFLOW_ENV_POOLS:
        entry = schedule[f"reap-orphans-{pool}"]
        assert entry["task"] == "envs.reap_orphans" and entry["schedule"] == settings.MEGAFLOW_REAPER_INTERVAL_S
        assert route_task(entry["task"], (), entry["kwargs"], {}) == {"queue": f"env.{pool}"}
