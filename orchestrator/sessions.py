"""Episode-bound sessions: a secret base URL that makes an agent framework's model calls the turns of one episode.

A framework agent (orchestrator/framework_loop.py) is handed ``<gateway>/v1/episodes/<secret>``; the gateway
(modelserving/episode_gateway.py) finds the episode by the secret's SHA-256 (only the hash is stored), checks
that the episode still runs and has budget left, and has a model worker serve the call as a turn
(``modelserving.session_turn``), which records it here as a Step row with the token-level fields of a built-in
agent's turn. The framework's commands come back through the Environment Service (``envs.session_exec``) and
complete that step with what they ran and printed.

The secret grants one attempt of one episode: a new attempt opens a new session, and the old secret no longer
finds anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError
from django.db.models import F
from django.utils import timezone

from modelserving.backend import Generation
from modelserving.token_prompts import PreviousTurn, TurnPrompt
from orchestrator import transitions
from orchestrator.models import Episode, Run, Step


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
    row = (
        Episode.objects.filter(session_key=session_key(secret))
        .select_related("run")
        .only(
            "pk", "attempt", "status", "task_id", "step_count", "prompt_tokens", "completion_tokens", "started_at",
            "run__max_steps", "run__max_episode_tokens", "run__episode_time_limit_s", "run__model_name",
        )
        .first()
    )  # fmt: skip
    if row is None or not secret:
        return None
    tokens = row.prompt_tokens + row.completion_tokens
    return Session(row.pk, row.attempt, row.status, row.run, row.task_id, row.step_count, tokens, row.started_at)


# --- the turns of a session ------------------------------------------------------------------------------------


def previous_turn(episode_id: int) -> PreviousTurn | None:
    """The session's last turn as the model saw and answered it: its whole conversation (rebuilt from each
    step's added messages), its reply as an assistant message, and its prompt + completion ids (None where a
    turn had none). None before the first turn."""
    rows = Step.objects.filter(episode_id=episode_id).order_by("index")
    messages: list[dict] = []
    ids: list[int] | None = []
    last = None
    for added, consistent, reply, calls, prefix_len, appended, completion in rows.values_list(
        "model_input", "prefix_consistent", "model_output", "tool_calls", "prompt_prefix_len", "prompt_ids",
        "completion_ids",
    ):  # fmt: skip
        if consistent and last is not None:
            messages = [*messages, last.reply_message, *added]
        else:
            messages = list(added)  # the first turn, or one rendered whole
        ids = None if ids is None or appended is None or completion is None else ids[: prefix_len or 0] + appended
        ids = None if ids is None else ids + completion
        last = PreviousTurn(messages, reply, None, tool_calls=calls)
    if last is None:
        return None
    return dataclasses.replace(last, ids=ids)


def record_turn(
    episode_id: int,
    attempt: int,
    prompt: TurnPrompt,
    generation: Generation,
    sampling: dict,
    model: str,
    tools: list | None,
) -> int | None:
    """The call as the next step of the episode, and its tokens counted against the episode's budget; None when
    the episode stopped running meanwhile (nothing is recorded then)."""
    now = timezone.now()
    fields = dict(
        model_input=prompt.new_messages,
        model_output=generation.text,
        tool_calls=generation.tool_calls or None,
        prompt_prefix_len=prompt.prefix_len,
        prompt_ids=prompt.appended_ids,
        completion_ids=generation.token_ids,
        logprobs=generation.logprobs,
        prefix_consistent=prompt.consistent,
        finish_reason=generation.finish_reason,
        sampling={**sampling, **({"tools": tools} if tools else {})},
        model_name=model,
        model_version=generation.model_version,
        model_latency_s=generation.latency_s,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        completed_at=now,  # a turn is whole once recorded; the commands it asks for add to it
    )
    for _ in range(3):  # two calls of one session at once race for the next index; the unique index decides
        index = Step.objects.filter(episode_id=episode_id).count()
        try:
            Step.objects.create(episode_id=episode_id, index=index, **fields)
            break
        except IntegrityError:
            continue
    else:
        return None
    counted = Episode.objects.filter(pk=episode_id, status=Episode.Status.RUNNING, attempt=attempt).update(
        step_count=F("step_count") + 1,
        prompt_tokens=F("prompt_tokens") + generation.prompt_tokens,
        completion_tokens=F("completion_tokens") + generation.completion_tokens,
        cost_prompt_tokens=F("cost_prompt_tokens") + generation.prompt_tokens,
        cost_completion_tokens=F("cost_completion_tokens") + generation.completion_tokens,
        model_s=F("model_s") + generation.latency_s,
        updated_at=now,
    )
    if not counted:
        Step.objects.filter(episode_id=episode_id, index=index).delete()
        return None
    return index


def record_command(episode_id: int, attempt: int, command: str, output: str, exit_code: int | None, seconds: float):
    """A command the framework ran, added to the episode's last turn (a reply with several tool calls runs
    several); False when the episode no longer runs this attempt."""
    step = Step.objects.filter(episode_id=episode_id).order_by("-index").only("pk", "action", "observation").first()
    if step is None or not Episode.objects.filter(pk=episode_id, attempt=attempt, status=Episode.Status.RUNNING).update(
        updated_at=timezone.now(), env_worker_s=F("env_worker_s") + seconds
    ):
        return False
    Step.objects.filter(pk=step.pk).update(
        action="\n".join(filter(None, [step.action, command])),
        observation="\n".join(filter(None, [step.observation, output])),
        exit_code=exit_code,
        env_latency_s=F("env_latency_s") + seconds if step.action else seconds,
        completed_at=timezone.now(),
    )
    return True
