"""Worker liveness and recovery, deterministically: heartbeats, deaths and broker epochs against a Redis database
of this test's own (megaflow_site/liveness.py), and the watchdog's decisions (orchestrator/runs.redrive_lost)
given a fleet and events, driven through the episode loop by calling it directly. No workers, no Docker, no
sleeps: time is passed in, and a key's expiry is its deletion.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace

import kombu
import pytest
import redis
from celery import signals
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from envs import service as env_service
from envs.backend import get_backend
from megaflow_site import liveness
from megaflow_site.celery import app
from modelserving import service as model_service
from orchestrator import episode_loop, framework_loop, hot_state, runs, sessions, tasks, transitions
from orchestrator.models import Dataset, Episode, Run, Step, Task
from tests.support.sim_loop import captured_loop

# Transactional: a step's claim is an INSERT that may hit the unique index, as between two deliveries.
pytestmark = pytest.mark.django_db(transaction=True)

E = Episode.Status
DEAD = "env-default@host#dead"
ALIVE = "env-default@host#alive"


@pytest.fixture
def broker() -> redis.Redis:
    """A Redis database next to the session's (its number minus one), empty before and after."""
    base, _, number = settings.REDIS_URL.rpartition("/")
    client = redis.Redis.from_url(f"{base}/{int(number) - 1}", decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()


# --- heartbeats, deaths, the broker's epoch ---------------------------------------------------------------------


def test_a_worker_is_alive_while_it_beats_and_its_silence_is_one_death(broker):
    with liveness.holding(7), liveness.holding(7), liveness.holding(8):
        liveness.beat(["env.default"], broker)
        assert liveness.held() == [7, 8]
    assert liveness.held() == []
    me = liveness.incarnation()
    assert 0 < broker.ttl(liveness.ALIVE_KEY + me) <= settings.MEGAFLOW_WORKER_DEAD_S
    fleet = liveness.read_fleet(broker)
    assert fleet.alive == {me: frozenset({7, 8})} and fleet.holds(7) and not fleet.holds(9) and fleet.dead == {}
    assert liveness.alive_incarnations(broker) == {me}
    liveness.observe(fleet, broker)  # the broker's epoch, first seen

    broker.delete(liveness.ALIVE_KEY + me)  # what Redis does once MEGAFLOW_WORKER_DEAD_S passed without a beat
    fleet = liveness.read_fleet(broker)
    assert fleet.alive == {} and set(fleet.dead) == {me} and liveness.alive_incarnations(broker) == set()
    [death] = [event for event in liveness.observe(fleet, broker) if "silent" in event.why]
    assert death.why == f"worker {me} went silent" and death.queues == {"env.default"}
    # What it held at its last beat survives the key that expired; a death re-drives that, not its queues.
    assert death.worker == me and death.held == {7, 8} and death.beat_at <= death.at
    assert not death.covers("env.default") and death.settled(death.at)
    assert liveness.observe(fleet, broker).count(death) == 1, "recorded once, and kept for the recovery window"
    later = time.time() + liveness.recovery_window_s() + 1
    assert liveness.observe(liveness.read_fleet(broker), broker, now=later) == []


def test_a_clean_exit_is_not_a_death(broker):
    liveness.beat(["agent"], broker)
    liveness.observe(liveness.read_fleet(broker), broker)
    liveness.sign_off(broker)
    fleet = liveness.read_fleet(broker)
    assert fleet.registered == {} and not [event for event in liveness.observe(fleet, broker) if "silent" in event.why]


def test_the_broker_epoch_tells_a_restart_and_a_loss_of_data(broker):
    [first] = liveness.observe(liveness.Fleet(), broker)
    assert "no epoch" in first.why and first.queues is None
    assert liveness.observe(liveness.Fleet(), broker) == [first], "nothing new"
    broker.hset(liveness.BROKER_KEY, "run_id", "an earlier server")  # as if redis-server restarted with its data
    assert [event.why for event in liveness.observe(liveness.Fleet(), broker)][-1] == "the broker restarted"
    broker.flushdb()  # SHUTDOWN NOSAVE: the server comes back empty
    [lost] = liveness.observe(liveness.Fleet(), broker)
    assert "lost its data" in lost.why


def register(broker, name: str, node: str, process: liveness.Process | None) -> None:
    """Another incarnation's beat: its key and its registry entry."""
    info = {"node": node, "queues": ["env.default"], "beat_at": time.time(), "held": [5]}
    broker.hset(liveness.REGISTRY_KEY, name, json.dumps(info | ({"process": process.to_json()} if process else {})))
    broker.set(liveness.ALIVE_KEY + name, json.dumps({"held": [5]}), ex=30)


def test_a_beat_buries_at_once_what_it_can_see_is_dead(broker):
    """A kill -9 on this machine, or a worker's predecessor under its node name, need not wait out the key."""
    here = liveness.this_process()
    child = subprocess.Popen(["sleep", "60"])
    alive = liveness.Process.of(child.pid)
    child.kill()
    child.wait()
    gone = liveness.Process.of(os.getpid())
    register(broker, "env-default@a#killed", "env-default@a", alive)  # its pid exists no more
    register(broker, "env-default@b#reused", "env-default@b", dataclasses.replace(gone, started=gone.started - 1))
    register(broker, "env-default@c#elsewhere", "env-default@c", dataclasses.replace(alive, boot="another boot"))
    register(broker, "env-default@d#old", "env-default@d", None)  # an incarnation from before processes were recorded
    register(broker, f"{liveness.node()}#predecessor", liveness.node(), None)
    register(broker, "env-default@e#alive", "env-default@e", here)
    liveness.beat(["env.default"], broker)
    fleet = liveness.read_fleet(broker)
    assert set(fleet.dead) == {"env-default@a#killed", "env-default@b#reused", f"{liveness.node()}#predecessor"}
    assert set(fleet.alive) == {liveness.incarnation(), "env-default@c#elsewhere", "env-default@d#old",
                                "env-default@e#alive"}  # fmt: skip
    deaths = [event for event in liveness.observe(fleet, broker) if event.worker]
    assert {event.worker for event in deaths} == set(fleet.dead) and all(event.held == {5} for event in deaths)
    assert liveness.bury(broker.hgetall(liveness.REGISTRY_KEY), broker) == [], "each is buried once"


def test_a_message_taken_by_a_worker_that_then_died_is_orphaned(broker):
    """kill -9 after a worker's last beat and before its next: the message it took is in kombu's unacknowledged
    set and in nobody's heartbeat. Taken here for real: Celery publishes the hop, kombu takes it without an ack,
    and the taker never beats (nor closes its connection, which would give the message back)."""
    url = broker.connection_pool.connection_kwargs
    url = f"redis://{url['host']}:{url['port']}/{url['db']}"
    taker = kombu.Connection(url)
    queue = taker.SimpleQueue("env.orphans")
    with app.connection_for_write(url) as publisher:
        app.send_task("envs.episode_step", kwargs={"episode_id": 77, "step": 0, "pool": "default"},
                      queue=queue.queue, connection=publisher)  # fmt: skip
        app.send_task("orchestrator.admit", queue=queue.queue, connection=publisher)  # names no episode
    taken = [queue.get(timeout=5), queue.get(timeout=5)]
    assert broker.hlen(liveness.UNACKED_KEY) == 2
    liveness.beat(["env.orphans"], broker)
    fleet = liveness.read_fleet(broker)
    assert liveness.orphaned(fleet, broker) == {}, "a living taker may not have beaten since it took it"

    later = {**fleet.registered[liveness.incarnation()], "beat_at": time.time() + 2 * liveness.heartbeat_s()}
    fleet = dataclasses.replace(fleet, registered={liveness.incarnation(): later})
    tag = taken[0].delivery_tag
    assert liveness.orphaned(fleet, broker) == {77: [tag]}
    holder = dataclasses.replace(fleet, alive={"model-sim@elsewhere#1": frozenset({77})} | fleet.alive)
    assert liveness.orphaned(holder, broker) == {}, "somebody alive holds it"
    liveness.forget([tag], broker)
    assert liveness.orphaned(fleet, broker) == {} and broker.hlen(liveness.UNACKED_KEY) == 1
    taker.release()


def test_the_heartbeat_outlives_a_broker_that_is_away(monkeypatch, caplog):
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    monkeypatch.setattr(liveness, "client", lambda: away)
    heartbeat = liveness.Heartbeat(["agent"])
    heartbeat.stopped.set()
    heartbeat.run()  # one beat, which fails, and returns because it was stopped: it did not raise
    assert "heartbeat of" in caplog.text


def test_a_task_holds_the_episode_it_names_while_it_runs(monkeypatch):
    seen = []
    monkeypatch.setattr(episode_loop, "episode_turn", lambda *args: seen.append(liveness.held()))
    tasks.episode_turn(episode_id=41, step=0, model="sim", attempt=1)
    assert seen == [[41]] and liveness.held() == []


def test_a_message_taken_off_its_queue_is_held_until_its_task_ends():
    """With late acks a kill -9 loses what the worker took, run or not: the heartbeat says so from the take."""
    taken = SimpleNamespace(id="task-1", kwargs={"episode_id": 42, "step": 0})
    signals.task_received.send(sender=None, request=taken)
    signals.task_received.send(sender=None, request=SimpleNamespace(id="task-2", kwargs={"run_id": 3}))
    assert liveness.held() == [42]
    signals.task_postrun.send(sender=None, task_id="task-1")
    assert liveness.held() == []
    signals.task_received.send(sender=None, request=taken)
    signals.task_revoked.send(sender=None, request=SimpleNamespace(id="task-1"))
    assert liveness.held() == []


# --- the watchdog's decisions -----------------------------------------------------------------------------------

REPLY = "Looking.\n```bash\necho hello\n```"


@pytest.fixture
def sent(monkeypatch, settings) -> list[tuple[str, dict]]:
    messages = captured_loop(monkeypatch, settings)
    monkeypatch.setattr(runs, "send", lambda name, **kwargs: messages.append((name, kwargs)))
    monkeypatch.setattr(runs, "admission_limit", lambda: None)
    yield messages
    get_backend.cache_clear()


@pytest.fixture
def run(db) -> Run:
    dataset = Dataset.objects.create(name="liveness")
    task = Task.objects.create(dataset=dataset, instance_id="t-1", problem_statement="Fix it.", test_command="true",
                               fail_to_pass=["test_it"], spec_sha256="0" * 64)  # fmt: skip
    run = Run.objects.create(dataset=dataset, model_name="sim", env_pool="default", status=Run.Status.RUNNING,
                             max_steps=5, max_attempts=2)  # fmt: skip
    run.tasks.add(task)
    return run


def started(run: Run, sent, sample: int = 0) -> Episode:
    episode = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=sample, status=E.QUEUED)
    assert transitions.admit(episode.pk, 1)
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    sent.clear()
    return Episode.objects.get(pk=episode.pk)


def held_by(episode: Episode, holder: str, **fields) -> None:
    Episode.objects.filter(pk=episode.pk).update(holder=holder, **fields)


def pump(sent) -> list[str]:
    """Deliver what the loop published, as the workers would, until nothing is left; returns the task names."""
    delivered = []
    while sent:
        name, message = sent.pop(0)
        delivered.append(name)
        message.pop("host", None)  # a routing kwarg, like pool
        if name != "envs.episode_start":
            message.pop("pool", None)
        if name == "envs.episode_start":
            episode_loop.episode_start(**message)
        elif name == "envs.episode_step":
            episode_loop.episode_step(**message)
        elif name == "modelserving.episode_turn":
            episode_loop.episode_turn(**message)
        elif name == "orchestrator.episode_done":
            runs.episode_done(**message)
    return delivered


def after(seconds: float):
    return timezone.now() + timedelta(seconds=seconds)


def death_of(worker: str, held=(), beat_at=None) -> liveness.Event:
    """The event the watchdog records when ``worker`` went silent, its last beat at ``beat_at`` holding ``held``."""
    beat_at = time.time() if beat_at is None else beat_at
    return liveness.Event.death(worker, {"queues": ["env.default"], "beat_at": beat_at, "held": list(held)}, beat_at)


def test_a_step_held_by_a_dead_worker_is_taken_over_at_once_and_its_straggler_dropped(run, sent, monkeypatch):
    episode = started(run, sent)
    Step.objects.create(episode=episode, index=0, model_output=REPLY)  # claimed; then the worker was killed
    held_by(episode, DEAD)
    commands = []
    real_run = env_service.run_command
    monkeypatch.setattr(env_service, "run_command", lambda *args: commands.append(args[1]) or real_run(*args))

    death = death_of(DEAD, held=[episode.pk])
    quiet_s = 2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S
    assert runs.redrive_lost(liveness.Fleet(), [], now=after(quiet_s + 1)) == [], "no death known: not lost"
    assert runs.redrive_lost(liveness.Fleet(), [death], now=after(quiet_s + 1)) == [episode.pk]
    [(name, message)] = sent
    assert (name, message["step"], message["reply"]) == ("envs.episode_step", 0, REPLY)
    assert Episode.objects.values_list("holder", flat=True).get(pk=episode.pk) == liveness.incarnation()
    sent.clear()
    episode_loop.episode_step(**{key: value for key, value in message.items() if key not in ("pool", "host")})
    assert commands == ["echo hello"] and [name for name, _ in sent] == ["modelserving.episode_turn"]
    pump(sent)  # the next turn claims step 1 (and the episode goes on to the end)

    # The original message, redelivered when the visibility timeout ran out an hour later: a straggler.
    episode_loop.episode_step(episode.pk, 0, REPLY, attempt=1)
    assert commands.count("echo hello") == 1 and [name for name, _ in sent] == ["envs.stop_sandbox"], "nothing else"
    indexes = list(Step.objects.filter(episode=episode).order_by("index").values_list("index", flat=True))
    assert indexes == list(range(len(indexes))) and len(indexes) >= 2


def test_long_work_is_kept_alive_by_its_holders_heartbeat(run, sent):
    episode = started(run, sent)
    held_by(episode, ALIVE)
    holding = liveness.Fleet(alive={ALIVE: frozenset({episode.pk})})
    long_after = after(runs.stalled_after_s() + 60)  # longer than any lease would be
    assert runs.redrive_lost(holding, [liveness.Event(long_after.timestamp(), "anything")], now=long_after) == []
    # Alive but not holding it: its next hop's message waits in a queue; only the last resort re-drives it.
    idle = liveness.Fleet(alive={ALIVE: frozenset()})
    assert settings.MEGAFLOW_WORKER_DEAD_S + 5 < runs.stalled_after_s()
    assert runs.redrive_lost(idle, [], now=after(settings.MEGAFLOW_WORKER_DEAD_S + 5)) == []
    assert runs.redrive_lost(idle, [], now=long_after) == [episode.pk]


def test_a_death_re_drives_what_the_dead_worker_took_and_not_what_it_published(run, sent):
    """Killed, a worker loses the messages it had taken (held at its last beat, whoever moved the episode last)
    and the hop it began after that beat; the hops it had finished and published wait in their queues, and a
    re-drive would only duplicate them (duplicated starts redo their sandboxes: under kill -9 every 20 s with a
    backlog of starts, that fed on itself)."""
    beat_at = time.time()
    taken = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=1, status=E.STARTING)
    held_by(taken, ALIVE, updated_at=_at(beat_at - 5))  # the admitter moved it; the dead worker took its start
    published = started(run, sent, sample=0)
    held_by(published, DEAD, updated_at=_at(beat_at - 5))  # its first turn waits on model.sim
    begun_after = started(run, sent, sample=2)
    held_by(begun_after, DEAD, updated_at=_at(beat_at + 1))
    moved_since = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=3, status=E.STARTING)
    held_by(moved_since, ALIVE, updated_at=_at(beat_at + 1))  # taken, and started by somebody else since
    idle = liveness.Fleet(alive={ALIVE: frozenset()})
    death = death_of(DEAD, held=[taken.pk, moved_since.pk], beat_at=beat_at)

    now = after(2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S + 2)
    assert sorted(runs.redrive_lost(idle, [death], now=now)) == sorted([taken.pk, begun_after.pk])
    assert ("envs.episode_start", {"episode_id": taken.pk, "pool": "default", "attempt": 1}) in sent
    assert runs.redrive_lost(idle, [death], now=now) == [], "they moved (were re-driven) after the death"
    much_later = after(runs.stalled_after_s() - 10)  # short of the last resort, long past the dead-worker window
    assert much_later > after(2 * settings.MEGAFLOW_WORKER_DEAD_S)
    assert runs.redrive_lost(idle, [death], now=much_later) == [], "what was published is not re-driven"


def _at(unix_time: float):
    return runs._moment(unix_time)


def test_a_broker_that_lost_its_data_re_drives_every_live_episode_nobody_holds(run, sent):
    starting = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=5, status=E.STARTING)
    running = started(run, sent, sample=1)
    evaluating = started(run, sent, sample=2)
    episode_loop.episode_step(evaluating.pk, 0, "```bash\necho MEGAFLOW_SUBMIT\n```", attempt=1)
    Episode.objects.filter(pk=evaluating.pk).update(status=E.EVALUATING)  # its evaluation was cut short
    busy = started(run, sent, sample=3)
    Episode.objects.create(run=run, task=run.tasks.get(), sample_index=4, status=E.QUEUED)
    sent.clear()
    fleet = liveness.Fleet(alive={ALIVE: frozenset({busy.pk})})
    lost = liveness.Event(after(0).timestamp(), "the broker has no epoch: it lost its data (or is new)")

    redriven = runs.redrive_lost(fleet, [lost], now=after(2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S + 1))
    assert sorted(redriven) == sorted([starting.pk, running.pk, evaluating.pk])
    assert sorted((name, message["episode_id"]) for name, message in sent) == sorted(
        [("envs.episode_start", starting.pk), ("modelserving.episode_turn", running.pk),
         ("envs.episode_step", evaluating.pk)]
    )  # fmt: skip
    assert runs.redrive_lost(fleet, [lost], now=after(2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S + 1)) == []


def test_a_hop_that_ended_in_an_error_is_re_driven_and_an_attempt_whose_hops_keep_failing_is_given_up(
    run, sent, broker, monkeypatch
):
    """A hop raised (here the model service; in the 10,000-episode bench, starts that waited out their database
    retries): Celery acknowledges its message and its living worker holds the episode no more, so neither a
    death nor the broker would ever re-drive it. The task decorator records the drop; the watchdog re-drives the
    episode at its next look, and after ``MEGAFLOW_HOP_ERRORS_MAX`` errors fails the attempt with the error."""
    monkeypatch.setattr(liveness, "client", lambda: broker)
    episode = started(run, sent)  # its first turn is on its way to model.sim
    name, turn = "modelserving.episode_turn", {"episode_id": episode.pk, "step": 0, "model": "sim", "attempt": 1}

    def broken(model, requests):
        raise RuntimeError("the tokenizer broke")

    monkeypatch.setattr(model_service, "generate", broken)
    idle = liveness.Fleet(alive={liveness.incarnation(): frozenset()})  # the worker lives on
    assert settings.MEGAFLOW_HOP_ERRORS_MAX == 3

    def the_turn_fails(times: int) -> liveness.Drop:
        assert tasks.episode_turn.apply(kwargs=turn).failed()
        [(episode_id, drop)] = liveness.drops().items()
        assert (episode_id, drop.task, drop.attempt, drop.times) == (episode.pk, name, 1, times)
        assert drop.error == "RuntimeError: the tokenizer broke"
        return drop

    quiet = 2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S + 1
    the_turn_fails(1)
    assert runs.redrive_lost(idle, [], now=after(quiet)) == [], "without the drop, only the last resort would"
    assert runs.redrive_lost(idle, [], now=after(quiet), dropped=liveness.drops()) == [episode.pk]
    assert sent == [("modelserving.episode_turn", turn)] and Episode.objects.get(pk=episode.pk).status == E.RUNNING
    sent.clear()
    assert runs.redrive_lost(idle, [], now=after(quiet), dropped=liveness.drops()) == [], "it moved since: once"

    the_turn_fails(2)
    busy = liveness.Fleet(alive={liveness.incarnation(): frozenset({episode.pk})})
    assert runs.redrive_lost(busy, [], now=after(quiet), dropped=liveness.drops()) == [], "a hop of it runs"
    assert runs.redrive_lost(idle, [], now=after(quiet), dropped=liveness.drops()) == [episode.pk]
    sent.clear()
    assert runs._settled_drops(liveness.drops()) == [], "the attempt is live: its count stays"

    the_turn_fails(3)
    assert runs.redrive_lost(idle, [], now=after(quiet), dropped=liveness.drops()) == []
    episode.refresh_from_db()
    assert (episode.status, episode.attempt) == (E.QUEUED, 2), "a fresh attempt (max_attempts is 2)"
    assert "ended in an error 3 times; the last: RuntimeError: the tokenizer broke" in episode.failure_reason
    assert sorted(name for name, _ in sent) == ["envs.stop_sandbox", "orchestrator.episode_done"]
    assert runs._settled_drops(liveness.drops()) == [episode.pk], "that attempt is over: its drop goes"


def test_an_episode_of_a_pool_this_deployment_has_no_queue_for_does_not_stop_the_watchdog(run, sent):
    """A clean clone's chaos test hung: the chaos database held live episodes of a run on the ``docker`` pool, left by
    an aborted run of another configuration, and the watchdog raised ``UnknownQueue`` on them every 5 s, so it
    re-drove nothing for anyone. Such an episode is passed by; the others are still looked for."""
    episode = started(run, sent)
    held_by(episode, DEAD, updated_at=timezone.now() - timedelta(seconds=60))
    elsewhere = Run.objects.create(model_name="sim", env_pool="nowhere")
    stranger = Episode.objects.create(run=elsewhere, task=episode.task, sample_index=0, status=E.RUNNING)
    Episode.objects.filter(pk=stranger.pk).update(updated_at=timezone.now() - timedelta(seconds=60))
    waiting = runs._waiting(liveness.Fleet(alive={ALIVE: frozenset()}))
    assert set(waiting) == {episode.pk}, "the stranger is passed by, the episode still looked for"


def test_a_message_that_vanished_with_a_worker_killed_while_taking_it_re_drives_its_episode(
    run, sent, broker, monkeypatch
):
    """kombu's Redis transport pops a message (BRPOP) and only then records it as unacknowledged; a worker killed
    in between loses it, in no queue and not unacknowledged (production chaos, kill -9 every 20 s: two episodes of
    100 stuck in ``running`` for good). The watchdog sees its queues empty at one look and, two heartbeats later,
    the episode still unmoved and held by nobody: the message is gone, and the episode is re-driven."""
    monkeypatch.setattr(liveness, "client", lambda: broker)
    episode = started(run, sent)  # its first turn was published to model.sim
    held_by(episode, DEAD, updated_at=timezone.now() - timedelta(seconds=60))
    idle = liveness.Fleet(alive={ALIVE: frozenset()})
    waiting = runs._waiting(idle)
    assert waiting == {episode.pk: (waiting[episode.pk][0], frozenset({"model.sim", "env.default"}))}
    assert runs._waiting(liveness.Fleet(alive={ALIVE: frozenset({episode.pk})})) == {}, "held: not waiting"

    broker.lpush("model.sim", "the turn")  # queued: it waits its turn, however long
    now, two_beats = time.time(), 2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S
    assert liveness.vanished(runs._waiting(idle), now) == {} and not broker.exists(liveness.VANISHING_KEY)
    assert liveness.vanished(runs._waiting(idle), now + two_beats) == {}
    assert broker.brpop("model.sim") == ("model.sim", "the turn")  # taken by a worker killed before it recorded it
    assert liveness.vanished(runs._waiting(idle), now + two_beats + 1) == {}, "seen empty once: a taker may be alive"
    assert liveness.vanished(runs._waiting(idle), now + 2 * two_beats) == {}
    found = liveness.vanished(runs._waiting(idle), now + 3 * two_beats + 1)
    assert found == {episode.pk: now + two_beats + 1}

    assert runs.redrive_lost(idle, [], now=after(1), vanished=found) == [episode.pk]
    assert sent == [("modelserving.episode_turn", {"episode_id": episode.pk, "step": 0, "model": "sim", "attempt": 1})]
    assert liveness.vanished(runs._waiting(idle), now + 4 * two_beats) == {}, "it moved: what was seen goes"
    assert not broker.exists(liveness.VANISHING_KEY)


@pytest.mark.usefixtures("own_admission_keys")
def test_admission_keeps_moving_past_the_dead_worker_window(run, sent):
    """A run at its concurrency limit whose live episode was held by a worker that died: within the dead-worker
    window it is re-driven, finishes, and the next episode gets the slot."""
    Run.objects.filter(pk=run.pk).update(max_concurrent_episodes=1)
    stuck = started(run, sent)
    waiting = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=1, status=E.QUEUED)
    held_by(stuck, DEAD)
    assert runs.admit() == [], "the run's one slot is held"

    death = death_of(DEAD, held=[stuck.pk])
    assert runs.redrive_lost(liveness.Fleet(), [death], now=after(settings.MEGAFLOW_WORKER_DEAD_S + 1)) == [stuck.pk]
    delivered = pump(sent)
    assert Episode.objects.get(pk=stuck.pk).status == E.SUCCEEDED
    assert "orchestrator.episode_done" in delivered and "envs.episode_start" in delivered
    assert Episode.objects.get(pk=waiting.pk).status in transitions.LIVE | {E.SUCCEEDED}


@pytest.mark.usefixtures("own_admission_keys")
def test_admission_ramps_at_the_rate_sandboxes_come_up(run, sent, settings, monkeypatch):
    """A burst is not admitted at once (10,000 start hops parked on the env workers starved their database pools
    until starts gave up): no more than MEGAFLOW_MAX_STARTING wait for a sandbox at a time, and each sandbox that
    comes up asks for the next pass at once, not at the beat's, before its prepare commands run: those run as its
    steps will (counted while they ran, 512 starts a few seconds of commands long admitted ~90 episodes a second
    and the 10,000 bench reached 0.43x its floor; not counted, 0.53x)."""
    settings.MEGAFLOW_MAX_STARTING = 2
    queued = [Episode.objects.create(run=run, task=run.tasks.get(), sample_index=index) for index in range(5)]
    client = liveness.client()
    client.delete(runs.RAMPING_KEY, runs.ADMIT_AGAIN)
    assert runs.admit() == [queued[0].pk, queued[1].pk] and client.exists(runs.RAMPING_KEY)
    starts = [message for name, message in sent if name == "envs.episode_start"]
    sent.clear()
    assert runs.admit() == [], "two are starting"

    asked_before_preparing, prepare = [], env_service.prepare_sandbox
    monkeypatch.setattr(env_service, "prepare_sandbox", lambda *args: (
        asked_before_preparing.append([name for name, _ in sent]), prepare(*args)))  # fmt: skip
    episode_loop.episode_start(starts[0]["episode_id"], "default", attempt=1)
    assert asked_before_preparing == [["orchestrator.admit"]], "its sandbox is up: the next pass is asked for first"
    assert sorted(name for name, _ in sent) == ["modelserving.episode_turn", "orchestrator.admit"]
    assert not hot_state.ask_for_admission(), "a pass is asked for: the next start to complete sends nothing more"
    sent.clear()
    assert runs.admit() == [queued[2].pk], "one sandbox came up: one more goes in"
    for episode in queued[1:3]:
        episode_loop.episode_start(episode.pk, "default", attempt=1)
    assert runs.admit() == [queued[3].pk, queued[4].pk] and not client.exists(runs.RAMPING_KEY), "none held back"
    sent.clear()
    episode_loop.episode_start(queued[3].pk, "default", attempt=1)
    assert [name for name, _ in sent] == ["modelserving.episode_turn"], "no ramp: no extra pass"


@pytest.mark.usefixtures("own_admission_keys")
def test_an_episode_preparing_its_sandbox_holds_no_start_slot(run, sent, settings):
    """The ramp bounds the episodes waiting for a sandbox; one whose sandbox is up and runs its prepare commands
    (still starting) lets the next one in."""
    settings.MEGAFLOW_MAX_STARTING = 1
    queued = [Episode.objects.create(run=run, task=run.tasks.get(), sample_index=index) for index in range(3)]
    liveness.client().delete(runs.RAMPING_KEY, runs.ADMIT_AGAIN)
    assert runs.admit() == [queued[0].pk] and runs.admit() == []
    assert transitions.claim_start(queued[0].pk, 1) and transitions.assign_sandbox(queued[0].pk, 1, "sandbox-0")
    assert runs.admit() == [queued[1].pk], "the first one's sandbox is up"
    assert Episode.objects.get(pk=queued[0].pk).status == E.STARTING


@pytest.mark.usefixtures("own_admission_keys")
def test_admission_paces_a_burst_at_the_admission_rate(run, sent, settings):
    """Episodes admitted together step together, every cycle (10,000 admitted at 700 a second on two cores: waves of
    665 steps a second and a p99 of 1.9 s). At MEGAFLOW_ADMIT_RATE a pass admits what the rate let in since the last
    (two passes' worth at most, so that a pause saves no burst) and, holding episodes back, passes again itself."""
    settings.MEGAFLOW_ADMIT_RATE, settings.MEGAFLOW_ADMIT_INTERVAL_S = 40, 0.25  # 20 a pass at most
    Run.objects.filter(pk=run.pk).update(max_concurrent_episodes=100)
    queued = [Episode.objects.create(run=run, task=run.tasks.get(), sample_index=index) for index in range(50)]
    client = liveness.client()
    assert [episode_id for episode_id, *_ in runs._admit_once()] == [episode.pk for episode in queued[:20]]
    assert client.exists(runs.ADMIT_AGAIN), "held back by the rate: the admitter passes again"

    began = time.monotonic()
    assert runs.admit() == [episode.pk for episode in queued[20:]], "the holder passes until the burst is in"
    assert time.monotonic() - began >= 0.6, "30 more at 40 a second take 0.75 s"
    assert not client.exists(runs.ADMIT_AGAIN), "nothing held back: no pass asked for"

    settings.MEGAFLOW_ADMIT_RATE = 0  # no limit: one pass admits everything
    more = [Episode.objects.create(run=run, task=run.tasks.get(), sample_index=index) for index in range(50, 100)]
    assert [episode_id for episode_id, *_ in runs._admit_once()] == [episode.pk for episode in more]


@pytest.mark.usefixtures("own_admission_keys")
def test_a_pass_with_nothing_queued_reads_no_live_counts(run, sent):
    """Every episode's end asks for a pass, and a pass counted the fleet's live episodes and each run's: an index
    entry read per live episode, twice, for nothing once every episode is in (at 10,000 live, most of PostgreSQL's
    rows read a step). With nothing queued a pass probes the queued episodes only, and clears the ramp flag."""
    started(run, sent)  # one live episode, for the counts to read
    liveness.client().set(runs.RAMPING_KEY, 1)
    with CaptureQueriesContext(connection) as nothing_queued:
        assert runs._admit_once() == []
    assert not any("COUNT(" in query["sql"] for query in nothing_queued), nothing_queued.captured_queries
    assert not liveness.client().exists(runs.RAMPING_KEY)

    waiting = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=1, status=E.QUEUED)
    with CaptureQueriesContext(connection) as one_queued:
        assert [episode_id for episode_id, *_ in runs._admit_once()] == [waiting.pk]
    assert any("COUNT(" in query["sql"] for query in one_queued), "with one queued, the room is counted"


@pytest.fixture
def own_admission_keys(monkeypatch) -> Iterator[None]:
    """Admission's lock, ask, ramp flag and rate bucket under names of this test's own: a worker of the session's (or
    a start it completes while admission ramps) that asks for a pass meanwhile would add one to the passes these
    tests count. And the session's own admitters held out for the test (they find the real lock taken): this file's
    episodes are committed and its run is running, so the beat's catch-up pass every 5 s, on a session worker,
    admits them too (CI: the pacing test's holder found 20 of the 30 it was pacing already admitted)."""
    session_admitters = liveness.client().lock(runs.ADMISSION_LOCK, timeout=60)
    assert session_admitters.acquire(blocking_timeout=30), "a session admitter held the lock for 30 s"
    suffix = f":{os.getpid()}:{time.monotonic_ns()}"
    for module, name in ((runs, "ADMISSION_LOCK"), (runs, "ADMIT_AGAIN"), (runs, "ADMIT_BUCKET"), (runs, "RAMPING_KEY"),
                         (hot_state, "ADMIT_AGAIN"), (episode_loop, "RAMPING_KEY")):  # fmt: skip
        monkeypatch.setattr(module, name, getattr(module, name) + suffix)
    try:
        yield
    finally:
        session_admitters.release()


@pytest.mark.usefixtures("own_admission_keys")
def test_an_admitter_killed_inside_the_lock_keeps_no_caller_waiting(run, sent, monkeypatch):
    """A caller that finds the admission lock taken returns at once and asks the holder for one more pass: under
    a dead holder's lock, worker threads do not queue (CI's kill -9 every 20 s: episode_done tasks waited 20 s on
    it, and the watchdog's turn on the agent queue waited behind them)."""
    waiting = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=1, status=E.QUEUED)
    client = liveness.client()
    client.set(runs.ADMISSION_LOCK, "a dead admitter's token", ex=30)
    began = time.monotonic()
    assert runs.admit() == [] and time.monotonic() - began < 5 and client.exists(runs.ADMIT_AGAIN)
    client.delete(runs.ADMISSION_LOCK)  # its timeout passed

    passes, real_pass = [], runs._admit_once

    def a_caller_arrives_during_the_pass():
        if not passes:
            passes.append(runs.admit())  # the lock is ours: this caller only asks for another pass
        passes.append("a pass")
        return real_pass()

    monkeypatch.setattr(runs, "_admit_once", a_caller_arrives_during_the_pass)
    assert runs.admit() == [waiting.pk]
    assert passes == [[], "a pass", "a pass"], "the holder passed once more for the caller that found the lock taken"
    assert not client.exists(runs.ADMIT_AGAIN) and not client.exists(runs.ADMISSION_LOCK)


@pytest.mark.usefixtures("own_admission_keys")
def test_admission_asked_again_and_again_passes_at_most_every_interval(run, sent, monkeypatch, settings):
    """Every completed start and every finished episode asks for a pass; at 10,000 episodes one pass each was most of
    PostgreSQL's work. The holder covers what is asked meanwhile with one pass per MEGAFLOW_ADMIT_INTERVAL_S."""
    settings.MEGAFLOW_ADMIT_INTERVAL_S = 0.3
    for sample in range(1, 4):
        Episode.objects.create(run=run, task=run.tasks.get(), sample_index=sample, status=E.QUEUED)
    passes, real_pass = [], runs._admit_once

    def five_callers_ask_during_the_first_two_passes():
        passes.append(time.monotonic())
        if len(passes) <= 2:
            assert [runs.admit() for _ in range(5)] == [[]] * 5, "each caller only asks, and returns at once"
        return real_pass()

    monkeypatch.setattr(runs, "_admit_once", five_callers_ask_during_the_first_two_passes)
    assert len(runs.admit()) == 3
    assert len(passes) == 3, "ten callers during two passes: one more pass each time, not one per caller"
    assert all(later - earlier >= 0.29 for earlier, later in zip(passes, passes[1:], strict=False))
    client = liveness.client()
    assert not client.exists(runs.ADMIT_AGAIN) and not client.exists(runs.ADMISSION_LOCK)


def test_an_orphaned_message_re_drives_its_episode(run, sent):
    """Published by a living worker and taken by one that died before its next beat: neither the death (it did not
    hold it at its last beat) nor the holder tells; ``liveness.orphaned`` does, from the broker."""
    beat_at = time.time()
    taken = started(run, sent)
    held_by(taken, ALIVE, updated_at=_at(beat_at - 5))
    idle = liveness.Fleet(alive={ALIVE: frozenset()})
    death, now = death_of(DEAD, held=[], beat_at=beat_at), after(2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S + 2)
    assert runs.redrive_lost(idle, [death], now=now) == []
    assert runs.redrive_lost(idle, [death], now=now, orphans={taken.pk}) == [taken.pk]
    assert sent[-1] == ("modelserving.episode_turn", {"episode_id": taken.pk, "step": 0, "model": "sim", "attempt": 1})


def test_a_run_whose_last_episode_done_was_lost_is_closed_by_the_watchdog(run, sent):
    """The last episode ends and publishes ``episode_done``, which dies with the worker that took it: nothing else
    would close the run, so the watchdog completes a running run none of whose episodes is unfinished."""
    first, last = started(run, sent, sample=0), started(run, sent, sample=1)
    transitions.fail(first.pk, "the agent gave up")
    assert runs.close_finished_runs() == [], "one episode is still live"
    assert runs.redrive_lost(liveness.Fleet(), [death_of(DEAD, held=[last.pk])], now=after(60)) == [last.pk]
    while sent:  # the episode runs to its end; its episode_done is taken by a worker that is then killed
        name, message = sent.pop(0)
        if name != "orchestrator.episode_done":
            pump([(name, message)])  # what it publishes lands in ``sent``
    assert Episode.objects.get(pk=last.pk).status == E.SUCCEEDED
    assert Run.objects.get(pk=run.pk).status == Run.Status.RUNNING, "nobody closed it"

    assert runs.close_finished_runs() == [run.pk]
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED and run.finished_at is not None
    assert runs.close_finished_runs() == [], "once"
    # A run that is still admitting is left alone: a queued episode is unfinished.
    Episode.objects.create(run=run, task=run.tasks.get(), sample_index=2, status=E.QUEUED)
    assert transitions.reopen_run(run.pk) and runs.close_finished_runs() == []


@pytest.mark.skipif(os.environ.get("MEGAFLOW_TEST_SLOT") is None, reason="needs the session's isolation slot")
def test_the_watchdog_reads_the_fleet_and_the_broker(run, sent):
    """``runs.watchdog`` end to end on the session's Redis: a live episode held by a registered worker that went
    silent is re-driven."""
    episode = started(run, sent)
    client = liveness.client()
    ghost = "model-sim@nowhere#ghost"
    client.hset(liveness.REGISTRY_KEY, ghost, '{"node": "model-sim@nowhere", "queues": ["model.sim"], "beat_at": 0}')
    held_by(episode, ghost, updated_at=timezone.now() - timedelta(seconds=settings.MEGAFLOW_WORKER_DEAD_S + 1))
    assert episode.pk in runs.watchdog()
    assert ghost not in client.hgetall(liveness.REGISTRY_KEY)
    assert [name for name, _ in sent] == ["modelserving.episode_turn"]


def test_a_framework_episode_whose_worker_died_is_retried_from_a_fresh_attempt(run, sent, monkeypatch):
    """A framework's loop dies with its worker (its state is in that process): the watchdog re-drives the loop,
    whose delivery finds the dead attempt's session and gives the episode a fresh attempt; the dead session's
    secret grants nothing any more."""
    monkeypatch.setattr(framework_loop, "send", lambda name, **kwargs: sent.append((name, kwargs)))
    Run.objects.filter(pk=run.pk).update(agent_name="mini-swe-agent")
    episode = Episode.objects.create(run=run, task=run.tasks.get(), sample_index=0, status=E.QUEUED)
    assert transitions.admit(episode.pk, 1)
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    assert [name for name, _ in sent] == ["agents.framework_episode"]  # the framework's loop, not a model turn
    sent.clear()
    secret = sessions.open_session(episode.pk, 1)  # the framework worker opened it, then was killed
    held_by(episode, DEAD)

    death = death_of(DEAD, held=[episode.pk])
    assert runs.redrive_lost(liveness.Fleet(), [death], now=after(2 * settings.MEGAFLOW_WORKER_HEARTBEAT_S + 1)) == [
        episode.pk
    ]
    [(name, message)] = sent
    assert (name, message) == ("agents.framework_episode", {"episode_id": episode.pk, "attempt": 1})
    sent.clear()
    framework_loop.framework_episode(**message)
    episode.refresh_from_db()
    assert (episode.status, episode.attempt, episode.session_key) == (E.QUEUED, 2, "")
    assert "the worker running its framework agent died" in episode.failure_reason
    assert sessions.find_session(secret) is None
