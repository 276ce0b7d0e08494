"""The coordinated autoscaler on the live fleet: observe, decide (orchestrator/autoscaler.py), actuate.

Beat runs ``tick`` every ``MEGAFLOW_AUTOSCALE_INTERVAL_S`` (task ``orchestrator.autoscale``). It scales the GPU pool
(the default model's queue) and the CPU pool (the default env pool's queue) together.

Observed, per tick: from the database, steps/s, the p95 step wall time and the mean service time (model +
command) of the steps of the last minute, live episodes and those waiting for admission; each queue's depth
from the broker; and from the workers themselves (one ``inspect`` broadcast each for stats, active tasks and
queues) every worker node, the pool it consumes, its concurrency and its tasks in service. The controller's
memory lives in Redis between ticks, so any agent worker can run the next one.

Actuated, three ways, from fast to slow:
- **Admission**: the controller's limit on live episodes goes to Redis (``ADMISSION_KEY``, expiring after a few
  ticks so that a stopped autoscaler throttles nothing) and ``orchestrator.runs.admit`` honours it.
- **Celery pool grow/shrink**: each worker node of a pool is resized (``pool_grow`` / ``pool_shrink``,
  megaflow_site/worker_pool.py) so that the nodes there are carry the desired capacity, between the
  concurrency they were started with and ``MAX_SLOTS_FACTOR`` times that. Seconds, with no new process.
- **Desired replicas** as metrics (``megaflow_desired_replicas{pool}`` on /metrics) for KEDA or an HPA, which
  add and remove worker pods; as they arrive, the per-node sizes go back towards their defaults.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.utils import timezone

from megaflow_site.topology import Service, WorkerSpec, queue_name
from orchestrator import transitions
from orchestrator.autoscaler import (
    ControllerConfig,
    CoordinatedAutoscaler,
    Decision,
    Observation,
    PoolConfig,
    PoolObservation,
)
from orchestrator.fleet import queue_depths, step_latencies
from orchestrator.hot_state import redis_client
from orchestrator.models import Episode, Run, Step

logger = logging.getLogger("megaflow.autoscale")

STATE_KEY = "megaflow:autoscale:state"
DECISION_KEY = "megaflow:autoscale:decision"
ADMISSION_KEY = "megaflow:autoscale:admission_limit"
BASE_KEY = "megaflow:autoscale:base_concurrency"  # node → the concurrency it was started with
MAX_SLOTS_FACTOR = 4
WINDOW = timedelta(seconds=60)


def pools() -> tuple[PoolConfig, ...]:
    return tuple(
        PoolConfig(queue_name(service), min_replicas=1, max_replicas=maximum,
                   slots_per_replica=WorkerSpec.DEFAULT_CONCURRENCY[service])
        for service, maximum in ((Service.MODEL, settings.MEGAFLOW_AUTOSCALE_MAX_GPU_WORKERS),
                                 (Service.ENV, settings.MEGAFLOW_AUTOSCALE_MAX_ENV_WORKERS))
    )  # fmt: skip


def controller() -> CoordinatedAutoscaler:
    interval = settings.MEGAFLOW_AUTOSCALE_INTERVAL_S
    return CoordinatedAutoscaler(ControllerConfig(pools(), latency_slo_s=settings.MEGAFLOW_LATENCY_SLO_S,
                                                  up_cooldown_s=2 * interval, down_cooldown_s=12 * interval,
                                                  down_window_s=20 * interval))  # fmt: skip


@dataclass
class Node:
    name: str
    queue: str
    concurrency: int
    in_service: int
    pid: int = 0

    @property
    def key(self) -> str:  # a restarted worker keeps its name but may be started with another concurrency
        return f"{self.name}:{self.pid}"


def worker_nodes(timeout: float = 1.0) -> list[Node]:
    """Every worker node that answers, with the queue it consumes, its concurrency and its tasks in service."""
    inspect = current_app.control.inspect(timeout=timeout)
    stats, active, queues = inspect.stats() or {}, inspect.active() or {}, inspect.active_queues() or {}
    nodes = []
    for name, info in stats.items():
        for queue in queues.get(name, []):
            concurrency = int(info["pool"]["max-concurrency"])
            nodes.append(Node(name, queue["name"], concurrency, len(active.get(name, [])), info.get("pid", 0)))
    return nodes


def observe(nodes: list[Node], now: float) -> Observation:
    since = timezone.now() - WINDOW
    steps = Step.objects.filter(completed_at__gte=since).count()
    samples = step_latencies(since)
    walls = sorted(samples["wall"])
    service = [model + env for model, env in zip(samples["model"], samples["env"], strict=True)]
    depths = queue_depths()
    pools_seen = {}
    for pool in pools():
        mine = [node for node in nodes if node.queue == pool.name]
        pools_seen[pool.name] = PoolObservation(
            replicas=len(mine),
            queue_depth=depths.get(pool.name, 0),
            in_service=sum(node.in_service for node in mine),
            slots=sum(node.concurrency for node in mine),
        )
    return Observation(
        now=now,
        steps_per_s=steps / WINDOW.total_seconds(),
        latency_p95_s=walls[int(0.95 * (len(walls) - 1))] if walls else None,
        live_episodes=Episode.objects.filter(status__in=transitions.LIVE).count(),
        service_s=sum(service) / len(service) if service else None,
        waiting_episodes=Episode.objects.filter(status=Episode.Status.QUEUED, run__status=Run.Status.RUNNING).count(),
        pools=pools_seen,
    )


def resize_workers(decision: Decision, nodes: list[Node]) -> dict[str, int]:
    """Pool grow/shrink each node so that a pool's nodes carry its desired capacity until its replicas catch
    up: node size = base × desired / replicas, within [base, ``MAX_SLOTS_FACTOR`` × base], where base is the
    concurrency the node was started with (its operator's choice; removing capacity below it is the replica
    scaler's job). Returns node → delta."""
    client = redis_client()
    known = client.hgetall(BASE_KEY)
    if fresh := {node.key: node.concurrency for node in nodes if node.key not in known}:
        client.hset(BASE_KEY, mapping=fresh)
        known.update(fresh)
    client.expire(BASE_KEY, 86400)  # departed workers' entries go with a day without ticks
    deltas = {}
    for pool in pools():
        mine = [node for node in nodes if node.queue == pool.name]
        for node in mine:
            base = int(known[node.key])
            scale = min(MAX_SLOTS_FACTOR, max(1.0, decision.replicas[pool.name] / len(mine)))
            delta = math.ceil(base * scale) - node.concurrency
            if delta > 0:
                current_app.control.pool_grow(delta, destination=[node.name])
            elif delta < 0:
                current_app.control.pool_shrink(-delta, destination=[node.name])
            if delta:
                deltas[node.name] = delta
    return deltas


def tick() -> dict:
    """One decision on the live fleet, actuated; returns what was decided and done."""
    client = redis_client()
    scaler = controller()
    if saved := client.get(STATE_KEY):
        scaler.restore(json.loads(saved))
    nodes = worker_nodes()
    observation = observe(nodes, time.time())
    decision = scaler.decide(observation)
    resized = resize_workers(decision, nodes)
    ttl = max(120, 4 * settings.MEGAFLOW_AUTOSCALE_INTERVAL_S)
    record = {**asdict(decision), "at": observation.now, "steps_per_s": observation.steps_per_s,
              "latency_p95_s": observation.latency_p95_s, "resized": resized}  # fmt: skip
    with client.pipeline() as pipe:
        pipe.set(STATE_KEY, json.dumps(scaler.snapshot()))
        pipe.set(DECISION_KEY, json.dumps(record), ex=ttl)
        if decision.admission_limit is None:
            pipe.delete(ADMISSION_KEY)
        else:
            pipe.set(ADMISSION_KEY, decision.admission_limit, ex=ttl)
        pipe.execute()
    if resized or decision.slo_breached:
        logger.info("autoscale: %s; replicas %s; resized %s", decision.reason, decision.replicas, resized)
    return record


def admission_limit() -> int | None:
    """The autoscaler's current limit on live episodes, if it set one."""
    value = redis_client().get(ADMISSION_KEY)
    return int(value) if value is not None else None


def last_decision() -> dict | None:
    value = redis_client().get(DECISION_KEY)
    return json.loads(value) if value else None
