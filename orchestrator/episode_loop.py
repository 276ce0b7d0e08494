"""The episode loop: plain functions, one per hop of an episode, each called by a thin Celery task on the queue
of the service that holds what it needs (orchestrator/tasks.py). Nothing waits on anything: a hop's last act is
to publish the next one.

    envs.episode_start          env     sandbox up → publish the first model turn
    modelserving.episode_turn   model   prompt (the agent, from the Step rows) → generate → publish the env step
    envs.episode_step           env     parse the reply (the agent, inline) → run it → Step row → next turn, or
                                        evaluate and finish
    orchestrator.episode_done   agent   run accounting, then admit more (orchestrator/runs.py)

A step costs two hops (model, environment): agent logic is a library call made where the data is. The
services (envs/service.py, modelserving/service.py) return values and raise typed errors; this module turns
them into the episode's transitions (orchestrator/transitions.py) and acts only on those that happened.

Exactly-once effects over at-least-once delivery: the Step row is the claim. ``episode_step`` inserts it
before running the action (the unique (episode, index) decides between two deliveries of one message) and
marks it complete after. A redelivered step that finds its row complete re-publishes the next turn only while
the episode has not moved past it; one that finds an incomplete row whose claim is older than the task time
limit takes it over, and so does one whose claim the watchdog expired because no living worker held it (the
action may run twice; the trajectory never holds it twice: the claim's time is its fencing token, and a holder
that was taken over cannot record its result). A redelivered model turn
whose step is already claimed is dropped. Every message carries the episode's attempt: one of an earlier
attempt is a straggler and changes nothing. A hop that finds its episode finished releases the sandbox. A hop
that goes ahead first records that this worker process holds the episode (``transitions.hold``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery import current_app
from django.conf import settings
from django.db import IntegrityError
from django.utils import timezone

from agents.agent import Agent, CommandResult, FrameworkAgent, TaskView, Turn, drives_itself, run_agent, submitted
from envs import service as env_service
from envs.backend import SandboxError
from megaflow_site import hop_batches, liveness
from modelserving import service as model_service
from modelserving.backend import GenerationRequest, SamplingParams
from modelserving.token_prompts import PreviousTurn
from orchestrator import costs, hot_sql, packed, staleness, transitions
from orchestrator.db import release_connection
from orchestrator.hot_state import RAMPING_KEY, ask_for_admission, redis_client
from orchestrator.models import Episode, Run, Step, Task

logger = logging.getLogger("megaflow.episodes")


def send(task_name: str, **kwargs) -> None:
    """Publish the next hop; the router (megaflow_site/topology.py) picks its queue from its name and kwargs. The hot
    hops travel several to a message (megaflow_site/hop_batches.py)."""
    if hop_batches.send(task_name, kwargs):
        return
    # ignore_result: no result backend is asked about the message (the app has none; looking it up costs a backend
    # object per greenlet on the gevent pool).
    current_app.send_task(task_name, kwargs=kwargs, argsrepr="()", kwargsrepr=brief_repr(kwargs), ignore_result=True)


def brief_repr(kwargs: dict) -> str:
    """What Flower and the logs show of a message's kwargs: its small values, and ``...`` for the rest. Celery's own
    repr walks every value, and a turn's thousands of token ids made it a fifth of the publish."""
    shown = {key: value if _small(value) else ... for key, value in kwargs.items()}
    return repr(shown)


def _small(value) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 80)


# --- what a hop reads ----------------------------------------------------------------------------------------
#
# A step is the hot path: every database round trip and every ORM query compiled here is paid tens of thousands
# of times a minute at scale. So the run and the task, which no longer change once a run has started, are read
# once per worker process; the episode is read as the few columns a hop needs; and each step writes its row
# twice (claim, then result) and the episode once. docs: agents/README.md, "Where a step's time goes".


@functools.lru_cache(maxsize=4096)
def cached_run(run_id: int) -> Run:
    return Run.objects.get(pk=run_id)


@functools.lru_cache(maxsize=4096)
def cached_task(task_id: int) -> Task:
    return Task.objects.get(pk=task_id)


@functools.lru_cache(maxsize=1024)
def agent_of_run(run_id: int) -> Agent | FrameworkAgent:
    run = cached_run(run_id)
    return run_agent(run.agent_name, run.agent_config)


@dataclass(frozen=True)
class Live:
    """What a hop needs to know about its episode, read in one query."""

    id: int
    run_id: int
    task_id: int
    status: str
    attempt: int
    container_id: str
    env_host: str
    started_at: datetime | None
    created_at: datetime
    prompt_tokens: int
    completion_tokens: int

    @property
    def is_terminal(self) -> bool:
        return self.status in Episode.TERMINAL

    @property
    def run(self) -> Run:
        return cached_run(self.run_id)

    @property
    def task(self) -> Task:
        return cached_task(self.task_id)


LIVE_FIELDS = tuple(field.name for field in dataclasses.fields(Live))


def read_live(episode_id: int) -> Live | None:
    row = hot_sql.episode_row(episode_id, LIVE_FIELDS)
    return None if row is None else Live(*row)


def _current(episode_id: int, attempt: int | None, hold: bool = True) -> Live | None:
    """The episode, if this message still concerns it: not deleted, not finished (a finished one's sandbox is
    released here), and of the message's attempt (an older one's message is a straggler). ``hold``: this process
    now holds it (a start holds it by its claim instead)."""
    if hold and (row := transitions.hold_returning(episode_id, attempt, LIVE_FIELDS)):
        return Live(*row)  # the common case, in one statement
    episode = read_live(episode_id)
    if episode is None:
        return None  # deleted with its run
    if episode.is_terminal:
        release(episode)
        return None
    if attempt is not None and attempt != episode.attempt:
        logger.info("episode %s: dropped a message of attempt %s (now %s)", episode_id, attempt, episode.attempt)
        return None
    return episode  # not live yet (queued): nothing to hold


def release(episode: Live, container_id: str | None = None) -> None:
    """Have the Environment Service release the episode's sandbox (or ``container_id``), on the host holding it."""
    if container_id := container_id or episode.container_id:
        send("envs.stop_sandbox", pool=episode.run.env_pool, container_id=container_id, episode_id=episode.id,
             host=episode.env_host)  # fmt: skip


def release_here(episode_id: int, container_id: str, pool: str, charged: bool = False) -> None:
    """Release a sandbox of this host now and charge the episode the seconds it held it, unless they were charged
    already (``charged``: ``charge_sandbox``, or an episode's end that charged them with its transition; its clock
    is stopped, and asking Redis again would be a round trip for 0 s)."""
    costs.charge(episode_id, sandbox_s=env_service.release(container_id, pool, clock_stopped=charged))


def charge_sandbox(episode_id: int, container_id: str) -> None:
    """Charge the sandbox's seconds before the episode's attempt ends, so that a run's cost is complete when it
    completes (the release that follows counts nothing more)."""
    costs.charge(episode_id, sandbox_s=env_service.stop_clock(container_id))


def finished(episode_id: int) -> None:
    send("orchestrator.episode_done", episode_id=episode_id)


def first_hop(episode: Live) -> None:
    """What follows a sandbox that came up: the first model turn, or, for an agent that runs its own loop (a
    framework), that loop (orchestrator/framework_loop.py)."""
    if drives_itself(agent_of_run(episode.run_id)):
        send("agents.framework_episode", episode_id=episode.id, attempt=episode.attempt)
    else:
        publish_turn(episode, 0)


def publish_turn(episode: Live, step: int) -> None:
    send("modelserving.episode_turn", episode_id=episode.id, step=step, model=episode.run.model_name,
         attempt=episode.attempt)  # fmt: skip


def _sandbox_failed(episode: Live, error: SandboxError, container_id: str, what: str = "", **charges) -> None:
    """Record a sandbox failure (a retryable one requeues the episode), release the sandbox, account for it:
    ``charges`` (the hop's own cost) are added with the sandbox's seconds before the episode's attempt ends."""
    costs.charge(episode.id, sandbox_s=env_service.stop_clock(container_id), **charges)
    outcome = transitions.fail_or_retry(
        episode.id, f"{what}{error.reason}", error.retryable, attempt=episode.attempt, holding=container_id
    )
    release_here(episode.id, container_id, episode.run.env_pool)
    logger.info("episode %s: %s%s (%s)", episode.id, what, error.reason, outcome)
    if outcome is not transitions.Outcome.UNCHANGED:
        finished(episode.id)


# --- env queue -------------------------------------------------------------------------------------------------


def episode_start(episode_id: int, pool: str, attempt: int | None = None) -> None:
    """Give the episode a prepared sandbox (pulling its image when this host lacks it), then publish its first model
    turn. The hop's time and the pull are charged to the episode's cost."""
    began = time.monotonic()
    outcome = None
    try:
        outcome = _start(episode_id, pool, attempt, began)
    finally:
        if outcome is None:  # nothing charged the hop's time yet
            costs.charge(episode_id, env_worker_s=time.monotonic() - began)
    if isinstance(outcome, Live):
        first_hop(outcome)


def _start(episode_id: int, pool: str, attempt: int | None, began: float) -> Live | bool | None:
    """The episode, running, when its sandbox is ready (the hop's worker time charged with that transition); True
    when a failure charged it (before the episode's attempt ended); None when nothing charged it yet."""
    episode = _current(episode_id, attempt, hold=False)
    if episode is None:
        return
    if episode.status == Episode.Status.RUNNING:
        # A redelivered start whose sandbox came up before the worker died: carry on with the first turn (a
        # turn that was already taken is dropped by its claim).
        transitions.hold(episode_id, episode.attempt)
        if env_service.is_alive(episode.container_id):
            first_hop(episode)
        else:
            _sandbox_failed(episode, SandboxError("the sandbox container stopped"), episode.container_id,
                            env_worker_s=time.monotonic() - began)  # fmt: skip
            return True
        return
    alive = liveness.alive_incarnations()
    if not transitions.claim_start(episode_id, episode.attempt, env_host=settings.MEGAFLOW_ENV_HOST, alive=alive):
        return  # not starting (cancelled, retried, not admitted), or a living worker's start of it is under way
    episode = dataclasses.replace(episode, env_host=settings.MEGAFLOW_ENV_HOST)
    task = episode.task
    if episode.container_id:
        release_here(episode_id, episode.container_id, pool)  # a start cut short by a dying worker

    def pulling(image: str) -> None:  # the episode shows what it waits for while the host pulls its image
        Episode.objects.filter(pk=episode_id, attempt=episode.attempt).update(pulling_image=image)

    try:
        sandbox = env_service.create_sandbox(task, episode_id, episode.run_id, pool, on_pull=pulling)
    except SandboxError as error:
        Episode.objects.filter(pk=episode_id).exclude(pulling_image="").update(pulling_image="")
        pull = getattr(error, "pull", None)  # a pull that came before a failed container creation
        pulled = costs.pull_charges(pull.pulled, pull.seconds, pull.bytes) if pull else {}
        _sandbox_failed(episode, error, episode.container_id, env_worker_s=time.monotonic() - began, **pulled)
        return True
    if pull := sandbox.pull:
        if pull.pulled or pull.waited:
            Episode.objects.filter(pk=episode_id).update(pulling_image="")
            costs.charge(episode_id, **costs.pull_charges(pull.pulled, pull.seconds, pull.bytes))
    if not transitions.assign_sandbox(episode_id, episode.attempt, sandbox.container_id):
        release_here(episode_id, sandbox.container_id, pool)  # cancelled while the sandbox started
        return
    # Admission ramps at the rate sandboxes come up (orchestrator/runs.py): with this one up, the next ones go in now,
    # while its prepare commands run as its steps will. One message while a pass is asked for (a burst of starts
    # completing sent thousands, each an agent-queue task).
    if redis_client().exists(RAMPING_KEY) and ask_for_admission():
        send("orchestrator.admit")
    try:
        env_service.prepare_sandbox(sandbox.container_id, task)
    except SandboxError as error:
        _sandbox_failed(episode, error, sandbox.container_id, env_worker_s=time.monotonic() - began)
        return True
    # The hop's worker time rides on the transition (one UPDATE, not two); refused, ``episode_start`` charges it.
    if not transitions.sandbox_ready(episode_id, episode.attempt, sandbox.container_id,
                                     env_worker_s=time.monotonic() - began):  # fmt: skip
        release_here(episode_id, sandbox.container_id, pool)  # cancelled, or another start took the episode over
        return
    return dataclasses.replace(episode, container_id=sandbox.container_id)


def episode_step(
    episode_id: int,
    step: int,
    reply: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    model_latency_s: float = 0.0,
    attempt: int | None = None,
    turn: dict | None = None,
) -> None:
    """Run the action in the model's reply, record the step, and publish what follows. ``turn``: what the model
    saw and produced as tokens (``TURN_FIELDS``), written with the claim."""
    began = time.monotonic()
    now, values = timezone.now(), {"episode_id": episode_id, "index": step, "model_output": reply, **_turn(turn)}
    # The common case is one round trip: the hold, and the INSERT that claims the step.
    if held := transitions.hold_and_claim(episode_id, attempt, LIVE_FIELDS, now, values):
        episode = Live(*held[0])
        row = Step(pk=held[1], created_at=now, **values) if held[1] else _claimed_before(episode_id, step)
    elif (episode := _current(episode_id, attempt)) is None:
        return
    else:
        row = _claim_step(episode_id, step, reply, turn)
    if row is None:
        return  # another delivery of this message holds the claim, or the step already ran and moved on
    if row.completed_at:
        _after_step(episode, row)  # a redelivery of a step that ran, before anything after it happened
        return
    run, task = episode.run, episode.task
    agent = agent_of_run(run.pk)
    action = agent.parse(reply)
    result = None
    if action.malformed:
        observation = agent.feedback_observation(action)
    else:
        timeout_s = min(settings.MEGAFLOW_EXEC_TIMEOUT_S, task.timeout_s)
        try:
            result = env_service.run_command(
                episode.container_id, action.command, timeout_s, task.workdir, agent.output_limit
            )
        except SandboxError as error:
            # The turn that led here was paid for: its model time and tokens count with the failed step's.
            _sandbox_failed(episode, error, episode.container_id, model_s=model_latency_s,
                            cost_prompt_tokens=prompt_tokens, cost_completion_tokens=completion_tokens,
                            env_worker_s=time.monotonic() - began)  # fmt: skip
            return
        observation = agent.observation(CommandResult(result.output, result.exit_code, result.note))
    completed_at = timezone.now()
    # The result only while the claim is still this delivery's (a claim taken over, its holder judged dead, is not);
    # the count, and the step's cost with it (orchestrator/costs.py), only on the episode of this attempt, running.
    recorded, counted = hot_sql.record_and_count_step(
        row.pk,
        row.created_at,
        dict(
            action=action.command or "",
            observation=observation,
            exit_code=None if result is None else result.exit_code,
            model_latency_s=model_latency_s,
            env_latency_s=None if result is None else result.duration_s,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            completed_at=completed_at,
        ),
        episode_id=episode_id, attempt=episode.attempt, running=Episode.Status.RUNNING, steps=step + 1,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, model_s=model_latency_s,
        env_worker_s=time.monotonic() - began, now=completed_at,
    )  # fmt: skip
    if not recorded:
        logger.warning("episode %s: step %s was taken over while its command ran; result dropped", episode_id, step)
        return
    if not counted:
        release(episode)  # the episode moved on while the command ran (cancelled, or retried)
        return
    row.action, row.observation, row.completed_at = action.command or "", observation, completed_at
    episode = dataclasses.replace(
        episode,
        prompt_tokens=episode.prompt_tokens + prompt_tokens,
        completion_tokens=episode.completion_tokens + completion_tokens,
    )
    _after_step(episode, row, submitted_now=result is not None and submitted(result.output))


# What a model turn records on its Step row (orchestrator/rollouts.py reads them back for trainers).
TURN_FIELDS = ("model_input", "prompt_prefix_len", "prompt_ids", "completion_ids", "logprobs", "prefix_consistent",
               "finish_reason", "sampling", "model_name", "model_version")  # fmt: skip


# The turn's fields that travel packed (``packed.to_wire``).
PACKED_FIELDS = frozenset(("prompt_ids", "completion_ids", "logprobs"))


def _turn(turn: dict | None) -> dict:
    """What of a turn's message its Step row records (``TURN_FIELDS``): the packed ones as their bytes."""
    return {
        key: packed.from_wire(value) if key in PACKED_FIELDS else value
        for key, value in (turn or {}).items()
        if key in TURN_FIELDS and value is not None
    }


def _claim_step(episode_id: int, step: int, reply: str, turn: dict | None = None) -> Step | None:
    """The Step row that makes this delivery the one to run the step, or a completed row whose follow-up must
    be re-published; None when there is nothing for this delivery to do."""
    fields = _turn(turn)
    try:
        # Autocommit: the INSERT is its own transaction, and the unique (episode, index) picks one delivery. The
        # turn's tokens go in the same INSERT: durable with the claim, so a re-driven step keeps them.
        now = timezone.now()
        pk = hot_sql.insert_step(now, episode_id=episode_id, index=step, model_output=reply, **fields)
        return Step(pk=pk, episode_id=episode_id, index=step, model_output=reply, created_at=now, **fields)
    except IntegrityError:
        return _claimed_before(episode_id, step)


def _claimed_before(episode_id: int, step: int) -> Step | None:
    """The claim of a step that has a row already: a completed row whose follow-up must be re-published, or a stale
    claim this delivery takes over; None when there is nothing for this delivery to do."""
    row = Step.objects.get(episode_id=episode_id, index=step)
    if row.completed_at:
        # A redelivery of a step that ran: carry on only if nothing after it happened yet.
        return None if Step.objects.filter(episode_id=episode_id, index=step + 1).exists() else row
    # A claim younger than the hard time limit may belong to a task still running; an older one cannot (the
    # limit kills it), and a redelivery only comes after the visibility timeout, at least twice the limit.
    # The watchdog expires the claim of a holder that died (orchestrator/runs.py) so that its step is taken over now.
    stale, now = timezone.now() - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT), timezone.now()
    taken = Step.objects.filter(pk=row.pk, created_at__lte=stale, completed_at__isnull=True).update(created_at=now)
    if not taken:
        return None
    row.created_at = now  # the new claim's fencing token
    return row


def _over_time(episode: Live) -> bool:
    started = episode.started_at or episode.created_at
    return timezone.now() - started > timedelta(seconds=episode.run.episode_time_limit_s)


def _after_step(episode: Live, row: Step, submitted_now: bool | None = None) -> None:
    """What follows a completed step: evaluation when the agent submitted or a budget ran out, else the next
    model turn."""
    run = episode.run
    if submitted_now is None:  # re-derived after a redelivery
        submitted_now = bool(row.action) and submitted(row.observation)
    tokens = episode.prompt_tokens + episode.completion_tokens
    out_of_tokens = bool(run.max_episode_tokens) and tokens >= run.max_episode_tokens
    done = submitted_now or row.index + 1 >= run.max_steps or out_of_tokens
    if _over_time(episode):
        reason = f"wall-clock budget of {run.episode_time_limit_s} s exhausted"
        charge_sandbox(episode.id, episode.container_id)
        if transitions.fail(episode.id, reason, Episode.Status.TIMED_OUT, attempt=episode.attempt):
            finished(episode.id)
        release_here(episode.id, episode.container_id, run.env_pool, charged=True)
    elif stale := _stale(episode, row, next_turn=not done):
        # The policy moved on past the run's bound. Not graded as it stands: that reward would reflect when the
        # trainer published, not what the agent did. The sample is dropped (masked) and, while the run's
        # max_attempts allow, taken again from a fresh attempt on the weights serving now.
        charge_sandbox(episode.id, episode.container_id)
        outcome = transitions.fail_or_retry(episode.id, stale, True, attempt=episode.attempt)
        release_here(episode.id, episode.container_id, run.env_pool, charged=True)
        logger.info("episode %s: %s (%s)", episode.id, stale, outcome)
        if outcome is not transitions.Outcome.UNCHANGED:
            finished(episode.id)
    elif done:
        # Out of steps or tokens without submitting: the tree is graded as it stands.
        evaluate(episode)
    else:
        publish_turn(episode, row.index + 1)


def _stale(episode: Live, row: Step, next_turn: bool) -> str:
    """Why the episode is past its run's ``max_staleness`` (orchestrator/staleness.py), or "": the turn just run
    (a version published while it was queued) or, when another turn would follow, the version serving now."""
    run = episode.run
    if run.max_staleness is None:
        return ""
    first = row.model_version if row.index == 0 else None
    if first is None:
        first = Step.objects.filter(episode_id=episode.id, index=0).values_list("model_version", flat=True).first()
    if reason := staleness.stale_reason(run, first or "", row.model_version):
        return reason
    return staleness.stale_reason(run, first or "") if next_turn else ""


def evaluate(episode: Live) -> None:
    """Grade the agent's final tree, record the reward, release the sandbox."""
    began = time.monotonic()
    pool = episode.run.env_pool
    if not transitions.begin_evaluation(episode.id, episode.attempt):
        return  # cancelled or retried since the last step
    if not episode.container_id:
        if transitions.fail(episode.id, "no sandbox to evaluate", attempt=episode.attempt):
            finished(episode.id)
        return
    try:
        evaluation = env_service.evaluate(episode.container_id, episode.task)
    except SandboxError as error:
        costs.charge(episode.id, env_worker_s=time.monotonic() - began)
        _sandbox_failed(episode, error, episode.container_id, what="evaluation failed: ")
        return
    # Charged with the episode's end (one UPDATE), or alone when that was refused (cancelled meanwhile), so that a
    # run's cost is whole when the run completes.
    charges = {"env_worker_s": time.monotonic() - began, "sandbox_s": env_service.stop_clock(episode.container_id)}
    if transitions.succeed(episode.id, episode.attempt, evaluation.reward, evaluation.error, **charges):
        finished(episode.id)
    else:
        costs.charge(episode.id, **charges)
    release_here(episode.id, episode.container_id, pool, charged=True)


# --- model queue ---------------------------------------------------------------------------------------------


def episode_turn(episode_id: int, step: int, model: str, attempt: int | None = None) -> None:
    """Build the agent's prompt from the trajectory so far (as ids, token in, token out, where the backend has a
    tokenizer), generate, and publish the env step with what the model saw and produced."""
    # The common case is one round trip: the hold, and the history that is also the redelivery check.
    if held := transitions.hold_returning_with_history(episode_id, attempt, LIVE_FIELDS, step):
        episode, steps = Live(*held[0]), held[1]
    elif (episode := _current(episode_id, attempt)) is None:
        return
    else:
        steps = hot_sql.history(episode_id, step)
    if steps and steps[-1][0] == step:
        return  # a redelivered turn whose step is already claimed
    run, task = episode.run, episode.task
    agent = agent_of_run(run.pk)
    history = [Turn(output, observation) for _, output, observation, completed in steps if completed]
    view = TaskView(task.instance_id, task.problem_statement, task.workdir)
    messages = agent.messages(view, history)
    previous = _previous_turn(episode, step, model, agent, view, history)
    prompt = model_service.turn_prompt(model, messages, previous)
    request = GenerationRequest(
        request_id=f"{episode_id}:{step}",
        messages=messages,
        # Trainers need the sampling logprobs where the backend gives ids; a run may still turn them off.
        sampling=SamplingParams.from_dict({"logprobs": prompt.ids is not None, **_sampling_of(run)}),
        context={"task_id": task.pk},
        prompt_token_ids=prompt.ids,
    )
    release_connection()  # nothing needs the database while the model works
    [generation] = model_service.generate(model, [request])
    if generation.error:
        outcome = transitions.fail_or_retry(
            episode_id, f"model {model}: {generation.error}", generation.infrastructure_failure, attempt=episode.attempt
        )
        release(episode)  # the episode ended or went back to the queue: either way this sandbox is done
        if outcome is not transitions.Outcome.UNCHANGED:
            finished(episode_id)
        return
    if prompt.ids is not None and generation.token_ids is not None:
        seen = prompt.ids + generation.token_ids
        _turns.remember((episode_id, episode.attempt), step, messages, generation.text, seen)
    send(
        "envs.episode_step",
        episode_id=episode_id,
        step=step,
        reply=generation.text,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        model_latency_s=generation.latency_s,
        pool=run.env_pool,
        host=episode.env_host,
        attempt=episode.attempt,
        turn={
            "model_input": prompt.new_messages,
            "prompt_prefix_len": prompt.prefix_len,
            # Packed, as base64 (orchestrator/packed.py): the env worker stores these bytes as they come.
            "prompt_ids": packed.to_wire(prompt.appended_ids, packed.INT32),
            "completion_ids": packed.to_wire(generation.token_ids, packed.INT32),
            "logprobs": packed.to_wire(generation.logprobs, packed.FLOAT64),
            "prefix_consistent": prompt.consistent,
            "finish_reason": generation.finish_reason,
            "sampling": request.sampling.as_dict(),  # not request.as_dict(): that copies every prompt id
            "model_name": model,
            "model_version": generation.model_version,
        },
    )


def _sampling_of(run: Run) -> dict:
    return (run.agent_config or {}).get("sampling") or {}


class _TurnCache:
    """The last turn of recent episodes as this model worker generated it: the next turn of an episode that
    comes back to the same worker extends these ids without reading every earlier step's ids back.

    Bounded by an estimate of its bytes (``MEGAFLOW_TURN_CACHE_MB``: the ids, at a list's ~36 bytes an id, and the
    messages' text), not by entries: at 10,000 concurrent each of two model workers sees 5,000 episodes, and 512
    entries held a tenth of them, so nine turns in ten read their ids back; and 512 turns of 32,000 ids would have
    been 600 MB. Not packed: packing a turn's ids from the list the prompt is built as costs ~30 ns an id (0.3 ms
    for a 10,000-id prompt) on every turn, more than the misses it saves at 1,000."""

    ID_BYTES = 36

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple[int, int], tuple[int, list[dict], str, list[int], int]] = OrderedDict()
        self.lock = threading.Lock()

    def remember(self, key: tuple[int, int], step: int, messages: list[dict], reply: str, ids: list[int]) -> None:
        size = self.ID_BYTES * len(ids) + len(reply)
        size += sum(len(str(message.get("content") or "")) for message in messages)
        with self.lock:
            if (replaced := self.entries.pop(key, None)) is not None:
                self.bytes -= replaced[4]
            self.entries[key] = (step, messages, reply, ids, size)
            self.bytes += size
            while self.bytes > self.max_bytes and self.entries:
                self.bytes -= self.entries.popitem(last=False)[1][4]

    def get(self, key: tuple[int, int], step: int, reply: str) -> PreviousTurn | None:
        with self.lock:
            entry = self.entries.pop(key, None)
            if entry is not None:
                self.bytes -= entry[4]
        # The reply check: another delivery of that turn may have generated the reply that was recorded.
        if entry is None or entry[0] != step or entry[2] != reply:
            return None
        return PreviousTurn(entry[1], entry[2], entry[3])


_turns = _TurnCache(settings.MEGAFLOW_TURN_CACHE_MB * 1024 * 1024)


def _previous_turn(episode: Live, step: int, model: str, agent: Agent, view: TaskView, history: list[Turn]):
    """What the model saw and said on the turn before ``step`` (None on the first turn)."""
    if step == 0 or not history:
        return None
    last = history[-1]
    if not model_service.tokenizes(model):
        return PreviousTurn(agent.messages(view, history[:-1]), last.reply, None)
    if cached := _turns.get((episode.id, episode.attempt), step - 1, last.reply):
        return cached
    # None where a turn had no ids (the model changed backend?): the next prompt is then rendered whole.
    return PreviousTurn(agent.messages(view, history[:-1]), last.reply, hot_sql.turn_ids(episode.id, step))
