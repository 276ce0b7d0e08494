"""Episode-bound sessions: a secret base URL that makes an agent framework's model calls the turns of one episode.

A framework agent (orchestrator/framework_loop.py) is handed ``<gateway>/v1/episodes/<secret>``; the gateway
(modelserving/episode_gateway.py) finds the episode by the secret's SHA-256 (only the hash is stored), checks
that the episode still runs and has budget left, and has a model worker serve the call as a turn
(``modelserving.session_turn``), which records it as a Step row with the token-level fields of a built-in agent's
turn. The framework's commands come back through the Environment Service (``envs.session_exec``) and complete that
step with what they ran and printed (both in orchestrator/framework_loop.py).

The secret grants one attempt of one episode: a new attempt opens a new session, and the old secret no longer
finds anything.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from orchestrator import transitions
from orchestrator.models import Episode, Run


def session_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def open_session(episode_id: int, attempt: int) -> str | None:
    """A new secret bound to this attempt of the episode, or None when it already has one (a redelivery of its
    framework task, whose first holder died) or no longer runs."""
    secret = secrets.token_urlsafe(32)
    return secret if transitions.open_session(episode_id, attempt, session_key(secret)) else None


@dataclass(frozen=True)
class Session:
    """What the gateway knows of the episode behind a secret."""

    episode_id: int
    attempt: int
    status: str
    run: Run
    task_id: int
    step_count: int
    tokens: int
    started_at: object

    def refusal(self) -> tuple[str, str] | None:
        """(code, message) when this episode may take no more model calls; None while it may."""
        if self.status != Episode.Status.RUNNING:
            return "episode_ended", f"episode {self.episode_id} is {self.status}: its session takes no more calls"
        run = self.run
        if self.step_count >= run.max_steps:
            return "episode_budget_exhausted", f"episode {self.episode_id} used its {run.max_steps} turns"
        if run.max_episode_tokens and self.tokens >= run.max_episode_tokens:
            return "episode_budget_exhausted", f"episode {self.episode_id} used its {run.max_episode_tokens} tokens"
        if self.started_at and timezone.now() - self.started_at > timedelta(seconds=run.episode_time_limit_s):
            return "episode_budget_exhausted", (
                f"episode {self.episode_id} is past its wall-clock budget of {run.episode_time_limit_s} s"
            )
        return None


def find_session(secret: str) -> Session | None:
    if not secret:
        return None
    row = (
        Episode.objects.filter(session_key=session_key(secret))
        .select_related("run")
        .only(
            "pk", "attempt", "status", "task_id", "step_count", "prompt_tokens", "completion_tokens", "started_at",
            "run__max_steps", "run__max_episode_tokens", "run__episode_time_limit_s", "run__model_name",
        )
        .first()
    )  # fmt: skip
    if row is None:
        return None
    tokens = row.prompt_tokens + row.completion_tokens
    return Session(row.pk, row.attempt, row.status, row.run, row.task_id, row.step_count, tokens, row.started_at)
