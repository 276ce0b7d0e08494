"""What episodes cost is counted where it is spent, and counted whole before the episode's attempt ends: a start
whose container creation fails after a pull pays for the pull, a step whose command fails pays for the model turn
that led to it, and a failed hop's worker time is on the episode before ``episode_done`` is sent (a run's cost is
complete when the run completes). DB-only: the Environment Service's sandbox operations are stand-ins."""

from __future__ import annotations

import contextlib
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from envs import service
from envs.backend import ExecResult, PullRecord, SandboxError
from envs.task_sandbox import Evaluation
from orchestrator import episode_loop
from orchestrator.models import Episode, Run

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def done_costs(monkeypatch) -> list[dict]:
    """The episode's counters as they stood when ``orchestrator.episode_done`` was sent for it."""
    seen = []

    def send(name, **kwargs):
        if name == "orchestrator.episode_done":
            episode = Episode.objects.get(pk=kwargs["episode_id"])
            seen.append({"status": episode.status, **{f: getattr(episode, f) for f in COUNTERS}})

    monkeypatch.setattr(episode_loop, "send", send)
    monkeypatch.setattr(service, "release", lambda container_id, pool, clock_stopped=False: 0.0)
    monkeypatch.setattr(service, "stop_clock", lambda container_id: 0.0)
    return seen


RELEASE = service.release

COUNTERS = ("env_worker_s", "model_s", "cost_prompt_tokens", "cost_completion_tokens", "image_pulls",
            "image_pull_bytes", "image_pull_s")  # fmt: skip


def an_episode(swe_mini, status, container_id="") -> Episode:
    task = swe_mini.tasks.get(instance_id="textkit-1")
    run = Run.objects.create(model_name="replay", env_pool="default", status=Run.Status.RUNNING)
    run.tasks.add(task)
    return Episode.objects.create(run=run, task=task, sample_index=0, status=status, container_id=container_id)


class PullsThenCannotCreate:
    """A backend whose image pull works and whose container creation then fails."""

    def holding_image(self, image):
        return contextlib.nullcontext()

    def ensure_image(self, image, on_pull=None):
        return PullRecord(image, pulled=True, seconds=2.5, bytes=1234)

    def create(self, spec):
        time.sleep(0.02)
        raise SandboxError("the daemon refused the container", retryable=False)


def test_a_pull_is_charged_when_the_container_creation_after_it_fails(swe_mini, done_costs, monkeypatch):
    monkeypatch.setattr(service, "get_backend", lambda: PullsThenCannotCreate())
    monkeypatch.setattr(service.warm_pool, "pool_size", lambda pool: 0)
    episode = an_episode(swe_mini, Episode.Status.STARTING)
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    [cost] = done_costs
    assert cost["status"] == Episode.Status.FAILED
    assert (cost["image_pulls"], cost["image_pull_bytes"], cost["image_pull_s"]) == (1, 1234, 2.5)
    assert cost["env_worker_s"] >= 0.02, "the failed start's worker time is counted before the episode ends"
    episode.refresh_from_db()
    assert episode.env_worker_s == cost["env_worker_s"], "and not counted twice"


def test_a_failed_prepare_charges_the_start_before_the_episode_ends(swe_mini, done_costs, monkeypatch):
    monkeypatch.setattr(service, "create_sandbox", lambda *args, **kwargs: service.Sandbox("c-1"))

    def prepare(container_id, task):
        time.sleep(0.02)
        raise SandboxError("setup failed", retryable=False)

    monkeypatch.setattr(service, "prepare_sandbox", prepare)
    episode = an_episode(swe_mini, Episode.Status.STARTING)
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    [cost] = done_costs
    assert cost["status"] == Episode.Status.FAILED and cost["env_worker_s"] >= 0.02
    episode.refresh_from_db()
    assert episode.env_worker_s == cost["env_worker_s"]


def test_a_step_whose_command_fails_still_pays_for_its_model_turn(swe_mini, done_costs, monkeypatch):
    def run_command(*args, **kwargs):
        time.sleep(0.02)
        raise SandboxError("the sandbox container stopped", retryable=False)

    monkeypatch.setattr(service, "run_command", run_command)
    episode = an_episode(swe_mini, Episode.Status.RUNNING, container_id="c-1")
    episode_loop.episode_step(episode.pk, 0, "```bash\nls\n```", prompt_tokens=100, completion_tokens=7,
                              model_latency_s=1.5, attempt=1)  # fmt: skip
    [cost] = done_costs
    assert cost["status"] == Episode.Status.FAILED
    assert (cost["model_s"], cost["cost_prompt_tokens"], cost["cost_completion_tokens"]) == (1.5, 100, 7)
    assert cost["env_worker_s"] >= 0.02


def test_an_evaluation_is_charged_with_the_episodes_end_or_alone_when_the_end_is_refused(
    swe_mini, done_costs, monkeypatch
):
    """The evaluation's worker time and the sandbox's seconds ride on the UPDATE that ends the episode (one statement,
    not two); an episode cancelled during its evaluation is not ended by it, and still pays for it."""
    monkeypatch.setattr(service, "run_command", lambda *args, **kwargs: ExecResult(0, "MEGAFLOW_SUBMIT\n", 0.01))
    clocks_stopped = []
    monkeypatch.setattr(service, "stop_clock", lambda container_id: clocks_stopped.append(container_id) or 3.0)
    monkeypatch.setattr(service, "release", RELEASE)  # the real one (its destroy of the made-up container is logged)
    cancel_during_evaluation = []

    def evaluate(container_id, task):
        time.sleep(0.02)
        if cancel_during_evaluation:
            Episode.objects.filter(container_id=container_id).update(status=Episode.Status.CANCELLED)
        return Evaluation(reward=1.0)

    monkeypatch.setattr(service, "evaluate", evaluate)
    ended = an_episode(swe_mini, Episode.Status.RUNNING, container_id="c-ended")
    with CaptureQueriesContext(connection) as queries:
        episode_loop.episode_step(ended.pk, 0, "```bash\necho MEGAFLOW_SUBMIT\n```", attempt=1)
    [cost] = done_costs
    assert cost["status"] == Episode.Status.SUCCEEDED and cost["env_worker_s"] >= 0.02
    ended.refresh_from_db()
    assert ended.sandbox_s == 3.0 and ended.env_worker_s == cost["env_worker_s"], "counted once, before the end"
    updates = [query["sql"] for query in queries.captured_queries if query["sql"].startswith("UPDATE")]
    ending = [sql for sql in updates if '"finished_at"' in sql]
    assert len(ending) == 1 and '"sandbox_s"' in ending[0], "the charge is in the statement that ends the episode"
    assert clocks_stopped == ["c-ended"], "the release after it does not ask Redis for the stopped clock again"

    cancel_during_evaluation.append(True)
    cancelled = an_episode(swe_mini, Episode.Status.RUNNING, container_id="c-cancelled")
    episode_loop.episode_step(cancelled.pk, 0, "```bash\necho MEGAFLOW_SUBMIT\n```", attempt=1)
    cancelled.refresh_from_db()
    assert cancelled.status == Episode.Status.CANCELLED
    assert cancelled.sandbox_s == 3.0 and cancelled.env_worker_s >= 0.02, "a refused end still pays for its evaluation"


def test_a_start_that_succeeds_is_charged_with_the_episodes_turn_to_running(swe_mini, done_costs, monkeypatch):
    monkeypatch.setattr(service, "create_sandbox", lambda *args, **kwargs: service.Sandbox("c-1"))
    monkeypatch.setattr(service, "prepare_sandbox", lambda container_id, task: time.sleep(0.02))
    episode = an_episode(swe_mini, Episode.Status.STARTING)
    with CaptureQueriesContext(connection) as queries:
        episode_loop.episode_start(episode.pk, "default", attempt=1)
    episode.refresh_from_db()
    assert episode.status == Episode.Status.RUNNING and episode.env_worker_s >= 0.02
    charging = [
        query["sql"] for query in queries.captured_queries if '"env_worker_s" = "env_worker_s" + ' in query["sql"]
    ]
    assert len(charging) == 1 and '"status" = ' in charging[0], "one statement: the transition carries the charge"
