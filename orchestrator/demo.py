"""The embedded demo's episodes, for as much of MegaFlow as exists.

Until the Agent Service's episode loop lands, the demo replays each task's reference patch straight through
the Environment Service: per episode, one chain of env tasks linked by Celery callbacks (start the sandbox →
apply the patch → evaluate → report), so nothing waits on anything and every episode runs in a real
container, leaving its Run, Episode rows and rewards in the database.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from orchestrator import replies
from orchestrator.models import Dataset, Episode, Run


@dataclass
class DemoEpisode:
    instance_id: str
    sample: int
    reward: float | None
    status: str
    seconds: float
    reason: str


def replay_command(patch: str) -> str:
    encoded = base64.b64encode(patch.encode()).decode()
    return f"echo {encoded} | base64 -d | git apply"


def replay_through_env(dataset: Dataset, samples: int, pool: str, timeout_s: float = 600, on_done=None) -> Run:
    """Create a run of ``samples`` episodes per task and drive each through the env queue ``pool``."""
    from envs import tasks as env_tasks
    from orchestrator.tasks import deliver_reply

    tasks = list(dataset.tasks.all())
    run = Run.objects.create(
        name=f"demo: reference patches through env.{pool}", dataset=dataset, samples_per_task=samples,
        model_name="replay", env_pool=pool, max_steps=1, status=Run.Status.RUNNING,
    )  # fmt: skip
    run.tasks.set(tasks)
    episodes = Episode.objects.bulk_create(
        Episode(run=run, task=task, sample_index=sample) for task in tasks for sample in range(samples)
    )
    inbox = replies.new_inbox()
    for episode in episodes:
        report = deliver_reply.s(inbox=inbox)
        evaluate = env_tasks.evaluate.si(episode_id=episode.pk, pool=pool)
        evaluate.link(report)
        apply = env_tasks.exec_command.si(episode_id=episode.pk, pool=pool, command=replay_command(episode.task.patch))
        apply.link(evaluate)
        env_tasks.start_sandbox.apply_async(kwargs={"episode_id": episode.pk, "pool": pool}, link=apply)
    deadline = time.monotonic() + timeout_s
    for _ in episodes:
        if replies.wait_for_reply(inbox, max(1.0, deadline - time.monotonic())) is None:
            break
        if on_done:
            on_done()
    Run.objects.filter(pk=run.pk).update(status=Run.Status.COMPLETED)
    return run


def summarize(run: Run) -> list[DemoEpisode]:
    rows = []
    for episode in run.episodes.select_related("task").order_by("task__instance_id", "sample_index"):
        began, ended = episode.started_at, episode.finished_at
        seconds = (ended - began).total_seconds() if began and ended else float("nan")
        rows.append(DemoEpisode(episode.task.instance_id, episode.sample_index, episode.reward, episode.status, seconds,
                                episode.failure_reason))  # fmt: skip
    return rows
