"""The orphan reaper: removes MegaFlow containers that no live episode owns.

It runs at env-worker start and every ``MEGAFLOW_REAPER_INTERVAL_S`` (Celery beat), on the daemon its worker
uses, and decides from the database, which every worker shares. Only this deployment's containers (label
``megaflow.deployment``) are judged. A container is kept while it is younger than ``MEGAFLOW_REAPER_GRACE_S``
(its episode row may not show it yet), while it is an idle warm container, or while a non-terminal episode
holds it. Everything else labelled ``megaflow.managed`` goes: containers of finished, cancelled or unknown
episodes, stopped containers, warm containers nobody returned.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings

from envs import warm_pool
from envs.backend import SandboxError
from envs.docker_backend import (
    LABEL_CREATED,
    LABEL_DEPLOYMENT,
    LABEL_EPISODE,
    LABEL_MANAGED,
    LABEL_MODE,
    DockerBackend,
)
from orchestrator.models import Episode

logger = logging.getLogger("megaflow.envs.reaper")


def _live_episode_containers(ids: set[int]) -> dict[int, str]:
    """Live episode id → the container it holds now ("" between attempts)."""
    live = Episode.objects.filter(pk__in=ids).exclude(status__in=Episode.TERMINAL)
    return dict(live.values_list("pk", "container_id"))


def _held_by_live_episode(container_ids: set[str]) -> set[str]:
    held = Episode.objects.filter(container_id__in=container_ids).exclude(status__in=Episode.TERMINAL)
    return set(held.values_list("container_id", flat=True))


def orphan_reasons(containers: list[dict], grace_s: float, now: float | None = None) -> dict[str, str]:
    """Container id → why it is an orphan, for the ones to remove; ``containers`` are Docker list entries."""
    now = now or time.time()
    candidates = []
    for entry in containers:
        labels = entry.get("Labels") or {}
        created = float(labels.get(LABEL_CREATED) or entry.get("Created") or now)
        if now - created >= grace_s:
            candidates.append((entry, labels))
    episode_ids = {
        int(labels[LABEL_EPISODE]) for _, labels in candidates if (labels.get(LABEL_EPISODE) or "").isdigit()
    }
    live_episodes = _live_episode_containers(episode_ids)
    held = _held_by_live_episode({entry["Id"] for entry, _ in candidates})

    reasons = {}
    for entry, labels in candidates:
        container_id = entry["Id"]
        if entry.get("State") != "running":
            reasons[container_id] = f"container is {entry.get('State')}"
        elif container_id in held:
            continue
        elif labels.get(LABEL_MODE) == "warm":
            if not warm_pool.is_idle_warm(container_id):
                reasons[container_id] = "warm container neither idle nor held by a live episode"
        else:
            episode = labels.get(LABEL_EPISODE) or ""
            if not episode.isdigit():
                reasons[container_id] = "container names no episode"
            elif int(episode) not in live_episodes:
                reasons[container_id] = f"episode {episode} is finished or unknown"
            elif live_episodes[int(episode)] != container_id:
                reasons[container_id] = f"episode {episode} has moved on to another sandbox (a new attempt)"
    return reasons


def reap_orphans(backend: DockerBackend, grace_s: float) -> dict[str, str]:
    """Remove every orphaned MegaFlow container on the backend's daemon; returns id → reason."""
    labels = [f"{LABEL_MANAGED}=1", f"{LABEL_DEPLOYMENT}={settings.MEGAFLOW_DEPLOYMENT}"]
    containers = backend.api.containers(all=True, filters={"label": labels})
    reasons = orphan_reasons(containers, grace_s)
    for container_id, reason in reasons.items():
        try:
            backend.destroy(container_id)
        except SandboxError as error:  # the daemon is busy; the next round tries again
            logger.info("could not reap %s: %s", container_id[:12], error.reason)
            continue
        warm_pool.forget(container_id)
        logger.info("reaped container %s: %s", container_id[:12], reason)
    return reasons
