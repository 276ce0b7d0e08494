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


def gather_statistics(*models) -> list[str]:
    """ANALYZE the tables of ``models`` that PostgreSQL has never gathered statistics for; returns those tables.

    Without any, the planner cannot tell a unique key from a column of a few values: a prepared statement's generic
    plan then found a step's episode (``WHERE id = %s AND status = %s``) by scanning the status index, every row of
    that status, on every step (1,000 rows a step at 1,000 concurrent episodes, until autovacuum's first analyze, and
    never where autovacuum is off). A run's episodes are a bulk load into a table the hot path reads by key, so the
    run's start looks (orchestrator/runs.py); once a table has statistics, autovacuum keeps them. Not for a table that
    is about to grow from empty: statistics that say "empty" make the planner cache scans of it (the steps' table,
    analyzed at the first run's start, took PostgreSQL from 1.6 to 2.5 ms of CPU a step).
    """
    if connection.vendor != "postgresql":
        return []
    tables = [model._meta.db_table for model in models]
    with connection.cursor() as cursor:
        # reltuples is -1 until a table is first analyzed or vacuumed (PostgreSQL 14 and later).
        cursor.execute("SELECT relname FROM pg_class WHERE oid = ANY(%s::regclass[]) AND reltuples < 0", [tables])
        never = [name for (name,) in cursor.fetchall()]
        for table in never:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(table)}")
    return never
