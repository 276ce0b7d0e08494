"""The Environment Service on real containers: its typed operations (envs/service.py), the episode loop's
start on top of them, and its Celery task on a real env worker."""

import base64

import docker
import pytest
from django.conf import settings

from envs import service
from envs.backend import SandboxError
from envs.tasks import stop_sandbox
from orchestrator import episode_loop, replies
from orchestrator.models import Episode, Run, Task
from orchestrator.tasks import deliver_reply

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def episodes_for(task: Task, count: int, pool: str, status=Episode.Status.QUEUED) -> list[Episode]:
    run = Run.objects.create(model_name="replay", env_pool=pool, samples_per_task=count, status=Run.Status.RUNNING)
    run.tasks.add(task)
    return [Episode.objects.create(run=run, task=task, sample_index=index, status=status) for index in range(count)]


def containers_labelled(episode_id: int) -> list:
    """This session's containers of the episode (another session on the machine may have an episode of that id)."""
    labels = [f"megaflow.episode={episode_id}", f"megaflow.deployment={settings.MEGAFLOW_DEPLOYMENT}"]
    return docker.from_env().containers.list(all=True, filters={"label": labels})


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, dict]]:
    messages = []
    monkeypatch.setattr(episode_loop, "send", lambda name, **kwargs: messages.append((name, kwargs)))
    return messages


def test_a_sandbox_is_prepared_driven_graded_and_released(swe_mini):
    task = swe_mini.tasks.get(instance_id="ledger-3")  # the multi-file fix
    [solved, unsolved] = episodes_for(task, 2, pool="heavy")
    sandboxes = {}
    for episode in (solved, unsolved):
        sandbox = service.create_sandbox(task, episode.pk, episode.run_id, "heavy")
        service.prepare_sandbox(sandbox.container_id, task)
        assert [c.id for c in containers_labelled(episode.pk)] == [sandbox.container_id]
        sandboxes[episode.pk] = sandbox.container_id

    encoded = base64.b64encode(task.patch.encode()).decode()
    edit = service.run_command(sandboxes[solved.pk], f"echo {encoded} | base64 -d | git apply && git status --short",
                               60, task.workdir)  # fmt: skip
    assert edit.exit_code == 0 and sorted(edit.output.split()) == ["M", "M", "ledger/account.py", "ledger/money.py"]

    graded = service.evaluate(sandboxes[solved.pk], task)
    assert graded.reward == 1.0 and graded.failing == []
    failed = service.evaluate(sandboxes[unsolved.pk], task)
    assert failed.reward == 0.0 and failed.failing == task.fail_to_pass

    for episode in (solved, unsolved):
        service.release(sandboxes[episode.pk], "heavy")
        assert containers_labelled(episode.pk) == [], "an ephemeral sandbox is destroyed when released"


def test_the_loop_starts_an_episode_once_however_often_its_start_is_delivered(swe_mini, sent):
    [episode] = episodes_for(swe_mini.tasks.get(instance_id="kvconf-1"), 1, pool="default",
                             status=Episode.Status.STARTING)  # fmt: skip
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    episode.refresh_from_db()
    assert episode.status == Episode.Status.RUNNING
    assert [c.id for c in containers_labelled(episode.pk)] == [episode.container_id]
    # A redelivered start finds the live sandbox instead of making a second one, and publishes the first turn.
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    assert [c.id for c in containers_labelled(episode.pk)] == [episode.container_id]
    assert [name for name, _ in sent] == ["modelserving.episode_turn"] * 2
    service.release(episode.container_id, "default")


def test_a_missing_image_fails_the_episode_with_the_image_name(swe_mini, sent):
    ghost = Task.objects.create(
        dataset=swe_mini, instance_id="ghost-1", problem_statement="p", image="megaflow/ghost:never-built",
        test_command="true", fail_to_pass=["t"], spec_sha256="0" * 64,
    )  # fmt: skip
    [episode] = episodes_for(ghost, 1, pool="default", status=Episode.Status.STARTING)
    with pytest.raises(SandboxError, match="image not found: megaflow/ghost:never-built") as raised:
        service.create_sandbox(ghost, episode.pk, episode.run_id, "default")
    assert not raised.value.retryable, "a missing image is permanent"

    episode_loop.episode_start(episode.pk, "default", attempt=1)
    episode.refresh_from_db()
    assert (episode.status, episode.attempt) == (Episode.Status.FAILED, 1), "not retried"
    assert episode.failure_reason == "image not found: megaflow/ghost:never-built"
    assert [name for name, _ in sent] == ["orchestrator.episode_done"]


def test_a_hanging_command_comes_back_with_a_note_on_how_it_ended(swe_mini):
    task = swe_mini.tasks.get(instance_id="textkit-1")
    [episode] = episodes_for(task, 1, pool="default")
    sandbox = service.create_sandbox(task, episode.pk, episode.run_id, "default")
    result = service.run_command(sandbox.container_id, "sleep 60", 1, task.workdir)
    assert result.timed_out and result.note == "[megaflow: command timed out after 1 s and was killed]"
    service.release(sandbox.container_id, "default")


def test_a_finished_episode_gets_no_sandbox(swe_mini, sent):
    [episode] = episodes_for(swe_mini.tasks.get(instance_id="textkit-2"), 1, pool="default",
                             status=Episode.Status.CANCELLED)  # fmt: skip
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    episode_loop.episode_step(episode.pk, 0, "```bash\nls\n```", attempt=1)
    assert containers_labelled(episode.pk) == [] and sent == []
    assert not episode.steps.exists()


def test_an_env_worker_releases_a_sandbox_on_request(celery_workers, swe_mini):
    task = swe_mini.tasks.get(instance_id="textkit-3")
    [episode] = episodes_for(task, 1, pool="default")
    sandbox = service.create_sandbox(task, episode.pk, episode.run_id, "default")
    inbox = replies.new_inbox()
    stop_sandbox.apply_async(kwargs={"pool": "default", "container_id": sandbox.container_id,
                                     "episode_id": episode.pk}, link=deliver_reply.s(inbox=inbox))  # fmt: skip
    reply = replies.wait_for_reply(inbox, 60)
    assert (reply["episode_id"], reply["container_id"]) == (episode.pk, sandbox.container_id)
    assert containers_labelled(episode.pk) == []
