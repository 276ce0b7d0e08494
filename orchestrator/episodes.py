"""Episode state changes that more than one service makes."""

from django.db import transaction
from django.utils import timezone

from orchestrator.models import Episode, Step


def record_failure(episode_id: int, reason: str, status: str = Episode.Status.FAILED) -> bool:
    """Mark a live episode failed (or timed out, cancelled) with its reason; a finished one is left as it is.
    Returns whether the episode changed."""
    now = timezone.now()
    changed = (
        Episode.objects.filter(pk=episode_id)
        .exclude(status__in=Episode.TERMINAL)
        .update(status=status, failure_reason=reason[:4000], finished_at=now, updated_at=now)
    )
    return bool(changed)


def fail_or_retry(episode_id: int, reason: str, retryable: bool, status: str = Episode.Status.FAILED) -> str:
    """Record a failure; a retryable one (infrastructure, not the agent's doing) puts the episode back in the
    queue for a fresh attempt while the run's ``max_attempts`` allows. Returns "retrying", "failed" or
    "unchanged" (the episode had already ended). The caller releases the sandbox either way."""
    with transaction.atomic():
        episode = Episode.objects.select_for_update().select_related("run").filter(pk=episode_id).first()
        if episode is None or episode.is_terminal:
            return "unchanged"
        if not retryable or episode.attempt >= episode.run.max_attempts:
            record_failure(
                episode_id, reason if episode.attempt == 1 else f"attempt {episode.attempt}: {reason}", status
            )
            return "failed"
        # A fresh attempt: a new sandbox and an empty trajectory; messages of the old attempt are dropped
        # because they carry its number (agents/episode_loop.py).
        Step.objects.filter(episode_id=episode_id).delete()
        Episode.objects.filter(pk=episode_id).update(
            status=Episode.Status.QUEUED,
            attempt=episode.attempt + 1,
            failure_reason=f"attempt {episode.attempt} failed: {reason}"[:4000],
            container_id="",
            step_count=0,
            prompt_tokens=0,
            completion_tokens=0,
            started_at=None,
            updated_at=timezone.now(),
        )
        return "retrying"
