"""Database connections on the hot path."""

import logging

import tenacity
from django.db import InterfaceError, OperationalError, connection

logger = logging.getLogger("megaflow.db")


def release_connection() -> None:
    """Give this thread's database connection back before a long wait (a model call, a command in a sandbox).

    A worker has a thread per in-flight message, and thousands of threads waiting on models and sandboxes must
    not hold thousands of server connections. With the PostgreSQL pool (settings ``MEGAFLOW_DB_POOL_SIZE``) the
    connection goes back to the pool, and the next query takes one out again.
    """
    if not connection.in_atomic_block:
        connection.close()


def _before_retry(state: tenacity.RetryCallState) -> None:
    logger.warning("database unavailable (%s); retrying %s", state.outcome.exception(), state.fn.__name__)
    connection.close_if_unusable_or_obsolete()


# For the Celery tasks of episode transitions: one that cannot reach the database (a pool exhausted by a burst,
# a server restarting) tries again in place, its message still unacknowledged, instead of failing and leaving
# the episode to the watchdog. Transitions are idempotent, so running one again is always safe.
retry_on_database_errors = tenacity.retry(
    retry=tenacity.retry_if_exception_type((OperationalError, InterfaceError)),
    wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=15),
    stop=tenacity.stop_after_delay(120),
    before_sleep=_before_retry,
    reraise=True,
)
