"""The episode and run state machine (orchestrator/transitions.py), and the races it exists for.

Every allowed transition happens, every other one is refused and changes nothing; each race is driven in its
racing order by calling the code directly (the second actor runs inside a hook of the first), with no sleeps,
no Docker and no workers: the sim environment backend stands in for containers and what the loop publishes is
collected instead of sent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from envs import service as env_service
from envs.backend import get_backend
from megaflow_site import liveness
from modelserving.versions import current_key
from orchestrator import episode_loop, rollouts, runs, staleness, transitions
from orchestrator.hot_state import redis_client
from orchestrator.models import Dataset, Episode, ModelVersion, Run, Step, Task

pytestmark = pytest.mark.django_db

E, R = Episode.Status, Run.Status
REPLY = "Looking.\n```bash\necho hello\n```"
SUBMIT = "Done.\n```bash\necho MEGAFLOW_SUBMIT\n```"


@pytest.fixture
def sent(monkeypatch, settings) -> list[tuple[str, dict]]:
    """The messages the loop publishes, in order; the sim sandbox backend, with commands that take no time."""
    settings.MEGAFLOW_ENV_BACKEND = "sim"
    settings.MEGAFLOW_SIM_EXEC_LATENCY_S = 0
    settings.MEGAFLOW_WARM_POOL_SIZES = {}
    get_backend.cache_clear()
    episode_loop.cached_run.cache_clear()
    episode_loop.cached_task.cache_clear()
    episode_loop.agent_of_run.cache_clear()
    messages: list[tuple[str, dict]] = []
    monkeypatch.setattr(episode_loop, "send", lambda name, **kwargs: messages.append((name, kwargs)))
    monkeypatch.setattr(runs, "send", lambda name, **kwargs: messages.append((name, kwargs)))
    yield messages
    get_backend.cache_clear()


@pytest.fixture
def run() -> Run:
    dataset = Dataset.objects.create(name="transitions")
    task = Task.objects.create(dataset=dataset, instance_id="t-1", problem_statement="Fix it.", test_command="true",
                               fail_to_pass=["test_it"], spec_sha256="0" * 64)  # fmt: skip
    run = Run.objects.create(dataset=dataset, model_name="sim", env_pool="default", status=R.RUNNING,
                             max_steps=5, max_attempts=2)  # fmt: skip
    run.tasks.add(task)
    return run


def episode_in(run: Run, status: str, sample: int = 0, **fields) -> Episode:
    return Episode.objects.create(run=run, task=run.tasks.get(), sample_index=sample, status=status, **fields)


def status_of(episode: Episode) -> str:
    return Episode.objects.values_list("status", flat=True).get(pk=episode.pk)


def names(messages: list[tuple[str, dict]]) -> list[str]:
    return [name for name, _ in messages]


# --- the tables ------------------------------------------------------------------------------------------------

# Each transition function, and the states it takes an episode from (to the state named in its docstring).
EPISODE_MOVES = {
    "admit": ({E.QUEUED}, E.STARTING, lambda ep: transitions.admit(ep.pk, ep.attempt)),
    "claim_start": ({E.STARTING}, E.STARTING, lambda ep: transitions.claim_start(ep.pk, ep.attempt)),
    "assign_sandbox": ({E.STARTING}, E.STARTING, lambda ep: transitions.assign_sandbox(ep.pk, ep.attempt, "c-2")),
    "sandbox_ready": ({E.STARTING}, E.RUNNING, lambda ep: transitions.sandbox_ready(ep.pk, ep.attempt, "c-1")),
    "begin_evaluation": ({E.RUNNING, E.EVALUATING}, E.EVALUATING,
                         lambda ep: transitions.begin_evaluation(ep.pk, ep.attempt)),
    "succeed": ({E.EVALUATING}, E.SUCCEEDED, lambda ep: transitions.succeed(ep.pk, ep.attempt, 1.0)),
    "fail": ({E.QUEUED, E.STARTING, E.RUNNING, E.EVALUATING}, E.FAILED, lambda ep: transitions.fail(ep.pk, "x")),
    "time_out": ({E.STARTING, E.RUNNING, E.EVALUATING}, E.TIMED_OUT,
                 lambda ep: transitions.fail(ep.pk, "x", E.TIMED_OUT)),
    "cancel": ({E.QUEUED, E.STARTING, E.RUNNING, E.EVALUATING}, E.CANCELLED,
               lambda ep: transitions.cancel_episodes(ep.run_id, "x") != []),
    "retry_attempt": ({E.STARTING, E.RUNNING, E.EVALUATING}, E.QUEUED,
                      lambda ep: transitions.fail_or_retry(ep.pk, "x", retryable=True) == "retrying"),
    "retry_failed": ({E.FAILED, E.TIMED_OUT}, E.QUEUED, lambda ep: transitions.retry_failed(ep.run_id) == 1),
}  # fmt: skip


@pytest.mark.parametrize("move", sorted(EPISODE_MOVES))
@pytest.mark.parametrize("start", sorted(E.values))
def test_an_episode_moves_only_along_the_table(run, move, start):
    sources, target, attempt_move = EPISODE_MOVES[move]
    episode = episode_in(run, start, container_id="c-1")
    happened = attempt_move(episode)
    assert happened == (start in sources), f"{move} from {start}"
    assert status_of(episode) == (target if happened else start)
    assert (target in transitions.EPISODE_TRANSITIONS[start]) or not happened


def test_every_allowed_episode_transition_has_a_move():
    covered = {(start, target) for sources, target, _ in EPISODE_MOVES.values() for start in sources}
    table = {(start, target) for start, targets in transitions.EPISODE_TRANSITIONS.items() for target in targets}
    assert covered == table


@pytest.mark.parametrize("start", sorted(E.values))
def test_every_transition_records_the_incarnation_that_made_it(run, start):
    """Who moved an episode is the worker process incarnation (node#id), written in the transition's own UPDATE;
    ``hold`` and ``redrive`` record it on a live episode without changing its state."""
    for sample, (move, (sources, _target, attempt_move)) in enumerate(EPISODE_MOVES.items()):
        if start not in sources or move in {"cancel", "retry_failed"}:  # whole-run moves record no holder
            continue
        episode = episode_in(run, start, sample=sample, container_id="c-1", holder="gone@host#0")
        assert attempt_move(episode)
        assert Episode.objects.values_list("holder", flat=True).get(pk=episode.pk) == liveness.incarnation(), move


@pytest.mark.parametrize("start", sorted(E.values))
def test_hold_and_redrive_record_a_holder_of_a_live_episode_only(run, start):
    episode = episode_in(run, start, holder="gone@host#0")
    live = start in transitions.LIVE
    assert transitions.hold(episode.pk, 1) is live and not transitions.hold(episode.pk, 2), "attempt 2 is not current"
    episode.refresh_from_db()
    assert (episode.status, episode.holder == liveness.incarnation()) == (start, live)
    Episode.objects.filter(pk=episode.pk).update(holder="gone@host#0")
    seen = Episode.objects.values_list("updated_at", flat=True).get(pk=episode.pk)
    assert not transitions.redrive(episode.pk, 1, seen - timedelta(seconds=1)), "it moved since the watchdog looked"
    assert transitions.redrive(episode.pk, 1, seen) is live
    assert Episode.objects.values_list("status", "holder").get(pk=episode.pk) == (
        start,
        liveness.incarnation() if live else "gone@host#0",
    )


RUN_MOVES = {
    "start_run": ({R.QUEUED}, R.RUNNING, transitions.start_run),
    "complete_run": ({R.RUNNING}, R.COMPLETED, transitions.complete_run),
    "cancel_run": ({R.QUEUED, R.RUNNING}, R.CANCELLED, transitions.cancel_run),
    "reopen_run": ({R.COMPLETED, R.FAILED}, R.RUNNING, transitions.reopen_run),
}


@pytest.mark.parametrize("move", sorted(RUN_MOVES))
@pytest.mark.parametrize("start", sorted(R.values))
def test_a_run_moves_only_along_the_table(run, move, start):
    sources, target, attempt_move = RUN_MOVES[move]
    Run.objects.filter(pk=run.pk).update(status=start)
    happened = attempt_move(run.pk)
    status = Run.objects.values_list("status", flat=True).get(pk=run.pk)
    if move == "reopen_run" and start == R.RUNNING:
        assert happened and status == R.RUNNING  # a running run is already open
        return
    assert happened == (start in sources), f"{move} from {start}"
    assert status == (target if happened else start)


def test_every_allowed_run_transition_has_a_move():
    covered = {(start, target) for sources, target, _ in RUN_MOVES.values() for start in sources}
    table = {(start, target) for start, targets in transitions.RUN_TRANSITIONS.items() for target in targets}
    assert covered == table


def test_a_refused_transition_is_logged_with_both_states(run, caplog):
    episode = episode_in(run, E.SUCCEEDED)
    with caplog.at_level("INFO", logger="megaflow.transitions"):
        assert not transitions.fail(episode.pk, "too late")
    assert f"episode {episode.pk} → failed refused: it is succeeded (attempt 1)" in caplog.text
    assert Episode.objects.get(pk=episode.pk).failure_reason == ""


def test_a_run_does_not_complete_while_an_episode_is_unfinished(run):
    episode_in(run, E.SUCCEEDED)
    unfinished = episode_in(run, E.RUNNING, sample=1)
    assert not transitions.complete_run(run.pk)
    Episode.objects.filter(pk=unfinished.pk).update(status=E.FAILED)
    assert transitions.complete_run(run.pk)


def test_a_transition_is_one_statement_that_checks_its_sandbox_and_claim_and_adds_its_charges(run):
    """The compare-and-set is written out (orchestrator/hot_sql.py's ``update_episode``), not compiled by the ORM:
    each condition a transition names still refuses it, and its counters are added, not set."""
    episode = episode_in(run, E.STARTING, container_id="c-1", holder="alive@host#1", started_at=timezone.now(),
                         env_worker_s=0.5, step_count=3, prompt_tokens=7)  # fmt: skip
    assert not transitions.claim_start(episode.pk, 1, alive=["alive@host#1"]), "a living worker's start is under way"
    assert transitions.claim_start(episode.pk, 1, alive=["other@host#2"]), "a dead worker's start is taken over"
    assert not transitions.sandbox_ready(episode.pk, 1, "c-2", env_worker_s=1.0), "another container's start"
    assert not transitions.sandbox_ready(episode.pk, 2, "c-1", env_worker_s=1.0), "another attempt's"
    with CaptureQueriesContext(connection) as queries:
        assert transitions.sandbox_ready(episode.pk, 1, "c-1", env_worker_s=1.25)
    assert len(queries.captured_queries) == 1
    episode.refresh_from_db()
    assert (episode.status, episode.env_worker_s, episode.holder) == (E.RUNNING, 1.75, liveness.incarnation())
    assert transitions.fail_or_retry(episode.pk, "x", retryable=True, holding="c-1") == "retrying"
    episode.refresh_from_db()
    assert (episode.status, episode.attempt, episode.container_id, episode.step_count, episode.prompt_tokens,
            episode.started_at, episode.env_worker_s) == (E.QUEUED, 2, "", 0, 0, None, 1.75)  # fmt: skip


def test_an_automatic_retry_fails_for_good_at_max_attempts(run):
    episode = episode_in(run, E.RUNNING, attempt=2)  # max_attempts is 2
    assert transitions.fail_or_retry(episode.pk, "the sandbox container stopped", retryable=True) == "failed"
    episode.refresh_from_db()
    assert (episode.status, episode.failure_reason) == (E.FAILED, "attempt 2: the sandbox container stopped")


# --- the races -------------------------------------------------------------------------------------------------


def started_episode(run: Run, sent) -> Episode:
    """An episode admitted and started through the loop, its first turn published."""
    episode = episode_in(run, E.QUEUED)
    assert transitions.admit(episode.pk, 1)
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    assert status_of(episode) == E.RUNNING
    sent.clear()
    episode.refresh_from_db()
    return episode


def test_cancel_while_the_sandbox_starts(run, sent, monkeypatch):
    episode = episode_in(run, E.STARTING)
    created = []

    def create_then_cancel(*args, **kwargs):
        sandbox = real_create(*args, **kwargs)
        created.append(sandbox.container_id)
        runs.cancel_run(run.pk, "cancelled by the test")  # lands while the sandbox starts
        return sandbox

    real_create = env_service.create_sandbox
    monkeypatch.setattr(env_service, "create_sandbox", create_then_cancel)
    sent.clear()
    episode_loop.episode_start(episode.pk, "default", attempt=1)

    assert status_of(episode) == E.CANCELLED, "the start did not overwrite the cancel"
    assert not get_backend().is_alive(created[0]), "the sandbox that came up too late was released"
    assert "modelserving.episode_turn" not in names(sent)


def test_cancel_while_a_command_runs(run, sent, monkeypatch):
    episode = started_episode(run, sent)

    def run_then_cancel(*args):
        result = real_run(*args)
        runs.cancel_run(run.pk, "cancelled by the test")
        return result

    real_run = env_service.run_command
    monkeypatch.setattr(env_service, "run_command", run_then_cancel)
    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)

    episode.refresh_from_db()
    assert (episode.status, episode.step_count) == (E.CANCELLED, 0)
    assert "modelserving.episode_turn" not in names(sent), "no turn after a cancel"
    assert names(sent).count("envs.stop_sandbox") >= 1


def test_cancel_while_evaluating(run, sent, monkeypatch):
    episode = started_episode(run, sent)

    def evaluate_then_cancel(*args):
        evaluation = real_evaluate(*args)
        runs.cancel_run(run.pk, "cancelled by the test")
        return evaluation

    real_evaluate = env_service.evaluate
    monkeypatch.setattr(env_service, "evaluate", evaluate_then_cancel)
    episode_loop.episode_step(episode.pk, 0, SUBMIT, attempt=1)

    episode.refresh_from_db()
    assert (episode.status, episode.reward) == (E.CANCELLED, None), "the grade did not overwrite the cancel"
    assert "orchestrator.episode_done" not in names(sent)
    assert not get_backend().is_alive(episode.container_id)


# A second INSERT of a claimed step fails, as it must, and would abort the test's wrapping transaction on
# PostgreSQL: these run in autocommit, as the workers do.
@pytest.mark.django_db(transaction=True)
def test_a_redelivered_step_runs_its_command_once(run, sent, monkeypatch):
    episode = started_episode(run, sent)
    commands = []
    real_run = env_service.run_command

    def counted(*args):
        commands.append(args[1])
        return real_run(*args)

    monkeypatch.setattr(env_service, "run_command", counted)
    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)
    assert names(sent) == ["modelserving.episode_turn"]
    # Redelivered before the next turn ran: the next turn is published again, the command is not run again.
    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)
    assert names(sent) == ["modelserving.episode_turn"] * 2 and commands == ["echo hello"]
    # Redelivered after the next step was claimed: nothing to do.
    Step.objects.create(episode=episode, index=1, model_output=REPLY)
    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)
    assert len(sent) == 2 and commands == ["echo hello"]
    assert Step.objects.filter(episode=episode, index=0).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_redelivered_step_while_the_first_delivery_runs_is_dropped(run, sent, monkeypatch):
    """While a step's command runs, its worker's heartbeat holds the episode: the watchdog leaves it alone however
    long it has been, and a redelivery of the same message finds the young claim and is dropped."""
    episode = started_episode(run, sent)
    commands, redriven = [], []
    real_run = env_service.run_command
    later = timezone.now() + timedelta(hours=3)  # longer than any lease: only the heartbeat keeps it

    def run_while_redelivered(*args):
        commands.append(args[1])
        me = liveness.Fleet(alive={liveness.incarnation(): frozenset({episode.pk})})
        redriven.extend(runs.redrive_lost(me, [liveness.Event(later.timestamp(), "a broker restart")], now=later))
        episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)  # the redelivery, while this one runs
        return real_run(*args)

    monkeypatch.setattr(env_service, "run_command", run_while_redelivered)
    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)

    assert redriven == [] and commands == ["echo hello"]
    assert [(index, done is not None) for index, done in episode.steps.values_list("index", "completed_at")] == [
        (0, True)
    ]
    assert names(sent) == ["modelserving.episode_turn"]


@pytest.mark.django_db(transaction=True)
def test_a_holder_taken_over_cannot_record_its_step(run, sent, monkeypatch):
    """A worker judged dead that was in fact running the step (silent to Redis, not dead): the watchdog expires
    its claim and the re-driven step takes it over; when the first delivery finishes, the claim is no longer
    its own, so the trajectory holds the step once, from the takeover, and one next turn is published."""
    episode = started_episode(run, sent)
    observations = iter(["first delivery", "takeover"])
    redriven = []
    real_run = env_service.run_command

    def run_while_judged_dead(*args):
        result = real_run(*args)
        result = dataclasses.replace(result, output=next(observations))
        if not redriven:
            later = timezone.now() + timedelta(seconds=settings.MEGAFLOW_WORKER_DEAD_S + 1)
            beat = {"queues": ["env.default"], "beat_at": time.time(), "held": [episode.pk]}
            death = liveness.Event.death(liveness.incarnation(), beat, time.time())  # silent, not dead
            redriven.extend(runs.redrive_lost(liveness.Fleet(), [death], now=later))
            [(_, message)] = [item for item in sent if item[0] == "envs.episode_step"]
            episode_loop.episode_step(**{key: value for key, value in message.items() if key not in ("pool", "host")})
        return result

    monkeypatch.setattr(env_service, "run_command", run_while_judged_dead)
    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)

    assert redriven == [episode.pk]
    [(index, observation)] = episode.steps.values_list("index", "observation")
    assert index == 0 and "takeover" in observation
    assert names(sent) == ["envs.episode_step", "modelserving.episode_turn"], "one next turn"
    assert Episode.objects.get(pk=episode.pk).step_count == 1


def test_the_watchdog_re_drives_a_start_that_is_still_alive(run, sent, monkeypatch):
    episode = episode_in(run, E.STARTING)
    created = []
    real_create = env_service.create_sandbox

    def create_while_redriven(*args, **kwargs):
        sandbox = real_create(*args, **kwargs)
        created.append(sandbox.container_id)
        if len(created) == 1:  # the first start is slow; the watchdog's start runs to the end meanwhile
            episode_loop.episode_start(episode.pk, "default", attempt=1)
        return sandbox

    monkeypatch.setattr(env_service, "create_sandbox", create_while_redriven)
    episode_loop.episode_start(episode.pk, "default", attempt=1)

    episode.refresh_from_db()
    first, second = created
    assert (episode.status, episode.container_id) == (E.RUNNING, second)
    assert names(sent) == ["modelserving.episode_turn"], "one first turn, not two"
    assert not get_backend().is_alive(first) and get_backend().is_alive(second)


def test_a_duplicated_start_leaves_a_living_workers_start_alone(run, sent, monkeypatch):
    """A start delivered twice (a broker event's re-drive of a start that was only queued, a redelivery) while a
    living worker's start of the same attempt is under way: the second is dropped, the first's container is not
    torn down (before, it was, and under kill -9 every 20 s duplicated starts fed a backlog that never drained)."""
    episode = episode_in(run, E.STARTING)
    created = []
    real_create = env_service.create_sandbox

    def create_while_duplicated(*args, **kwargs):
        sandbox = real_create(*args, **kwargs)
        created.append(sandbox.container_id)
        if len(created) == 1:
            episode_loop.episode_start(episode.pk, "default", attempt=1)  # the duplicate, while this start runs
        return sandbox

    monkeypatch.setattr(env_service, "create_sandbox", create_while_duplicated)
    liveness.beat(["env.default"])  # this process is a living worker
    try:
        episode_loop.episode_start(episode.pk, "default", attempt=1)
    finally:
        liveness.sign_off()

    episode.refresh_from_db()
    [only] = created
    assert (episode.status, episode.container_id) == (E.RUNNING, only) and get_backend().is_alive(only)
    assert names(sent) == ["modelserving.episode_turn"], "one first turn"


def test_a_retry_racing_the_last_step_keeps_the_run_open(run, sent, monkeypatch):
    failed = episode_in(run, E.FAILED, sample=1, failure_reason="the sandbox container stopped")
    last = started_episode(run, sent)
    real_complete = transitions.complete_run

    def retry_then_complete(run_id):
        assert runs.retry_failed(run_id) == 1  # lands between the "nothing unfinished" check and the write
        return real_complete(run_id)

    monkeypatch.setattr(transitions, "complete_run", retry_then_complete)
    episode_loop.episode_step(last.pk, 0, SUBMIT, attempt=1)
    assert status_of(last) == E.SUCCEEDED
    [(name, message)] = [item for item in sent if item[0] == "orchestrator.episode_done"]
    runs.episode_done(**message)

    assert Run.objects.get(pk=run.pk).status == R.RUNNING, "the run is open while the retried episode waits"
    assert Episode.objects.get(pk=failed.pk).status in (E.QUEUED, E.STARTING)


def test_a_retry_after_the_run_completed_reopens_it(run, sent):
    failed = episode_in(run, E.FAILED, failure_reason="boom")
    runs.episode_done(failed.pk)
    assert Run.objects.get(pk=run.pk).status == R.COMPLETED
    assert runs.retry_failed(run.pk) == 1
    assert Run.objects.get(pk=run.pk).status == R.RUNNING and status_of(failed) == E.QUEUED


def test_two_admitters_admit_an_episode_once(run, sent):
    episode = episode_in(run, E.QUEUED)
    # Both read the queue before either wrote: only one compare-and-set wins.
    assert [transitions.admit(episode.pk, 1), transitions.admit(episode.pk, 1)] == [True, False]
    Run.objects.filter(pk=run.pk).update(max_concurrent_episodes=2)
    for sample in range(1, 5):
        episode_in(run, E.QUEUED, sample=sample)
    admitted = runs.admit() + runs.admit()
    assert len(admitted) == 1 and Episode.objects.filter(run=run, status__in=transitions.LIVE).count() == 2


def test_a_straggler_of_an_earlier_attempt_changes_nothing(run, sent, monkeypatch):
    episode = started_episode(run, sent)
    assert transitions.fail_or_retry(episode.pk, "the sandbox container stopped", retryable=True) == "retrying"
    episode.refresh_from_db()
    assert (episode.status, episode.attempt) == (E.QUEUED, 2)
    commands = []
    monkeypatch.setattr(env_service, "run_command", lambda *args: commands.append(args))

    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)
    episode_loop.episode_turn(episode.pk, 0, "sim", attempt=1)
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    assert transitions.fail_or_retry(episode.pk, "late news", retryable=False, attempt=1) == "unchanged"

    episode.refresh_from_db()
    assert (episode.status, episode.attempt, episode.step_count) == (E.QUEUED, 2, 0)
    assert commands == [] and sent == [] and not episode.steps.exists()


# --- model versions ------------------------------------------------------------------------------------------


def test_a_model_version_moves_only_along_its_table():
    from orchestrator.models import ModelVersion

    V = ModelVersion.Status
    ModelVersion.objects.create(model_name="sim", version="v1", checkpoint_path="/a")
    assert transitions.refuse_model_version("sim", "v1", "cannot read /a")
    assert not transitions.serve_model_version("sim", "v1"), "a refused version does not serve without a reload"
    assert transitions.reload_model_version("sim", "v1", "/b")
    assert ModelVersion.objects.get(version="v1").error == ""
    assert transitions.serve_model_version("sim", "v1")
    assert not transitions.refuse_model_version("sim", "v1", "late"), "serving is final"
    assert not transitions.reload_model_version("sim", "v1", "/c")
    record = ModelVersion.objects.get(version="v1")
    assert (record.status, record.checkpoint_path, record.error) == (V.SERVING, "/b", "")
    assert record.serving_at is not None
    assert not transitions.serve_model_version("sim", "nope"), "an unknown version changes nothing"


# --- model versions: a required version and a staleness bound (orchestrator/staleness.py) ----------------------


@pytest.fixture
def serve(db):
    """sim's versions v1, v2, v3, published in that order; ``serve(version)`` makes one the version sim serves."""
    for version in ("v1", "v2", "v3"):
        ModelVersion.objects.create(model_name="sim", version=version, checkpoint_path=f"/{version}",
                                    status=ModelVersion.Status.SERVING)  # fmt: skip
    ModelVersion.objects.create(model_name="sim", version="bad", checkpoint_path="/bad", status="refused")

    def serving(version: str) -> None:
        redis_client().set(current_key("sim"), json.dumps({"version": version, "checkpoint_path": f"/{version}"}))

    yield serving
    redis_client().delete(current_key("sim"))


def test_max_staleness_is_validated_with_the_run(run):
    fields = {"dataset": run.dataset.name, "model_name": "sim"}
    for bad in (-1, "two", 1.5):
        assert runs.run_errors({**fields, "max_staleness": bad}).keys() == {"max_staleness"}, bad
    assert runs.run_errors({**fields, "max_staleness": 0}) == {} == runs.run_errors({**fields, "max_staleness": None})
    assert runs.create_run({**fields, "max_staleness": 2}).max_staleness == 2
    assert runs.create_run(fields).max_staleness is None


def test_admission_starts_a_run_on_its_version_or_one_within_max_staleness(run, sent, serve):
    assert staleness.version_order("sim") == ["base", "v1", "v2", "v3"], "by publish time; refused ones never served"
    Run.objects.filter(pk=run.pk).update(model_version="v1", max_staleness=1)
    first, second = episode_in(run, E.QUEUED), episode_in(run, E.QUEUED, sample=1)
    Run.objects.filter(pk=run.pk).update(max_concurrent_episodes=1)
    assert runs.admit() == [], "base serves: v1 not yet"
    serve("v2")
    assert runs.admit() == [first.pk], "one version newer than the one required: within the bound"
    Run.objects.filter(pk=run.pk).update(max_concurrent_episodes=2)
    serve("v3")
    assert runs.admit() == [] and status_of(second) == E.QUEUED, "two newer: past it"
    Run.objects.filter(pk=run.pk).update(max_staleness=None)
    serve("v2")
    assert runs.admit() == [], "without a bound, only the version required itself"
    serve("v1")
    assert runs.admit() == [second.pk]


def test_an_episode_past_max_staleness_is_masked_and_taken_again_never_graded(run, sent, serve):
    """max_staleness 0: every turn of a rollout on its first turn's version. A version that serves before the next
    turn stops the episode there; one published while a turn was queued shows in that turn, and stops it too,
    even when the agent submitted: the sample is dropped (masked), not graded."""
    Run.objects.filter(pk=run.pk).update(max_staleness=0)
    serve("v1")
    episode = started_episode(run, sent)

    def step(index: int, version: str, reply: str = REPLY, attempt: int = 1) -> None:
        turn = {"model_name": "sim", "model_version": version}
        episode_loop.episode_step(episode.pk, index, reply, attempt=attempt, turn=turn)

    step(0, "v1")
    assert names(sent) == ["modelserving.episode_turn"], "on the version it started on: it carries on"
    sent.clear()
    serve("v2")
    step(1, "v1")
    episode.refresh_from_db()
    assert (episode.status, episode.attempt, names(sent)) == (E.QUEUED, 2, ["orchestrator.episode_done"])
    assert episode.failure_reason == ("attempt 1 failed: stale: sim serves 'v2', 1 versions newer than 'v1' that the "
                                      "episode's first turn ran on (max_staleness 0)")  # fmt: skip

    # The fresh attempt starts on v2; v3 is published while its second turn is queued, and that turn submits.
    assert transitions.admit(episode.pk, 2)
    episode_loop.episode_start(episode.pk, "default", attempt=2)
    sent.clear()
    step(0, "v2", attempt=2)
    serve("v3")
    step(1, "v3", SUBMIT, attempt=2)
    episode.refresh_from_db()
    assert (episode.status, episode.reward) == (E.FAILED, None), "the run's 2 attempts are spent: failed, not graded"
    assert episode.failure_reason.startswith("attempt 2: stale: a turn ran on 'v3', 1 versions newer than 'v2'")
    line = rollouts.rollout(episode, run, list(episode.steps.order_by("index")))
    assert (line["mask"], line["stop_reason"], line["model_versions"]) == (True, "staleness", ["v2", "v3"])


def test_without_a_bound_versions_only_show_in_the_turns(run, sent, serve):
    serve("v1")
    episode = started_episode(run, sent)
    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1, turn={"model_version": "v1"})
    serve("v3")
    sent.clear()
    episode_loop.episode_step(episode.pk, 1, REPLY, attempt=1, turn={"model_version": "v3"})
    assert names(sent) == ["modelserving.episode_turn"] and status_of(episode) == E.RUNNING
