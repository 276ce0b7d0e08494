"""Database connections on the hot path, and the statistics its plans depend on."""

import time

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


def gather_statistics(*models, stale: bool = False) -> list[str]:
    """ANALYZE the tables of ``models`` that PostgreSQL has never gathered statistics for, and with ``stale`` those
    whose statistics autovacuum would renew but cannot, because the server runs without it; returns the tables.

    Without statistics the planner cannot tell a unique key from a column of a few values: a prepared statement's
    generic plan then found a step's episode (``WHERE id = %s AND status = %s``) by scanning the status index, every
    row of that status, on every step (1,000 rows a step at 1,000 concurrent episodes, until autovacuum's first
    analyze). A run's episodes are a bulk load into a table the hot path reads by key, so a run's start looks
    (orchestrator/runs.py). Not for a table about to grow from empty: statistics that say "empty" make the planner
    cache scans of it (the steps' table, analyzed at the first run's start, took PostgreSQL from 1.6 to 2.5 ms of
    CPU a step).

    Statistics also go stale within a run: taken at its start, they say every episode is queued, and admission then
    walked the episode table's key past every admitted episode to find the queued ones. Autovacuum re-analyzes a
    table once a tenth of it changed; where it is off (this project's CI machines), ``stale`` applies the same
    rule from here (``keep_statistics``, on admission's passes).
    """
    if connection.vendor != "postgresql":
        return []
    tables = [model._meta.db_table for model in models]
    with connection.cursor() as cursor:
        # reltuples is -1 until a table is first analyzed or vacuumed (PostgreSQL 14 and later).
        cursor.execute(
            "SELECT c.relname FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid"
            " WHERE c.oid = ANY(%s::regclass[]) AND (c.reltuples < 0 OR (%s AND current_setting('autovacuum') = 'off'"
            " AND COALESCE(s.n_mod_since_analyze, 0) > current_setting('autovacuum_analyze_threshold')::float"
            " + current_setting('autovacuum_analyze_scale_factor')::float * c.reltuples))",
            [tables, stale],
        )
        analyzed = [name for (name,) in cursor.fetchall()]
        for table in analyzed:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(table)}")
    return analyzed


# How often a process looks for stale statistics at most (``keep_statistics``).
STATISTICS_EVERY_S = 30.0
_statistics_looked_at = -STATISTICS_EVERY_S


def keep_statistics(*models) -> list[str]:
    """``gather_statistics(..., stale=True)`` at most every ``STATISTICS_EVERY_S`` in this process."""
    global _statistics_looked_at
    now = time.monotonic()
    if now - _statistics_looked_at < STATISTICS_EVERY_S:
        return []
    _statistics_looked_at = now
    return gather_statistics(*models, stale=True)
