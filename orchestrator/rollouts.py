"""Rollouts for trainers: one JSON object per ended episode, in the shapes RL trainers read (SkyRL's generator
output, verl's agent loop output), streamed as episodes end, with a cursor that resumes a broken stream.

A line holds the exact token ids the policy saw and produced: ``prompt_token_ids`` (the first prompt) and
``response_token_ids`` (every token after it: the model's turns and the environment's deltas interleaved),
``loss_mask`` (1 on model tokens), ``logprobs`` (the sampling logprobs, null where the mask is 0), the model
version of every turn, the reward and ``mask`` (true when the sample has no reward: an infrastructure failure,
a cancel, a budget that ended it before grading; the trainer drops it rather than learning a 0). Ids are never
invented: a backend without them gives nulls and ``token_ids_note`` says why.

Order and cursors: lines come in the order episodes ended (``finished_at``, then id); with
``group_complete`` a task's samples come together once all of them ended, in the order groups completed.
Every line carries the ``cursor`` to resume after it (in group mode, after its whole group). Episodes that
ended in the last ``MEGAFLOW_ROLLOUTS_SETTLE_S`` are held back, so one committed late never falls behind a
cursor. An episode retried after it ended (``retry-failed``) ends again later and comes again, with its new
``attempt``: (episode_id, attempt) identifies a line.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, Max, Prefetch, Q
from django.utils import timezone

from agents.agent import submitted
from orchestrator.models import Episode, Run, Step

BATCH = 100
POLL_S = 0.5

STEP_FIELDS = ("index", "action", "observation", "model_latency_s", "env_latency_s", "completed_at",
               "prompt_prefix_len", "prompt_ids", "completion_ids", "logprobs", "prefix_consistent", "finish_reason",
               "sampling", "model_name", "model_version")  # fmt: skip

# An episode stopped by its run's max_staleness (episode_loop._stale), on its last attempt or an earlier one.
STALE = re.compile(r"(attempt \d+: )?stale: ")


class BadCursor(ValueError):
    """A cursor that is malformed, of the other mode, or names nothing in this run."""


@dataclass(frozen=True)
class Cursor:
    """A position in a run's rollouts: after what ended at ``at`` with id ``key`` (an episode, or in group mode a
    task)."""

    groups: bool
    at: datetime
    key: int

    def encode(self) -> str:
        raw = f"{'g' if self.groups else 'e'}|{self.at.isoformat()}|{self.key}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, run: Run, groups: bool) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            mode, at, key = raw.split("|")
            cursor = cls(mode == "g", datetime.fromisoformat(at), int(key))
            if mode not in ("e", "g") or cursor.at.tzinfo is None:
                raise ValueError(mode)
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise BadCursor("is not a cursor of this API") from None
        if cursor.groups != groups:
            raise BadCursor(f"is a cursor of the {'group' if cursor.groups else 'episode'} stream (group_complete)")
        named = run.episodes.filter(task_id=cursor.key) if groups else run.episodes.filter(pk=cursor.key)
        if not named.exists():
            raise BadCursor(f"names no {'task' if groups else 'episode'} of run {run.pk}")
        return cursor


# --- one line ----------------------------------------------------------------------------------------------------


def stop_reason(episode: Episode, run: Run, last: Step | None) -> str:
    """Why the episode stopped: submitted, max_steps, token_budget, time_limit, context_length, or (without a
    reward) cancelled / staleness / error."""
    if episode.status == Episode.Status.TIMED_OUT:
        return "time_limit"
    if episode.status == Episode.Status.CANCELLED:
        return "cancelled"
    if episode.status != Episode.Status.SUCCEEDED:
        if STALE.match(episode.failure_reason):
            return "staleness"  # the policy moved on past the run's max_staleness (orchestrator/staleness.py)
        return "context_length" if "maximum context length" in episode.failure_reason else "error"
    if last is not None and last.action and submitted(last.observation):
        return "submitted"
    tokens = episode.prompt_tokens + episode.completion_tokens
    if run.max_episode_tokens and tokens >= run.max_episode_tokens:
        return "token_budget"
    return "max_steps"


def _turn(step: Step) -> dict:
    return {
        "index": step.index,
        "model_name": step.model_name,
        "model_version": step.model_version,
        "prompt_prefix_len": step.prompt_prefix_len,
        "prompt_ids": step.prompt_ids,
        "completion_ids": step.completion_ids,
        "logprobs": step.logprobs,
        "finish_reason": step.finish_reason,
        "sampling": step.sampling,
        "prefix_consistent": step.prefix_consistent,
        "latency_s": step.model_latency_s,
        "env_latency_s": step.env_latency_s,
    }


def token_sequence(steps: list[Step]) -> tuple[dict, str]:
    """``prompt_token_ids``, ``response_token_ids``, ``loss_mask``, ``logprobs`` of a trajectory, or nulls and
    the reason there is no single token sequence."""
    empty = dict.fromkeys(("prompt_token_ids", "response_token_ids", "loss_mask", "logprobs"))
    if not steps:
        return empty, "no model turn was recorded"
    for step in steps:
        if step.prompt_ids is None or step.completion_ids is None:
            name = step.model_name or "the model"
            return empty, f"turn {step.index}: {name} gave no token ids (its backend does not expose them)"
        if step.index > 0 and step.prefix_consistent is False:
            return empty, (
                f"turn {step.index} re-rendered the conversation (prefix_consistent false): there is no single "
                "token sequence; rebuild each turn's prompt from turns[].prompt_prefix_len and prompt_ids"
            )
    prompt = list(steps[0].prompt_ids)
    response: list[int] = []
    mask: list[int] = []
    logprobs: list[float | None] | None = []
    for step in steps:
        if step.index > 0:
            response += step.prompt_ids
            mask += [0] * len(step.prompt_ids)
            if logprobs is not None:
                logprobs += [None] * len(step.prompt_ids)
        response += step.completion_ids
        mask += [1] * len(step.completion_ids)
        if logprobs is not None:
            if step.logprobs is None or len(step.logprobs) != len(step.completion_ids):
                logprobs = None  # sampled without logprobs (the run's sampling turned them off)
            else:
                logprobs += step.logprobs
    return {"prompt_token_ids": prompt, "response_token_ids": response, "loss_mask": mask, "logprobs": logprobs}, ""


def rollout(episode: Episode, run: Run, steps: list[Step]) -> dict:
    """The rollout line of an ended episode (``steps``: its Step rows, in order)."""
    tokens, note = token_sequence(steps)
    versions: list[str] = []
    for step in steps:
        if step.model_version and step.model_version not in versions:
            versions.append(step.model_version)
    masked = episode.status != Episode.Status.SUCCEEDED or episode.reward is None
    return {
        "run_id": run.pk,
        "episode_id": episode.pk,
        "instance_id": episode.task.instance_id,
        "group": episode.task_id,
        "group_size": run.samples_per_task,
        "sample_index": episode.sample_index,
        "attempt": episode.attempt,
        "status": episode.status,
        "reward": episode.reward,
        "failure_reason": episode.failure_reason,
        "mask": masked,
        "stop_reason": stop_reason(episode, run, steps[-1] if steps else None),
        "model_versions": versions,
        **tokens,
        "token_ids_note": note or None,
        "num_turns": len(steps),
        "turns": [_turn(step) for step in steps],
    }


def _with_steps(episodes):
    steps = Step.objects.only("episode_id", *STEP_FIELDS).order_by("index")
    return episodes.select_related("task").prefetch_related(Prefetch("steps", queryset=steps))


def _line(record: dict, cursor: Cursor) -> str:
    return json.dumps({**record, "cursor": cursor.encode()}, ensure_ascii=False) + "\n"


# --- the stream ----------------------------------------------------------------------------------------------------


def _ended_episodes(run: Run, after: Cursor | None, settled: datetime) -> list[tuple[Episode, Cursor]]:
    query = run.episodes.filter(status__in=Episode.TERMINAL, finished_at__lte=settled)
    if after is not None:
        query = query.filter(Q(finished_at__gt=after.at) | Q(finished_at=after.at, pk__gt=after.key))
    episodes = list(_with_steps(query).order_by("finished_at", "pk")[:BATCH])
    return [(episode, Cursor(False, episode.finished_at, episode.pk)) for episode in episodes]


def _complete_groups(run: Run, after: Cursor | None, settled: datetime) -> list[tuple[Episode, Cursor]]:
    groups = (
        run.episodes.values("task_id")
        .annotate(done_at=Max("finished_at"), unfinished=Count("pk", filter=~Q(status__in=Episode.TERMINAL)))
        .filter(unfinished=0, done_at__lte=settled)
    )
    if after is not None:
        groups = groups.filter(Q(done_at__gt=after.at) | Q(done_at=after.at, task_id__gt=after.key))
    chosen = list(groups.order_by("done_at", "task_id").values_list("task_id", "done_at")[: max(1, BATCH // 8)])
    if not chosen:
        return []
    cursors = {task_id: Cursor(True, done_at, task_id) for task_id, done_at in chosen}
    episodes = _with_steps(run.episodes.filter(task_id__in=cursors)).order_by("task_id", "sample_index")
    order = {task_id: position for position, (task_id, _) in enumerate(chosen)}
    ordered = sorted(episodes, key=lambda episode: (order[episode.task_id], episode.sample_index))
    return [(episode, cursors[episode.task_id]) for episode in ordered]


def stream(
    run: Run,
    cursor: Cursor | None = None,
    group_complete: bool = False,
    follow: bool = True,
    wait_s: float = 3600,
    settle_s: float | None = None,
) -> Iterator[str]:
    """JSON lines of the run's ended episodes after ``cursor``. ``follow``: keep the stream open for episodes
    still to end, until the run is over and everything is out (or ``wait_s`` passed: resume with the last
    cursor). Never holds more than a batch in memory."""
    settle = timedelta(seconds=settings.MEGAFLOW_ROLLOUTS_SETTLE_S if settle_s is None else settle_s)
    fetch = _complete_groups if group_complete else _ended_episodes
    deadline = time.monotonic() + wait_s
    while True:
        now = timezone.now()
        run_over = Run.objects.filter(pk=run.pk, status__in=Run.TERMINAL).exists()
        batch = fetch(run, cursor, now - settle)
        for episode, position in batch:
            yield _line(rollout(episode, run, list(episode.steps.all())), position)
            cursor = position
        if batch:
            continue
        if not follow or time.monotonic() > deadline:
            return
        if run_over and not run.episodes.filter(finished_at__gt=now - settle).exists():
            return  # over, and nothing ended too recently to have been read
        time.sleep(POLL_S)
