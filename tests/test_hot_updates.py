"""A hop updates its episode in place: no index of the episode table covers a column the hot path writes, so on
PostgreSQL each hold and each step's count is a heap-only (HOT) update, which writes no index entry and leaves no
dead version in any index (migration 0012). Real PostgreSQL."""

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from orchestrator import db, hot_sql, transitions
from orchestrator.episode_loop import LIVE_FIELDS
from orchestrator.models import Episode, Step
from tests.support.records import new_episode

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="HOT updates and fillfactor are PostgreSQL's"),
]

# What a hold (hot_sql._hold_update) and a step's count (hot_sql._COUNT_UPDATE) write, per hop.
HOT_COLUMNS = {"holder", "worker", "updated_at", "step_count", "prompt_tokens", "completion_tokens",
               "cost_prompt_tokens", "cost_completion_tokens", "model_s", "env_worker_s"}  # fmt: skip


@pytest.fixture
def running():
    return new_episode(Episode.Status.RUNNING)


def indexed_columns(table: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT a.attname FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass",
            [table],
        )
        return {name for (name,) in cursor.fetchall()}


def hot_updates_so_far() -> tuple[int, int]:
    """This transaction's (updates, HOT updates) of the episode table (the test runs inside one)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_stat_get_xact_tuples_updated(%s::regclass), pg_stat_get_xact_tuples_hot_updated(%s::regclass)",
            [Episode._meta.db_table] * 2,
        )
        return cursor.fetchone()


def test_no_index_of_the_episode_table_covers_a_column_a_hop_writes():
    assert indexed_columns(Episode._meta.db_table) & HOT_COLUMNS == set()
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", [Episode._meta.db_table])
        assert "fillfactor=70" in cursor.fetchone()[0]  # room on each page for the next version of its rows


def test_holds_and_step_counts_are_heap_only_updates(running):
    updates, hot = hot_updates_so_far()
    for step in range(10):
        assert transitions.hold_returning(running.pk, running.attempt, LIVE_FIELDS)
        assert hot_sql.count_step(running.pk, running.attempt, Episode.Status.RUNNING, step + 1, 100, 20, 1.0, 0.5,
                                  timezone.now())  # fmt: skip
    more_updates, more_hot = hot_updates_so_far()
    assert more_updates - updates == 20
    assert more_hot - hot == 20
    running.refresh_from_db()
    assert running.step_count == 10 and running.prompt_tokens == 1000


def test_a_transition_still_finds_the_episode_by_its_status(running):
    assert list(Episode.objects.filter(status__in=transitions.LIVE).values_list("pk", flat=True)) == [running.pk]


def generic_plan_of_a_steps_count() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute("PREPARE counting(bigint, text, int) AS UPDATE orchestrator_episode SET step_count = 1"
                       " WHERE id = $1 AND status = $2 AND attempt = $3")  # fmt: skip
        cursor.execute("EXPLAIN EXECUTE counting(1, 'running', 0)")
        plan = "\n".join(line for (line,) in cursor.fetchall())
        cursor.execute("DEALLOCATE counting")
    return plan


def test_a_runs_start_gathers_the_statistics_a_table_never_had(running):
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [Episode._meta.db_table])
        if cursor.fetchone()[0] >= 0:
            pytest.skip("a committed run analyzed the episode table of this test database already")
    Episode.objects.bulk_create(
        Episode(run=running.run, task=running.task, sample_index=index, status=Episode.Status.RUNNING)
        for index in range(1, 2000)
    )
    # No statistics: the generic plan takes the status index (every running episode, for one).
    assert "episode_status" in generic_plan_of_a_steps_count()
    assert db.gather_statistics(Episode) == [Episode._meta.db_table]
    assert db.gather_statistics(Episode) == []  # once
    assert "orchestrator_episode_pkey" in generic_plan_of_a_steps_count()  # by its key


@pytest.mark.django_db(transaction=True)
def test_statistics_gone_stale_are_renewed_only_where_autovacuum_is_off(running):
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('autovacuum') = 'off'")
        if not cursor.fetchone()[0]:
            pytest.skip("this server runs autovacuum, which renews statistics itself")
        cursor.execute(f"ANALYZE {Episode._meta.db_table}")
    assert db.gather_statistics(Episode) == []  # has statistics: only stale=True looks further
    Episode.objects.bulk_create(
        Episode(run=running.run, task=running.task, sample_index=index) for index in range(1, 400)
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")  # the inserts counted before the next statement reads
    assert db.gather_statistics(Episode) == []
    assert db.gather_statistics(Episode, stale=True) == [Episode._meta.db_table]
    assert db.gather_statistics(Episode, stale=True) == []  # renewed: nothing changed since


def test_a_step_insert_sends_each_value_as_django_would():
    """The step INSERT prepares only the values Django would change (``hot_sql._step_values``); every parameter keeps
    the type Django's own preparation gives it. An int sent bare goes as the smallest type its value fits, not as
    the Int4 Django sends: the prepared statement's parameter types, and PostgreSQL's plans, then vary by value."""
    now = timezone.now()
    values = dict(episode_id=5, index=3, model_output="reply", model_input=[{"role": "user", "content": "x"}],
                  prompt_prefix_len=40_000, prompt_ids=b"\x01\x00\x00\x00", prefix_consistent=True,
                  finish_reason="stop", sampling={"temperature": 1.0}, model_name="sim", model_version="v1",
                  exit_code=0, model_latency_s=1.5, env_latency_s=2, prompt_tokens=7, completion_tokens=90_000,
                  tool_calls=None)  # fmt: skip
    fields = hot_sql._step_fields()
    given = {"created_at": now, **values}
    django = [
        field.get_db_prep_save(given.get(field.attname, given.get(field.name, field.get_default())), connection)
        for field in fields
    ]
    sent = hot_sql._step_values(now, values)
    assert [type(value) for value in sent] == [type(value) for value in django], [
        (field.name, type(ours).__name__, type(theirs).__name__)
        for field, ours, theirs in zip(fields, sent, django, strict=True)
        if type(ours) is not type(theirs)
    ]


@pytest.mark.django_db(transaction=True)
def test_a_hot_statement_runs_on_psycopgs_cursor_as_djangos_would(running):
    """``hot_sql._cursor``: outside a transaction a hot statement skips Django's cursor wrapper (on the hop's Django
    connection, opened from the pool as before), and reads, writes and fails as Django's cursor would; inside a
    transaction, or where queries are logged, it goes through Django's cursor and is part of both."""
    connection.close()
    now = timezone.now()
    step_id = hot_sql.insert_step(now, episode_id=running.pk, index=0, model_output="reply", sampling={"t": 1.0})
    assert connection.connection is not None, "the hop's connection, kept until its next wait"
    with pytest.raises(IntegrityError):  # Django's class, as the hot path catches it (episode_loop._claim_step)
        hot_sql.insert_step(now, episode_id=running.pk, index=0, model_output="another delivery")
    row = hot_sql.episode_row(running.pk, ("status", "updated_at", "attempt"))
    assert row == (running.status, Episode.objects.get(pk=running.pk).updated_at, running.attempt)
    assert row[1].tzinfo is not None
    stored = Step.objects.get(pk=step_id)
    assert (stored.created_at, stored.sampling, stored.model_output) == (now, {"t": 1.0}, "reply")

    with transaction.atomic():
        hot_sql.insert_step(now, episode_id=running.pk, index=1, model_output="rolled back")
        transaction.set_rollback(True)
    assert not Step.objects.filter(episode=running, index=1).exists(), "it ran inside the transaction"
    with CaptureQueriesContext(connection) as logged:
        hot_sql.episode_row(running.pk, ("status",))
    assert len(logged) == 1
