"""What episodes and runs cost: sandbox-seconds, env-worker-seconds, model-seconds, tokens, image pulls and bytes.

The counters live on the episode (every attempt's cost is counted: a retried attempt was paid for too) and a run's
cost is their sum. The episode loop adds to them where the time is spent (orchestrator/episode_loop.py): a start
adds its pull and its worker time, each step its model time, tokens and worker time, and an evaluation its worker
time and the sandbox's seconds, each in the UPDATE it makes anyway (the start's and the evaluation's in their
transitions, ``increments``); each release of a sandbox adds the seconds it was held. The API, the admin, /metrics and
``megaflow status`` read them through ``episode_cost`` and ``run_cost``.
"""

from __future__ import annotations

from django.db.models import FloatField, Sum, Value
from django.db.models.functions import Coalesce

from orchestrator import hot_sql
from orchestrator.models import Episode

# The cost's name in the API → the episode's field.
FIELDS = {
    "sandbox_s": "sandbox_s",
    "env_worker_s": "env_worker_s",
    "model_s": "model_s",
    "prompt_tokens": "cost_prompt_tokens",
    "completion_tokens": "cost_completion_tokens",
    "image_pulls": "image_pulls",
    "image_pull_bytes": "image_pull_bytes",
    "image_pull_s": "image_pull_s",
}
_SECONDS = {"sandbox_s", "env_worker_s", "model_s", "image_pull_s"}


def charge(episode_id: int, **amounts: float) -> None:
    """Add ``amounts`` (episode field → amount) to the episode's counters, in one UPDATE; zeros are skipped."""
    if adding := increments(**amounts):
        hot_sql.update_episode(episode_id, add=adding)


def increments(**amounts: float) -> dict:
    """``amounts`` as what an episode UPDATE adds (zeros skipped), for a transition that charges in the statement it
    makes anyway (``add`` of orchestrator/transitions.py)."""
    return {name: amount for name, amount in amounts.items() if amount}


def pull_charges(pulled: bool, seconds: float, downloaded: int) -> dict:
    """The counters a start's image pull adds (a start that waited on another's pull pays its wait, not a pull)."""
    return {"image_pulls": int(pulled), "image_pull_bytes": downloaded, "image_pull_s": seconds}


def _rounded(name: str, value) -> float | int:
    return round(float(value or 0), 3) if name in _SECONDS else int(value or 0)


def episode_cost(episode: Episode) -> dict:
    """The episode's cost, under the API's names."""
    return {name: _rounded(name, getattr(episode, field)) for name, field in FIELDS.items()}


def run_cost(run_id: int) -> dict:
    """The sum of the run's episodes' costs, under the API's names."""
    return totals(Episode.objects.filter(run_id=run_id))


def totals(episodes) -> dict:
    """The summed cost of an episode queryset."""
    sums = episodes.aggregate(
        **{name: Coalesce(Sum(field), Value(0), output_field=FloatField()) for name, field in FIELDS.items()}
    )
    return {name: _rounded(name, sums[name]) for name in FIELDS}


def format_cost(cost: dict) -> str:
    """One line for people: ``megaflow status`` and the admin."""
    return (
        f"sandbox {cost['sandbox_s']:.1f} s · env workers {cost['env_worker_s']:.1f} s · model {cost['model_s']:.1f} s"
        f" · tokens {cost['prompt_tokens']} in / {cost['completion_tokens']} out"
        f" · image pulls {cost['image_pulls']} ({cost['image_pull_bytes'] / 1e6:.1f} MB, {cost['image_pull_s']:.1f} s)"
    )
