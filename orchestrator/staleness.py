"""How far behind the serving version a model version is, for runs that require a version or bound staleness.

A run's ``max_staleness`` follows AReaL's ``max_head_offpolicyness``: a sample's staleness is how many versions
newer than the one its generation started on (its head: the episode's first turn) serve now, and 0 keeps every
episode on one version. Versions are ordered by publish time (``ModelVersion.created_at``), after the weights the
model's configuration names; a version that never served (loading, refused) does not count.
"""

from __future__ import annotations

from modelserving.backend import DEFAULT_VERSION, UnknownModel, model_config
from modelserving.versions import current_version
from orchestrator.models import ModelVersion, Run


def configured_version(model: str) -> str:
    """The version of the weights a model's configuration names (before any is published)."""
    return str(model_config(model).get("version", DEFAULT_VERSION))


def serving_version(model: str) -> str | None:
    """The version ``model`` serves now; None for a model no longer configured (no version serves)."""
    try:
        configured = configured_version(model)
    except UnknownModel:
        return None
    return current_version(model, default=configured)


def version_order(model: str) -> list[str]:
    """``model``'s versions that served, oldest first."""
    served = ModelVersion.objects.filter(model_name=model, status=ModelVersion.Status.SERVING)
    published = list(served.order_by("created_at", "pk").values_list("version", flat=True))
    configured = configured_version(model)
    return published if configured in published else [configured, *published]


def versions_behind(model: str, version: str, serving: str) -> int | None:
    """How many versions of ``model`` newer than ``version`` ``serving`` is (negative when it is older); None when
    either is not a version that served."""
    if version == serving:
        return 0
    order = version_order(model)
    if version not in order or serving not in order:
        return None
    return order.index(serving) - order.index(version)


def admissible(run: Run) -> bool:
    """Whether the run's episodes may start now: it requires no version, or the one it requires serves, or one at
    most ``max_staleness`` versions newer does."""
    if not run.model_version:
        return True
    serving = serving_version(run.model_name)
    if serving == run.model_version:
        return True
    if serving is None or run.max_staleness is None:
        return False
    behind = versions_behind(run.model_name, run.model_version, serving)
    return behind is not None and 0 <= behind <= run.max_staleness


def stale_reason(run: Run, first_version: str, version: str | None = None) -> str:
    """Why an episode of ``run`` whose first turn ran on ``first_version`` is past ``max_staleness``: ``version``
    (a later turn's) or, when None, the version serving now (its next turn's) is more versions newer than the bound
    allows. "" when it is not."""
    if run.max_staleness is None or not first_version:
        return ""
    later = serving_version(run.model_name) if version is None else version
    if not later or later == first_version:
        return ""
    behind = versions_behind(run.model_name, first_version, later)
    if behind is None or behind <= run.max_staleness:
        return ""
    what = f"{run.model_name} serves {later!r}" if version is None else f"a turn ran on {later!r}"
    return (
        f"stale: {what}, {behind} versions newer than {first_version!r} that the episode's first turn ran on "
        f"(max_staleness {run.max_staleness})"
    )
