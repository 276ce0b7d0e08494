"""The episode loop on the sim environment backend, its publishes captured instead of sent: for tests that drive
hops by hand (tests/test_liveness.py, tests/test_hop_batches.py)."""

from __future__ import annotations

from envs.backend import get_backend
from orchestrator import episode_loop


def captured_loop(monkeypatch, settings, exec_latency_s: float = 0.0) -> list[tuple[str, dict]]:
    """Sandboxes on the sim backend (each command ``exec_latency_s``), fresh per-process caches, and what the loop
    publishes appended, as (task name, kwargs), to the returned list. Call ``get_backend.cache_clear()`` after."""
    settings.MEGAFLOW_ENV_BACKEND = "sim"
    settings.MEGAFLOW_SIM_EXEC_LATENCY_S = exec_latency_s
    settings.MEGAFLOW_WARM_POOL_SIZES = {}
    get_backend.cache_clear()
    for cache in (episode_loop.cached_run, episode_loop.cached_task, episode_loop.agent_of_run):
        cache.cache_clear()
    messages: list[tuple[str, dict]] = []
    monkeypatch.setattr(episode_loop, "send", lambda name, **kwargs: messages.append((name, kwargs)))
    return messages
