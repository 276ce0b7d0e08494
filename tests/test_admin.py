"""Django admin: the run list's columns and actions, and the charts on a run's page."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from orchestrator.models import Episode, Run, Step


@pytest.fixture
def admin_client(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("admin", password="x" * 12))
    return client


@pytest.fixture
def finished_run(swe_mini) -> Run:
    start = timezone.now() - timedelta(seconds=60)
    run = Run.objects.create(dataset=swe_mini, model_name="replay", status=Run.Status.COMPLETED, started_at=start,
                             finished_at=start + timedelta(seconds=50))  # fmt: skip
    tasks = list(swe_mini.tasks.all()[:4])
    run.tasks.set(tasks)
    for index, task in enumerate(tasks):
        status, reward = (Episode.Status.SUCCEEDED, float(index % 2)) if index < 3 else (Episode.Status.FAILED, None)
        episode = Episode.objects.create(run=run, task=task, sample_index=0, status=status, reward=reward,
                                         started_at=start + timedelta(seconds=5 * index),
                                         finished_at=start + timedelta(seconds=20 + 5 * index))  # fmt: skip
        Step.objects.create(episode=episode, index=0, action="ls", completed_at=start + timedelta(seconds=10))
    return run


def test_the_run_list_shows_progress_success_rate_and_reward(admin_client, finished_run):
    page = admin_client.get("/admin/orchestrator/run/").content.decode()
    assert "4/4" in page and "25%" in page and "0.333" in page  # 1 of 4 solved; rewards 0, 1, 0


def test_a_run_page_draws_its_charts(admin_client, finished_run):
    page = admin_client.get(f"/admin/orchestrator/run/{finished_run.pk}/change/").content.decode()
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" width=') == 3
    for title in ("Episodes by status over time", "Steps per second", "Reward distribution (3 episodes)"):
        assert title in page


def test_admin_actions_retry_and_export(admin_client, finished_run):
    response = admin_client.post("/admin/orchestrator/run/", {"action": "export_trajectories",
                                                             "_selected_action": [finished_run.pk]})  # fmt: skip
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert response["Content-Type"] == "application/x-ndjson" and len(lines) == 4
    admin_client.post("/admin/orchestrator/run/", {"action": "retry_failed_episodes",
                                                  "_selected_action": [finished_run.pk]})  # fmt: skip
    assert finished_run.episodes.filter(status=Episode.Status.QUEUED, attempt=2).count() == 1
    finished_run.refresh_from_db()
    assert finished_run.status == Run.Status.RUNNING


def test_a_started_run_is_read_only_with_its_actions_on_its_page(admin_client, finished_run):
    url = f"/admin/orchestrator/run/{finished_run.pk}/change/"
    page = admin_client.get(url).content.decode()
    assert 'name="model_name"' not in page and 'name="tasks"' not in page and "View run" in page
    assert 'id="run-retry-failed"' in page and 'id="run-export"' in page
    assert 'id="run-cancel"' not in page, "a completed run cannot be cancelled"
    response = admin_client.post(url, {"model_name": "other", "samples_per_task": 9})
    assert response.status_code == 403
    finished_run.refresh_from_db()
    assert (finished_run.model_name, finished_run.samples_per_task) == ("replay", 1)

    exported = admin_client.get(f"/admin/orchestrator/run/{finished_run.pk}/export/")
    assert len(b"".join(exported.streaming_content).decode().splitlines()) == 4
    assert admin_client.get(f"/admin/orchestrator/run/{finished_run.pk}/retry-failed/").status_code == 405
    retried = admin_client.post(f"/admin/orchestrator/run/{finished_run.pk}/retry-failed/")
    assert retried.status_code == 302 and retried["Location"] == url
    assert finished_run.episodes.filter(status=Episode.Status.QUEUED, attempt=2).count() == 1


def test_a_running_run_is_cancelled_from_its_page(admin_client, finished_run):
    Run.objects.filter(pk=finished_run.pk).update(status=Run.Status.RUNNING, finished_at=None)
    finished_run.episodes.filter(status=Episode.Status.FAILED).update(status=Episode.Status.RUNNING, container_id="c1")
    page = admin_client.get(f"/admin/orchestrator/run/{finished_run.pk}/change/").content.decode()
    assert 'id="run-cancel"' in page
    admin_client.post(f"/admin/orchestrator/run/{finished_run.pk}/cancel/")
    finished_run.refresh_from_db()
    assert finished_run.status == Run.Status.CANCELLED
    assert finished_run.episodes.get(container_id="c1").status == Episode.Status.CANCELLED


def test_a_queued_run_can_still_be_edited(admin_client, swe_mini):
    run = Run.objects.create(dataset=swe_mini, model_name="replay")
    page = admin_client.get(f"/admin/orchestrator/run/{run.pk}/change/").content.decode()
    assert 'name="model_name"' in page and "Change run" in page


@pytest.mark.parametrize(
    "url", ["/admin/orchestrator/run/", "/admin/orchestrator/episode/", "/admin/orchestrator/dataset/",
            "/admin/orchestrator/task/"],
)  # fmt: skip
def test_list_pages_cost_the_same_queries_for_one_row_or_many(url, admin_client, finished_run, swe_mini,
                                                             django_assert_max_num_queries):  # fmt: skip
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from orchestrator.models import Dataset

    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(url).status_code == 200
    owner = User.objects.get(username="admin")
    for index in range(12):
        run = Run.objects.create(dataset=swe_mini, owner=owner, model_name="replay", name=f"more-{index}")
        episode = Episode.objects.create(run=run, task=swe_mini.tasks.first(), sample_index=0)
        Step.objects.create(episode=episode, index=0, action="ls")
        Dataset.objects.create(name=f"more-{index}", owner=owner)
    with django_assert_max_num_queries(len(few)):
        assert admin_client.get(url).status_code == 200


def test_a_run_added_in_the_admin_is_checked_and_started_like_one_from_the_api(
    admin_client, swe_mini, django_capture_on_commit_callbacks, monkeypatch
):
    from orchestrator import runs

    started = []
    monkeypatch.setattr(runs, "send", lambda name, **kwargs: started.append((name, kwargs)))
    chosen = list(swe_mini.tasks.order_by("instance_id")[:2])
    form = {"name": "from the admin", "dataset": swe_mini.pk, "tasks": [task.pk for task in chosen],
            "samples_per_task": 2, "agent_name": "bash", "agent_config": "{}", "env_pool": "default",
            "max_concurrent_episodes": 4, "max_steps": 10, "episode_time_limit_s": 600, "max_attempts": 2}  # fmt: skip

    refused = admin_client.post("/admin/orchestrator/run/add/", {**form, "model_name": "gpt-nope"})
    assert refused.status_code == 200 and "unknown model &#x27;gpt-nope&#x27;" in refused.content.decode()
    assert not Run.objects.filter(name="from the admin").exists()

    with django_capture_on_commit_callbacks(execute=True):
        added = admin_client.post("/admin/orchestrator/run/add/", {**form, "model_name": "replay"})
    assert added.status_code == 302
    run = Run.objects.get(name="from the admin")
    assert sorted(run.tasks.values_list("pk", flat=True)) == sorted(task.pk for task in chosen)
    assert (run.owner.username, run.samples_per_task, run.max_steps) == ("admin", 2, 10)
    assert started == [("orchestrator.start_run", {"run_id": run.pk})]
