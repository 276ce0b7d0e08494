"""Trajectories for trainers: a run exported as JSONL, one episode per line.

Each line carries the task id, the sample, the chat messages exactly as the agent built them for the model
(system, instance, then every reply and observation), the actions and observations step by step, the reward,
the token counts, the episode's cost (orchestrator/costs.py) and, for an episode that did not finish well, why.
Episodes are streamed in batches so a run of thousands never sits in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from agents.agent import TaskView, Turn, run_agent
from orchestrator import costs
from orchestrator.models import Episode, Run

BATCH = 200


def episode_record(episode: Episode, agent) -> dict:
    steps = [step for step in episode.steps.all() if step.completed_at]
    task = episode.task
    turns = [Turn(step.model_output, step.observation) for step in steps]
    return {
        "run_id": episode.run_id,
        "episode_id": episode.pk,
        "instance_id": task.instance_id,
        "sample": episode.sample_index,
        "attempt": episode.attempt,
        "status": episode.status,
        "reward": episode.reward,
        "messages": agent.messages(TaskView(task.instance_id, task.problem_statement, task.workdir), turns),
        "actions": [step.action for step in steps],
        "observations": [step.observation for step in steps],
        "exit_codes": [step.exit_code for step in steps],
        "prompt_tokens": episode.prompt_tokens,
        "completion_tokens": episode.completion_tokens,
        "failure_reason": episode.failure_reason,
        "cost": costs.episode_cost(episode),
    }


def export_run(run: Run) -> Iterator[str]:
    """JSON lines, one per episode of ``run``, in (task, sample) order."""
    agent = run_agent(run.agent_name, run.agent_config)
    episodes = (
        run.episodes.select_related("task").prefetch_related("steps").order_by("task__instance_id", "sample_index")
    )
    for start in range(0, episodes.count(), BATCH):
        for episode in episodes[start : start + BATCH]:
            yield json.dumps(episode_record(episode, agent), ensure_ascii=False) + "\n"
