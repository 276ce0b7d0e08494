"""kill -9 a worker of each service in the middle of a run: every episode still ends, and no trajectory holds
a step twice or skips one."""

import time
from datetime import timedelta

import docker
import pytest
from celery import current_app
from django.utils import timezone

from orchestrator import episode_loop, runs, transitions
from orchestrator.models import Episode, Run, Step

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_run_survives_kill_9_of_a_worker_of_each_service(celery_workers, swe_mini, settings, broker):
    run = Run.objects.create(dataset=swe_mini, samples_per_task=2, model_name="sim", env_pool="default",
                             max_steps=10, max_concurrent_episodes=8)  # fmt: skip
    run.tasks.set(swe_mini.tasks.all()[:10])
    current_app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})

    killed = []
    for queue in ("env.default", "model.sim", "agent"):
        before = Step.objects.filter(episode__run=run).count()
        deadline = time.monotonic() + 60
        while Step.objects.filter(episode__run=run).count() < before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        celery_workers.kill(queue)
        killed.append((queue, Step.objects.filter(episode__run=run).count()))

    # Messages the dead workers held come back after the visibility timeout (tests/session_env.py: 60 s).
    deadline = time.monotonic() + 4 * settings.CELERY_BROKER_VISIBILITY_TIMEOUT_S
    while Episode.objects.filter(run=run).exclude(status__in=Episode.TERMINAL).exists() and time.monotonic() < deadline:
        time.sleep(0.5)

    episodes = list(run.episodes.all())
    unfinished = [
        (episode.pk, episode.status, list(episode.steps.values_list("index", "completed_at")))
        for episode in episodes
        if not episode.is_terminal
    ]
    queues = {name: broker.llen(name) for name in ("agent", "model.sim", "env.default")}
    assert not unfinished, (
        f"episodes still open after killing workers at steps {killed}: {unfinished}; "
        f"queues {queues}, unacked {broker.hlen('unacked')}"
    )
    assert len(episodes) == 20
    for episode in episodes:
        indexes = list(episode.steps.order_by("index").values_list("index", flat=True))
        assert indexes == list(range(len(indexes))), f"episode {episode.pk} steps {indexes}"
        assert episode.steps.filter(completed_at__isnull=True).count() == 0
        if episode.status == Episode.Status.SUCCEEDED:
            assert indexes == [0, 1, 2] and episode.step_count == 3
    # The run is closed by the last episode's episode_done message, a moment after that episode ends.
    deadline = time.monotonic() + 30
    while Run.objects.get(pk=run.pk).status not in Run.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    assert sum(episode.status == Episode.Status.SUCCEEDED for episode in episodes) >= 18


def test_the_watchdog_re_drives_an_episode_whose_message_was_lost(celery_workers, swe_mini, monkeypatch):
    run = Run.objects.create(dataset=swe_mini, model_name="sim", env_pool="default", status=Run.Status.RUNNING)
    run.tasks.set(swe_mini.tasks.filter(instance_id="kvconf-2"))
    episode = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=0, status=Episode.Status.STARTING)
    with monkeypatch.context() as lost:
        lost.setattr(episode_loop, "send", lambda name, **kwargs: None)  # the first turn's message is lost
        episode_loop.episode_start(episode.pk, "default", attempt=1)
    assert Episode.objects.get(pk=episode.pk).status == Episode.Status.RUNNING
    long_ago = timezone.now() - timedelta(seconds=runs.stalled_after_s() + 1)
    Episode.objects.filter(pk=episode.pk).update(updated_at=long_ago)

    assert runs.watchdog() == [episode.pk]
    assert runs.watchdog() == [], "a re-driven episode is not re-driven again at once"
    deadline = time.monotonic() + 60
    while not Episode.objects.get(pk=episode.pk).is_terminal and time.monotonic() < deadline:
        time.sleep(0.2)
    episode.refresh_from_db()
    assert episode.status == Episode.Status.SUCCEEDED
    assert list(episode.steps.order_by("index").values_list("index", flat=True)) == [0, 1, 2]


def test_a_vanished_container_is_retried_and_a_permanent_failure_is_not(swe_mini, monkeypatch):
    sent = []
    monkeypatch.setattr(episode_loop, "send", lambda name, **kwargs: sent.append(name))
    run = Run.objects.create(dataset=swe_mini, model_name="sim", env_pool="default", max_attempts=2,
                             status=Run.Status.RUNNING)  # fmt: skip
    task = swe_mini.tasks.get(instance_id="textkit-2")
    episode = Episode.objects.create(run=run, task=task, sample_index=0, status=Episode.Status.STARTING)
    client = docker.from_env()

    def start_then_kill(attempt: int) -> str:
        episode_loop.episode_start(episode.pk, "default", attempt=attempt)
        container_id = Episode.objects.get(pk=episode.pk).container_id
        client.containers.get(container_id).kill()  # the sandbox dies under the episode
        episode_loop.episode_step(episode.pk, 0, "```bash\nls\n```", attempt=attempt)
        return container_id

    first = start_then_kill(attempt=1)
    episode.refresh_from_db()
    assert (episode.status, episode.attempt, episode.container_id) == (Episode.Status.QUEUED, 2, "")
    assert episode.failure_reason == "attempt 1 failed: the sandbox container stopped"

    assert transitions.admit(episode.pk, 2)
    second = start_then_kill(attempt=2)
    assert second != first
    episode.refresh_from_db()
    assert episode.status == Episode.Status.FAILED, "max_attempts is 2"
    assert episode.failure_reason == "attempt 2: the sandbox container stopped"
    assert sent.count("orchestrator.episode_done") == 2

    ghost = Episode.objects.create(run=run, task=task, sample_index=1, status=Episode.Status.STARTING)
    task.image = "megaflow/ghost:never"
    task.save()
    episode_loop.cached_task.cache_clear()
    episode_loop.episode_start(ghost.pk, "default", attempt=1)
    ghost.refresh_from_db()
    assert (ghost.status, ghost.attempt) == (Episode.Status.FAILED, 1), "a missing image is not retried"
