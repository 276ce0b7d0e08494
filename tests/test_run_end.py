"""An episode's end asks whether its run has an unfinished episode left (orchestrator/runs.episode_done, through
hot_sql.run_of_episode): every unfinished status counts, other runs' episodes do not, and the question stays an index
probe at a run's end, when the statistics still say most episodes are live. Real database."""

import pytest
from django.db import connection

from orchestrator import hot_sql, runs, transitions
from orchestrator.models import Episode, Run
from tests.support.records import new_episode

pytestmark = pytest.mark.django_db

S = Episode.Status


@pytest.fixture
def run():
    first = new_episode(status=S.SUCCEEDED, samples_per_task=12)
    Episode.objects.bulk_create(
        Episode(run=first.run, task=first.task, sample_index=index, status=S.SUCCEEDED) for index in range(1, 12)
    )
    return first.run


def ended(run: Run) -> int:
    return run.episodes.order_by("pk").first().pk


def newest(run: Run):
    """The run's newest episode, as a queryset to update."""
    return Episode.objects.filter(pk=run.episodes.order_by("-pk").values("pk")[:1])


@pytest.mark.parametrize("status", sorted(transitions.UNFINISHED))
def test_any_episode_of_the_run_in_an_unfinished_status_keeps_it_open(run, status):
    newest(run).update(status=status)
    assert hot_sql.run_of_episode(ended(run), transitions.UNFINISHED) == (run.pk, True)


def test_a_run_whose_episodes_all_ended_is_finished_whatever_other_runs_do(run):
    other = Run.objects.create(model_name="sim")
    Episode.objects.create(run=other, task=run.tasks.get(), sample_index=0, status=S.RUNNING)
    newest(run).update(status=S.FAILED)
    assert hot_sql.run_of_episode(ended(run), transitions.UNFINISHED) == (run.pk, False)


def test_an_episode_end_asks_about_every_unfinished_status(run):
    assert sorted(runs.UNFINISHED_LIKELIEST_FIRST) == sorted(transitions.UNFINISHED)
    newest(run).update(status=S.EVALUATING)
    run.status = Run.Status.RUNNING
    run.save(update_fields=["status"])
    runs.episode_done(ended(run))
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING  # one episode still being graded: the run goes on
    run.episodes.update(status=S.SUCCEEDED)
    runs.episode_done(ended(run))
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED


def test_an_episode_deleted_with_its_run_has_none():
    assert hot_sql.run_of_episode(2**62, transitions.UNFINISHED) is None


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's planner")
def test_at_a_runs_end_the_question_probes_the_index_not_the_table(run):
    """The statistics are from when the run's episodes were live (ANALYZE then); by its end all but the newest have
    finished. The statement, as a prepared one runs it (the generic plan), must not scan the episode table: an
    ``EXISTS (... status IN (...))`` did, reading most of it on every episode's end."""
    task = run.tasks.get()
    Episode.objects.bulk_create(Episode(run=run, task=task, sample_index=i, status=S.RUNNING) for i in range(12, 3000))
    statuses = sorted(transitions.UNFINISHED)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Episode._meta.db_table}")
        run.episodes.exclude(pk__in=newest(run)).update(status=S.SUCCEEDED)
        sql = hot_sql._run_of_episode(len(statuses))
        numbered = sql.replace("%s", "{}").format(*(f"${n}" for n in range(1, len(statuses) + 2)))
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute(f"PREPARE run_end ({', '.join(['varchar'] * len(statuses))}, bigint) AS {numbered}")
        try:
            arguments = ", ".join([*(f"'{status}'" for status in statuses), str(ended(run))])
            cursor.execute(f"EXPLAIN EXECUTE run_end ({arguments})")
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("DEALLOCATE run_end")
    assert "Seq Scan" not in plan, plan
    assert hot_sql.run_of_episode(ended(run), transitions.UNFINISHED) == (run.pk, True)
