"""The *naive* baseline of ``make bench``: one blocking Celery task per episode on a prefork pool.

Each task sleeps through its episode's simulated work (sandbox preparation, then model time and command time
for every step, then evaluation) exactly as the orchestrated episode does, holding its worker process the whole
time. It is its own Celery app on its own queue, so it shares nothing with MegaFlow but the broker: it is what
"just put the agent loop in a Celery task" gives. Each finished step is recorded in Redis as
``(finished_at, wall_s)`` for the driver (tests/bench/orchestration.py).
"""

import json
import os
import time

import redis
from celery import Celery

QUEUE = "bench.naive"
STEPS_KEY = "megaflow:bench:naive:steps"

# Not the current app: the bench driver publishes MegaFlow's messages through MegaFlow's app in the same process.
app = Celery("megaflow-bench-naive", broker=os.environ.get("MEGAFLOW_BENCH_NAIVE_REDIS_URL"), set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.naive_episode")
def naive_episode(
    steps: int, model_latency_s: float, env_latency_s: float, prepare_execs: int, evaluate_execs: int
) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    time.sleep(env_latency_s * prepare_execs)
    for _ in range(steps):
        began = time.monotonic()
        time.sleep(model_latency_s)
        time.sleep(env_latency_s)
        client.rpush(STEPS_KEY, json.dumps([time.time(), time.monotonic() - began]))
    time.sleep(env_latency_s * evaluate_execs)
