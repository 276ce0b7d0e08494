"""Queue wait and run time of every Celery task, recorded once through Celery signals (as Sentry does).

The publisher stamps each message with its wall-clock send time; the worker turns that into the queue wait
when the task starts, and into the run time when it ends. Both land in Prometheus histograms labelled by
task and queue, and the queue wait is also left on ``task.request.megaflow_queue_wait_s`` for task code
(the probe relay reports it per hop).
"""

import logging
import time

from celery import signals
from prometheus_client import Histogram

logger = logging.getLogger("megaflow.tasks")

SENT_AT_HEADER = "megaflow_sent_at"

# Milliseconds to minutes: a hop is ~1 ms when the fleet is idle, queue waits grow to minutes under load.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)

QUEUE_WAIT = Histogram(
    "megaflow_task_queue_wait_seconds", "Time from publish to start of a task.", ["task", "queue"], buckets=_BUCKETS
)
RUN_TIME = Histogram("megaflow_task_run_seconds", "Time a task body ran.", ["task", "queue", "state"], buckets=_BUCKETS)


@signals.before_task_publish.connect
def _stamp_send_time(headers=None, **_) -> None:
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())


def _queue_of(task) -> str:
    return (task.request.delivery_info or {}).get("routing_key") or "unknown"


@signals.task_prerun.connect
def _task_started(task=None, **_) -> None:
    request = task.request
    request.megaflow_started_at = time.perf_counter()
    sent_at = request.get(SENT_AT_HEADER) or (request.headers or {}).get(SENT_AT_HEADER)
    request.megaflow_queue_wait_s = max(0.0, time.time() - float(sent_at)) if sent_at else None
    if request.megaflow_queue_wait_s is not None:
        QUEUE_WAIT.labels(task.name, _queue_of(task)).observe(request.megaflow_queue_wait_s)


@signals.task_postrun.connect
def _task_finished(task=None, state=None, **_) -> None:
    started = getattr(task.request, "megaflow_started_at", None)
    if started is None:
        return
    run_s = time.perf_counter() - started
    RUN_TIME.labels(task.name, _queue_of(task), state or "UNKNOWN").observe(run_s)
    logger.debug(
        "task %s[%s] on %s: waited %s s, ran %.4f s, %s",
        task.name, task.request.id, _queue_of(task), task.request.megaflow_queue_wait_s, run_s, state,
    )  # fmt: skip
