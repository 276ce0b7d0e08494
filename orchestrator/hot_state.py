"""Redis for the hot path's small, short-lived state (the database keeps the durable truth)."""

import functools

import redis
from django.conf import settings

# Set while admission holds queued episodes back for the starting cap (orchestrator/runs.py): each start that
# completes then asks for the next pass (orchestrator/episode_loop.py). An admitter that died with it set leaves
# starts asking for a minute at most.
RAMPING_KEY = "megaflow:admission:ramping"
RAMPING_TTL_S = 60


@functools.cache
def redis_client() -> redis.Redis:
    """The process-wide client for ``MEGAFLOW_REDIS_URL``; thread-safe, pooled connections."""
    return redis.Redis.from_url(
        settings.REDIS_URL, decode_responses=True, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30
    )
