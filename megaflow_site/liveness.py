"""Who holds what, and who is alive: worker process incarnations, their heartbeats, and what the broker forgot.

Every process has an **incarnation**: its node name (``env-default@host`` in a worker, ``host:pid`` elsewhere)
plus an id drawn when it starts, so that a worker started in place of a killed one under the same node name is
somebody else. Transitions record the incarnation that made them (``Episode.holder``, orchestrator/transitions.py).

A worker **heartbeats** from a thread of its own every ``MEGAFLOW_WORKER_HEARTBEAT_S``: a key that expires after
``MEGAFLOW_WORKER_DEAD_S`` and carries the episodes whose hops the worker runs at that moment (``holding``,
entered by ``@megaflow_task`` around every task that names an ``episode_id``), and an entry in the registry of
workers with its queues and the time of the beat. A registered worker whose key expired is dead. Long work is
kept alive by the heartbeat, not by a lease as long as the longest task.

A ``kill -9`` need not wait out that window where somebody can see the process is gone. Each beat also **buries**
the incarnations that are surely dead, by deleting their key at once: one on this machine (same boot, same pid
namespace) whose process no longer exists (its pid is gone, or is now another process: the start time differs),
and this worker's predecessor, an earlier incarnation under this worker's node name (Celery node names are unique
in a cluster: a supervisor starts a worker under its old name once the old one is gone). The key's expiry stays
the rule for what cannot be seen from here: a host that went away, a container restarted elsewhere.

A worker holds an episode from the moment it takes a message naming it off its queue (``task_received``) until
that task ends: with late acknowledgement, those are exactly the messages a ``kill -9`` loses (prefetch is one
per thread, so a taken message is about to run). The registry entry keeps the list of the last beat, so that
it outlives the key that expires.

The watchdog (orchestrator/runs.py) reads the ``Fleet``, turns what happened into recovery ``Event`` s — a
worker went silent (what it held at its last beat, and the hops it began after it, are lost; what it merely
published sits in a queue and is not), the broker restarted (publishes in flight may be lost) or lost its data
(every queued message is lost: no epoch key) — and re-drives from the database the live episodes no living
worker holds that were lost.

Two losses no event tells. A hop can end in an error nobody recorded on the episode (a bug, a database away for
longer than the task's retries): its message is acknowledged, and the episode is held by nobody.
``@megaflow_task`` records it as a ``Drop``; the watchdog re-drives the episode at its next look, or fails the
attempt with the error as its reason once ``MEGAFLOW_HOP_ERRORS_MAX`` of its hops did. And a message can vanish
between the broker and a worker killed while taking it (``vanished``): seen from its queues being empty while
the episode, held by nobody, does not move.
"""

from __future__ import annotations

import base64
import collections
import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
from celery import signals
from django.conf import settings
from kombu.transport.redis import PRIORITY_STEPS, Channel

from megaflow_site.redis_pool import pooled_client

PRIORITY_SEP = Channel.sep  # kombu's queue name + sep + priority step names a queue's lower-priority lists

logger = logging.getLogger("megaflow.liveness")

ALIVE_KEY = "megaflow:alive:"  # + incarnation: {"held": [episode ids]}, expires after MEGAFLOW_WORKER_DEAD_S
REGISTRY_KEY = "megaflow:workers"  # incarnation → {"node", "queues", "beat_at"}
BROKER_KEY = "megaflow:broker"  # {"epoch": written once per broker life, "run_id": the redis-server's}
EVENTS_KEY = "megaflow:recovery-events"  # sorted set of Event, scored by when it happened
DROPPED_KEY = "megaflow:dropped-hops"  # episode id → Drop: its hop ended in an error nothing recorded

_node = f"{socket.gethostname()}:{os.getpid()}"
_token = secrets.token_hex(4)
_held: collections.Counter[int] = collections.Counter()
# Task id → (episode ids, when): messages taken off a queue whose task has not ended. Running tasks are in _held as
# well, so an entry older than a task's hard limit is a message Celery dropped without running it: forgotten.
_taken: dict[str, tuple[tuple[int, ...], float]] = {}
_held_lock = threading.Lock()


def node() -> str:
    """This process's node name (the Celery node name in a worker)."""
    return _node


def incarnation() -> str:
    """This process, this start: ``node#id``."""
    return f"{_node}#{_token}"


@contextmanager
def holding(episode_id: int | None) -> Iterator[None]:
    """While the block runs, this process's heartbeat says it holds ``episode_id`` (None: nothing)."""
    if episode_id is None:
        yield
        return
    with _held_lock:
        _held[episode_id] += 1
    try:
        yield
    finally:
        with _held_lock:
            _held[episode_id] -= 1
            if _held[episode_id] <= 0:
                del _held[episode_id]


def tasks_holding(episode_id: int) -> int:
    """How many tasks of this process are running for ``episode_id`` now (the caller's own included)."""
    with _held_lock:
        return _held[episode_id]


def held() -> list[int]:
    with _held_lock:
        too_old = time.monotonic() - settings.CELERY_TASK_TIME_LIMIT
        for task_id in [task_id for task_id, (_, at) in _taken.items() if at < too_old]:
            del _taken[task_id]
        return sorted(set(_held).union(*(episodes for episodes, _ in _taken.values())))


def episodes_named(kwargs) -> tuple[int, ...]:
    """The episodes a message's kwargs name: its ``episode_id``, or each of its hops' in a batch
    (megaflow_site/hop_batches.py)."""
    if not isinstance(kwargs, dict):
        return ()
    if isinstance(hops := kwargs.get("hops"), list):
        named = (
            hop[1].get("episode_id")
            for hop in hops
            if isinstance(hop, list) and len(hop) > 1 and isinstance(hop[1], dict)
        )
    else:
        named = (kwargs.get("episode_id"),)
    return tuple(episode_id for episode_id in named if isinstance(episode_id, int))


@signals.task_received.connect
def _took(request=None, **_) -> None:
    """A message naming an episode was taken off a queue: from now until its task ends, a death loses it."""
    if episodes := episodes_named(getattr(request, "kwargs", None)):
        with _held_lock:
            _taken[request.id] = (episodes, time.monotonic())


@signals.task_postrun.connect
@signals.task_revoked.connect
def _let_go(task_id=None, request=None, **_) -> None:
    with _held_lock:
        _taken.pop(task_id or getattr(request, "id", None), None)


@functools.cache
def client() -> redis.Redis:
    # Short timeouts: a heartbeat or a watchdog that waits on a broker that went away only delays recovery.
    return pooled_client(settings.REDIS_URL, decode_responses=True, socket_connect_timeout=3, socket_timeout=5)


def heartbeat_s() -> float:
    return settings.MEGAFLOW_WORKER_HEARTBEAT_S


@dataclass(frozen=True)
class Process:
    """Where a process runs, as precisely as another process can check it: the machine's boot, the pid namespace,
    the pid, and the process's start time in clock ticks since boot (a pid reused later has another)."""

    boot: str
    pid_namespace: str
    pid: int
    started: int

    @classmethod
    def of(cls, pid: int | str = "self") -> Process | None:
        """The process ``pid`` as this process sees it; None if there is none (or /proc cannot tell)."""
        try:
            namespace = os.readlink("/proc/self/ns/pid")
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None
        started = _start_time(pid)
        return None if started is None else cls(boot, namespace, int(Path(f"/proc/{pid}").resolve().name), started)

    def to_json(self) -> dict:
        return {"boot": self.boot, "pid_namespace": self.pid_namespace, "pid": self.pid, "started": self.started}

    def is_gone(self, here: Process) -> bool:
        """Whether this process surely no longer exists, seen from ``here``: only a process of the same boot and
        pid namespace can be checked; any other may be alive, for all this one can tell."""
        if (self.boot, self.pid_namespace) != (here.boot, here.pid_namespace):
            return False
        return _start_time(self.pid) != self.started


def _start_time(pid: int | str) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None if none runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow its last ")".
    return int(stat[stat.rindex(")") + 2 :].split()[19])


@functools.cache
def _this_process(pid: int) -> Process | None:
    return Process.of()


def this_process() -> Process | None:
    return _this_process(os.getpid())  # keyed by pid: a forked child is another process


_beat_hooks: list = []


def every_beat(hook):
    """Have ``hook(redis_client)`` run at every heartbeat of this process (after the beat itself): what must live
    no longer than its holder, a lease renewed while held (envs/startup_control.py's slots)."""
    _beat_hooks.append(hook)
    return hook


def beat(queues: Iterable[str] = (), redis_client: redis.Redis | None = None) -> None:
    """One heartbeat of this process: alive for ``MEGAFLOW_WORKER_DEAD_S`` more seconds, holding what it holds;
    the incarnations it can see are dead buried (``bury``); and the ``every_beat`` hooks run."""
    redis_client = redis_client or client()
    me = incarnation()
    holding_now = held()
    pipe = redis_client.pipeline(transaction=False)
    pipe.set(ALIVE_KEY + me, json.dumps({"held": holding_now}), ex=max(1, round(settings.MEGAFLOW_WORKER_DEAD_S)))
    # The registry keeps what was held at the last beat: the watchdog reads it once the key above has expired.
    info = {"node": _node, "queues": sorted(queues), "beat_at": time.time(), "held": holding_now}
    if process := this_process():
        info["process"] = process.to_json()
    pipe.hset(REGISTRY_KEY, me, json.dumps(info))
    pipe.hgetall(REGISTRY_KEY)
    registered = pipe.execute()[-1]
    bury(registered, redis_client)
    for hook in _beat_hooks:
        hook(redis_client)


def bury(registered: dict[str, str], redis_client: redis.Redis) -> list[str]:
    """Delete the alive key of every registered incarnation that is surely dead, seen from this process: its
    process is gone from this machine, or it is this worker's predecessor under the same node name. The watchdog
    then finds it dead at its next look, as if its key had expired. Returns those buried."""
    me, here, dead = incarnation(), this_process(), []
    for name, text in registered.items():
        info = json.loads(text)
        process = info.get("process")
        if name != me and (info.get("node") == _node or here and process and Process(**process).is_gone(here)):
            dead.append(name)
    if not dead:
        return []
    pipe = redis_client.pipeline(transaction=False)
    for name in dead:
        pipe.delete(ALIVE_KEY + name)
    buried = [name for name, deleted in zip(dead, pipe.execute(), strict=True) if deleted]
    for name in buried:
        logger.warning("%s found %s dead (its process is gone, or this worker took its place)", me, name)
    return buried


def sign_off(redis_client: redis.Redis | None = None) -> None:
    """A clean exit: this incarnation is gone, and nothing it held was lost (a warm shutdown finished it)."""
    me = incarnation()
    (redis_client or client()).pipeline(transaction=False).delete(ALIVE_KEY + me).hdel(REGISTRY_KEY, me).execute()


class Heartbeat(threading.Thread):
    """Beats every ``MEGAFLOW_WORKER_HEARTBEAT_S`` until stopped; a broker that is away is tried again next beat."""

    def __init__(self, queues: Iterable[str]):
        super().__init__(name="megaflow-heartbeat", daemon=True)
        self.queues = sorted(queues)
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                beat(self.queues)
            except redis.RedisError as error:
                logger.warning("heartbeat of %s failed: %s", incarnation(), error)
            if self.stopped.wait(heartbeat_s()):
                return


_heartbeat: Heartbeat | None = None


@signals.celeryd_init.connect
def _name_this_worker(sender=None, **_) -> None:
    """A worker's incarnation is its Celery node name and a fresh id."""
    global _node, _token
    if sender:
        _node, _token = str(sender), secrets.token_hex(4)


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_) -> None:
    global _heartbeat
    consumer = getattr(sender, "task_consumer", None)
    queues = [queue.name for queue in getattr(consumer, "queues", [])]
    _heartbeat = Heartbeat(queues)
    _heartbeat.start()
    logger.info("worker incarnation %s heartbeats every %s s (queues %s)", incarnation(), heartbeat_s(), queues)


@signals.worker_shutdown.connect
def _stop_heartbeat(**_) -> None:
    if _heartbeat is None:
        return
    _heartbeat.stopped.set()
    try:
        sign_off()
    except redis.RedisError as error:
        logger.warning("%s could not sign off: %s", incarnation(), error)


# --- what the watchdog reads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """The workers alive now, each with the episodes it holds, and every registered one (alive or not)."""

    alive: dict[str, frozenset[int]] = field(default_factory=dict)
    registered: dict[str, dict] = field(default_factory=dict)

    def holds(self, episode_id: int) -> bool:
        return any(episode_id in episodes for episodes in self.alive.values())

    @property
    def dead(self) -> dict[str, dict]:
        return {name: info for name, info in self.registered.items() if name not in self.alive}


def alive_incarnations(redis_client: redis.Redis | None = None) -> set[str]:
    """The registered incarnations alive now: ``read_fleet``'s names without what each holds (at 10,000 episodes a
    worker's beat lists thousands, and a start that only asks who is alive read and parsed them all)."""
    redis_client = redis_client or client()
    names = redis_client.hkeys(REGISTRY_KEY)
    if not names:
        return set()
    pipe = redis_client.pipeline(transaction=False)
    for name in names:
        pipe.exists(ALIVE_KEY + name)
    return {name for name, alive in zip(names, pipe.execute(), strict=True) if alive}


def read_fleet(redis_client: redis.Redis | None = None) -> Fleet:
    redis_client = redis_client or client()
    registered = {name: json.loads(info) for name, info in redis_client.hgetall(REGISTRY_KEY).items()}
    names = list(registered)
    beats = redis_client.mget([ALIVE_KEY + name for name in names]) if names else []
    alive = {name: frozenset(json.loads(value)["held"]) for name, value in zip(names, beats, strict=True) if value}
    return Fleet(alive, registered)


@dataclass(frozen=True)
class Event:
    """Something after which messages may have been lost.

    A broker event re-drives the live episodes that no living worker holds and that have not moved since ``at``
    (a UNIX time), those whose next hop runs on one of ``queues`` (None: any queue). A worker's death (``worker``
    set) re-drives only what that worker lost: what it held at its last beat (``beat_at``, ``held``) and the hops
    it began after that beat. What it merely published waits in a queue and is not lost: re-driving it would
    duplicate it, and after every death under a backlog the duplicates feed on themselves."""

    at: float
    why: str
    queues: frozenset[str] | None = None
    # Seconds after ``at`` before the event re-drives anything: what was merely queued has been taken by then.
    settle_s: float = 0.0
    worker: str | None = None
    beat_at: float = 0.0
    held: frozenset[int] = frozenset()

    def covers(self, queue: str) -> bool:
        return self.worker is None and (self.queues is None or queue in self.queues)

    def settled(self, now: float) -> bool:
        return now >= self.at + self.settle_s

    def lost_with_worker(self, episode_id: int, holder: str, updated_at: float) -> bool:
        """Whether the dead ``worker`` took the episode's pending hop with it: it held the episode at its last
        beat and nobody moved it since, or it made the episode's last move after that beat (a hop it began then,
        or one that finished and published its successor in those last seconds: a bounded duplicate)."""
        if self.worker is None:
            return False
        if holder == self.worker:
            return episode_id in self.held or updated_at >= self.beat_at
        return episode_id in self.held and updated_at <= self.beat_at

    def to_json(self) -> str:
        queues = None if self.queues is None else sorted(self.queues)
        return json.dumps({"at": self.at, "why": self.why, "queues": queues, "settle_s": self.settle_s,
                           "worker": self.worker, "beat_at": self.beat_at, "held": sorted(self.held)})  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Event:
        data = json.loads(text)
        queues = None if data["queues"] is None else frozenset(data["queues"])
        return cls(data["at"], data["why"], queues, data.get("settle_s", 0.0), data.get("worker"),
                   data.get("beat_at", 0.0), frozenset(data.get("held", ())))  # fmt: skip

    @classmethod
    def death(cls, name: str, info: dict, now: float) -> Event:
        """``name`` went silent; ``info`` is its registry entry (queues, the time and held list of its last beat)."""
        beat_at = float(info.get("beat_at", now))
        queues = frozenset(info["queues"]) if info.get("queues") else None
        # It died at most a heartbeat after its last beat.
        return cls(beat_at + heartbeat_s(), f"worker {name} went silent", queues, worker=name, beat_at=beat_at,
                   held=frozenset(info.get("held", ())))  # fmt: skip


# kombu's Redis transport keeps every message a consumer took and has not acknowledged in a hash (delivery tag →
# [message, exchange, routing key]), and when it took it in a sorted set; these are its default names.
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"


def orphaned(fleet: Fleet, redis_client: redis.Redis | None = None) -> dict[int, list[str]]:
    """The messages that a worker took off its queue and that nobody alive holds, by the episode they name (→ their
    delivery tags: an episode re-driven before may have several): taken before every living worker's last beat
    (a living taker would have said it holds them), and held by none. Their taker died with them: a kill -9
    between a worker's last beat and its taking a message is seen here, and nowhere else, until the visibility
    timeout gives the message back an hour later."""
    redis_client = redis_client or client()
    # Nobody alive: nothing to compare with (the cutoff is before any take), and the deaths say what was lost.
    beats = [float(fleet.registered[name].get("beat_at", 0)) for name in fleet.alive if name in fleet.registered]
    cutoff = min(beats, default=0) - heartbeat_s()  # a margin for clocks apart and a beat under way
    tags = redis_client.zrangebyscore(UNACKED_INDEX_KEY, "-inf", cutoff)
    found: dict[int, list[str]] = {}
    for tag, entry in zip(tags, redis_client.hmget(UNACKED_KEY, tags) if tags else [], strict=True):
        for episode_id in _episodes_of_message(entry):
            if not fleet.holds(episode_id):
                found.setdefault(episode_id, []).append(tag)
    return found


def _episodes_of_message(entry: str | None) -> tuple[int, ...]:
    """The episodes a Celery message (as kombu keeps it in ``unacked``) names, if it names any."""
    try:
        message = json.loads(entry)[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return episodes_named(json.loads(body)[1])
    except (TypeError, ValueError, KeyError, IndexError):
        return ()  # not a message of ours (or not JSON): not an episode's hop


def forget(tags: Iterable[str], redis_client: redis.Redis | None = None) -> None:
    """Drop orphaned messages once their episodes were re-driven: the visibility timeout would otherwise give
    them back, as stragglers, an hour later."""
    if tags := list(tags):
        (redis_client or client()).pipeline(transaction=False).hdel(UNACKED_KEY, *tags).zrem(
            UNACKED_INDEX_KEY, *tags
        ).execute()


def recovery_window_s() -> float:
    """How long an event keeps re-driving what it may have lost: a hop that was running when the broker went away
    may fail to publish well after it came back (timeouts, retries)."""
    return max(180.0, 6 * settings.MEGAFLOW_WORKER_DEAD_S)


def observe(fleet: Fleet, redis_client: redis.Redis | None = None, now: float | None = None) -> list[Event]:
    """Record what happened since the last look (workers that went silent, a broker that restarted or lost its
    data) and return the events still within the recovery window."""
    redis_client = redis_client or client()
    now = time.time() if now is None else now
    found = []
    for name, info in fleet.dead.items():
        if redis_client.hdel(REGISTRY_KEY, name):  # one watchdog records each death
            found.append(Event.death(name, info, now))
    found += broker_events(redis_client, now)
    if found:  # scored by when they were seen: the window runs from there
        redis_client.zadd(EVENTS_KEY, {event.to_json(): now for event in found})
        for event in found:
            logger.warning("recovery: %s", event.why)
    redis_client.zremrangebyscore(EVENTS_KEY, "-inf", now - recovery_window_s())
    return [Event.from_json(text) for text in redis_client.zrangebyscore(EVENTS_KEY, now - recovery_window_s(), "+inf")]


def broker_events(redis_client: redis.Redis, now: float) -> list[Event]:
    """A broker without its epoch key lost its data (or is new: then nothing is live), and every message queued
    before now with it; one whose server run id changed restarted (what was in flight to it may be lost)."""
    server = redis_client.info("server")
    run_id, started = server["run_id"], now - float(server["uptime_in_seconds"])
    if redis_client.hsetnx(BROKER_KEY, "epoch", secrets.token_hex(8)):
        redis_client.hset(BROKER_KEY, "run_id", run_id)
        return [Event(now, "the broker has no epoch: it lost its data (or is new)")]
    if redis_client.hget(BROKER_KEY, "run_id") != run_id:
        redis_client.hset(BROKER_KEY, "run_id", run_id)
        return [Event(started, "the broker restarted", settle_s=settings.MEGAFLOW_WORKER_DEAD_S)]
    return []


# --- hops that ended in an error -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """The last hop of an episode's ``attempt`` (None: the message named none) that ended in ``error`` at ``at``
    (a UNIX time); ``times``: how many of that attempt's hops did."""

    at: float
    task: str
    error: str
    attempt: int | None
    times: int = 1

    def lost(self, attempt: int, updated_at: float) -> bool:
        """Whether the episode (of ``attempt``, last moved at ``updated_at``) waits on the hop that failed:
        nothing moved it since."""
        return self.attempt in (None, attempt) and updated_at <= self.at


def drop(episode_id: int, attempt: int | None, task: str, error: BaseException, redis_client=None) -> None:
    """Record that a hop of the episode ended in ``error`` (its message is acknowledged; nothing else would move
    the episode before the last resort). A broker that is away loses the record: the last resort remains."""
    redis_client = redis_client or client()
    try:
        # Read, then write: one episode has one hop in flight, so two drops of it do not race.
        earlier = redis_client.hget(DROPPED_KEY, str(episode_id))
        times = 1
        if earlier and (previous := Drop(**json.loads(earlier))).attempt == attempt:
            times = previous.times + 1
        record = Drop(time.time(), task, f"{type(error).__name__}: {error}"[:1000], attempt, times)
        redis_client.hset(DROPPED_KEY, str(episode_id), json.dumps(asdict(record)))
    except redis.RedisError as failure:
        logger.error("episode %s: could not record that %s failed (%s): %s", episode_id, task, error, failure)


def drops(redis_client=None) -> dict[int, Drop]:
    entries = (redis_client or client()).hgetall(DROPPED_KEY)
    return {int(episode_id): Drop(**json.loads(text)) for episode_id, text in entries.items()}


def forget_drops(episode_ids: Iterable[int], redis_client=None) -> None:
    if episode_ids := [str(episode_id) for episode_id in episode_ids]:
        (redis_client or client()).hdel(DROPPED_KEY, *episode_ids)


# --- messages that vanished between the broker and a worker ----------------------------------------------------

VANISHING_KEY = "megaflow:vanishing"  # episode id → {"seen_at", "updated_at"}: its next hop's queues were empty


def empty_queues(queues: Iterable[str], redis_client: redis.Redis | None = None) -> set[str]:
    """Those of ``queues`` with no message waiting, in any of the priority lists kombu keeps for a queue."""
    queues = sorted(set(queues))
    lists = [[queue, *(f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS if step)] for queue in queues]
    pipe = (redis_client or client()).pipeline(transaction=False)
    for names in lists:
        for name in names:
            pipe.llen(name)
    lengths = iter(pipe.execute())
    return {queue for queue, names in zip(queues, lists, strict=True) if sum(next(lengths) for _ in names) == 0}


def vanished(
    waiting: dict[int, tuple[float, frozenset[str]]], now: float | None = None, redis_client: redis.Redis | None = None
) -> dict[int, float]:
    """The episodes whose next hop's message vanished in the broker's one gap: kombu's Redis transport takes a
    message off its list (BRPOP) and only then records it as unacknowledged, so a worker killed in between (under
    load, the reply can wait in its socket for a second or two) loses it without a trace. Nothing else sees it.

    ``waiting``: the live episodes that no living worker holds and that have not moved for two heartbeats, each
    with when it last moved (a UNIX time) and the queues its next hop would wait in. An episode whose queues
    were all empty at one look has no message queued: its last hop published it before that look, or its holder
    would still say it holds it. If at least two heartbeats later nobody holds it and it has not moved, no living
    worker took that message (a taker says so in its next beat, and moves the episode when its hop begins) and
    no dead one did (``orphaned`` finds those in the unacknowledged set): it is gone. Returns those episodes, each
    with when its queues were seen empty. What each look saw is kept in Redis for the next."""
    redis_client = redis_client or client()
    now = time.time() if now is None else now
    seen = {int(pk): json.loads(text) for pk, text in redis_client.hgetall(VANISHING_KEY).items()}
    queues = set().union(*(queues for _, queues in waiting.values())) if waiting else set()
    empty = empty_queues(queues, redis_client) if queues else set()
    found: dict[int, float] = {}
    keep: dict[int, dict] = {}
    for pk, (updated_at, episode_queues) in waiting.items():
        earlier = seen.get(pk)
        if earlier and earlier["updated_at"] == updated_at:  # unmoved since its queues were seen empty
            keep[pk] = earlier
            if now - earlier["seen_at"] >= 2 * heartbeat_s():
                found[pk] = earlier["seen_at"]
        elif episode_queues <= empty:
            keep[pk] = {"seen_at": now, "updated_at": updated_at}
    pipe = redis_client.pipeline()  # what no longer waits (moved, held, ended) goes
    pipe.delete(VANISHING_KEY)
    if keep:
        pipe.hset(VANISHING_KEY, mapping={str(pk): json.dumps(entry) for pk, entry in keep.items()})
    pipe.execute()
    return found
