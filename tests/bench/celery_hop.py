"""A bare Celery hop on this box: a no-op task's latency from its publisher's hand-over to its start, on a gevent
worker through Redis, at a light, even rate; the floor under each of a step's two hops (agents/README.md, "Why
1,000's overhead p50 is not 5 ms")::

    python -m tests.bench.celery_hop [--hops 1] [--messages 500] [--rate 100]

``--hops 2`` has each task publish the next (a model turn, then an env step). Results off, no task events, acks
late, as the hot queues run. Its own Redis database (``MEGAFLOW_BENCH_HOP_REDIS_URL``, db 11 by default) and queue.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import redis
from celery import Celery

REDIS_URL = os.environ.get("MEGAFLOW_BENCH_HOP_REDIS_URL", "redis://127.0.0.1:6379/11")
QUEUE, LATENCIES = "bench.hop", "bench:hop:latency"

app = Celery("celery_hop", broker=REDIS_URL)
app.conf.update(task_ignore_result=True, worker_send_task_events=False, task_acks_late=True,
                worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True)  # fmt: skip


@app.task(name="bench.hop")
def hop(sent_at: float, hops_left: int = 0) -> None:
    if hops_left:
        hop.apply_async((sent_at, hops_left - 1), queue=QUEUE)
    else:
        redis.Redis.from_url(REDIS_URL).rpush(LATENCIES, time.time() - sent_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=1)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0, help="messages a second")
    args = parser.parse_args()
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.bench.celery_hop", "worker", "-P", "gevent", "-c", "200",
         "-Q", QUEUE, "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        hop.apply_async((time.time(), 0), queue=QUEUE)  # the worker is up once this one arrives
        deadline = time.time() + 60
        while not client.llen(LATENCIES):
            if time.time() > deadline or worker.poll() is not None:
                raise SystemExit("the worker did not start")
            time.sleep(0.1)
        client.delete(LATENCIES)
        for _ in range(args.messages):
            hop.apply_async((time.time(), args.hops - 1), queue=QUEUE)
            time.sleep(1 / args.rate)
        deadline = time.time() + 30
        while client.llen(LATENCIES) < args.messages and time.time() < deadline:
            time.sleep(0.1)
        latencies = sorted(1000 * float(value) for value in client.lrange(LATENCIES, 0, -1))
    finally:
        worker.terminate()
        worker.wait(30)
    p99 = latencies[max(0, round(0.99 * len(latencies)) - 1)]
    print(
        f"{args.hops} hop(s), {len(latencies)} of {args.messages} messages at {args.rate:g}/s: "
        f"p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms"
    )


if __name__ == "__main__":
    main()
