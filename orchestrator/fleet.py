"""What the fleet is doing now, read from the database and the broker: the signals /metrics exports and the
autoscaler decides on."""

from __future__ import annotations

from datetime import timedelta

from celery import current_app

from megaflow_site.topology import declared_queues
from orchestrator.models import Step

MAX_STEPS_SCANNED = 50_000


def step_latencies(since) -> dict[str, list[float]]:
    """Model time, command time, wall time since the previous step, and overhead (wall minus both) of recent
    steps."""
    rows = (
        Step.objects.filter(completed_at__gte=since - timedelta(minutes=1))
        .order_by("episode_id", "index")
        .values_list("episode_id", "index", "completed_at", "model_latency_s", "env_latency_s")[:MAX_STEPS_SCANNED]
    )
    samples: dict[str, list[float]] = {"model": [], "env": [], "overhead": [], "wall": []}
    previous = {}
    for episode_id, index, completed_at, model_s, env_s in rows:
        before = previous.get((episode_id, index - 1))
        previous[(episode_id, index)] = completed_at
        if completed_at < since:
            continue
        samples["model"].append(model_s or 0.0)
        samples["env"].append(env_s or 0.0)
        if before is not None:
            wall = (completed_at - before).total_seconds()
            samples["wall"].append(wall)
            samples["overhead"].append(max(0.0, wall - (model_s or 0) - (env_s or 0)))
    return samples


def queue_depths() -> dict[str, int]:
    """Messages waiting in each declared queue, read from the broker."""
    with current_app.connection_for_read() as connection:
        client = connection.default_channel.client
        return {queue.name: client.llen(queue.name) for queue in declared_queues()}
