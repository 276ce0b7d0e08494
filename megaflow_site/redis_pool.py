"""A process's Redis clients for hot state and liveness (the broker's connections are Celery's own).

Every thread or greenlet of a worker shares a client, and redis-py's default pool holds at most 100 connections
and raises ``MaxConnectionsError`` past them. At 10,000 concurrent episodes a burst of evaluations (each reads its
sandbox's clock from Redis) took more than 100 at once, and 23 episodes failed their hop on it and waited for the
watchdog. This pool waits up to ``MEGAFLOW_REDIS_POOL_TIMEOUT_S`` for a free connection instead.
"""

from __future__ import annotations

import redis
from django.conf import settings


def pooled_client(url: str, **options) -> redis.Redis:
    """A thread-safe client on ``url`` whose pool (``MEGAFLOW_REDIS_MAX_CONNECTIONS``) waits for a free connection.
    ``options``: the connections' (timeouts, ``decode_responses``...)."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=settings.REDIS_MAX_CONNECTIONS, timeout=settings.REDIS_POOL_TIMEOUT_S, **options
    )
    return redis.Redis(connection_pool=pool)
