"""The coordinated autoscaler on real workers: it observes the fleet, resizes worker pools through Celery's
pool grow/shrink, publishes desired replicas on /metrics, and an SLO breach throttles admission."""

import time

import pytest
from celery import current_app
from django.contrib.auth.models import User
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orchestrator import autoscale
from orchestrator.hot_state import redis_client
from orchestrator.models import Episode, Run

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def fresh_autoscaler():
    keys = (autoscale.STATE_KEY, autoscale.DECISION_KEY, autoscale.ADMISSION_KEY)
    redis_client().delete(*keys)
    yield
    redis_client().delete(*keys)


def concurrency_of(node: str) -> int:
    [stats] = current_app.control.inspect(destination=[node], timeout=2).stats().values()
    return stats["pool"]["max-concurrency"]


def finish(run: Run, timeout: float = 120) -> Run:
    deadline = time.monotonic() + timeout
    while Run.objects.get(pk=run.pk).status not in Run.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
    run.refresh_from_db()
    return run


def test_a_worker_grows_and_shrinks_through_celery_remote_control(celery_workers):
    node = celery_workers.node_for("env.default")
    before = concurrency_of(node)
    replies = current_app.control.pool_grow(3, destination=[node], reply=True, timeout=2)
    assert replies == [{node: {"ok": "pool will grow"}}]
    assert concurrency_of(node) == before + 3
    current_app.control.pool_shrink(3, destination=[node], reply=True, timeout=2)
    assert concurrency_of(node) == before


def test_a_tick_sizes_both_pools_from_the_live_fleet_and_publishes_them(celery_workers, swe_mini):
    run = Run.objects.create(dataset=swe_mini, samples_per_task=2, model_name="sim", env_pool="default")
    run.tasks.set(swe_mini.tasks.all()[:4])
    current_app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})
    assert finish(run).status == Run.Status.COMPLETED

    record = autoscale.tick()
    assert set(record["replicas"]) == {"model.replay", "env.default"}  # the default model and pool
    assert record["steps_per_s"] > 0 and record["latency_p95_s"] > 0
    assert record["admission_limit"] is None and not record["slo_breached"]

    staff = User.objects.create_user("ops", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff).key}")
    text = client.get(reverse("metrics")).content.decode()
    for pool, replicas in record["replicas"].items():
        assert f'megaflow_desired_replicas{{pool="{pool}"}} {float(replicas)}' in text
    assert "megaflow_admission_limit -1.0" in text


def test_an_slo_breach_throttles_admission_on_the_workers(celery_workers, swe_mini, settings):
    warm_up = Run.objects.create(dataset=swe_mini, model_name="sim", env_pool="default")
    warm_up.tasks.set(swe_mini.tasks.all()[:3])
    current_app.send_task("orchestrator.start_run", kwargs={"run_id": warm_up.pk})
    assert finish(warm_up).status == Run.Status.COMPLETED

    settings.MEGAFLOW_LATENCY_SLO_S = 0.001  # every step of the warm-up breached it
    record = autoscale.tick()
    assert record["slo_breached"] and record["admission_limit"] == 1
    assert autoscale.admission_limit() == 1

    run = Run.objects.create(dataset=swe_mini, model_name="sim", env_pool="default", max_concurrent_episodes=8)
    run.tasks.set(swe_mini.tasks.all()[:5])
    current_app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})
    most_live = 0
    deadline = time.monotonic() + 120
    while Run.objects.get(pk=run.pk).status not in Run.TERMINAL and time.monotonic() < deadline:
        most_live = max(most_live, run.episodes.filter(status__in=["starting", "running", "evaluating"]).count())
        time.sleep(0.05)
    assert Run.objects.get(pk=run.pk).status == Run.Status.COMPLETED
    assert most_live == 1, "the run allows 8 at once; the autoscaler's limit is 1"
    assert run.episodes.filter(status=Episode.Status.SUCCEEDED).count() == 5
