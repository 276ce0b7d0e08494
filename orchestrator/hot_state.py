"""Redis for the hot path's small, short-lived state (the database keeps the durable truth)."""

import functools

import redis
from django.conf import settings

from megaflow_site.redis_pool import pooled_client

# Set while admission holds queued episodes back for the starting cap (orchestrator/runs.py): each start that
# completes then asks for the next pass (orchestrator/episode_loop.py). An admitter that died with it set leaves
# starts asking for a minute at most.
RAMPING_KEY = "megaflow:admission:ramping"
RAMPING_TTL_S = 60
# Set while an admission pass is asked for and not yet begun: by a caller that found the admission lock taken (its
# holder passes once more), or by a start that completed and sent ``orchestrator.admit`` (``ask_for_admission``).
ADMIT_AGAIN = "megaflow:admission:again"
# The admission rate's token bucket (MEGAFLOW_ADMIT_RATE): the tokens left and when they were counted.
ADMIT_BUCKET = "megaflow:admission:bucket"


def ask_for_admission() -> bool:
    """Ask for an admission pass: True when none was asked for yet (the caller sends ``orchestrator.admit``),
    False when one is already (the lock's holder, or an admit message on its way, covers this one too). The ask
    lapses after a minute, so that an admit message lost with its worker stops nobody asking (beat admits too)."""
    return bool(redis_client().set(ADMIT_AGAIN, 1, nx=True, ex=RAMPING_TTL_S))


@functools.cache
def redis_client() -> redis.Redis:
    """The process-wide client for ``MEGAFLOW_REDIS_URL``; thread-safe, pooled connections."""
    return pooled_client(
        settings.REDIS_URL, decode_responses=True, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30
    )
