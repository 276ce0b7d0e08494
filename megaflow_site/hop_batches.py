"""Several hops of the episode loop per Celery message.

A Celery message costs milliseconds of CPU whatever it carries (publish, the broker's list and unacked-hash copies,
consume, Celery's request and tracer, ack: agents/README.md, "Where a step's time goes"), and a step is two of
them. So the hot hops (``BATCHED``: a start, a model turn, an env step, an episode's end) travel together: a
process hands each one to its ``Batcher``, which holds it for at most a window and then sends everything bound for
one queue as one message, ``envs.hop_batch``, ``modelserving.hop_batch`` or ``orchestrator.hop_batch``
(orchestrator/tasks.py). The receiving worker runs the batch's hops side by side, each as the task it stands for
would run (``megaflow_task.run_batch``: each holds its episode, records its own error as a drop, retries the
database), and the message is acknowledged when every hop has ended.

**The window widens with load.** It is ``MEGAFLOW_HOP_BATCH_WINDOW_MS`` while hops go straight through, and a
quarter of the wait they see lately, up to ``MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS``, once they wait: a hop that waited
a second for a busy fleet loses little to 50 ms more, and each hop that shares a message saves the fleet that
message's publish, its copies in the broker and its consume (agents/README.md: on a saturated box, a 50 ms window
cut a seventh of the workers' CPU per step). Two waits, the longer counts: the queue wait of the hops this process
takes (from their publisher's hand-over to their start), and how late its own window closes (its lag: a gevent
worker takes every message at once, so its hops wait for the CPU inside the process, not in the broker's queue).
``celery -A megaflow_site inspect hop_batching`` shows a worker's window and the waits behind it.

Nothing is weaker than one message per hop:

- **Publishing is durable before the publisher's own message is acknowledged.** A hop's ``send`` only queues it;
  the task that sent it waits, before it returns (and Celery acknowledges it), until the batch holding it is in the
  broker (``flush_sent``). A publisher killed inside the window loses its own unacknowledged message with it, which
  the broker redelivers, as for a publisher killed before it published.
- **A redelivered batch runs every hop again**, which each hop's claims make harmless (orchestrator/episode_loop.py:
  the Step row is the claim; a start is claimed; a turn whose step is claimed is dropped).
- **Liveness sees each episode**: a batch names all its hops' episodes, and a worker that took one holds each of
  them (megaflow_site/liveness.py reads ``episodes_named``); a batch orphaned by a dead worker re-drives them all.

``MEGAFLOW_HOP_BATCH_WINDOW_MS=0`` sends every hop as its own message, as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict

from celery import current_app
from celery.worker.control import inspect_command
from django.conf import settings
from django.db import connection

from megaflow_site.topology import HOST_KWARG, ROUTING_KWARG, Service, service_of_task

logger = logging.getLogger("megaflow.hop_batches")

# The hops that travel in batches: the ones every step and every episode pays for (a start, a turn, a step, the
# run accounting of an episode that ended). Everything else (the control plane, a sandbox's release, a framework's
# session) is rare and goes alone.
BATCHED = frozenset(
    {"envs.episode_start", "envs.episode_step", "modelserving.episode_turn", "orchestrator.episode_done"}
)
BATCH_TASK = {
    Service.ENV: "envs.hop_batch",
    Service.MODEL: "modelserving.hop_batch",
    Service.AGENT: "orchestrator.hop_batch",
}

# The window, between its floor and its ceiling: this share of the queue wait lately seen, an average that each hop's
# wait moves this share of the way (about the last hundred hops).
WAIT_SHARE = 0.25
WAIT_SMOOTHING = 0.01


class Ticket:
    """One flush: set once the batches it covers are in the broker, with the error that kept one out, if any."""

    def __init__(self):
        self.sent = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.sent.wait()
        if self.error is not None:
            raise self.error


class Batcher:
    """Collects hops per destination queue and sends each destination's as one message per window (at most
    ``max_hops`` a message), from a thread of its own. The window is ``floor_s`` until hops wait, then widens with
    their wait up to ``ceiling_s`` (``observe_wait``)."""

    def __init__(self, floor_s: float, max_hops: int, ceiling_s: float | None = None):
        self.floor_s, self.max_hops = floor_s, max_hops
        self.ceiling_s = floor_s if ceiling_s is None else max(floor_s, ceiling_s)
        self.wait_s = 0.0  # the queue wait of the hops this process took lately (a moving average)
        self.lag_s = 0.0  # how late this process's own window closed lately: its wait for CPU (a moving average)
        self.cond = threading.Condition()
        self.pending: dict[tuple, list] = defaultdict(list)  # (service, routing kwargs) → [[name, kwargs, queued_at]]
        self.count = 0
        self.ticket = Ticket()
        self.first_at = 0.0
        self.idle = False  # the thread waits for a first hop
        self.first_found_idle = False  # this window's first hop woke the thread: how late it closes is its CPU wait
        self.thread: threading.Thread | None = None

    def add(self, name: str, kwargs: dict) -> Ticket:
        """Queue one hop; the returned ticket is set once it is in the broker."""
        service = service_of_task(name)
        keys = (ROUTING_KWARG.get(service), HOST_KWARG if service is Service.ENV else None)
        # What routes a hop routes its batch (megaflow_site/topology.py): the same service, model or pool, and host.
        routing = tuple(sorted((key, kwargs[key]) for key in keys if key and kwargs.get(key) is not None))
        with self.cond:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="megaflow-hop-batcher", daemon=True)
                self.thread.start()
            if not self.count:
                self.first_at, self.first_found_idle = time.monotonic(), self.idle
            self.pending[(service, routing)].append([name, kwargs, time.time()])
            self.count += 1
            self.cond.notify()
            return self.ticket

    def observe_wait(self, seconds: float) -> None:
        """A hop this process took waited ``seconds`` since its publisher handed it over. (Unlocked: a lost update
        of the average, between two threads, is one hop's weight of it.)"""
        self.wait_s += WAIT_SMOOTHING * (seconds - self.wait_s)

    def observe_lag(self, seconds: float) -> None:
        """This process's window closed ``seconds`` after it was due: its threads (or greenlets) wait that long for
        the CPU, a wait the broker's queue does not show where a worker takes every message at once (gevent)."""
        self.lag_s += WAIT_SMOOTHING * (seconds - self.lag_s)

    @property
    def window_s(self) -> float:
        return min(self.ceiling_s, max(self.floor_s, WAIT_SHARE * max(self.wait_s, self.lag_s)))

    def _run(self) -> None:
        while True:
            with self.cond:
                self.idle = True
                while not self.count:
                    self.cond.wait()
                self.idle = False
                # The window opens with the first hop; a full message goes at once.
                due = self.first_at + self.window_s
                while self.count < self.max_hops and (left := due - time.monotonic()) > 0:
                    self.cond.wait(left)
                # Closed by its timer, and the thread was free to close it on time (not still publishing the last
                # window's): how late it ran is its wait for the CPU, the first wake-up after the hop included.
                if self.first_found_idle and self.count < self.max_hops:
                    self.observe_lag(max(0.0, time.monotonic() - due))
                pending, self.pending, self.count = self.pending, defaultdict(list), 0
                ticket, self.ticket = self.ticket, Ticket()
            try:
                for (service, routing), hops in pending.items():
                    for start in range(0, len(hops), self.max_hops):
                        publish(service, dict(routing), hops[start : start + self.max_hops])
            except BaseException as error:  # noqa: BLE001 -- each waiting task raises it as its own
                ticket.error = error
                logger.warning("a batch of hops could not be published: %s", error)
            ticket.sent.set()


def publish(service: Service, routing: dict, hops: list) -> None:
    """One message carrying ``hops`` ([name, kwargs, queued_at] each) to the queue ``routing`` names."""
    kwargs = {"hops": hops, **routing}
    current_app.send_task(BATCH_TASK[service], kwargs=kwargs, argsrepr="()", kwargsrepr=batch_repr(hops, routing),
                          ignore_result=True)  # fmt: skip


def batch_repr(hops: list, routing: dict) -> str:
    """What Flower and the logs show of a batch: its routing and each hop's task and episode."""
    shown = ", ".join(f"{name.split('.', 1)[1]}({kwargs.get('episode_id')})" for name, kwargs, _ in hops)
    return repr({**routing, "hops": f"[{shown}]"})


_batcher: Batcher | None = None
_batcher_lock = threading.Lock()
_mine = threading.local()  # the tickets of the hops this thread's task sent, waited for before the task ends


def batcher() -> Batcher:
    global _batcher
    if _batcher is not None:  # every hop asks (observe_wait): no lock once there is one
        return _batcher
    with _batcher_lock:
        if _batcher is None:
            _batcher = Batcher(settings.MEGAFLOW_HOP_BATCH_WINDOW_MS / 1000, settings.MEGAFLOW_HOP_BATCH_MAX,
                               settings.MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS / 1000)  # fmt: skip
        return _batcher


def _forget_batcher_in_child() -> None:  # a forked child has the lock and the queue, not the thread
    global _batcher, _batcher_lock
    _batcher, _batcher_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_batcher_in_child)


def observe_wait(seconds: float) -> None:
    """A batched hop this process took waited ``seconds`` in the queue: the window of the hops it sends follows."""
    if settings.MEGAFLOW_HOP_BATCH_WINDOW_MS > 0:
        batcher().observe_wait(seconds)


@inspect_command()
def hop_batching(state_, **_) -> dict:
    """This worker's hop window now, its floor and ceiling, and the queue wait and CPU lag it follows, in ms."""
    if settings.MEGAFLOW_HOP_BATCH_WINDOW_MS <= 0:
        return {"window_ms": 0.0}
    current = batcher()
    return {
        f"{name}_ms": round(1000 * getattr(current, f"{name}_s"), 3)
        for name in ("window", "floor", "ceiling", "wait", "lag")
    }


def send(name: str, kwargs: dict) -> bool:
    """Hand a hop to this process's batcher, if it travels in batches; False when it must go alone. Inside a
    task, the task waits for it before it ends (``flush_sent``); anywhere else, this waits now."""
    if name not in BATCHED or settings.MEGAFLOW_HOP_BATCH_WINDOW_MS <= 0:
        return False
    ticket = batcher().add(name, kwargs)
    tickets = getattr(_mine, "tickets", None)
    if tickets is None:
        ticket.wait()
    elif not tickets or tickets[-1] is not ticket:
        tickets.append(ticket)
    return True


class flush_sent:
    """Around a task: on the way out, wait until every hop it sent is in the broker, so that its own message is
    acknowledged only after what it published (an error publishing fails the task, as a failed publish did)."""

    def __enter__(self):
        self.outer = getattr(_mine, "tickets", None)
        _mine.tickets = []
        return self

    def __exit__(self, kind, error, traceback):
        tickets, _mine.tickets = _mine.tickets, self.outer
        if tickets and not connection.in_atomic_block:
            connection.close()  # a pooled connection goes back while this waits (orchestrator/db.py)
        for ticket in tickets:
            ticket.wait()
        return False
