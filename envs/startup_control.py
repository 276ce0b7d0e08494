"""Start-up control, shared by every env worker on the same Redis: a burst of 10,000 episodes must not
stampede the Docker daemon.

Two limits, both checked before a container is created:
- a cap on containers in the *starting* state (``MEGAFLOW_START_CONCURRENCY``): a semaphore held in a Redis
  sorted set, one member per holder (named by its worker incarnation), scored by when its lease expires. The
  lease is short (``MEGAFLOW_WORKER_DEAD_S``) and the holder's heartbeat renews it while the slot is held, so a
  worker killed mid-start frees its slot as soon as the watchdog knows it dead (``release_slots_of``), and a slot
  whose release failed (the broker was away: it came back from its snapshot with the slot in it) frees itself
  within one lease, instead of holding a start slot for minutes;
- a creation rate (``MEGAFLOW_START_RATE``), a moving window kept in Redis by the ``limits`` library.

A thread that finds either limit reached sleeps a jittered, growing interval and tries again. Waiting here,
rather than re-queueing the message with a countdown, keeps the backlog in the broker's queue, where it
costs nothing: each worker parks at most its own thread count, and Celery holds no pile of ETA messages.
"""

from __future__ import annotations

import functools
import random
import threading
import time
import uuid
from contextlib import contextmanager

from django.conf import settings
from limits import parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from envs.backend import SandboxError
from megaflow_site import liveness
from orchestrator.hot_state import redis_client

SLOTS_KEY = "megaflow:env:starting"
SEMAPHORES_KEY = "megaflow:semaphores"  # every semaphore's key, so that a dead worker's slots can be found
# The slots this process holds (token → key, lease seconds), renewed by its heartbeat (``renew_slots``).
_holding: dict[str, tuple[str, float]] = {}
_holding_lock = threading.Lock()
MAX_WAIT_S = 300
_BACKOFF_BASE_S = 0.02
_BACKOFF_CAP_S = 1.0

# KEYS[1] slots zset, KEYS[2] the set of semaphores; ARGV: now, capacity, lease expiry, token. Returns 1 when
# the slot was taken.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('SADD', KEYS[2], KEYS[1])
  return 1
end
return 0
"""


@functools.cache
def _rate_limiter() -> tuple[MovingWindowRateLimiter, object]:
    return MovingWindowRateLimiter(RedisStorage(settings.REDIS_URL)), parse(settings.MEGAFLOW_START_RATE)


@functools.cache
def _acquire_script():
    return redis_client().register_script(_ACQUIRE)


def _backoff(attempt: int) -> float:
    """Full jitter: a uniform wait up to an exponentially growing cap, so waiters do not retry in step."""
    return random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt))


def _wait_until(take, what: str, deadline: float, waited_s: float = MAX_WAIT_S) -> None:
    attempt = 0
    while not take():
        if time.monotonic() > deadline:
            raise SandboxError(f"waited {waited_s:.0f} s for {what}; the environment pool is overloaded")
        time.sleep(_backoff(attempt))
        attempt += 1


def starting_now() -> int:
    """How many containers are starting across the fleet (expired leases excluded)."""
    redis = redis_client()
    redis.zremrangebyscore(SLOTS_KEY, "-inf", time.time())
    return redis.zcard(SLOTS_KEY)


@contextmanager
def start_gate():
    """Hold a starting slot and one unit of the creation rate for the duration of one container start."""
    deadline = time.monotonic() + MAX_WAIT_S
    limiter, rate = _rate_limiter()
    _wait_until(lambda: limiter.hit(rate, "megaflow", "container-start"), "the container creation rate", deadline)
    remaining = max(0.0, deadline - time.monotonic())
    with semaphore_slot(SLOTS_KEY, settings.MEGAFLOW_START_CONCURRENCY, "a container start slot", remaining):
        yield


@contextmanager
def semaphore_slot(key: str, capacity: int, what: str, max_wait_s: float = MAX_WAIT_S, lease_s: float | None = None):
    """Hold one of ``capacity`` slots of the Redis semaphore ``key`` (a lease of ``lease_s``, by default the
    dead-worker window, renewed by this process's heartbeat while held), waiting with jittered back-off up to
    ``max_wait_s``; envs/images.py bounds pulls with it."""
    token = f"{liveness.incarnation()} {uuid.uuid4().hex}"  # whose it is: release_slots_of frees a dead one's
    lease_s = lease_s or settings.MEGAFLOW_WORKER_DEAD_S
    script = _acquire_script()

    def take_slot() -> bool:
        now = time.time()
        return bool(script(keys=[key, SEMAPHORES_KEY], args=[now, capacity, now + lease_s, token]))

    _wait_until(take_slot, what, time.monotonic() + max_wait_s, max_wait_s)
    with _holding_lock:
        _holding[token] = (key, lease_s)
    try:
        yield
    finally:
        with _holding_lock:
            del _holding[token]  # renewed no more: should the release below fail, the lease runs out
        redis_client().zrem(key, token)


@liveness.every_beat
def renew_slots(client) -> int:
    """Extend the lease of every slot this process holds (its heartbeat calls this). Returns how many."""
    with _holding_lock:
        held = list(_holding.items())
    if not held:
        return 0
    now, pipe = time.time(), client.pipeline(transaction=False)
    for token, (key, lease_s) in held:
        pipe.zadd(key, {token: now + lease_s}, xx=True)  # xx: a slot freed meanwhile stays free
    pipe.execute()
    return len(held)


def release_slots_of(incarnations: set[str]) -> int:
    """Free every slot, of every semaphore, that the given (dead) worker incarnations hold: a worker killed inside
    a start or a pull would hold its slot for the whole lease, and with every slot so held no sandbox starts
    until the leases run out. Returns how many were freed."""
    if not incarnations:
        return 0
    redis = redis_client()
    freed = 0
    for key in redis.smembers(SEMAPHORES_KEY):
        theirs = [token for token in redis.zrange(key, 0, -1) if token.split(" ", 1)[0] in incarnations]
        if theirs:
            freed += redis.zrem(key, *theirs)
    return freed
