"""Publishing model versions (the control plane's side; the workers' side is modelserving/versions.py).

``publish`` records the version and has one worker of the model load it, waiting for the answer: the trainer
learns at once whether its checkpoint serves. A retried publish of the same version and path is answered
from the record (or waits on the load in progress); a refused one is tried again.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.db import IntegrityError

from modelserving.backend import UnknownModel, model_config
from modelserving.tasks import load_version
from orchestrator import replies, transitions
from orchestrator.episode_loop import send
from orchestrator.models import ModelVersion
from orchestrator.staleness import configured_version, serving_version


class VersionConflict(ValueError):
    """The version was published before with another checkpoint."""


class LoadTimeout(TimeoutError):
    """No model worker answered within MEGAFLOW_MODEL_LOAD_TIMEOUT_S (the version stays loading)."""


def known_version(model: str, version: str) -> bool:
    """Whether a run may ask for ``version`` of ``model``: the configured one, or one published and not
    refused."""
    if version == configured_version(model):
        return True
    published = ModelVersion.objects.filter(model_name=model, version=version)
    return published.exclude(status=ModelVersion.Status.REFUSED).exists()


def publish(model: str, version: str, checkpoint_path: str, owner=None) -> tuple[ModelVersion, bool]:
    """Have ``model``'s workers serve ``checkpoint_path`` as ``version``. Returns the record (its status
    ``serving`` or ``refused``, with the reason) and whether this call created it. ``UnknownModel``,
    ``VersionConflict``, ``LoadTimeout``."""
    model_config(model)  # UnknownModel
    try:
        record, created = ModelVersion.objects.get_or_create(
            model_name=model, version=version, defaults={"checkpoint_path": checkpoint_path, "owner": owner}
        )
    except IntegrityError:  # a concurrent publish of the same version created it first
        record, created = ModelVersion.objects.get(model_name=model, version=version), False
    if record.checkpoint_path != checkpoint_path and record.status != ModelVersion.Status.REFUSED:
        raise VersionConflict(f"version {version!r} of {model} was published with {record.checkpoint_path!r}")
    if record.status == ModelVersion.Status.SERVING:
        return record, created
    if record.status == ModelVersion.Status.REFUSED:
        transitions.reload_model_version(model, version, checkpoint_path)
    elif not created:
        return _wait_loaded(record), created  # a retry while the first publish's load is in progress
    inbox = replies.new_inbox()
    load_version.apply_async(
        kwargs={"model": model, "version": version, "checkpoint_path": checkpoint_path, "reply_to": inbox}
    )
    if replies.wait_for_reply(inbox, settings.MEGAFLOW_MODEL_LOAD_TIMEOUT_S) is None:
        raise LoadTimeout(f"no worker of {model} loaded {version!r} within {settings.MEGAFLOW_MODEL_LOAD_TIMEOUT_S} s")
    record.refresh_from_db()
    if record.status == ModelVersion.Status.SERVING:
        send("orchestrator.admit")  # runs waiting for this version may start now
    return record, created


def _wait_loaded(record: ModelVersion) -> ModelVersion:
    deadline = time.monotonic() + settings.MEGAFLOW_MODEL_LOAD_TIMEOUT_S
    while record.status == ModelVersion.Status.LOADING:
        if time.monotonic() > deadline:
            raise LoadTimeout(f"{record} is still loading")
        time.sleep(0.5)
        record.refresh_from_db()
    return record


__all__ = ["UnknownModel", "VersionConflict", "LoadTimeout", "publish", "serving_version", "known_version"]
