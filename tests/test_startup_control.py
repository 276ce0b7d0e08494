"""Start-up control: a fleet-wide cap on starting containers and a creation rate, both in Redis."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from envs import startup_control
from megaflow_site import liveness


@pytest.fixture(autouse=True)
def fresh_limits(settings, broker):
    startup_control._rate_limiter.cache_clear()
    broker.delete(startup_control.SLOTS_KEY)
    yield
    startup_control._rate_limiter.cache_clear()
    for key in broker.keys("LIMITS*"):
        broker.delete(key)


def run_through_gate(count: int, hold_s: float) -> tuple[int, list[float]]:
    """Pass ``count`` threads through the gate; returns the most that held it at once and their entry times."""
    lock, holding, most, entered = threading.Lock(), [0], [0], []

    def start():
        with startup_control.start_gate():
            with lock:
                holding[0] += 1
                most[0] = max(most[0], holding[0])
                entered.append(time.monotonic())
            time.sleep(hold_s)
            with lock:
                holding[0] -= 1

    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(lambda _: start(), range(count)))
    return most[0], sorted(entered)


def test_no_more_than_the_cap_start_at_once(settings):
    settings.MEGAFLOW_START_CONCURRENCY = 2
    settings.MEGAFLOW_START_RATE = "1000/second"
    most, entered = run_through_gate(8, hold_s=0.1)
    assert most == 2 and len(entered) == 8
    assert startup_control.starting_now() == 0, "every slot was given back"


def test_the_creation_rate_holds_in_every_window(settings, monkeypatch):
    settings.MEGAFLOW_START_CONCURRENCY = 100
    settings.MEGAFLOW_START_RATE = "4/second"
    limiter, rate = startup_control._rate_limiter()
    admitted, real_hit = [], limiter.hit

    def hit(*args, **kwargs):
        allowed = real_hit(*args, **kwargs)
        if allowed:
            admitted.append(time.monotonic())  # when the limiter let a start through, not when its thread ran on
        return allowed

    monkeypatch.setattr(limiter, "hit", hit)
    _, entered = run_through_gate(12, hold_s=0)
    assert len(entered) == len(admitted) == 12
    # A moving window: no second-long span admitted more than four starts.
    admitted.sort()
    assert max(sum(1 for t in admitted if start <= t < start + 0.9) for start in admitted) <= 4
    assert admitted[-1] - admitted[0] >= 2.0, "12 starts at 4/second span at least two full windows"


def test_a_slot_held_by_a_dead_worker_expires(settings, broker):
    settings.MEGAFLOW_START_CONCURRENCY = 1
    broker.zadd(startup_control.SLOTS_KEY, {"crashed-worker": time.time() - 1})
    most, _ = run_through_gate(1, hold_s=0)
    assert most == 1


def test_the_slots_of_a_dead_worker_are_freed_as_soon_as_it_is_known_dead(settings, broker):
    settings.MEGAFLOW_START_CONCURRENCY = 2
    with startup_control.start_gate():
        with startup_control.semaphore_slot("megaflow:env:pulling-test", 1, "a pull slot"):
            dead = liveness.incarnation()
            assert startup_control.release_slots_of({"somebody-else#1"}) == 0
            assert startup_control.starting_now() == 1
            assert startup_control.release_slots_of({dead}) == 2, "its start slot and its pull slot"
            assert startup_control.starting_now() == 0
            assert broker.zcard("megaflow:env:pulling-test") == 0
    assert startup_control.release_slots_of(set()) == 0
    broker.delete("megaflow:env:pulling-test", startup_control.SEMAPHORES_KEY)


def test_a_slot_lives_while_its_holder_beats_and_one_whose_release_failed_runs_out(settings, broker, monkeypatch):
    """A slot's lease is the dead-worker window, renewed by its holder's heartbeat: a long start keeps its slot, and
    a slot whose release failed (production chaos, Redis SHUTDOWN SAVE: the starts under way could not give their
    slots back, the snapshot kept them, and no container started for the two minutes of the old lease) is free
    again within one lease."""
    settings.MEGAFLOW_START_CONCURRENCY = 1
    assert startup_control.renew_slots in liveness._beat_hooks
    lease = settings.MEGAFLOW_WORKER_DEAD_S
    with startup_control.start_gate():
        [(token, expiry)] = broker.zrange(startup_control.SLOTS_KEY, 0, -1, withscores=True)
        assert time.time() < expiry <= time.time() + lease
        broker.zadd(startup_control.SLOTS_KEY, {token: time.time() + 1})  # the lease nearly ran out
        assert startup_control.renew_slots(broker) == 1
        assert broker.zscore(startup_control.SLOTS_KEY, token) > time.time() + lease - 5, "renewed by the beat"

    def broker_away(*args):
        raise ConnectionError("the broker is away")

    monkeypatch.setattr(startup_control.redis_client(), "zrem", broker_away)
    with pytest.raises(ConnectionError), startup_control.start_gate():
        pass
    monkeypatch.undo()
    [(token, _)] = broker.zrange(startup_control.SLOTS_KEY, 0, -1, withscores=True)
    assert startup_control.renew_slots(broker) == 0, "a slot let go of is renewed no more"
    broker.zadd(startup_control.SLOTS_KEY, {token: time.time() - 1})  # one lease later
    settings.MEGAFLOW_START_RATE = "1000/second"
    most, _ = run_through_gate(1, hold_s=0)
    assert most == 1 and startup_control.starting_now() == 0
