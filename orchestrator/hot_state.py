"""Redis for the hot path's small, short-lived state (the database keeps the durable truth)."""

import functools

import redis
from django.conf import settings


@functools.cache
def redis_client() -> redis.Redis:
    """The process-wide client for ``MEGAFLOW_REDIS_URL``; thread-safe, pooled connections."""
    return redis.Redis.from_url(
        settings.REDIS_URL, decode_responses=True, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30
    )
