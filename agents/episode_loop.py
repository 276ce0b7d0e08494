"""The episode state machine: plain functions, one per transition, each called by a thin Celery task on the
queue of the service that holds what it needs. Nothing waits on anything: a transition's last act is to publish
the next one.

    agents.start_run          agent   fan out the run's episodes, admit as many as the limits allow
    envs.episode_start        env     sandbox up → publish the first model turn
    modelserving.episode_turn model   prompt (the agent, from the Step rows) → generate → publish the env step
    envs.episode_step         env     parse the reply (the agent, inline) → run it → Step row → next turn, or
                                      evaluate and finish
    agents.episode_done       agent   run accounting, then admit more

A step costs two hops (model, environment): agent logic is a library call made where the data is.

Exactly-once effects over at-least-once delivery: the Step row is the claim. ``episode_step`` inserts it
before running the action (the unique (episode, index) decides between two deliveries of one message) and
marks it complete after. A redelivered step that finds its row complete re-publishes the next turn only while
the episode has not moved past it; one that finds an incomplete row whose claim is older than the exec timeout
takes it over (the action may run twice; the trajectory never holds it twice). A redelivered model turn whose
step is already claimed is dropped. Every transition first checks the episode: a cancelled or finished one
stops there and its sandbox is released.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from agents.agent import CommandResult, TaskView, Turn, run_agent, submitted
from orchestrator import episodes as episode_state
from orchestrator.autoscale import admission_limit
from orchestrator.db import release_connection
from orchestrator.hot_state import redis_client
from orchestrator.models import Episode, Run, Step, Task

logger = logging.getLogger("megaflow.agents")

LIVE = (Episode.Status.STARTING, Episode.Status.RUNNING, Episode.Status.EVALUATING)


def _send(task_name: str, **kwargs) -> None:
    from celery import current_app

    current_app.send_task(task_name, kwargs=kwargs)


# --- agent queue ---------------------------------------------------------------------------------------------


def start_run(run_id: int) -> int:
    """Create the run's episodes (tasks × samples, idempotently), mark it running, admit episodes. Returns how
    many episodes the run has."""
    run = Run.objects.get(pk=run_id)
    if run.status in Run.TERMINAL:
        return run.episodes.count()
    Episode.objects.bulk_create(
        [
            Episode(run=run, task=task, sample_index=sample)
            for task in run.tasks.all()
            for sample in range(run.samples_per_task)
        ],
        ignore_conflicts=True,
    )
    Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).update(status=Run.Status.RUNNING, started_at=timezone.now())
    admit()
    return run.episodes.count()


def admit() -> list[int]:
    """Start queued episodes while their run and the whole fleet have room (``Run.max_concurrent_episodes``,
    ``MEGAFLOW_MAX_LIVE_EPISODES``, the autoscaler's admission limit). One admitter at a time (a Redis lock),
    oldest runs first."""
    admitted: list[tuple[int, str]] = []
    with redis_client().lock("megaflow:admission", timeout=60, blocking_timeout=30):
        ceiling = settings.MEGAFLOW_MAX_LIVE_EPISODES
        if (throttle := admission_limit()) is not None:  # the autoscaler's, while the latency SLO is breached
            ceiling = min(ceiling, throttle)
        room = ceiling - Episode.objects.filter(status__in=LIVE).count()
        for run in Run.objects.filter(status=Run.Status.RUNNING).order_by("created_at"):
            if room <= 0:
                break
            run_room = run.max_concurrent_episodes - run.episodes.filter(status__in=LIVE).count()
            queued = run.episodes.filter(status=Episode.Status.QUEUED).order_by("pk")
            ready = [episode.pk for episode in queued.only("pk", "attempt", "updated_at") if _backed_off(episode)]
            for episode_id in ready[: max(0, min(room, run_room))]:
                if Episode.objects.filter(pk=episode_id, status=Episode.Status.QUEUED).update(
                    status=Episode.Status.STARTING
                ):
                    admitted.append((episode_id, run.env_pool))
                    room -= 1
    for episode_id, pool in admitted:
        _send("envs.episode_start", episode_id=episode_id, pool=pool)
    return [episode_id for episode_id, _ in admitted]


def _backed_off(episode: Episode) -> bool:
    """A retried episode waits MEGAFLOW_RETRY_BACKOFF_S, doubling with each attempt, before it is admitted."""
    if episode.attempt <= 1:
        return True
    wait = settings.MEGAFLOW_RETRY_BACKOFF_S * 2 ** (episode.attempt - 2)
    return timezone.now() - episode.updated_at >= timedelta(seconds=wait)


def episode_done(episode_id: int) -> None:
    """Close the run when its last episode ended, then let the next episodes in."""
    run_id = Episode.objects.filter(pk=episode_id).values_list("run_id", flat=True).first()
    if run_id is None:
        return  # the episode was deleted with its run
    unfinished = Episode.objects.filter(run_id=run_id).exclude(status__in=Episode.TERMINAL)
    if not unfinished.exists():
        Run.objects.filter(pk=run_id, status=Run.Status.RUNNING).update(
            status=Run.Status.COMPLETED, finished_at=timezone.now()
        )
    admit()


def stalled_after_s() -> float:
    """How long a live episode may go without progress before the watchdog re-drives it: past the visibility
    timeout plus a task's hard limit, so that the broker's own redelivery always gets its chance first."""
    return settings.CELERY_BROKER_VISIBILITY_TIMEOUT_S + settings.CELERY_TASK_TIME_LIMIT


def watchdog() -> list[int]:
    """Re-drive live episodes that stopped moving, from their durable state. A message can be lost outright
    (a worker killed between Redis handing it over and recording it as unacknowledged); every transition is
    idempotent, so re-publishing the one the database implies is always safe. Returns the episodes re-driven."""
    cutoff = timezone.now() - timedelta(seconds=stalled_after_s())
    stalled = Episode.objects.filter(status__in=LIVE, updated_at__lt=cutoff).select_related("run")
    redriven = []
    for episode in stalled:
        run = episode.run
        Episode.objects.filter(pk=episode.pk).update(updated_at=timezone.now())
        last = episode.steps.order_by("-index").first()
        if episode.status == Episode.Status.STARTING:
            _send("envs.episode_start", episode_id=episode.pk, pool=run.env_pool)
        elif last is not None and (last.completed_at is None or episode.status == Episode.Status.EVALUATING):
            _send(
                "envs.episode_step",
                episode_id=episode.pk,
                step=last.index,
                reply=last.model_output,
                pool=run.env_pool,
                attempt=episode.attempt,
            )
        else:
            next_step = 0 if last is None else last.index + 1
            _send(
                "modelserving.episode_turn",
                episode_id=episode.pk,
                step=next_step,
                model=run.model_name,
                attempt=episode.attempt,
            )
        logger.warning("episode %s stalled in %s; re-driven", episode.pk, episode.status)
        redriven.append(episode.pk)
    return redriven


def cancel_run(run_id: int, reason: str = "cancelled") -> int:
    """Cancel every unfinished episode of the run; live ones stop at their next transition, and their
    sandboxes are released now. Returns how many episodes were cancelled."""
    with transaction.atomic():
        Run.objects.filter(pk=run_id).exclude(status__in=Run.TERMINAL).update(
            status=Run.Status.CANCELLED, finished_at=timezone.now()
        )
        unfinished = list(Episode.objects.filter(run_id=run_id).exclude(status__in=Episode.TERMINAL))
        for episode in unfinished:
            episode_state.record_failure(episode.pk, reason, Episode.Status.CANCELLED)
    pool = Run.objects.values_list("env_pool", flat=True).get(pk=run_id)
    for episode in unfinished:
        if episode.container_id:
            _send("envs.stop_sandbox", episode_id=episode.pk, pool=pool)
    return len(unfinished)


def retry_failed(run_id: int) -> int:
    """Give the run's failed and timed-out episodes a fresh attempt (their old steps are dropped, and messages
    of the old attempt are ignored by number); the run goes back to running. Returns how many were requeued."""
    retried = [Episode.Status.FAILED, Episode.Status.TIMED_OUT]
    with transaction.atomic():
        ids = list(
            Episode.objects.select_for_update().filter(run_id=run_id, status__in=retried).values_list("pk", flat=True)
        )
        if not ids:
            return 0
        Step.objects.filter(episode_id__in=ids).delete()
        Episode.objects.filter(pk__in=ids).update(
            status=Episode.Status.QUEUED, attempt=F("attempt") + 1, reward=None, container_id="", step_count=0,
            prompt_tokens=0, completion_tokens=0, started_at=None, finished_at=None, updated_at=timezone.now(),
        )  # fmt: skip
        Run.objects.filter(pk=run_id).update(status=Run.Status.RUNNING, finished_at=None)
    _send("agents.admit")
    return len(ids)


# --- the agent, wherever the data is -------------------------------------------------------------------------
#
# A step is the hot path: every database round trip and every ORM query compiled here is paid tens of thousands
# of times a minute at scale. So the run and the task, which no longer change once a run has started, are read
# once per worker process; the episode is read as the few columns a transition needs; and each step writes its
# row twice (claim, then result) and the episode once. docs: agents/README.md, "Where a step's time goes".


@functools.lru_cache(maxsize=4096)
def _run(run_id: int) -> Run:
    return Run.objects.get(pk=run_id)


@functools.lru_cache(maxsize=4096)
def _task(task_id: int) -> Task:
    return Task.objects.get(pk=task_id)


@functools.lru_cache(maxsize=1024)
def _agent_for(run_id: int):
    run = _run(run_id)
    return run_agent(run.agent_name, run.agent_config)


@dataclass(frozen=True)
class _Live:
    """What a transition needs to know about its episode, read in one query."""

    id: int
    run_id: int
    task_id: int
    status: str
    attempt: int
    container_id: str
    started_at: datetime | None
    created_at: datetime
    prompt_tokens: int
    completion_tokens: int

    @property
    def is_terminal(self) -> bool:
        return self.status in Episode.TERMINAL

    @property
    def run(self) -> Run:
        return _run(self.run_id)


def _live(episode_id: int) -> _Live:
    fields = [field.name for field in dataclasses.fields(_Live)]
    return _Live(*Episode.objects.filter(pk=episode_id).values_list(*fields).get())


def _finish(episode_id: int) -> None:
    _send("agents.episode_done", episode_id=episode_id)


def _stop(episode: _Live) -> None:
    """The episode is over: make sure its sandbox is released."""
    if episode.container_id:
        _send("envs.stop_sandbox", episode_id=episode.id, pool=episode.run.env_pool)


def _over_time(episode: _Live) -> bool:
    started = episode.started_at or episode.created_at
    return timezone.now() - started > timedelta(seconds=episode.run.episode_time_limit_s)


# --- env queue -------------------------------------------------------------------------------------------------


def episode_start(episode_id: int, pool: str) -> None:
    from envs import service as env_service

    started = env_service.start_sandbox(episode_id, pool)
    if not started["ok"]:
        _finish(episode_id)  # the env service recorded why
        return
    episode = _live(episode_id)
    _send("modelserving.episode_turn", episode_id=episode_id, step=0, model=episode.run.model_name,
          attempt=episode.attempt)  # fmt: skip


def episode_step(
    episode_id: int,
    step: int,
    reply: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    model_latency_s: float = 0.0,
    attempt: int = 1,
) -> None:
    from envs import service as env_service

    episode = _live(episode_id)
    if episode.is_terminal:
        _stop(episode)
        return
    if attempt != episode.attempt:
        return  # a straggler of an earlier attempt
    row = _claim_step(episode_id, step, reply)
    if row is None:
        return  # another delivery of this message holds the claim, or the step already ran and moved on
    if row.completed_at:
        _after_step(episode, row)  # a redelivery of a step that ran, before anything after it happened
        return
    run, task = episode.run, _task(episode.task_id)
    agent = _agent_for(run.pk)
    action = agent.parse(reply)
    result = None
    if action.malformed:
        observation = agent.feedback_observation(action)
    else:
        timeout_s = min(settings.MEGAFLOW_EXEC_TIMEOUT_S, task.timeout_s)
        outcome = env_service.run_command(
            episode_id, episode.container_id, action.command, run.env_pool, timeout_s, task.workdir
        )
        if not outcome["ok"]:
            _finish(episode_id)  # the sandbox failed; the env service recorded why
            return
        result = outcome
        command_result = CommandResult(outcome["output"], outcome["exit_code"], outcome["timed_out"])
        observation = agent.observation(command_result)
    completed_at = timezone.now()
    Step.objects.filter(pk=row.pk).update(
        action=action.command or "",
        observation=observation,
        exit_code=None if result is None else result["exit_code"],
        model_latency_s=model_latency_s,
        env_latency_s=None if result is None else result["duration_s"],
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        completed_at=completed_at,
    )
    Episode.objects.filter(pk=episode_id).update(
        step_count=step + 1,
        prompt_tokens=F("prompt_tokens") + prompt_tokens,
        completion_tokens=F("completion_tokens") + completion_tokens,
        updated_at=completed_at,
    )
    row.action, row.observation, row.completed_at = action.command or "", observation, completed_at
    episode = dataclasses.replace(
        episode,
        prompt_tokens=episode.prompt_tokens + prompt_tokens,
        completion_tokens=episode.completion_tokens + completion_tokens,
    )
    _after_step(episode, row, submitted_now=result is not None and submitted(result["output"]))


def _claim_step(episode_id: int, step: int, reply: str) -> Step | None:
    """The Step row that makes this delivery the one to run the step, or a completed row whose follow-up must
    be re-published; None when there is nothing for this delivery to do."""
    try:
        # Autocommit: the INSERT is its own transaction, and the unique (episode, index) picks one delivery.
        return Step.objects.create(episode_id=episode_id, index=step, model_output=reply)
    except IntegrityError:
        pass
    row = Step.objects.get(episode_id=episode_id, index=step)
    if row.completed_at:
        # A redelivery of a step that ran: carry on only if nothing after it happened yet.
        return None if Step.objects.filter(episode_id=episode_id, index=step + 1).exists() else row
    # A claim younger than the hard time limit may belong to a task still running; an older one cannot (the
    # limit kills it), and a redelivery only comes after the visibility timeout, at least twice the limit.
    stale = timezone.now() - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT)
    taken = Step.objects.filter(pk=row.pk, created_at__lte=stale).update(created_at=timezone.now())
    return row if taken else None


def _after_step(episode: _Live, row: Step, submitted_now: bool | None = None) -> None:
    """What follows a completed step: evaluation when the agent submitted or a budget ran out, else the next
    model turn."""
    from envs import service as env_service

    run = episode.run
    if submitted_now is None:  # re-derived after a redelivery
        submitted_now = bool(row.action) and submitted(row.observation)
    tokens = episode.prompt_tokens + episode.completion_tokens
    out_of_tokens = bool(run.max_episode_tokens) and tokens >= run.max_episode_tokens
    if _over_time(episode):
        reason = f"wall-clock budget of {run.episode_time_limit_s} s exhausted"
        env_service.fail_episode(episode.id, reason, run.env_pool, Episode.Status.TIMED_OUT)
    elif submitted_now or row.index + 1 >= run.max_steps or out_of_tokens:
        # Out of steps or tokens without submitting: the tree is graded as it stands.
        env_service.evaluate_episode(episode.id, run.env_pool)
    else:
        _send(
            "modelserving.episode_turn",
            episode_id=episode.id,
            step=row.index + 1,
            model=run.model_name,
            attempt=episode.attempt,
        )
        return
    _finish(episode.id)


# --- model queue ---------------------------------------------------------------------------------------------


def episode_turn(episode_id: int, step: int, model: str, attempt: int = 1) -> None:
    from modelserving import service as model_service

    episode = _live(episode_id)
    if episode.is_terminal:
        _stop(episode)
        return
    if attempt != episode.attempt:
        return  # a straggler of an earlier attempt
    # One query for both the history and the redelivery check.
    steps = list(
        Step.objects.filter(episode_id=episode_id, index__lte=step)
        .order_by("index")
        .values_list("index", "model_output", "observation", "completed_at")
    )
    if steps and steps[-1][0] == step:
        return  # a redelivered turn whose step is already claimed
    run, task = episode.run, _task(episode.task_id)
    history = [Turn(output, observation) for _, output, observation, completed in steps if completed]
    view = TaskView(task.instance_id, task.problem_statement, task.workdir)
    request = {
        "request_id": f"{episode_id}:{step}",
        "messages": _agent_for(run.pk).messages(view, history),
        "sampling": (run.agent_config or {}).get("sampling", {}),
        "context": {"task_id": task.pk},
    }
    release_connection()  # nothing needs the database while the model works
    [generation] = model_service.generate(model, [request], episode_id=episode_id)
    if generation.get("error"):
        # The episode ended or went back to the queue for a fresh attempt: either way this sandbox is done.
        if episode.container_id:
            _send("envs.stop_sandbox", episode_id=episode_id, pool=run.env_pool, container_id=episode.container_id)
        _finish(episode_id)  # the model service recorded why (and requeued the episode if worth retrying)
        return
    _send(
        "envs.episode_step",
        episode_id=episode_id,
        step=step,
        reply=generation["text"],
        prompt_tokens=generation.get("prompt_tokens", 0),
        completion_tokens=generation.get("completion_tokens", 0),
        model_latency_s=generation.get("latency_s", 0.0),
        pool=run.env_pool,
        attempt=attempt,
    )
