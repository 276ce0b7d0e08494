"""Several hops per Celery message (megaflow_site/hop_batches.py): what travels together, what a batch runs, and what
liveness sees of one. Real Redis (the session's broker database) and the real episode loop on the test database."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from types import SimpleNamespace

import kombu
import pytest
import redis
from celery import signals
from django.conf import settings

from envs.backend import get_backend
from megaflow_site import hop_batches, liveness
from megaflow_site.celery import app
from megaflow_site.topology import route_task
from orchestrator import episode_loop, tasks, transitions
from orchestrator.models import Dataset, Episode, Run, Step, Task
from tests.support.sim_loop import captured_loop

E = Episode.Status
NOBODY = 10**12  # episode ids no test database reaches
REPLY = "Looking.\n```bash\necho hello\n```"


@pytest.fixture
def published():
    """Every Celery message this process publishes from now on, as (queue, task name, kwargs), seen as it leaves
    for the broker (the session's workers may take it at once: a hop of an episode that does not exist does nothing)."""
    seen: list[tuple[str, str, dict]] = []

    def record(sender=None, body=None, routing_key=None, **_):
        seen.append((routing_key, sender, body[1]))

    signals.before_task_publish.connect(record, weak=False)
    yield seen
    signals.before_task_publish.disconnect(record)


def of_queue(published, queue: str) -> list[tuple[str, dict]]:
    return [(name, kwargs) for routing_key, name, kwargs in published if routing_key == queue]


@pytest.fixture
def fresh_batcher(settings, monkeypatch):
    """A batcher of this test's own, with a window long enough that hops sent from several threads meet in it."""
    settings.MEGAFLOW_HOP_BATCH_WINDOW_MS = 1000
    settings.MEGAFLOW_HOP_BATCH_MAX = 64
    settings.MEGAFLOW_ENV_HOSTS = ["h1"]
    monkeypatch.setattr(hop_batches, "_batcher", None)
    yield
    hop_batches._batcher = None


def test_hops_sent_together_travel_as_one_message_per_queue(published, fresh_batcher):
    # Episodes that do not exist: the session's workers may take these messages, and then do nothing.
    step = {"reply": "r", "pool": "default", "attempt": 1}
    sends = [("envs.episode_step", {"episode_id": NOBODY + 10 + n, "step": n, **step}) for n in range(5)]
    sends += [("modelserving.episode_turn", {"episode_id": NOBODY + 30 + n, "step": 1, "model": "sim", "attempt": 1})
              for n in range(3)]  # fmt: skip
    sends += [("orchestrator.episode_done", {"episode_id": NOBODY + 50 + n}) for n in range(2)]  # every episode's end
    sends += [("orchestrator.admit", {})]  # not a hot hop: it goes alone, at once

    together = threading.Barrier(len(sends))

    def task(name, kwargs):  # as a task does: send, then wait on the way out until it is in the broker
        together.wait(timeout=30)  # all inside one window, however loaded the machine
        with hop_batches.flush_sent():
            episode_loop.send(name, **kwargs)

    began = time.monotonic()
    threads = [threading.Thread(target=task, args=send) for send in sends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0.9 < time.monotonic() - began < 30, "each task returned once its window's batch was published"

    [(name, batch)] = of_queue(published, "env.default")
    assert name == "envs.hop_batch" and batch["pool"] == "default"
    assert sorted((hop[0], hop[1]["episode_id"]) for hop in batch["hops"]) == [
        ("envs.episode_step", NOBODY + 10 + n) for n in range(5)
    ]
    assert all(hop[2] <= time.time() for hop in batch["hops"]), "each hop carries when it was handed over"
    # A hop bound to an env host goes with that host's (the batch names the host, and the router sends it there).
    assert route_task("envs.hop_batch", (), {"pool": "default", "host": "h1", "hops": []}, {}) == {
        "queue": "env.default.h1"
    }
    [(name, batch)] = of_queue(published, "model.sim")
    assert (name, batch["model"]) == ("modelserving.hop_batch", "sim")
    assert sorted(hop[1]["episode_id"] for hop in batch["hops"]) == [NOBODY + 30, NOBODY + 31, NOBODY + 32]
    [(name, batch)] = [(name, kwargs) for name, kwargs in of_queue(published, "agent") if name != "orchestrator.admit"]
    assert name == "orchestrator.hop_batch" and sorted((hop[0], hop[1]["episode_id"]) for hop in batch["hops"]) == [
        ("orchestrator.episode_done", NOBODY + 50 + n) for n in range(2)
    ]
    assert [name for name, _ in of_queue(published, "agent")].count("orchestrator.admit") == 1


def test_a_batch_is_cut_at_its_most_hops_and_the_window_off_sends_each_alone(published, fresh_batcher, settings):
    settings.MEGAFLOW_HOP_BATCH_MAX = 4
    with hop_batches.flush_sent():
        for n in range(10):
            episode_loop.send("modelserving.episode_turn", episode_id=NOBODY + n, step=0, model="sim", attempt=1)
    batches = [batch["hops"] for _, batch in of_queue(published, "model.sim")]
    # [4, 4, 2] when the batcher keeps up; hops added while it publishes a batch wait for the next one, which is
    # then cut in fours too ([4, 4, 1, 1] on a loaded box): never more than four, nothing lost, in order.
    assert max(map(len, batches)) == 4 and len(batches) >= 3, [len(hops) for hops in batches]
    assert [kwargs["episode_id"] for hops in batches for _, kwargs, _ in hops] == [NOBODY + n for n in range(10)]
    published.clear()

    settings.MEGAFLOW_HOP_BATCH_WINDOW_MS = 0
    episode_loop.send("modelserving.episode_turn", episode_id=NOBODY, step=0, model="sim", attempt=1)
    assert of_queue(published, "model.sim") == [
        ("modelserving.episode_turn", {"episode_id": NOBODY, "step": 0, "model": "sim", "attempt": 1})
    ]


def test_the_window_is_its_floor_while_hops_go_straight_through_and_widens_with_their_queue_wait():
    batcher = hop_batches.Batcher(0.010, 64, 0.050)
    assert batcher.window_s == 0.010

    def waits(seconds: float, hops: int = 1000) -> float:
        for _ in range(hops):
            batcher.observe_wait(seconds)
        return batcher.window_s

    assert waits(0.012) == 0.010, "hops that wait no more than the window itself leave it at its floor"
    assert waits(0.1) == pytest.approx(0.025, rel=0.01), "a busy fleet: a quarter of the wait"
    assert waits(5.0) == 0.050, "never past the ceiling"
    assert waits(0.0, hops=2000) == 0.010, "back to the floor once hops stop waiting"
    assert hop_batches.Batcher(0.010, 64).window_s == hop_batches.Batcher(0.010, 64, 0.001).window_s == 0.010


def test_a_window_that_closes_late_widens_as_a_queue_wait_would(monkeypatch):
    """On gevent a worker takes every message at once: its hops wait for the CPU inside the process, where the queue
    wait does not see it. The batcher's own window then closes late, and that lag widens the window as a queue wait
    does. Here a thread that never sleeps holds the GIL for a 50 ms switch interval, as a worker's busy hops do."""
    batcher = hop_batches.Batcher(0.001, 64, 0.050)
    for _ in range(1000):
        batcher.observe_lag(0.1)
    assert batcher.window_s == pytest.approx(0.025, rel=0.01), "a quarter of the lag, as of a queue wait"
    batcher.observe_wait(0.16)
    assert batcher.window_s == pytest.approx(0.025, rel=0.01), "the longer of the two waits counts"

    batcher, lags, published = hop_batches.Batcher(0.001, 64, 0.001), [], []
    monkeypatch.setattr(batcher, "observe_lag", lags.append)
    monkeypatch.setattr(hop_batches, "publish", lambda service, routing, hops: published.append(len(hops)))
    busy, interval = threading.Event(), sys.getswitchinterval()

    def hold_the_gil():
        while not busy.is_set():
            pass

    sys.setswitchinterval(0.05)
    spinner = threading.Thread(target=hold_the_gil)
    spinner.start()
    try:
        for n in range(5):
            batcher.add("modelserving.episode_turn", {"episode_id": NOBODY + n, "model": "sim"}).wait()
            wait_until_idle(batcher)
    finally:
        busy.set()
        spinner.join()
        sys.setswitchinterval(interval)
    assert published == [1] * 5 and max(lags) >= 0.02, lags


def wait_until_idle(batcher, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not batcher.idle:
        assert time.monotonic() < deadline, "the batcher thread never went back to waiting for hops"
        time.sleep(0.001)


def test_a_batcher_that_wakes_late_counts_its_wake_up_as_lag(monkeypatch):
    """The lag a loaded process shows most is the batcher's wake-up itself: notified by the first hop, it runs only
    once the CPU (here the lock the hop's thread keeps for 30 ms) lets it, past its 1 ms window. That wait counts; a
    window whose first hop came while the thread was still publishing the last one does not (its lateness is the
    publish, not the CPU)."""
    batcher, lags = hop_batches.Batcher(0.001, 64, 0.050), []
    monkeypatch.setattr(batcher, "observe_lag", lags.append)
    publishing, go_on = threading.Event(), threading.Event()

    def publish(service, routing, hops):
        publishing.set()
        assert go_on.wait(5.0)

    monkeypatch.setattr(hop_batches, "publish", publish)
    hop = {"episode_id": NOBODY, "model": "sim"}
    go_on.set()
    batcher.add("modelserving.episode_turn", hop).wait()  # starts the thread
    wait_until_idle(batcher)
    lags.clear()

    with batcher.cond:  # the thread is notified at once, and runs 30 ms later
        ticket = batcher.add("modelserving.episode_turn", hop)
        time.sleep(0.030)
    ticket.wait()
    assert len(lags) == 1 and lags[0] >= 0.025, lags

    wait_until_idle(batcher)
    go_on.clear()
    publishing.clear()
    lags.clear()
    first = batcher.add("modelserving.episode_turn", hop)
    assert publishing.wait(5.0)
    second = batcher.add("modelserving.episode_turn", hop)  # arrives while the first window is being published
    time.sleep(0.030)
    go_on.set()
    first.wait()
    second.wait()
    assert len(lags) == 1, f"the first window's lag only, not the one that waited 30 ms on a publish: {lags}"


@pytest.mark.django_db(transaction=True)
def test_hops_that_waited_widen_the_window_of_the_hops_this_process_sends(published, fresh_batcher, settings, broker):
    settings.MEGAFLOW_HOP_BATCH_WINDOW_MS, settings.MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS = 10, 2000

    def send_spread_out(first: int) -> list[int]:
        """Three turns handed over 0.3 s apart, each by a task of its own; the sizes of the messages they left in."""
        published.clear()

        def task(n):
            time.sleep(0.3 * n)
            with hop_batches.flush_sent():
                episode_loop.send("modelserving.episode_turn", episode_id=first + n, step=0, model="sim", attempt=1)

        threads = [threading.Thread(target=task, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [len(batch["hops"]) for _, batch in of_queue(published, "model.sim")]

    assert send_spread_out(NOBODY) == [1, 1, 1], "a 10 ms window: each went alone"
    # This process takes a batch of hops that waited a minute in the queue (of episodes that do not exist: each
    # hop does nothing): the fleet is behind, and the window goes to its ceiling.
    waited = [["modelserving.episode_turn", {"episode_id": NOBODY + n, "step": 0, "model": "sim"}, time.time() - 60]
              for n in range(200)]  # fmt: skip
    assert tasks.model_hop_batch.apply(kwargs={"hops": waited, "model": "sim"}).get() == 0
    assert hop_batches.batcher().window_s == 2.0
    assert send_spread_out(NOBODY + 10) == [3], "a two-second window: the three shared one message"


@pytest.mark.integration
def test_every_worker_tells_its_window_and_the_wait_it_follows(celery_workers, settings):
    replies = celery_workers.ask("hop_batching")  # what `celery -A megaflow_site inspect hop_batching` asks
    assert set(celery_workers.nodes) <= set(replies)
    for node, state in replies.items():
        assert state["floor_ms"] == settings.MEGAFLOW_HOP_BATCH_WINDOW_MS, node
        assert state["ceiling_ms"] == settings.MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS, node
        assert state["floor_ms"] <= state["window_ms"] <= state["ceiling_ms"], node
        assert state["wait_ms"] >= 0 and state["lag_ms"] >= 0, node


def test_a_publish_that_fails_fails_the_task_that_sent_it(fresh_batcher, monkeypatch):
    def refused(*args, **kwargs):
        raise ConnectionError("the broker is away")

    monkeypatch.setattr(hop_batches, "publish", refused)
    with pytest.raises(ConnectionError, match="the broker is away"):
        with hop_batches.flush_sent():
            episode_loop.send("modelserving.episode_turn", episode_id=NOBODY, step=0, model="sim", attempt=1)


# --- a batch at its receiver ------------------------------------------------------------------------------------


@pytest.fixture
def sent(monkeypatch, settings):
    yield captured_loop(monkeypatch, settings, exec_latency_s=0.3)
    get_backend.cache_clear()


def running_episodes(sent, count: int) -> list[Episode]:
    dataset = Dataset.objects.create(name="batches")
    task = Task.objects.create(dataset=dataset, instance_id="t-1", problem_statement="Fix it.", test_command="true",
                               fail_to_pass=["test_it"], spec_sha256="0" * 64)  # fmt: skip
    run = Run.objects.create(dataset=dataset, model_name="sim", env_pool="default", status=Run.Status.RUNNING,
                             max_steps=5, max_attempts=2, samples_per_task=count)  # fmt: skip
    run.tasks.add(task)
    episodes = []
    for sample in range(count):
        episode = Episode.objects.create(run=run, task=task, sample_index=sample, status=E.QUEUED)
        assert transitions.admit(episode.pk, 1)
        episode_loop.episode_start(episode.pk, "default", attempt=1)
        episodes.append(Episode.objects.get(pk=episode.pk))
    sent.clear()
    return episodes


def step_hop(episode: Episode) -> list:
    kwargs = {"episode_id": episode.pk, "step": 0, "reply": REPLY, "pool": "default", "attempt": 1}
    return ["envs.episode_step", kwargs, time.time()]


@pytest.mark.django_db(transaction=True)
def test_a_batch_runs_its_hops_side_by_side_once_each_and_a_redelivery_changes_nothing(sent):
    episodes = running_episodes(sent, 4)
    batch = {"hops": [step_hop(episode) for episode in episodes], "pool": "default"}
    began = time.monotonic()
    assert tasks.env_hop_batch.apply(kwargs=batch).get() == 0
    assert time.monotonic() - began < 4 * 0.3, "the four 0.3 s commands ran side by side"
    for episode in episodes:
        [step] = Step.objects.filter(episode=episode)
        assert (step.index, step.action, step.completed_at is not None) == (0, "echo hello", True)
    assert sorted((name, kwargs["episode_id"], kwargs["step"]) for name, kwargs in sent) == [
        ("modelserving.episode_turn", episode.pk, 1) for episode in episodes
    ]
    sent.clear()

    # The broker gives the whole batch back (its worker died before the ack): every hop finds its claim.
    assert tasks.env_hop_batch.apply(kwargs=batch).get() == 0
    assert Step.objects.filter(episode__in=episodes).count() == 4
    assert sorted(kwargs["episode_id"] for _, kwargs in sent) == sorted(e.pk for e in episodes), (
        "a redelivery before the next turn re-publishes it, and runs no command again"
    )


@pytest.mark.django_db(transaction=True)
def test_a_hop_that_fails_in_a_batch_is_its_episodes_drop_alone(sent, monkeypatch, broker):
    episodes = running_episodes(sent, 2)
    broken, fine = episodes
    real_step = episode_loop.episode_step

    def step(episode_id, *args, **kwargs):
        if episode_id == broken.pk:
            raise RuntimeError("a bug in one hop")
        return real_step(episode_id, *args, **kwargs)

    monkeypatch.setattr(episode_loop, "episode_step", step)
    liveness.forget_drops([broken.pk, fine.pk])
    batch = {"hops": [step_hop(broken), step_hop(fine)], "pool": "default"}
    assert tasks.env_hop_batch.apply(kwargs=batch).get() == 1
    assert Step.objects.filter(episode=fine).count() == 1 and not Step.objects.filter(episode=broken).exists()
    drops = liveness.drops()
    assert broken.pk in drops and fine.pk not in drops
    assert "a bug in one hop" in drops[broken.pk].error
    liveness.forget_drops([broken.pk])


# --- what liveness sees of a batch ------------------------------------------------------------------------------


def test_a_batch_taken_off_its_queue_holds_every_episode_it_names():
    taken = SimpleNamespace(id="batch-1", kwargs={"hops": [step_hop(SimpleNamespace(pk=pk)) for pk in (5, 6)]})
    signals.task_received.send(sender=None, request=taken)
    assert liveness.held() == [5, 6]
    signals.task_postrun.send(sender=None, task_id="batch-1")
    assert liveness.held() == []


def test_a_batch_taken_by_a_worker_that_then_died_orphans_each_of_its_episodes():
    """As tests/test_liveness.py's single hop, for a batch: a real publish, a real take that is never acknowledged."""
    base, _, number = settings.REDIS_URL.rpartition("/")
    url = f"{base}/{int(number) - 1}"  # the liveness tests' database: empty before and after
    broker = redis.Redis.from_url(url, decode_responses=True)
    broker.flushdb()
    taker = kombu.Connection(url)
    queue = taker.SimpleQueue("env.orphaned-batches")
    hops = [step_hop(SimpleNamespace(pk=pk)) for pk in (77, 78)]
    with app.connection_for_write(url) as publisher:
        app.send_task("envs.hop_batch", kwargs={"hops": hops, "pool": "default"}, queue=queue.queue,
                      connection=publisher)  # fmt: skip
    tag = queue.get(timeout=5).delivery_tag
    liveness.beat(["env.orphaned-batches"], broker)
    fleet = liveness.read_fleet(broker)
    later = {**fleet.registered[liveness.incarnation()], "beat_at": time.time() + 2 * liveness.heartbeat_s()}
    fleet = dataclasses.replace(fleet, registered={liveness.incarnation(): later})
    assert liveness.orphaned(fleet, broker) == {77: [tag], 78: [tag]}
    liveness.forget([tag], broker)
    taker.release()
    broker.flushdb()
