"""Gold validation of a stored dataset on an env worker, its progress written to a ``DatasetValidation`` row as
each task finishes (the API's ``POST /datasets/{id}/validate/`` starts it)."""

from __future__ import annotations

from django.utils import timezone

from envs import gold_check
from envs.backend import SandboxError, get_backend
from orchestrator.models import DatasetValidation

State = DatasetValidation.State


def validate_dataset(validation_id: int, parallel: int = 4) -> str:
    """Gold-check every task of the validation's dataset; returns the validation's final state."""
    claimed = DatasetValidation.objects.filter(pk=validation_id, state=State.QUEUED).update(state=State.RUNNING)
    if not claimed:
        return DatasetValidation.objects.values_list("state", flat=True).get(pk=validation_id)
    validation = DatasetValidation.objects.select_related("dataset").get(pk=validation_id)
    rows = DatasetValidation.objects.filter(pk=validation_id)
    done: list[dict] = []

    def record(result: gold_check.GoldResult) -> None:
        # check_tasks calls this from its own thread, one result at a time, as each task finishes.
        done.append({"instance_id": result.instance_id, "ok": result.ok, "problems": result.problems,
                     "seconds": round(result.seconds, 2)})  # fmt: skip
        rows.update(results=done)

    try:
        gold_check.check_tasks(get_backend(), validation.dataset.tasks.order_by("instance_id"), parallel, record)
    except SandboxError as error:
        rows.update(state=State.ERROR, error=error.reason, finished_at=timezone.now())
        return State.ERROR
    rows.update(state=State.DONE, finished_at=timezone.now())
    return State.DONE
