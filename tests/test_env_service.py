"""The Environment Service end to end: Celery tasks on real env workers, real containers, Episode rows."""

import base64

import docker
import pytest

from envs import tasks as env_tasks
from orchestrator import replies
from orchestrator.models import Episode, Run, Task
from orchestrator.tasks import deliver_reply

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def call(task, wait_s: float = 90, **kwargs) -> dict:
    """Send ``task`` to its queue and wait for its return value through a reply inbox."""
    inbox = replies.new_inbox()
    task.apply_async(kwargs=kwargs, link=deliver_reply.s(inbox=inbox))
    reply = replies.wait_for_reply(inbox, wait_s)
    assert reply is not None, f"{task.name} sent no reply in {wait_s} s"
    return reply


def episodes_for(task: Task, count: int, pool: str) -> list[Episode]:
    run = Run.objects.create(model_name="replay", env_pool=pool, samples_per_task=count)
    run.tasks.add(task)
    return [Episode.objects.create(run=run, task=task, sample_index=index) for index in range(count)]


def containers_of(episode: Episode) -> list:
    return docker.from_env().containers.list(all=True, filters={"label": f"megaflow.episode={episode.pk}"})


def test_an_episode_is_started_driven_and_graded_by_the_env_workers(celery_workers, swe_mini):
    task = swe_mini.tasks.get(instance_id="ledger-3")  # the multi-file fix
    solved, unsolved = episodes_for(task, 2, pool="heavy")

    for episode in (solved, unsolved):
        started = call(env_tasks.start_sandbox, episode_id=episode.pk, pool="heavy")
        assert started["ok"], started
        episode.refresh_from_db()
        assert episode.status == Episode.Status.RUNNING and episode.container_id == started["container_id"]
        assert [c.id for c in containers_of(episode)] == [episode.container_id]

    # A redelivered start finds the live sandbox instead of making a second one.
    again = call(env_tasks.start_sandbox, episode_id=solved.pk, pool="heavy")
    assert again["reused"] and again["container_id"] == solved.container_id and len(containers_of(solved)) == 1

    encoded = base64.b64encode(task.patch.encode()).decode()
    edit = call(env_tasks.exec_command, episode_id=solved.pk, pool="heavy",
                command=f"echo {encoded} | base64 -d | git apply && git status --short")  # fmt: skip
    assert edit["exit_code"] == 0 and sorted(edit["observation"].split()) == [
        "M",
        "M",
        "ledger/account.py",
        "ledger/money.py",
    ]

    graded = call(env_tasks.evaluate, episode_id=solved.pk, pool="heavy")
    assert graded["reward"] == 1.0 and graded["failing"] == []
    failed = call(env_tasks.evaluate, episode_id=unsolved.pk, pool="heavy")
    assert failed["reward"] == 0.0 and failed["failing"] == task.fail_to_pass

    for episode, reward in ((solved, 1.0), (unsolved, 0.0)):
        episode.refresh_from_db()
        assert (episode.status, episode.reward) == (Episode.Status.SUCCEEDED, reward)
        assert episode.finished_at is not None
        assert containers_of(episode) == [], "an ephemeral sandbox is destroyed when its episode ends"


def test_a_missing_image_fails_the_episode_with_the_image_name(celery_workers, swe_mini):
    ghost = Task.objects.create(
        dataset=swe_mini, instance_id="ghost-1", problem_statement="p", image="megaflow/ghost:never-built",
        test_command="true", fail_to_pass=["t"], spec_sha256="0" * 64,
    )  # fmt: skip
    [episode] = episodes_for(ghost, 1, pool="default")
    reply = call(env_tasks.start_sandbox, episode_id=episode.pk, pool="default")
    assert reply == {
        "ok": False,
        "episode_id": episode.pk,
        "error": "image not found: megaflow/ghost:never-built",
        "outcome": "failed",  # a missing image is permanent: not retried
    }
    episode.refresh_from_db()
    assert episode.status == Episode.Status.FAILED
    assert episode.failure_reason == "image not found: megaflow/ghost:never-built"


def test_a_hanging_command_comes_back_as_an_observation(celery_workers, swe_mini):
    [episode] = episodes_for(swe_mini.tasks.get(instance_id="textkit-1"), 1, pool="default")
    assert call(env_tasks.start_sandbox, episode_id=episode.pk, pool="default")["ok"]
    reply = call(env_tasks.exec_command, episode_id=episode.pk, pool="default", command="sleep 60", timeout_s=1)
    assert reply["ok"] and reply["timed_out"]
    assert reply["observation"] == "[megaflow: command timed out after 1 s and was killed]"
    stopped = call(env_tasks.stop_sandbox, episode_id=episode.pk, pool="default")
    assert stopped["ok"] and containers_of(episode) == []


def test_commands_for_a_finished_episode_are_refused(celery_workers, swe_mini):
    [episode] = episodes_for(swe_mini.tasks.get(instance_id="textkit-2"), 1, pool="default")
    Episode.objects.filter(pk=episode.pk).update(status=Episode.Status.CANCELLED)
    assert (
        call(env_tasks.start_sandbox, episode_id=episode.pk, pool="default")["error"] == "episode is already cancelled"
    )
    reply = call(env_tasks.exec_command, episode_id=episode.pk, pool="default", command="ls")
    assert reply["ok"] is False and containers_of(episode) == []
