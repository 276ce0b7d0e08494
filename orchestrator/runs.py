"""The control plane: runs are created and launched, their episodes fanned out and admitted, stalled episodes
re-driven, runs cancelled and retried. The API, the CLI, the admin and the demo all act through these
functions; state changes go through orchestrator/transitions.py. Who is alive and what the broker forgot is read
from megaflow_site/liveness.py.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Exists, OuterRef, Q
from django.utils import timezone
from redis.exceptions import LockError

from agents.agent import drives_itself
from envs import startup_control
from megaflow_site import liveness
from megaflow_site.topology import (
    FRAMEWORK_QUEUE,
    Service,
    UnknownQueue,
    host_queue_name,
    queue_name,
    service_of_task,
)
from orchestrator import hot_sql, transitions
from orchestrator.api.serializers import RunSerializer
from orchestrator.autoscale import admission_limit
from orchestrator.db import bulk_batch_size, gather_statistics, keep_statistics
from orchestrator.episode_loop import agent_of_run, finished, read_live, release, send
from orchestrator.hot_state import ADMIT_AGAIN, ADMIT_BUCKET, RAMPING_KEY, RAMPING_TTL_S, redis_client
from orchestrator.models import Episode, Run, Step
from orchestrator.placement import Placer
from orchestrator.staleness import admissible

logger = logging.getLogger("megaflow.runs")

LIVE = transitions.LIVE


class RunRejected(ValueError):
    """A run's fields did not validate; ``errors`` maps each bad field to its reasons (the API's 400 body)."""

    def __init__(self, errors: dict):
        self.errors = errors
        field, reasons = next(iter(errors.items()))
        super().__init__(f"{field}: {reasons[0] if isinstance(reasons, list) else reasons}")


def run_errors(fields: dict, owner=None) -> dict:
    """What is wrong with ``fields`` as a run (field → reasons), checked as ``create_run`` checks them."""
    form = RunSerializer(data=fields, context={"owner": owner})
    return {} if form.is_valid() else dict(form.errors)


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
        batch_size=bulk_batch_size(Episode),
    )
    # Not the steps: analyzed while still empty, their table would plan every later read of it as a scan.
    gather_statistics(Episode)
    transitions.start_run(run_id)
    admit()
    return run.episodes.count()


ADMISSION_LOCK = "megaflow:admission"


def admit() -> list[int]:
    """Start queued episodes while their run and the whole fleet have room (``Run.max_concurrent_episodes``,
    ``MEGAFLOW_MAX_LIVE_EPISODES``, the autoscaler's admission limit), no more than ``MEGAFLOW_MAX_STARTING``
    wait for a sandbox at once (the ramp: each sandbox that comes up asks for the next pass), and the model
    version the run asks for serves, or one at most ``Run.max_staleness`` versions newer
    (orchestrator/staleness.py). One admitter at a time (a Redis lock), oldest runs first. A caller that finds
    the lock taken does not wait for it: it asks the holder for one more pass and returns, so that no worker
    thread queues behind an admitter (nor, for the lock's whole timeout, behind one killed inside it); the holder
    passes again, at most every ``MEGAFLOW_ADMIT_INTERVAL_S``, while it is asked to. Returns the episodes this
    call admitted."""
    client = redis_client()
    # An admitter killed inside the lock holds it no longer than the dead-worker window (a pass takes ms, and the
    # holder renews it before each); the beat's admit every few seconds then goes on.
    lock = client.lock(ADMISSION_LOCK, timeout=settings.MEGAFLOW_WORKER_DEAD_S)
    admitted: list[int] = []
    client.set(ADMIT_AGAIN, 1)
    if not lock.acquire(blocking=False):
        return admitted  # the holder passes once more for this caller
    try:
        while client.exists(ADMIT_AGAIN):
            began = time.monotonic()
            client.delete(ADMIT_AGAIN)  # what was asked for until now, this pass covers
            starts = _admit_once()
            for episode_id, attempt, pool, host in starts:
                send("envs.episode_start", episode_id=episode_id, pool=pool, attempt=attempt, host=host)
            admitted += [episode_id for episode_id, *_ in starts]
            # Every completed start and every finished episode asks for a pass, and a pass reads the fleet's live
            # counts: at 10,000 episodes that was most of the database's work. Asked for again meanwhile, the next
            # pass waits out MEGAFLOW_ADMIT_INTERVAL_S and covers everything asked until then, the lock still held.
            if client.exists(ADMIT_AGAIN):
                time.sleep(max(0.0, settings.MEGAFLOW_ADMIT_INTERVAL_S - (time.monotonic() - began)))
                lock.reacquire()  # raises LockError if it expired under the pass: the beat's next admit goes on
    finally:
        try:
            lock.release()
        except LockError:
            logger.warning("the admission lock expired under a pass (over %s s)", settings.MEGAFLOW_WORKER_DEAD_S)
    return admitted


def _admit_once() -> list[tuple[int, int, str, str]]:
    """One pass of admission, under the lock: the episodes admitted, each with its attempt, pool and env host."""
    admitted: list[tuple[int, int, str, str]] = []
    keep_statistics(Episode)  # what a pass reads by status, planned on statistics of the run's start
    # Every episode's end asks for a pass; once a run's episodes are all in, a pass has nothing to admit, and the
    # live counts below read an index entry per live episode of the fleet and of each run (10,000 live: ~8 ms and
    # ~6,500 rows a pass, tests/bench/admission_pass). The runs with an episode queued: an EXISTS on the (run,
    # status, id) index.
    queued = Episode.objects.filter(run=OuterRef("pk"), status=Episode.Status.QUEUED)
    waiting = list(Run.objects.filter(Exists(queued), status=Run.Status.RUNNING).order_by("created_at"))
    if not waiting:
        redis_client().delete(RAMPING_KEY)
        return admitted
    ceiling = settings.MEGAFLOW_MAX_LIVE_EPISODES
    if (throttle := admission_limit()) is not None:  # the autoscaler's, while the latency SLO is breached
        ceiling = min(ceiling, throttle)
    counts = Episode.objects.filter(status__in=LIVE).aggregate(
        live=Count("pk"), starting=Count("pk", filter=Q(status=Episode.Status.STARTING, container_id=""))
    )
    room = ceiling - counts["live"]
    # The ramp: no more episodes waiting for a sandbox than the fleet starts well. While it holds episodes back, each
    # sandbox that comes up asks for the next pass (episode_loop's start), so a burst of 10,000 goes in at the rate
    # sandboxes come up. An episode running its prepare commands is still starting but holds no slot: those
    # commands are its work, as its steps are, and counting them held admission to the cap over their length.
    starting_room = settings.MEGAFLOW_MAX_STARTING - counts["starting"]
    bucket = AdmissionRate()
    placers: dict[str, Placer] = {}  # per pool: the env host each episode goes to (orchestrator/placement.py)
    ramping = paced = False
    for run in waiting:
        if room <= 0:
            break
        if not admissible(run):
            continue  # its episodes start once the version it asks for (or one within max_staleness) serves
        run_room = run.max_concurrent_episodes - run.episodes.filter(status__in=LIVE).count()
        want = max(0, min(room, run_room))
        take = min(want, max(0, starting_room))
        ready = _ready(run, min(take, bucket.room) + 1)  # one more than is taken: whether the ramp holds any back
        ramping |= len(ready) > take and take < want
        paced |= len(ready) > bucket.room and bucket.room < take
        take = min(take, bucket.room)
        placer = placers.setdefault(run.env_pool, Placer(run.env_pool))
        for episode_id, attempt, image in ready[:take]:
            host = placer.place(image)
            if transitions.admit(episode_id, attempt, env_host=host):
                admitted.append((episode_id, attempt, run.env_pool, host))
                room -= 1
                starting_room -= 1
                bucket.spend(1)
    bucket.save()
    if paced:  # the rate held episodes back: the admitter passes again after MEGAFLOW_ADMIT_INTERVAL_S
        redis_client().set(ADMIT_AGAIN, 1, ex=RAMPING_TTL_S)
    if ramping:
        redis_client().set(RAMPING_KEY, 1, ex=RAMPING_TTL_S)
    else:
        redis_client().delete(RAMPING_KEY)
    return admitted


class AdmissionRate:
    """The token bucket of ``MEGAFLOW_ADMIT_RATE``, read and written under the admission lock: it fills at the rate
    (Redis's clock, the same for every admitter) up to what two passes spend (``MEGAFLOW_ADMIT_INTERVAL_S`` apart),
    so that a pass after a pause admits no burst. No rate: the bucket never runs dry."""

    def __init__(self):
        self.rate, self.tokens, self.spent = settings.MEGAFLOW_ADMIT_RATE, math.inf, 0
        if self.rate <= 0:
            return
        (seconds, micros), (tokens, at) = redis_client().pipeline().time().hmget(ADMIT_BUCKET, "tokens", "at").execute()
        self.now = seconds + micros / 1e6
        capacity = max(1.0, 2 * self.rate * settings.MEGAFLOW_ADMIT_INTERVAL_S)
        refilled = capacity if at is None else float(tokens) + self.rate * max(0.0, self.now - float(at))
        self.tokens = min(capacity, refilled)

    @property
    def room(self) -> int:
        """What this pass may still admit."""
        return int(min(self.tokens, 10**9))

    def spend(self, episodes: int) -> None:
        self.tokens -= episodes
        self.spent += episodes

    def save(self) -> None:
        """Keep what is left for the next pass (a pass that spent nothing leaves the bucket as it found it: it
        refills from then to the same level)."""
        if self.spent and self.rate > 0:
            pipe = redis_client().pipeline()
            pipe.hset(ADMIT_BUCKET, mapping={"tokens": self.tokens, "at": self.now}).expire(ADMIT_BUCKET, RAMPING_TTL_S)
            pipe.execute()


def _ready(run: Run, limit: int) -> list[tuple[int, int, str]]:
    """The first ``limit`` queued episodes of the run that may start now (episode, attempt, image), oldest first:
    first attempts, and retried ones whose back-off passed. Read in id order from the (run, status, id) index, a
    page of ``limit`` at a time, so that a pass reads about as many rows as it admits (two queries that each read
    every queued episode of the run read 20,000 rows a pass at 10,000)."""
    page = (
        run.episodes.filter(status=Episode.Status.QUEUED)
        .order_by("pk")
        .values_list("pk", "attempt", "task__image", "updated_at")
    )
    ready, after = [], 0
    while len(ready) < limit:
        rows = list(page.filter(pk__gt=after)[:limit])
        ready += [(pk, attempt, image) for pk, attempt, image, updated_at in rows if _backed_off(attempt, updated_at)]
        if len(rows) < limit:
            break
        after = rows[-1][0]
    return ready[:limit]


def _backed_off(attempt: int, updated_at: datetime) -> bool:
    """A retried episode waits MEGAFLOW_RETRY_BACKOFF_S, doubling with each attempt, before it is admitted."""
    if attempt <= 1:
        return True
    wait = settings.MEGAFLOW_RETRY_BACKOFF_S * 2 ** (attempt - 2)
    return timezone.now() - updated_at >= timedelta(seconds=wait)


# Whether a run has an unfinished episode, asked at each episode's end, status by status: while a run goes on its
# newest episodes are mostly running, and at its end the last are running or being graded.
UNFINISHED_LIKELIEST_FIRST = (Episode.Status.RUNNING, Episode.Status.EVALUATING, Episode.Status.STARTING,
                              Episode.Status.QUEUED)  # fmt: skip


def episode_done(episode_id: int) -> None:
    """Close the run when its last episode ended, then let the next episodes in."""
    if (found := hot_sql.run_of_episode(episode_id, UNFINISHED_LIKELIEST_FIRST)) is None:
        return  # the episode was deleted with its run
    run_id, unfinished = found
    if not unfinished:
        transitions.complete_run(run_id)
    admit()


def stalled_after_s() -> float:
    """The last resort: how long a live episode that no worker is known to hold may go without progress before
    the watchdog re-drives it anyway (past the visibility timeout plus a task's hard limit, so that the broker's
    own redelivery has had its chance). Dead workers and broker restarts are acted on long before."""
    return settings.CELERY_BROKER_VISIBILITY_TIMEOUT_S + settings.CELERY_TASK_TIME_LIMIT


def watchdog() -> list[int]:
    """Re-drive, from their durable state, the live episodes whose next hop was lost: taken from its queue or run
    by a worker that died (silent for MEGAFLOW_WORKER_DEAD_S), published to a broker that restarted or lost its
    data, or stalled past the last resort; and close the runs whose last ``episode_done`` was lost. Returns the
    episodes re-driven."""
    fleet = liveness.read_fleet()
    events = liveness.observe(fleet)
    dead = {event.worker for event in events if event.worker}
    startup_control.release_slots_of(dead)  # the start and pull slots the dead held: nobody else starts otherwise
    # Only a death orphans a taken message; while none is recent there is nothing to look for in the broker.
    orphans = liveness.orphaned(fleet) if dead else {}
    dropped = liveness.drops()
    vanished = liveness.vanished(_waiting(fleet))
    redriven = redrive_lost(fleet, events, orphans=set(orphans), dropped=dropped, vanished=vanished)
    # Every orphaned message of an episode re-driven goes: left, each would re-drive it again.
    liveness.forget(tag for episode_id in redriven for tag in orphans.get(episode_id, ()))
    liveness.forget_drops(_settled_drops(dropped))
    close_finished_runs()
    return redriven


def _waiting(fleet: liveness.Fleet, now=None) -> dict[int, tuple[float, frozenset[str]]]:
    """The live episodes that no living worker holds and that have not moved for two heartbeats, each with when it
    last moved and every queue its next hop may wait in (``liveness.vanished``). The database does not tell a
    turn's reply on its way to the env queue from the next turn on its way to the model queue: both count."""
    quiet = (now or timezone.now()) - timedelta(seconds=2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S)
    claimed = Step.objects.filter(episode_id=OuterRef("pk"), completed_at__isnull=True)
    rows = (
        Episode.objects.filter(status__in=LIVE, updated_at__lt=quiet)
        .annotate(claimed=Exists(claimed))
        .values_list("pk", "status", "updated_at", "env_host", "run_id", "run__env_pool", "run__model_name", "claimed")
    )
    waiting = {}
    for pk, status, updated_at, host, run_id, pool, model, claimed_step in rows:
        if fleet.holds(pk):
            continue
        try:
            queues = _queues_of(status, run_id, pool, host, model, claimed_step)
        except UnknownQueue as error:
            # A run of a pool or model this deployment has no queue for (left by another configuration on the same
            # database): its hops wait in no queue here, and it must not stop the watchdog for every other episode.
            logger.warning("episode %s: %s; the vanished-message check passes it by", pk, error)
            continue
        waiting[pk] = (updated_at.timestamp(), frozenset(queues))
    return waiting


def _queues_of(status: str, run_id: int, pool: str, host: str, model: str, claimed_step: bool) -> set[str]:
    """Every queue a live episode's next hop may wait in."""
    env = {queue_name(Service.ENV, pool)}
    if host in settings.MEGAFLOW_ENV_HOSTS:  # as the router sends it (megaflow_site/topology.py)
        env.add(host_queue_name(pool, host))
    if status == Episode.Status.RUNNING and drives_itself(agent_of_run(run_id)):
        return {FRAMEWORK_QUEUE}
    if status == Episode.Status.RUNNING and not claimed_step:
        return env | {queue_name(Service.MODEL, model)}
    return env  # a start, a claimed step, an evaluation


def _settled_drops(dropped: dict[int, liveness.Drop]) -> list[int]:
    """The drops that say nothing any more: their episode ended, or went on to another attempt (whose count of
    errors starts again). A live one's stays, counting its attempt's errors, after it was re-driven."""
    current = dict(Episode.objects.filter(pk__in=list(dropped), status__in=LIVE).values_list("pk", "attempt"))
    return [pk for pk, drop in dropped.items() if current.get(pk) is None or drop.attempt not in (None, current[pk])]


def close_finished_runs() -> list[int]:
    """Complete the running runs none of whose episodes is unfinished: a run is closed by its last episode's
    ``episode_done``, and that message may have died with its worker. Returns the runs completed."""
    unfinished = Episode.objects.filter(run_id=OuterRef("pk"), status__in=transitions.UNFINISHED)
    finished = Run.objects.filter(status=Run.Status.RUNNING).exclude(Exists(unfinished)).values_list("pk", flat=True)
    closed = [run_id for run_id in finished if transitions.complete_run(run_id)]
    for run_id in closed:
        logger.warning("run %s completed by the watchdog: its last episode_done was lost", run_id)
    return closed


def redrive_lost(
    fleet: liveness.Fleet, events: list[liveness.Event], now=None, orphans=frozenset(), dropped=None, vanished=None
) -> list[int]:
    """The watchdog's decision and act, given what it knows of the fleet and what happened (DB only: tests pass
    both). A live episode is lost when no living worker holds it (by its heartbeat), it has not moved for two
    heartbeats, and either a worker that died took its pending hop with it (``Event.lost_with_worker``, or its
    message is among the ``orphans``, taken by a worker nobody alive is: ``liveness.orphaned``), or its last hop
    ended in an error and nothing moved it since (``dropped``: episode → ``liveness.Drop``), or its next hop's
    message vanished between the broker and a worker killed while taking it (``vanished``: episode → when its
    queues were seen empty, ``liveness.vanished``), or it has not
    moved since a broker event that may have lost its next hop's message (once the event settled), or it
    stalled past ``stalled_after_s``. Every hop is idempotent and fenced, so re-publishing the one the database
    implies is always safe; an unfinished step's claim is expired so that the re-driven step takes it over now.
    An attempt whose hops ended in errors ``MEGAFLOW_HOP_ERRORS_MAX`` times is failed with the error instead
    (retried while the run's ``max_attempts`` allow)."""
    dropped, vanished = dropped or {}, vanished or {}
    now = now or timezone.now()
    events = [event for event in events if event.settled(now.timestamp())]
    deaths = [event for event in events if event.worker]
    broker_events = [event for event in events if not event.worker]
    quiet = now - timedelta(seconds=2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S)
    lost = Q(updated_at__lt=now - timedelta(seconds=stalled_after_s()))
    for death in deaths:
        lost |= Q(holder=death.worker) | Q(pk__in=death.held)
    if orphans or dropped or vanished:
        lost |= Q(pk__in={*orphans, *dropped, *vanished})
    if broker_events:
        lost |= Q(updated_at__lt=_moment(max(event.at for event in broker_events)))
    candidates = (
        Episode.objects.filter(status__in=LIVE, updated_at__lt=quiet)
        .filter(lost)
        .values_list(
            "pk", "status", "attempt", "holder", "updated_at", "run__env_pool", "run__model_name", "env_host", "run_id"
        )  # fmt: skip
    )
    redriven = []
    for pk, status, attempt, holder, updated_at, pool, model, host, run_id in candidates:
        if fleet.holds(pk):
            continue  # a living worker runs its hop, however long it takes
        drop = dropped.get(pk)
        drop = drop if drop and drop.lost(attempt, updated_at.timestamp()) else None  # None: it moved since
        if drop and drop.times >= settings.MEGAFLOW_HOP_ERRORS_MAX:
            _give_up(pk, attempt, drop)
            continue
        last = Step.objects.filter(episode_id=pk).order_by("-index").values_list("index", "model_output",
                                                                                 "completed_at").first()  # fmt: skip
        if status != Episode.Status.STARTING and drives_itself(agent_of_run(run_id)):
            name, message = _next_framework_hop(status, pool, pk, attempt, host)
        else:
            name, message = _next_hop(status, last, pool, model, pk, attempt, host)
        why = _why_lost(pk, holder, updated_at, events, _queue_of(name, message), now, orphans, drop,
                        vanished.get(pk))  # fmt: skip
        if why is None or not transitions.redrive(pk, attempt, updated_at):
            continue
        if name == "envs.episode_step" and last[2] is None:
            # Nobody alive holds this claim: expire it, so that the re-driven step takes it over.
            expired = timezone.now() - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 1)
            Step.objects.filter(episode_id=pk, index=last[0], completed_at__isnull=True).update(created_at=expired)
        send(name, **message)
        logger.warning("episode %s (%s) re-driven with %s: %s", pk, status, name, why)
        redriven.append(pk)
    return redriven


def _queue_of(name: str, message: dict) -> str:
    service = service_of_task(name)
    if service is Service.ENV:
        return f"{Service.ENV}.{message['pool']}"
    if service is Service.AGENT:
        return FRAMEWORK_QUEUE  # the only agent-service hop of an episode: a framework's loop
    return f"{Service.MODEL}.{message['model']}"


def _moment(unix_time: float):
    return datetime.fromtimestamp(unix_time, tz=UTC)


def _next_hop(
    status: str, last, pool: str, model: str, episode_id: int, attempt: int, host: str = ""
) -> tuple[str, dict]:
    """The hop the database implies for a live episode (``last``: its last step's index, reply, completion).
    A start may be taken over by any host of the pool (its placed host may be the one that is down); a step goes
    to the host holding the episode's sandbox."""
    if status == Episode.Status.STARTING:
        return "envs.episode_start", {"episode_id": episode_id, "pool": pool, "attempt": attempt}
    if last is not None and (last[2] is None or status == Episode.Status.EVALUATING):
        return "envs.episode_step", {"episode_id": episode_id, "step": last[0], "reply": last[1], "pool": pool,
                                     "attempt": attempt, "host": host}  # fmt: skip
    next_step = 0 if last is None else last[0] + 1
    return "modelserving.episode_turn", {"episode_id": episode_id, "step": next_step, "model": model,
                                         "attempt": attempt}  # fmt: skip


def _next_framework_hop(status: str, pool: str, episode_id: int, attempt: int, host: str) -> tuple[str, dict]:
    """The same for an episode a framework drives (orchestrator/framework_loop.py): its evaluation, or its loop,
    whose redelivery finds the session of a dead worker and retries the episode."""
    if status == Episode.Status.EVALUATING:
        return "envs.framework_evaluate", {"episode_id": episode_id, "attempt": attempt, "pool": pool, "host": host}
    return "agents.framework_episode", {"episode_id": episode_id, "attempt": attempt}


def _give_up(episode_id: int, attempt: int, drop: liveness.Drop) -> None:
    """The attempt's hops keep ending in an error: it fails with that error (a fresh attempt follows while the
    run allows), and its sandbox is released."""
    reason = f"{drop.task} ended in an error {drop.times} times; the last: {drop.error}"
    episode = read_live(episode_id)  # before the retry clears its sandbox
    outcome = transitions.fail_or_retry(episode_id, reason, retryable=True, attempt=attempt)
    logger.warning("episode %s given up: %s (%s)", episode_id, reason, outcome)
    if outcome is not transitions.Outcome.UNCHANGED:
        release(episode)
        finished(episode_id)


def _why_lost(
    episode_id, holder, updated_at, events, queue, now, orphans=frozenset(), drop=None, empty_since=None
) -> str | None:
    if episode_id in orphans:
        return "a worker that is gone took its hop's message"
    if drop:
        return f"{drop.task} ended in an error ({drop.times} of {settings.MEGAFLOW_HOP_ERRORS_MAX}): {drop.error}"
    if empty_since is not None and updated_at.timestamp() < empty_since:
        return (f"its next hop's message vanished: its queues were empty at {_moment(empty_since):%H:%M:%S} and no "
                "living worker took it")  # fmt: skip
    for event in events:
        if event.lost_with_worker(episode_id, holder, updated_at.timestamp()):
            return f"{event.why} and took its hop with it"
        if updated_at < _moment(event.at) and event.covers(queue):
            return f"{event.why}, and its next hop on {queue} may have been lost"
    if now - updated_at > timedelta(seconds=stalled_after_s()):
        return "it stalled"
    return None


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
