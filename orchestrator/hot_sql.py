"""The statements of a step, written out once instead of compiled by the ORM on every call.

A step runs about eight statements, each trivial for PostgreSQL; compiling them through Django's ORM cost more
CPU in the workers than running them did (a ``.first()`` alone spends half its time building an ORDER BY). So
the hot path sends fixed SQL through Django's own connection (the same pool, transactions and error classes:
a unique violation is still ``django.db.IntegrityError``); the statements that list many columns build their
text from the models' fields, once per process. Everything off the hot path keeps the ORM. docs:
agents/README.md, "Where a step's time goes".
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from django.db import DEFAULT_DB_ALIAS, connection, connections

from megaflow_site import greenlet_db
from orchestrator.models import Episode, Step
from orchestrator.packed import join_turns


@contextlib.contextmanager
def _cursor() -> Iterator:
    """A cursor for one hot statement: psycopg's own, on this thread's (or greenlet's) Django connection. Django's
    cursor wrapper cost ~45 µs of a worker's CPU a statement (against ~80 µs for psycopg to run it); errors still
    arrive as Django's (a unique violation is ``django.db.IntegrityError``), and the connection is taken from the pool
    and kept until the hop's next wait as before. (Taking a pooled connection per statement instead saved Django's
    ``connect()`` too, but a hop of three statements then queued three times behind every thread waiting on the
    pool: overhead p99 at 1,000 went from 3.5–4.6 s to 6.9–12.8 s.) Django's cursor inside a transaction (it refuses
    statements after an error there), where queries are logged (DEBUG, a test counting them), and on SQLite."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.in_atomic_block or db.queries_logged or db.vendor != "postgresql":
        with db.cursor() as cursor:
            yield cursor
        return
    if (threads := greenlet_db.statement_threads()) is not None:  # a gevent worker: a native thread runs it
        with db.wrap_database_errors:
            yield threads.cursor()
        return
    db.ensure_connection()
    with db.wrap_database_errors, db.connection.cursor() as cursor:
        yield cursor


# Portable SQL: PostgreSQL, and SQLite for the embedded default. Values cross as the ORM would send and read them:
# datetimes through the backend's own adaptation (SQLite keeps them as naive UTC text), JSON as text.


def _columns(model, names) -> list[str]:
    return [connection.ops.quote_name(model._meta.get_field(name).column) for name in names]


def _moment(value: datetime | None):
    return connection.ops.adapt_datetimefield_value(value)


def _read_moment(value):
    """A datetime column as read: aware from PostgreSQL, naive UTC (or text) from SQLite."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _json(value):
    """A JSON column as read: text on both backends (Django's connection leaves jsonb undecoded for its fields)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


@functools.cache
def _readers(model, names: tuple[str, ...]) -> tuple:
    """Per column of ``names``: how its value is read back, or None to take it as it comes."""
    kinds = [model._meta.get_field(name).get_internal_type() for name in names]
    return tuple(_read_moment if kind == "DateTimeField" else _json if kind == "JSONField" else None for kind in kinds)


def _row(model, names: tuple[str, ...], row: tuple | None) -> tuple | None:
    if row is None:
        return None
    return tuple(
        value if read is None else read(value) for read, value in zip(_readers(model, names), row, strict=True)
    )


@functools.cache
def _episode_select(names: tuple[str, ...]) -> str:
    return f"SELECT {', '.join(_columns(Episode, names))} FROM {Episode._meta.db_table} WHERE id = %s"


@functools.cache
def _hold_update(names: tuple[str, ...], live: int) -> str:
    return (
        f"UPDATE {Episode._meta.db_table} SET holder = %s, worker = %s, updated_at = %s"
        f" WHERE id = %s AND status IN ({', '.join(['%s'] * live)}) AND attempt = COALESCE(%s, attempt)"
        f" RETURNING {', '.join(_columns(Episode, names))}"
    )


@functools.cache
def _episode_update(setting: tuple[str, ...], adding: tuple[str, ...], statuses: int, attempt: bool, container: bool,
                    unclaimed: int | None) -> str:  # fmt: skip
    assignments = [f"{column} = %s" for column in _columns(Episode, setting)]
    assignments += [f"{column} = {column} + %s" for column in _columns(Episode, adding)]
    conditions = ["id = %s"]
    if statuses:
        conditions.append(f"status IN ({', '.join(['%s'] * statuses)})")
    if attempt:
        conditions.append("attempt = %s")
    if container:
        conditions.append("container_id = %s")
    if unclaimed:  # (none alive: every start is unclaimed)
        conditions.append(f"(started_at IS NULL OR holder NOT IN ({', '.join(['%s'] * unclaimed)}))")
    return f"UPDATE {Episode._meta.db_table} SET {', '.join(assignments)} WHERE {' AND '.join(conditions)}"


@functools.cache
def _episode_field(name: str):
    return Episode._meta.get_field(name)


def update_episode(
    episode_id: int,
    *,
    set: dict | None = None,  # noqa: A002 -- as the statement says it
    add: dict | None = None,
    status_in: Iterable[str] = (),
    attempt: int | None = None,
    container_id: str | None = None,
    unclaimed_by: Iterable[str] | None = None,
) -> int:
    """One UPDATE of an episode: ``set`` its fields (name → value) and ``add`` to its counters (name → amount), only
    while its status is in ``status_in``, it is of ``attempt``, holds ``container_id`` and its start is not claimed
    by one of ``unclaimed_by`` (each where given). Returns the rows changed (0 or 1). Orchestrator/transitions.py's
    compare-and-set, without compiling a QuerySet every time (about 0.5 ms of a worker's CPU each)."""
    set, add = set or {}, add or {}
    statuses = sorted(status_in)
    unclaimed = None if unclaimed_by is None else sorted(unclaimed_by)
    sql = _episode_update(tuple(set), tuple(add), len(statuses), attempt is not None, container_id is not None,
                          None if unclaimed is None else len(unclaimed))  # fmt: skip
    # Every value as Django prepares it, amounts too: a bare int goes as the smallest type it fits, and the prepared
    # statement's parameter types would then vary with the values (see _STORED_AS_IS).
    params = [_episode_field(name).get_db_prep_save(value, connection) for name, value in (*set.items(), *add.items())]
    params += [episode_id, *statuses]
    params += [value for value in (attempt, container_id) if value is not None]
    params += unclaimed or []
    with _cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


@functools.cache
def _run_of_episode(unfinished: int) -> str:
    # One probe of the (run, status, id) index per status, newest first, not ``EXISTS (... status IN (...))``: the
    # planner takes a run's episodes for mostly unfinished (its statistics are from the run's start) and scans the
    # table for the first one; at a run's end, when nearly all have finished, that read most of it on every
    # episode's end (at 10,000 concurrent, ~3,300 rows and several ms of the server's CPU each, 33 million rows a
    # run). ``ORDER BY ... LIMIT 1`` in a scalar subquery keeps the index's order in the plan, where an EXISTS would
    # drop it; COALESCE stops at the first status found.
    table = Episode._meta.db_table
    probe = (
        f"(SELECT other.id FROM {table} other WHERE other.run_id = ended.run_id AND other.status = %s"
        " ORDER BY other.id DESC LIMIT 1)"
    )
    probes = ", ".join([probe] * unfinished + ["NULL"])  # NULL: SQLite's COALESCE takes two arguments or more
    return f"SELECT ended.run_id, COALESCE({probes}) IS NOT NULL FROM {table} ended WHERE ended.id = %s"


def run_of_episode(episode_id: int, unfinished: Iterable[str]) -> tuple[int, bool] | None:
    """The episode's run, and whether any of the run's episodes is in one of the ``unfinished`` states, probed in
    the order given (the likeliest first: each probe reads past the index entries its status left behind in
    episodes that moved on, until the autovacuum); None when the episode is gone. (An episode's end,
    orchestrator/runs.py: one round trip instead of two compiled queries.)"""
    statuses = list(unfinished)
    with _cursor() as cursor:
        cursor.execute(_run_of_episode(len(statuses)), [*statuses, episode_id])
        row = cursor.fetchone()
    return None if row is None else (row[0], bool(row[1]))


def episode_row(episode_id: int, names: tuple[str, ...]) -> tuple | None:
    """The episode's ``names`` columns (Episode field names), or None if it is gone."""
    with _cursor() as cursor:
        cursor.execute(_episode_select(names), [episode_id])
        return _row(Episode, names, cursor.fetchone())


def hold_returning(episode_id: int, attempt: int | None, live: frozenset[str], holder: str, worker: str, now,
                   names: tuple[str, ...]) -> tuple | None:  # fmt: skip
    """Mark a live episode of ``attempt`` (any attempt if None) as held by ``holder`` and moved now, and return its
    ``names`` columns as they are after that; None when it is not live or of another attempt."""
    with _cursor() as cursor:
        cursor.execute(_hold_update(names, len(live)), _hold_values(episode_id, attempt, live, holder, worker, now))
        return _row(Episode, names, cursor.fetchone())


def _hold_values(episode_id: int, attempt: int | None, live: frozenset[str], holder: str, worker: str, now) -> list:
    return [holder, worker, _moment(now), episode_id, *sorted(live), attempt]


@functools.cache
def _hold_with_history(names: tuple[str, ...], live: int) -> str:
    # The episode's columns on every row, one row per step up to the turn's (one row of NULL steps when it has none).
    step = Step._meta.db_table
    columns = ", ".join(f"{step}.{column}" for column in _columns(Step, HISTORY))
    return (
        f"WITH held AS ({_hold_update(names, live)}) SELECT held.*, {columns} FROM held"
        f' LEFT JOIN {step} ON {step}.episode_id = %s AND {step}."index" <= %s ORDER BY {step}."index"'
    )


def hold_returning_with_history(episode_id: int, attempt: int | None, live: frozenset[str], holder: str, worker: str,
                                now, names: tuple[str, ...], through: int) -> tuple | None:  # fmt: skip
    """``hold_returning`` and ``history`` in one round trip, on PostgreSQL: the episode's ``names`` columns and its
    steps up to ``through``; None when it is not live or of another attempt, or on SQLite (ask for each alone)."""
    if connection.vendor != "postgresql":
        return None
    with _cursor() as cursor:
        params = [*_hold_values(episode_id, attempt, live, holder, worker, now), episode_id, through]
        cursor.execute(_hold_with_history(names, len(live)), params)
        rows = cursor.fetchall()
    if not rows:
        return None
    width = len(names)
    steps = [_row(Step, HISTORY, row[width:]) for row in rows if row[width] is not None]
    return _row(Episode, names, rows[0][:width]), steps


@functools.cache
def _steps_select(names: tuple[str, ...], through: str) -> str:
    """The ``names`` columns of an episode's steps up to an index (``through``: the comparison, ``<=`` or ``<``)."""
    return (
        f"SELECT {', '.join(_columns(Step, names))} FROM {Step._meta.db_table}"
        f' WHERE episode_id = %s AND "index" {through} %s ORDER BY "index"'
    )


def _steps(episode_id: int, names: tuple[str, ...], through: str, index: int) -> list[tuple]:
    with _cursor() as cursor:
        cursor.execute(_steps_select(names, through), [episode_id, index])
        return [_row(Step, names, row) for row in cursor.fetchall()]


HISTORY = ("index", "model_output", "observation", "completed_at")
PROMPT_IDS = ("prompt_prefix_len", "prompt_ids", "completion_ids")


def history(episode_id: int, through: int) -> list[tuple[int, str, str, datetime | None]]:
    """(index, model_output, observation, completed_at) of the episode's steps up to ``through``, in order."""
    return _steps(episode_id, HISTORY, "<=", through)


def turn_ids(episode_id: int, before: int) -> list[int] | None:
    """The ids the model saw and produced on the turn before ``before`` (its prompt, then its completion), joined
    from every earlier step's packed ids without a list in between; None where a turn has none."""
    with _cursor() as cursor:
        cursor.execute(_steps_select(PROMPT_IDS, "<"), [episode_id, before])
        return join_turns(cursor.fetchall())


@functools.cache
def _step_fields():
    return [field for field in Step._meta.concrete_fields if not field.primary_key]


@functools.cache
def _step_insert() -> str:
    columns, values = _step_columns()
    return f"INSERT INTO {Step._meta.db_table} ({columns}) VALUES ({values}) RETURNING id"


def _step_columns() -> tuple[str, str]:
    """A Step INSERT's column list and its placeholders, every field but the id (``_step_values`` fills them)."""
    fields = _step_fields()
    return ", ".join(_columns(Step, [field.name for field in fields])), ", ".join(["%s"] * len(fields))


def insert_step(now, **values) -> int:
    """Insert a Step row (Step field names → values; every other field takes its default, ``created_at`` is
    ``now``) and return its id. Raises IntegrityError when the episode already has a step of that index."""
    with _cursor() as cursor:
        cursor.execute(_step_insert(), _step_values(now, values))
        return cursor.fetchone()[0]


@functools.cache
def _hold_and_claim(names: tuple[str, ...], live: int) -> str:
    columns, values = _step_columns()
    # Only where the hold happened; a step that has its row already (another delivery's) inserts nothing.
    return (
        f"WITH held AS ({_hold_update(names, live)}),"
        f" claimed AS (INSERT INTO {Step._meta.db_table} ({columns}) SELECT {values}"
        " WHERE EXISTS (SELECT 1 FROM held) ON CONFLICT DO NOTHING RETURNING id)"
        " SELECT held.*, (SELECT id FROM claimed) FROM held"
    )


def hold_and_claim(episode_id: int, attempt: int | None, live: frozenset[str], holder: str, worker: str, now,
                   names: tuple[str, ...], values: dict) -> tuple | None:  # fmt: skip
    """``hold_returning`` and, only if it held, ``insert_step`` (``values``, claimed at ``now``) in one round trip,
    on PostgreSQL: (the episode's ``names`` columns, the new step's id or None when the episode has a step of that
    index already); None when the episode was not held, or on SQLite (ask for each alone)."""
    if connection.vendor != "postgresql":
        return None
    with _cursor() as cursor:
        hold = _hold_values(episode_id, attempt, live, holder, worker, now)
        cursor.execute(_hold_and_claim(names, len(live)), [*hold, *_step_values(now, values)])
        row = cursor.fetchone()
    return None if row is None else (_row(Episode, names, row[:-1]), row[-1])


# The Python types a field of each kind stores as they are: Django's get_db_prep_save returns such a value unchanged,
# and skipping it for them is half a step INSERT's parameters (the preparation was a twentieth of an env worker at
# 10,000). Not integers: Django sends those as psycopg's Int4/Int8, and a bare int would go as the smallest type its
# value fits, so the prepared statement's parameter types, and PostgreSQL's plans, would vary with the values.
_STORED_AS_IS = {"CharField": (str,), "TextField": (str,), "FloatField": (float,), "BooleanField": (bool,)}


@functools.cache
def _step_params() -> tuple:
    """Per field of a Step INSERT: the field, the keys its value may come under, the types stored as they are, and
    its default as sent (a field's default is a constant; prepared once)."""
    return tuple(
        (field, (field.attname, field.name), _STORED_AS_IS.get(field.get_internal_type(), ()),
         field.get_db_prep_save(field.get_default(), connection))
        for field in _step_fields()
    )  # fmt: skip


def _step_values(now, values: dict) -> list:
    params = []
    for field, keys, as_is, default in _step_params():
        if field.name == "created_at":
            value = now
        elif keys[0] in values:
            value = values[keys[0]]
        elif keys[1] in values:
            value = values[keys[1]]
        else:
            params.append(default)
            continue
        params.append(value if value is None or type(value) in as_is else field.get_db_prep_save(value, connection))
    return params


@functools.cache
def _step_result_update() -> str:
    columns = _columns(Step, RESULT_FIELDS)
    return (
        f"UPDATE {Step._meta.db_table} SET {', '.join(f'{column} = %s' for column in columns)}"
        " WHERE id = %s AND created_at = %s AND completed_at IS NULL"
    )


RESULT_FIELDS = ("action", "observation", "exit_code", "model_latency_s", "env_latency_s", "prompt_tokens",
                 "completion_tokens", "completed_at")  # fmt: skip


def record_step(step_id: int, claimed_at, **result) -> bool:
    """Write a step's result (``RESULT_FIELDS``) while its claim is still the one made at ``claimed_at`` and it
    has none yet: False when the claim was taken over."""
    with _cursor() as cursor:
        cursor.execute(_step_result_update(), _result_values(step_id, claimed_at, result))
        return cursor.rowcount == 1


def _result_values(step_id: int, claimed_at, result: dict) -> list:
    return [_moment(value) if isinstance(value, datetime) else value
            for value in (*(result[name] for name in RESULT_FIELDS), step_id, claimed_at)]  # fmt: skip


_COUNT_UPDATE = (
    f"UPDATE {Episode._meta.db_table} SET step_count = %s, prompt_tokens = prompt_tokens + %s,"
    " completion_tokens = completion_tokens + %s, cost_prompt_tokens = cost_prompt_tokens + %s,"
    " cost_completion_tokens = cost_completion_tokens + %s, model_s = model_s + %s,"
    " env_worker_s = env_worker_s + %s, updated_at = %s"
    " WHERE id = %s AND status = %s AND attempt = %s"
)


def _count_values(episode_id: int, attempt: int, running: str, steps: int, prompt_tokens: int, completion_tokens: int,
                  model_s: float, env_worker_s: float, now) -> list:  # fmt: skip
    return [steps, prompt_tokens, completion_tokens, prompt_tokens, completion_tokens, model_s, env_worker_s,
            _moment(now), episode_id, running, attempt]  # fmt: skip


def count_step(episode_id: int, attempt: int, running: str, steps: int, prompt_tokens: int, completion_tokens: int,
               model_s: float, env_worker_s: float, now) -> bool:  # fmt: skip
    """A running episode of ``attempt`` has ``steps`` steps now, and the step's tokens and seconds added to its
    counts and its cost (orchestrator/costs.py); False when it moved on (cancelled, retried)."""
    with _cursor() as cursor:
        cursor.execute(_COUNT_UPDATE, _count_values(episode_id, attempt, running, steps, prompt_tokens,
                                                    completion_tokens, model_s, env_worker_s, now))  # fmt: skip
        return cursor.rowcount == 1


@functools.cache
def _record_and_count() -> str:
    # One statement, one transaction: the count only where the result was recorded (PostgreSQL's data-modifying WITH).
    return (
        f"WITH recorded AS ({_step_result_update()} RETURNING 1),"
        f" counted AS ({_COUNT_UPDATE} AND EXISTS (SELECT 1 FROM recorded) RETURNING 1)"
        " SELECT (SELECT count(*) FROM recorded), (SELECT count(*) FROM counted)"
    )


def record_and_count_step(step_id: int, claimed_at, result: dict, **count) -> tuple[bool, bool]:
    """``record_step`` then, only if it recorded, ``count_step``: whether each happened. On PostgreSQL in one
    statement (a step's hot path pays one round trip and one commit less); on SQLite as the two."""
    if connection.vendor != "postgresql":
        recorded = record_step(step_id, claimed_at, **result)
        return recorded, recorded and count_step(**count)
    with _cursor() as cursor:
        cursor.execute(_record_and_count(), [*_result_values(step_id, claimed_at, result), *_count_values(**count)])
        recorded, counted = cursor.fetchone()
        return recorded == 1, counted == 1
