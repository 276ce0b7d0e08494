"""Episode state changes that more than one service makes."""

from django.utils import timezone

from orchestrator.models import Episode


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
