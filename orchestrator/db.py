"""Database connections on the hot path."""

from django.db import connection


def release_connection() -> None:
    """Give this thread's database connection back before a long wait (a model call, a command in a sandbox).

    A worker has a thread per in-flight message, and thousands of threads waiting on models and sandboxes must
    not hold thousands of server connections. With the PostgreSQL pool (settings ``MEGAFLOW_DB_POOL_SIZE``) the
    connection goes back to the pool, and the next query takes one out again.
    """
    if not connection.in_atomic_block:
        connection.close()


# PostgreSQL's protocol carries at most this many parameters a statement, and with server-side binding
# (megaflow_site/settings.py) a bulk INSERT that Django cannot write as UNNEST puts one per field of every row in it.
MAX_PARAMETERS = 65_535


def bulk_batch_size(model) -> int:
    """Rows a ``bulk_create`` of ``model`` may send in one statement."""
    return max(1, MAX_PARAMETERS // len(model._meta.concrete_fields))
