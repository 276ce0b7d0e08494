"""The data model's invariants hold in the database itself, not only in Python."""

import pytest
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError

from orchestrator.models import Dataset, Episode, Run, Step, Task

pytestmark = pytest.mark.django_db


@pytest.fixture
def episode():
    dataset = Dataset.objects.create(name="d")
    task = Task.objects.create(
        dataset=dataset, instance_id="t-1", problem_statement="p", test_command="pytest", fail_to_pass=["test_a"]
    )
    run = Run.objects.create(model_name="replay", samples_per_task=2)
    run.tasks.add(task)
    return Episode.objects.create(run=run, task=task, sample_index=0)


def test_step_indexes_are_unique_per_episode(episode):
    Step.objects.create(episode=episode, index=0, action="ls")
    with pytest.raises(IntegrityError), transaction.atomic():
        Step.objects.create(episode=episode, index=0, action="ls again")
    Step.objects.create(episode=episode, index=1, action="cat")
    assert list(episode.steps.values_list("index", flat=True)) == [0, 1]


def test_one_episode_per_task_sample(episode):
    with pytest.raises(IntegrityError), transaction.atomic():
        Episode.objects.create(run=episode.run, task=episode.task, sample_index=0)
    assert Episode.objects.create(run=episode.run, task=episode.task, sample_index=1).attempt == 1


def test_a_run_needs_at_least_one_sample_and_one_concurrent_episode():
    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.create(model_name="replay", samples_per_task=0)
    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.create(model_name="replay", max_concurrent_episodes=0)


def test_deleting_a_run_deletes_its_trajectories_but_tasks_in_use_are_protected(episode):
    Step.objects.create(episode=episode, index=0)
    with pytest.raises(ProtectedError):
        episode.task.delete()
    episode.run.delete()
    assert not Episode.objects.exists() and not Step.objects.exists()
    assert Task.objects.count() == 1


def test_terminal_states(episode):
    assert not episode.is_terminal
    assert {status.value for status in Episode.TERMINAL} == {"succeeded", "failed", "timed_out", "cancelled"}
    episode.status = Episode.Status.TIMED_OUT
    assert episode.is_terminal
