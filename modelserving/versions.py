"""Model versions: which weights each model serves, and how its workers move to new ones.

A trainer publishes a version (``POST /api/v1/models/{name}/versions``): one model worker loads it
(``modelserving.load_version`` on ``model.<name>``), and once it serves, the version is the model's current one
in Redis. Every other worker of the model notices before its next batch and loads it too, so a batch in flight
finishes on the weights it started with and the fleet converges between batches. A checkpoint that cannot be
loaded is refused and the old weights keep serving. The ``ModelVersion`` rows are the durable record; their
state changes go through orchestrator/transitions.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from modelserving.backend import DEFAULT_VERSION, ModelBackend, ModelError, get_backend
from orchestrator import transitions
from orchestrator.hot_state import redis_client

logger = logging.getLogger("megaflow.modelserving.versions")

# A worker looks for a newer version at most this often (one Redis GET per model per interval, not per batch).
FOLLOW_INTERVAL_S = 1.0

_checked: dict[str, float] = {}
_follow_lock = threading.Lock()


def current_key(model: str) -> str:
    return f"megaflow:model-version:{model}"


def current(model: str) -> dict | None:
    """``{"version", "checkpoint_path"}`` of the version ``model`` serves, or None before any was published."""
    raw = redis_client().get(current_key(model))
    return json.loads(raw) if raw else None


def current_version(model: str, default: str = DEFAULT_VERSION) -> str:
    return (current(model) or {}).get("version", default)


def load(model: str, version: str, checkpoint_path: str) -> dict:
    """Load ``version`` in this worker and make it the model's current one. Returns ``{"ok": True}`` or
    ``{"ok": False, "error": why}`` (the old weights keep serving)."""
    try:
        get_backend(model).load_version(version, checkpoint_path)
    except ModelError as error:
        transitions.refuse_model_version(model, version, error.reason)
        logger.warning("model %s: version %s refused: %s", model, version, error.reason)
        return {"ok": False, "error": error.reason}
    redis_client().set(current_key(model), json.dumps({"version": version, "checkpoint_path": checkpoint_path}))
    transitions.serve_model_version(model, version)
    logger.info("model %s: now serving version %s (%s)", model, version, checkpoint_path)
    return {"ok": True}


def follow(model: str, backend: ModelBackend) -> None:
    """Before a batch: load the model's current version if another worker published it since."""
    now = time.monotonic()
    if now - _checked.get(model, 0.0) < FOLLOW_INTERVAL_S:
        return
    with _follow_lock:
        if now - _checked.get(model, 0.0) < FOLLOW_INTERVAL_S:
            return
        _checked[model] = now
        wanted = current(model)
        if wanted is None or wanted["version"] == backend.version:
            return
        try:
            backend.load_version(wanted["version"], wanted["checkpoint_path"])
        except ModelError as error:
            logger.error("model %s: cannot follow version %s: %s", model, wanted["version"], error.reason)
