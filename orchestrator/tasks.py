"""Celery tasks of the control plane (queue ``agent``)."""

from celery import shared_task

from orchestrator import replies


@shared_task(name="orchestrator.deliver_reply")
def deliver_reply(result, inbox: str) -> None:
    """Link callback: push the linked task's return value into ``inbox`` (see orchestrator/replies.py)."""
    replies.deliver(inbox, result)
