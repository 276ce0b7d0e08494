"""The control plane: runs are created and launched, their episodes fanned out and admitted, stalled episodes
re-driven, runs cancelled and retried. The API, the CLI, the admin and the demo all act through these
functions; state changes go through orchestrator/transitions.py.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from orchestrator import transitions
from orchestrator.api.serializers import RunSerializer
from orchestrator.autoscale import admission_limit
from orchestrator.episode_loop import send
from orchestrator.hot_state import redis_client
from orchestrator.models import Episode, Run
from orchestrator.placement import Placer

logger = logging.getLogger("megaflow.runs")

LIVE = transitions.LIVE


class RunRejected(ValueError):
    """A run's fields did not validate; ``errors`` maps each bad field to its reasons (the API's 400 body)."""

    def __init__(self, errors: dict):
        self.errors = errors
        field, reasons = next(iter(errors.items()))
        super().__init__(f"{field}: {reasons[0] if isinstance(reasons, list) else reasons}")


def create_run(fields: dict, owner=None, idempotency_key: str = "") -> Run:
    """Validate ``fields`` (the REST API's run fields, RunSerializer) and store the run, which starts as soon as
    the transaction creating it commits. ``RunRejected`` names the first bad field."""
    form = RunSerializer(data=fields, context={"owner": owner})
    if not form.is_valid():
        raise RunRejected(form.errors)
    with transaction.atomic():
        run = form.save(idempotency_key=idempotency_key)
        transaction.on_commit(lambda: send("orchestrator.start_run", run_id=run.pk))
    return run


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
    transitions.start_run(run_id)
    admit()
    return run.episodes.count()


def admit() -> list[int]:
    """Start queued episodes while their run and the whole fleet have room (``Run.max_concurrent_episodes``,
    ``MEGAFLOW_MAX_LIVE_EPISODES``, the autoscaler's admission limit). One admitter at a time (a Redis lock),
    oldest runs first."""
    admitted: list[tuple[int, int, str, str]] = []
    with redis_client().lock("megaflow:admission", timeout=60, blocking_timeout=30):
        ceiling = settings.MEGAFLOW_MAX_LIVE_EPISODES
        if (throttle := admission_limit()) is not None:  # the autoscaler's, while the latency SLO is breached
            ceiling = min(ceiling, throttle)
        room = ceiling - Episode.objects.filter(status__in=LIVE).count()
        placers: dict[str, Placer] = {}  # per pool: the env host each episode goes to (orchestrator/placement.py)
        for run in Run.objects.filter(status=Run.Status.RUNNING).order_by("created_at"):
            if room <= 0:
                break
            run_room = run.max_concurrent_episodes - run.episodes.filter(status__in=LIVE).count()
            queued = run.episodes.filter(status=Episode.Status.QUEUED).order_by("pk")
            ready = [(episode.pk, episode.attempt, episode.task.image)
                     for episode in queued.select_related("task").only("pk", "attempt", "updated_at", "task__image")
                     if _backed_off(episode)]  # fmt: skip
            placer = placers.setdefault(run.env_pool, Placer(run.env_pool))
            for episode_id, attempt, image in ready[: max(0, min(room, run_room))]:
                host = placer.place(image)
                if transitions.admit(episode_id, attempt, env_host=host):
                    admitted.append((episode_id, attempt, run.env_pool, host))
                    room -= 1
    for episode_id, attempt, pool, host in admitted:
        send("envs.episode_start", episode_id=episode_id, pool=pool, attempt=attempt, host=host)
    return [episode_id for episode_id, *_ in admitted]


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
    if not Episode.objects.filter(run_id=run_id, status__in=transitions.UNFINISHED).exists():
        transitions.complete_run(run_id)
    admit()


def stalled_after_s() -> float:
    """How long a live episode may go without progress before the watchdog re-drives it: past the visibility
    timeout plus a task's hard limit, so that the broker's own redelivery always gets its chance first."""
    return settings.CELERY_BROKER_VISIBILITY_TIMEOUT_S + settings.CELERY_TASK_TIME_LIMIT


def watchdog() -> list[int]:
    """Re-drive live episodes that stopped moving, from their durable state. A message can be lost outright
    (a worker killed between Redis handing it over and recording it as unacknowledged); every hop is
    idempotent, so re-publishing the one the database implies is always safe. Returns the episodes re-driven."""
    cutoff = timezone.now() - timedelta(seconds=stalled_after_s())
    stalled = Episode.objects.filter(status__in=LIVE, updated_at__lt=cutoff).select_related("run")
    redriven = []
    for episode in stalled:
        run = episode.run
        # Only if it is still stalled (one watchdog at a time moves it; a hop that moved it meanwhile wins).
        if not Episode.objects.filter(pk=episode.pk, updated_at__lt=cutoff).update(updated_at=timezone.now()):
            continue
        last = episode.steps.order_by("-index").first()
        if episode.status == Episode.Status.STARTING:
            # Any host of the pool may take a start over (its placed host may be the one that is down).
            send("envs.episode_start", episode_id=episode.pk, pool=run.env_pool, attempt=episode.attempt)
        elif last is not None and (last.completed_at is None or episode.status == Episode.Status.EVALUATING):
            send("envs.episode_step", episode_id=episode.pk, step=last.index, reply=last.model_output,
                 pool=run.env_pool, attempt=episode.attempt, host=episode.env_host)  # fmt: skip
        else:
            next_step = 0 if last is None else last.index + 1
            send("modelserving.episode_turn", episode_id=episode.pk, step=next_step, model=run.model_name,
                 attempt=episode.attempt)  # fmt: skip
        logger.warning("episode %s stalled in %s; re-driven", episode.pk, episode.status)
        redriven.append(episode.pk)
    return redriven


def cancel_run(run_id: int, reason: str = "cancelled") -> int:
    """Cancel the run and every unfinished episode of it (one UPDATE); live ones stop at their next hop, and the
    Environment Service is asked to release their sandboxes now. Returns how many episodes were cancelled."""
    with transaction.atomic():
        transitions.cancel_run(run_id)
        cancelled = transitions.cancel_episodes(run_id, reason)
    pool = Run.objects.values_list("env_pool", flat=True).get(pk=run_id)
    hosts = dict(Episode.objects.filter(pk__in=[pk for pk, _ in cancelled]).values_list("pk", "env_host"))
    for episode_id, container_id in cancelled:
        if container_id:
            send("envs.stop_sandbox", pool=pool, container_id=container_id, episode_id=episode_id,
                 host=hosts.get(episode_id, ""))  # fmt: skip
    return len(cancelled)


def retry_failed(run_id: int) -> int:
    """Give the run's failed and timed-out episodes a fresh attempt; the run goes back to running. Returns how
    many were requeued."""
    retried = transitions.retry_failed(run_id)
    if retried:
        send("orchestrator.admit")
    return retried
