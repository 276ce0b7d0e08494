"""The smallest set of rows an episode needs (a dataset, one task, a run of it), for tests that work on episodes
directly."""

from orchestrator.models import Dataset, Episode, Run, Task


def new_episode(status: str = Episode.Status.QUEUED, image: str = "", **run_fields) -> Episode:
    """Episode 0 of a new run (``run_fields``) of a one-task dataset (the task's ``image``), in ``status``."""
    dataset = Dataset.objects.create(name="d")
    task = Task.objects.create(dataset=dataset, instance_id="t-1", problem_statement="p", test_command="true",
                               image=image)  # fmt: skip
    run = Run.objects.create(model_name="sim", **run_fields)
    run.tasks.add(task)
    return Episode.objects.create(run=run, task=task, sample_index=0, status=status)
