"""Runs end to end on real workers of all three services: agent → model → environment, event-driven."""

import time

import docker
import pytest
from celery import current_app

from orchestrator import runs, transitions
from orchestrator.models import Episode, Run
from tests.support.tiny_model import TINY_AGENT_CONFIG

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def make_run(dataset, instance_ids, **fields) -> Run:
    run = Run.objects.create(dataset=dataset, **{"model_name": "replay", "env_pool": "default", **fields})
    run.tasks.set(dataset.tasks.filter(instance_id__in=instance_ids))
    return run


def start_and_wait(run: Run, timeout_s: float = 240, watch=None) -> Run:
    current_app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if watch:
            watch(run)
        run.refresh_from_db()
        if run.status in Run.TERMINAL:
            return run
        time.sleep(0.1)
    episodes = list(run.episodes.values("status", "failure_reason"))
    raise AssertionError(f"run {run.pk} still {run.status} after {timeout_s} s: {episodes}")


def step_indexes(episode: Episode) -> list[int]:
    return list(episode.steps.order_by("index").values_list("index", flat=True))


def test_a_replay_run_flows_through_all_three_services(celery_workers, swe_mini):
    run = start_and_wait(make_run(swe_mini, ["kvconf-4", "ledger-3", "textkit-1"], samples_per_task=2))
    assert run.status == Run.Status.COMPLETED and run.finished_at
    episodes = list(run.episodes.all())
    assert len(episodes) == 6
    assert {(episode.status, episode.reward) for episode in episodes} == {(Episode.Status.SUCCEEDED, 1.0)}
    for episode in episodes:
        [step] = episode.steps.all()
        assert step.index == 0 and "git apply" in step.action and "MEGAFLOW_SUBMIT" in step.observation
        assert step.completed_at and step.env_latency_s > 0 and episode.step_count == 1
        assert step.model_output.startswith("# replay policy")


def test_the_sim_policy_runs_exactly_its_scripted_steps(celery_workers, swe_mini):
    run = start_and_wait(make_run(swe_mini, ["calendarx-1", "taskgraph-4"], model_name="sim", max_steps=10))
    for episode in run.episodes.all():
        assert step_indexes(episode) == [0, 1, 2]  # the sim model submits on its third turn
        assert [step.action for step in episode.steps.order_by("index")] == [
            "echo step 0",
            "echo step 1",
            "echo MEGAFLOW_SUBMIT",
        ]
        assert (episode.status, episode.reward) == (Episode.Status.SUCCEEDED, 0.0), "a wrong answer is a result"
        assert episode.prompt_tokens > 0 and episode.completion_tokens > 0


def test_the_step_budget_ends_an_episode_and_grades_its_tree(celery_workers, swe_mini):
    run = start_and_wait(make_run(swe_mini, ["kvconf-1"], model_name="sim", max_steps=2))
    [episode] = run.episodes.all()
    assert step_indexes(episode) == [0, 1] and episode.status == Episode.Status.SUCCEEDED and episode.reward == 0.0


def test_malformed_replies_become_feedback_and_cancelling_frees_the_sandboxes(
    celery_workers, tiny_model_server, swe_mini
):
    run = make_run(swe_mini, ["ledger-1", "ledger-2"], model_name="tiny", max_steps=200, agent_config=TINY_AGENT_CONFIG)
    current_app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})
    deadline = time.monotonic() + 120
    while Episode.objects.filter(run=run, step_count__gte=3).count() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runs.cancel_run(run.pk, "cancelled by the test") == 2
    time.sleep(3)  # in-flight transitions reach the cancellation
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED
    client = docker.from_env()
    for episode in run.episodes.all():
        assert episode.status == Episode.Status.CANCELLED and episode.failure_reason == "cancelled by the test"
        indexes = step_indexes(episode)
        assert indexes == list(range(len(indexes))) and len(indexes) >= 3
        first = episode.steps.get(index=0)
        assert first.action == "" and first.observation.startswith("Bad reply: it contained no bash code block")
        assert not client.containers.list(all=True, filters={"label": f"megaflow.episode={episode.pk}"})


def test_admission_keeps_a_run_within_its_limit(celery_workers, swe_mini):
    most_live = []

    def watch(run):
        most_live.append(run.episodes.filter(status__in=transitions.LIVE).count())

    ids = ["calendarx-2", "calendarx-3", "kvconf-2", "kvconf-3"]
    run = start_and_wait(make_run(swe_mini, ids, max_concurrent_episodes=1), watch=watch)
    assert run.status == Run.Status.COMPLETED
    assert max(most_live) == 1
    assert {episode.reward for episode in run.episodes.all()} == {1.0}


def test_the_demo_command_runs_the_suite_and_ends_with_its_summary(celery_workers, swe_mini, capsys):
    from django.core.management import call_command

    call_command("megaflow", "demo", "--tasks", "2")
    lines = capsys.readouterr().out.strip().splitlines()
    assert "policy: replay (the tasks' reference solutions: no model is configured)" in "\n".join(lines)
    assert lines[-1] == "demo: 4 episodes, 4 succeeded, 0 failed, mean reward 1.000"


def test_a_run_exports_as_jsonl_for_trainers(celery_workers, swe_mini, tmp_path):
    import json

    from django.core.management import call_command

    run = start_and_wait(make_run(swe_mini, ["taskgraph-1"], model_name="sim", samples_per_task=2))
    out = tmp_path / "run.jsonl"
    call_command("megaflow", "export", str(run.pk), "--out", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(record["instance_id"], record["sample"]) for record in records] == [("taskgraph-1", 0), ("taskgraph-1", 1)]
    for record in records:
        assert record["actions"] == ["echo step 0", "echo step 1", "echo MEGAFLOW_SUBMIT"]
        assert record["observations"][0].startswith("<returncode>0</returncode>\n<output>\nstep 0")
        roles = [message["role"] for message in record["messages"]]
        assert roles == ["system", "user"] + ["assistant", "user"] * 3
        assert record["reward"] == 0.0 and record["prompt_tokens"] > 0 and record["status"] == "succeeded"
