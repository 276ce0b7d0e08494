"""``manage.py megaflow run`` and ``status``: a run from the command line, followed to its end on real workers."""

import pytest
from django.core.management import CommandError, call_command

from orchestrator.models import Run


def test_a_bad_run_option_is_one_clear_error(db, swe_mini):
    with pytest.raises(CommandError, match=r"^model_name: unknown model 'nope'"):
        call_command("megaflow", "run", "swe_mini", "--model", "nope")
    with pytest.raises(CommandError, match=r"^instance_ids: not in swe_mini: missing-1"):
        call_command("megaflow", "run", "swe_mini", "--tasks", "missing-1")
    assert not Run.objects.exists()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_run_follows_a_run_to_its_summary_and_status_lists_it(celery_workers, swe_mini, capsys):
    call_command("megaflow", "run", "swe_mini", "--tasks", "kvconf-1", "calendarx-2", "--samples", "2", "--model",
                 "replay", "--name", "from-cli")  # fmt: skip
    out = capsys.readouterr().out
    run = Run.objects.get(name="from-cli")
    assert run.status == Run.Status.COMPLETED
    assert f"run {run.pk}: 4 episodes (2 tasks x 2)" in out
    assert f"run {run.pk} completed: 4 succeeded" in out and "mean reward 1.000, success rate 1.000" in out

    call_command("megaflow", "status")
    listing = capsys.readouterr().out
    assert any(line.split()[:4] == [str(run.pk), "completed", "4/4", "1.000"] for line in listing.splitlines())
    assert "queues: agent 0" in listing


@pytest.mark.integration
def test_validate_prints_each_tasks_outcome_and_reason_as_a_table(swe_mini, capsys):
    from orchestrator.models import Dataset, Task

    quiet = Dataset.objects.create(name="quiet")
    for task in swe_mini.tasks.filter(instance_id__in=["calendarx-1", "kvconf-1"]):
        task.pk, task.dataset = None, quiet
        if task.instance_id == "kvconf-1":
            task.test_command = "python3 -m pytest -q -p no:cacheprovider"
        task.save()
    assert Task.objects.filter(dataset=quiet).count() == 2
    with pytest.raises(CommandError, match="1 task\\(s\\) failed gold validation"):
        call_command("megaflow", "validate", "quiet", "--parallel", "2")
    header, *rows, last = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["task", "outcome", "seconds", "reason"]
    valid, invalid = (row.split(maxsplit=3) for row in rows)
    assert valid[:2] == ["calendarx-1", "valid"] and valid[3] == "-"
    assert invalid[:2] == ["kvconf-1", "INVALID"] and "add -rA" in invalid[3] and "base tree:" in invalid[3]
    assert last == "validate quiet: 1 of 2 tasks valid"
