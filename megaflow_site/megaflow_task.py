"""How every MegaFlow Celery task is declared: ``@megaflow_task("<package>.<name>")``, and nothing else.

The one decorator (as Sentry wraps every task once) gives each task:

- its **name and queue**: the name's package prefix (``envs.``, ``modelserving.``, ``agents.``,
  ``orchestrator.``) picks the service, and the router (megaflow_site/topology.py) its queue, from the
  message's ``pool=`` / ``model=``; a name no service owns is refused when the module loads;
- **retries on database connection errors**, in place, the message still unacknowledged: a task that cannot
  reach the database (a pool exhausted by a burst, a server restarting) tries again instead of failing and
  leaving its episode to the watchdog. Tasks are idempotent, so running one again is always safe;
- **who holds what**: while a task that names an ``episode_id`` runs, its worker's heartbeat says it holds that
  episode (megaflow_site/liveness.py), so the watchdog leaves long work alone and re-drives what a dead worker
  held; one that ends in an error (its message acknowledged, the episode held by nobody) is recorded as a drop,
  which the watchdog re-drives at its next look;
- **what it published, in the broker before it is acknowledged**: the hot hops it sends travel in batches
  (megaflow_site/hop_batches.py), and the task waits for its own on the way out; a batch's hops each run as their
  own task would (``run_batch``);
- **telemetry**: queue wait (from the send time the publisher stamps on every message) and run time, in
  Prometheus histograms labelled by task and queue. The queue wait is also left on
  ``task.request.megaflow_queue_wait_s`` for task code (the probe relay reports it per hop).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import tenacity
from celery import shared_task, signals
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from prometheus_client import Histogram

from megaflow_site import liveness
from megaflow_site.hop_batches import flush_sent, observe_wait
from megaflow_site.topology import service_of_task

logger = logging.getLogger("megaflow.tasks")

SENT_AT_HEADER = "megaflow_sent_at"

# Milliseconds to minutes: a hop is ~1 ms when the fleet is idle, queue waits grow to minutes under load.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)

QUEUE_WAIT = Histogram(
    "megaflow_task_queue_wait_seconds", "Time from publish to start of a task.", ["task", "queue"], buckets=_BUCKETS
)
RUN_TIME = Histogram("megaflow_task_run_seconds", "Time a task body ran.", ["task", "queue", "state"], buckets=_BUCKETS)


DATABASE_ERRORS = (OperationalError, InterfaceError)


def _before_retry(error: BaseException, fn) -> None:
    logger.warning("database unavailable (%s); retrying %s", error, fn.__name__)
    connection.close_if_unusable_or_obsolete()


_retry_database_errors = tenacity.retry(
    retry=tenacity.retry_if_exception_type(DATABASE_ERRORS),
    wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=15),
    stop=tenacity.stop_after_delay(120),
    before_sleep=lambda state: _before_retry(state.outcome.exception(), state.fn),
    reraise=True,
)


def retry_on_database_errors(fn):
    """``fn``, retried in place on database connection errors (tenacity's policy above) once a first call failed.

    The first call runs outside tenacity: a tenacity-wrapped call makes a ``Retrying`` with a ``threading.local``
    of its own, in reference cycles only the garbage collector frees, and freeing a thread-local visits every
    thread of the process. With 2,000 threads alive that was 87 us a call and all that the hot workers' collector
    freed (megaflow_site/gc_tuning.py); nearly every call succeeds at once.
    """
    retried = _retry_database_errors(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DATABASE_ERRORS as error:
            _before_retry(error, fn)
        return retried(*args, **kwargs)

    return call


@signals.before_task_publish.connect
def _stamp_send_time(headers=None, **_) -> None:
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())


def queue_of(task) -> str:
    """The queue the task's message was taken off."""
    return (task.request.delivery_info or {}).get("routing_key") or "unknown"


def _record_queue_wait(task) -> None:
    request = task.request
    sent_at = request.get(SENT_AT_HEADER) or (request.headers or {}).get(SENT_AT_HEADER)
    request.megaflow_queue_wait_s = max(0.0, time.time() - float(sent_at)) if sent_at else None
    if request.megaflow_queue_wait_s is not None:
        QUEUE_WAIT.labels(task.name, queue_of(task)).observe(request.megaflow_queue_wait_s)


# Task name → its body (database retries included): a hop that travels in a batch (megaflow_site/hop_batches.py)
# runs it as its own task would.
_BODIES: dict = {}


def _run_body(name: str, queue: str, call, kwargs: dict):
    """Run a task's body: its episode held while it runs, an error recorded as the episode's drop, its run time."""
    started, state = time.perf_counter(), "FAILURE"
    episode_id = kwargs.get("episode_id")
    try:
        with liveness.holding(episode_id):
            result = call()
        state = "SUCCESS"
        return result
    except Exception as error:
        if episode_id is not None:  # the watchdog re-drives the episode, or gives its attempt up
            liveness.drop(episode_id, kwargs.get("attempt"), name, error)
        raise
    finally:
        run_s = time.perf_counter() - started
        RUN_TIME.labels(name, queue, state).observe(run_s)
        logger.debug("task %s on %s ran %.4f s, %s", name, queue, run_s, state)


def run_hop(name: str, queue: str, kwargs: dict, queued_at: float | None = None):
    """Run the task ``name``'s body on ``kwargs`` here, as its own message would have (a hop of a batch, taken off
    ``queue``; ``queued_at``: when its publisher handed it over, for the queue wait)."""
    if queued_at is not None:
        waited = max(0.0, time.time() - queued_at)
        QUEUE_WAIT.labels(name, queue).observe(waited)
        observe_wait(waited)  # the window of the hops this process sends follows it
    return _run_body(name, queue, lambda: _BODIES[name](**kwargs), kwargs)


def megaflow_task(name: str, *, bind: bool = False, **options):
    """Declare ``fn`` as the Celery task ``name`` (see the module docstring). ``bind``: ``fn`` gets the Celery
    task as its first argument. Other ``options`` go to Celery's ``shared_task``."""
    if service_of_task(name) is None:
        raise ValueError(f"task {name!r}: its name must start with the package of a service (envs., ...)")

    def decorate(fn):
        body = retry_on_database_errors(fn)
        if not bind:
            _BODIES[name] = body

        def run(self, *args, **kwargs):
            _record_queue_wait(self)
            call = (lambda: body(self, *args, **kwargs)) if bind else (lambda: body(*args, **kwargs))
            # What the task published is in the broker before its own message is acknowledged (hop_batches).
            with flush_sent():
                return _run_body(self.name, queue_of(self), call, kwargs)

        run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        return shared_task(name=name, bind=True, typing=False, **options)(run)

    return decorate


# --- a batch of hops (megaflow_site/hop_batches.py) --------------------------------------------------------------

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _hops_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(settings.MEGAFLOW_HOP_THREADS, thread_name_prefix="megaflow-hop")
        return _executor


def run_batch(hops: list, queue: str) -> int:
    """Run a batch's hops ([name, kwargs, queued_at] each, taken off ``queue``) side by side, the first on the
    calling thread, and return once all have ended: how many ended in an error (each recorded as its episode's
    drop, as its own task's would be; the others go on)."""
    first, *rest = hops
    futures = [_hops_executor().submit(_run_batched, hop, queue) for hop in rest]
    failed = _run_batched(first, queue)
    wait(futures)
    return failed + sum(future.result() for future in futures)


def _run_batched(hop: list, queue: str) -> int:
    name, kwargs, queued_at = hop
    try:
        with flush_sent():
            run_hop(name, queue, kwargs, queued_at)
        return 0
    except Exception:
        logger.exception("hop %s of episode %s failed", name, kwargs.get("episode_id"))
        return 1
    finally:
        # As Celery does after each task: the pooled connection goes back, and the thread that ran the first hop
        # waits for the others without one (else a few batches waiting on their hops hold the whole pool).
        if not connection.in_atomic_block:
            connection.close()
