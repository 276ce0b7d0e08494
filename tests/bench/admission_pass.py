"""One admission pass with many live episodes and nothing queued: what every episode's end asks for once a run's
episodes are all in (agents/README.md, twelfth stop)::

    python -m tests.bench.admission_pass [--live 10000] [--passes 200]

Its own database on ``DATABASE_URL``'s server (``megaflow_bench_admission``, kept between runs while ``--live``
stays the same) and the configured Redis's admission keys. Prints the wall time of a pass and the PostgreSQL rows
it returned and fetched (``pg_stat_database``). To compare two commits, run it from a worktree of each.
"""

from __future__ import annotations

import argparse
import os
import time

BENCH_DATABASE = "megaflow_bench_admission"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=10_000, help="running episodes of one running run")
    parser.add_argument("--passes", type=int, default=200)
    args = parser.parse_args()
    server = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/megaflow").rsplit("/", 1)[0]
    os.environ["DATABASE_URL"] = f"{server}/{BENCH_DATABASE}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "megaflow_site.settings")
    import django

    from tests.support.databases import ensure_database

    ensure_database(os.environ["DATABASE_URL"])
    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from orchestrator import runs
    from orchestrator.models import Dataset, Episode, Run, Task

    call_command("migrate", verbosity=0)
    name = f"admission pass, {args.live} live"
    if not Run.objects.filter(name=name, status=Run.Status.RUNNING).exists():
        Run.objects.filter(status=Run.Status.RUNNING).update(status=Run.Status.CANCELLED)
        dataset, _ = Dataset.objects.get_or_create(name="admission-pass")
        task, _ = Task.objects.get_or_create(dataset=dataset, instance_id="pass", defaults={
            "problem_statement": "p", "test_command": "true"})  # fmt: skip
        run = Run.objects.create(name=name, dataset=dataset, model_name="sim", status=Run.Status.RUNNING,
                                 samples_per_task=args.live, max_concurrent_episodes=args.live)  # fmt: skip
        run.tasks.add(task)
        Episode.objects.filter(status__in=[Episode.Status.RUNNING, Episode.Status.QUEUED]).delete()
        Episode.objects.bulk_create((Episode(run=run, task=task, sample_index=index, status=Episode.Status.RUNNING)
                                     for index in range(args.live)), batch_size=2000)  # fmt: skip
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")

    def rows() -> tuple[int, int]:
        time.sleep(1)  # the backends' counters reach pg_stat_database when their transactions end, within a second
        with connection.cursor() as cursor:
            cursor.execute("SELECT tup_returned, tup_fetched FROM pg_stat_database WHERE datname = current_database()")
            return cursor.fetchone()

    runs._admit_once()  # warm: statistics, connections, plans
    returned, fetched = rows()
    began = time.perf_counter()
    for _ in range(args.passes):
        assert runs._admit_once() == [], "nothing is queued"
    seconds = (time.perf_counter() - began) / args.passes
    returned_after, fetched_after = rows()
    print(f"{args.live} live, nothing queued: {seconds * 1000:.2f} ms a pass, PostgreSQL rows returned "
          f"{(returned_after - returned) / args.passes:.0f} and fetched {(fetched_after - fetched) / args.passes:.0f} "
          f"a pass")  # fmt: skip


if __name__ == "__main__":
    main()
