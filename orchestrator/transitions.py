"""The one writer of ``Episode.status`` and ``Run.status``.

Every change of state is a compare-and-set: ``UPDATE … WHERE id = … AND status IN (<allowed from>) [AND attempt
= …]``, with the fields that travel with the transition (reason, reward, container, worker, timestamps) set in
the same statement. Each function reports whether its transition happened, and callers act only when it did:
a refused transition means somebody else moved the episode first (a cancel, a retry, another delivery of the
same message), and overwriting their move is exactly the bug this module exists to prevent. Refusals are
logged with both states.

Episodes::

    queued      → starting (admitted) · cancelled · failed
    starting    → starting (a start claimed, a container assigned) · running · queued (retry) · failed ·
                  timed_out · cancelled
    running     → evaluating · queued (retry) · failed · timed_out · cancelled
    evaluating  → evaluating (evaluation run again) · succeeded · queued (retry) · failed · timed_out · cancelled
    failed, timed_out → queued  (only through ``retry_failed``, the one way out of a terminal state)
    succeeded, cancelled        (final)

Runs::

    queued    → running · cancelled
    running   → completed (no unfinished episode left) · cancelled
    completed, failed → running  (``retry_failed`` reopens the run; nothing in MegaFlow fails a whole run today)
    cancelled                    (final)

Model versions (the weights a trainer published)::

    loading   → serving (a worker loaded it) · refused (no worker could)
    refused   → loading (published again, e.g. after the checkpoint was fixed)
    serving                      (final: a newer version supersedes it, nothing changes its row)

``attempt`` fences a whole attempt: a message of attempt 1 that arrives after the episode was retried matches
no row and changes nothing.

Every episode transition records, in the same statement, the worker process incarnation that made it
(``Episode.holder``, megaflow_site/liveness.py); ``hold`` records the one whose hop runs now, and ``redrive`` the
watchdog that re-published a hop lost with a dead worker or broker. What the watchdog knows of who holds what is
read from there and from the workers' heartbeats.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from datetime import datetime

from django.db import transaction
from django.db.models import Case, Exists, F, OuterRef, Q, When
from django.utils import timezone

from megaflow_site import liveness
from orchestrator import costs, hot_sql
from orchestrator.models import Episode, ModelVersion, Run, Step

logger = logging.getLogger("megaflow.transitions")

E = Episode.Status
R = Run.Status
V = ModelVersion.Status

LIVE = frozenset({E.STARTING, E.RUNNING, E.EVALUATING})
UNFINISHED = frozenset({E.QUEUED, *LIVE})
FAILURES = frozenset({E.FAILED, E.TIMED_OUT, E.CANCELLED})

# from → the states it may move to. Self-loops are the repeats a redelivered message legitimately makes.
EPISODE_TRANSITIONS: dict[str, frozenset[str]] = {
    E.QUEUED: frozenset({E.STARTING, E.CANCELLED, E.FAILED}),
    E.STARTING: frozenset({E.STARTING, E.RUNNING, E.QUEUED, E.FAILED, E.TIMED_OUT, E.CANCELLED}),
    E.RUNNING: frozenset({E.EVALUATING, E.QUEUED, E.FAILED, E.TIMED_OUT, E.CANCELLED}),
    E.EVALUATING: frozenset({E.EVALUATING, E.SUCCEEDED, E.QUEUED, E.FAILED, E.TIMED_OUT, E.CANCELLED}),
    E.FAILED: frozenset({E.QUEUED}),
    E.TIMED_OUT: frozenset({E.QUEUED}),
    E.SUCCEEDED: frozenset(),
    E.CANCELLED: frozenset(),
}

RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    R.QUEUED: frozenset({R.RUNNING, R.CANCELLED}),
    R.RUNNING: frozenset({R.COMPLETED, R.CANCELLED}),
    R.COMPLETED: frozenset({R.RUNNING}),
    R.FAILED: frozenset({R.RUNNING}),
    R.CANCELLED: frozenset(),
}


MODEL_VERSION_TRANSITIONS: dict[str, frozenset[str]] = {
    V.LOADING: frozenset({V.SERVING, V.REFUSED}),
    V.REFUSED: frozenset({V.LOADING}),
    V.SERVING: frozenset(),
}


def sources(table: dict[str, frozenset[str]], to: str, within: Iterable[str] | None = None) -> frozenset[str]:
    """The states from which ``to`` may be reached (narrowed to ``within``)."""
    allowed = {state for state, targets in table.items() if to in targets}
    return frozenset(allowed if within is None else allowed & set(within))


# The retry out of a terminal state is its own transition (retry_failed); every other move into QUEUED is the
# automatic retry of a live attempt.
_AUTO_RETRY_FROM = sources(EPISODE_TRANSITIONS, E.QUEUED, within=LIVE)
_RETRY_FAILED_FROM = sources(EPISODE_TRANSITIONS, E.QUEUED, within={E.FAILED, E.TIMED_OUT})


class Outcome(enum.StrEnum):
    """What ``fail_or_retry`` did."""

    RETRYING = "retrying"
    FAILED = "failed"
    UNCHANGED = "unchanged"  # the episode had already moved on (ended, retried, or another attempt is current)


def _refused(kind: str, pk: int, to: str, allowed: Iterable[str], current: tuple | None) -> None:
    if current is None:
        logger.info("%s %s → %s refused: it no longer exists", kind, pk, to)
    else:
        state = current[0] if len(current) == 1 else f"{current[0]} (attempt {current[1]})"
        logger.info("%s %s → %s refused: it is %s, not one of %s", kind, pk, to, state, ", ".join(sorted(allowed)))


def _episode(
    episode_id: int,
    to: str,
    *,
    within: Iterable[str] | None = None,
    of_attempt: int | None = None,
    holding: str | None = None,
    unclaimed_by: Iterable[str] | None = None,
    add: dict | None = None,
    **fields,
) -> bool:
    """Compare-and-set one episode to ``to`` from any state allowed to reach it (narrowed to ``within``), of
    ``of_attempt``, while it holds the container ``holding`` and, for ``unclaimed_by``, while no incarnation of it
    claimed its start, where each is given; ``add`` (field → amount) is added to its counters in the same UPDATE."""
    allowed = sources(EPISODE_TRANSITIONS, to, within)
    fields.setdefault("holder", liveness.incarnation())
    changed = hot_sql.update_episode(
        episode_id, set={"status": to, "updated_at": timezone.now(), **fields}, add=add, status_in=allowed,
        attempt=of_attempt, container_id=holding, unclaimed_by=unclaimed_by,
    )  # fmt: skip
    if not changed:
        current = Episode.objects.filter(pk=episode_id).values_list("status", "attempt").first()
        _refused("episode", episode_id, to, allowed, current)
    return bool(changed)


def _run(run_id: int, to: str, *, within: Iterable[str] | None = None, extra=None, **fields) -> bool:
    allowed = sources(RUN_TRANSITIONS, to, within)
    query = Run.objects.filter(pk=run_id, status__in=allowed)
    if extra is not None:
        query = query.filter(extra)
    changed = query.update(status=to, updated_at=timezone.now(), **fields)
    if not changed:
        _refused("run", run_id, to, allowed, Run.objects.filter(pk=run_id).values_list("status").first())
    return bool(changed)


# --- episodes --------------------------------------------------------------------------------------------------


def admit(episode_id: int, attempt: int, env_host: str = "") -> bool:
    """queued → starting: the admitter let the episode in, placed on ``env_host`` (orchestrator/placement.py)."""
    return _episode(episode_id, E.STARTING, within={E.QUEUED}, of_attempt=attempt, env_host=env_host)


def claim_start(episode_id: int, attempt: int, env_host: str = "", alive: Iterable[str] = ()) -> bool:
    """starting → starting: this worker, on ``env_host``, prepares the episode's sandbox. Refused while the start is
    claimed by an incarnation in ``alive`` (this one included): that start is under way, and a second one would
    tear its container down. A start nobody alive claimed (a redelivery after a death) takes it over."""
    return _episode(episode_id, E.STARTING, within={E.STARTING}, of_attempt=attempt, unclaimed_by=alive,
                    worker=liveness.node(), env_host=env_host, failure_reason="",
                    started_at=timezone.now())  # fmt: skip


def assign_sandbox(episode_id: int, attempt: int, container_id: str) -> bool:
    """starting → starting with ``container_id`` recorded before it is prepared, so that whoever takes the
    episode over next (a redelivery, a cancel) knows which container to release."""
    return _episode(episode_id, E.STARTING, within={E.STARTING}, of_attempt=attempt, container_id=container_id)


def sandbox_ready(episode_id: int, attempt: int, container_id: str, **charges: float) -> bool:
    """starting → running, only while ``container_id`` is still the episode's (a later start of the same attempt
    may have replaced it); ``charges`` (cost field → amount) are added in the same UPDATE, and not when refused."""
    return _episode(episode_id, E.RUNNING, within={E.STARTING}, of_attempt=attempt, holding=container_id,
                    add=costs.increments(**charges))  # fmt: skip


def begin_evaluation(episode_id: int, attempt: int) -> bool:
    """running → evaluating (or evaluating again, for a redelivered evaluation)."""
    return _episode(episode_id, E.EVALUATING, of_attempt=attempt, worker=liveness.node())


def hold(episode_id: int, attempt: int) -> bool:
    """A live episode stays as it is, now held by this process: the hop it runs has begun (and is progress)."""
    now = timezone.now()
    return bool(
        Episode.objects.filter(pk=episode_id, status__in=LIVE, attempt=attempt).update(
            holder=liveness.incarnation(), worker=liveness.node(), updated_at=now
        )
    )


def hold_returning(episode_id: int, attempt: int | None, names: tuple[str, ...]) -> tuple | None:
    """``hold`` as a hop's first statement: a live episode of ``attempt`` (None: its current one) is now held by
    this process, and its ``names`` columns come back; None when it is not live or of another attempt."""
    return hot_sql.hold_returning(episode_id, attempt, LIVE, liveness.incarnation(), liveness.node(), timezone.now(),
                                  names)  # fmt: skip


def hold_returning_with_history(episode_id: int, attempt: int | None, names: tuple[str, ...], through: int):
    """``hold_returning`` and the episode's steps up to ``through`` (``hot_sql.history``) in one round trip, where the
    database can (PostgreSQL): (columns, steps), or None when it cannot or the episode was not held."""
    return hot_sql.hold_returning_with_history(episode_id, attempt, LIVE, liveness.incarnation(), liveness.node(),
                                               timezone.now(), names, through)  # fmt: skip


def hold_and_claim(episode_id: int, attempt: int | None, names: tuple[str, ...], now, step: dict) -> tuple | None:
    """``hold_returning`` and, only if it held, the INSERT of the Step row ``step`` that claims an env step
    (orchestrator/episode_loop.py) in one round trip, where the database can (PostgreSQL): (columns, the new step's
    id or None when that step has a row already), or None when it cannot or the episode was not held."""
    return hot_sql.hold_and_claim(episode_id, attempt, LIVE, liveness.incarnation(), liveness.node(), now, names,
                                  step)  # fmt: skip


def open_session(episode_id: int, attempt: int, session_key: str) -> bool:
    """A running episode of this attempt that has no episode-bound session yet gets one (orchestrator/sessions.py):
    the first delivery of its framework task opens it; a redelivery finds it open (its first holder died)."""
    return bool(
        Episode.objects.filter(pk=episode_id, status=E.RUNNING, attempt=attempt, session_key="").update(
            session_key=session_key, holder=liveness.incarnation(), updated_at=timezone.now()
        )
    )


def redrive(episode_id: int, attempt: int, seen: datetime) -> bool:
    """A live episode stays as it is, now held by this (watchdog) process, which re-publishes its next hop —
    only while it has not moved since the watchdog read it at ``seen`` (a hop that moved it meanwhile wins). A
    start's claim is given up with it, so that the re-published start may claim it (``claim_start``)."""
    now = timezone.now()
    unclaimed = Case(When(status=E.STARTING, then=None), default=F("started_at"))
    return bool(
        Episode.objects.filter(pk=episode_id, status__in=LIVE, attempt=attempt, updated_at=seen).update(
            holder=liveness.incarnation(), updated_at=now, started_at=unclaimed
        )
    )


def succeed(episode_id: int, attempt: int, reward: float, note: str = "", **charges: float) -> bool:
    """evaluating → succeeded with its reward; ``note`` is what the grader had to say (e.g. a timeout); ``charges``
    (cost field → amount, orchestrator/costs.py) are added in the same UPDATE, and not at all when it is refused."""
    now = timezone.now()
    return _episode(episode_id, E.SUCCEEDED, of_attempt=attempt, reward=reward, failure_reason=note[:4000],
                    finished_at=now, add=costs.increments(**charges))  # fmt: skip


def fail(
    episode_id: int, reason: str, status: str = E.FAILED, attempt: int | None = None, holding: str | None = None
) -> bool:
    """An unfinished episode → failed, timed_out or cancelled, with its reason. ``holding``: only while the
    episode's sandbox is still that container (a failure of a sandbox the episode has since replaced is not
    the episode's)."""
    if status not in FAILURES:
        raise ValueError(f"{status!r} is not a failure state")
    return _episode(episode_id, status, within=UNFINISHED, of_attempt=attempt, holding=holding,
                    failure_reason=reason[:4000], finished_at=timezone.now())  # fmt: skip


def fail_or_retry(
    episode_id: int,
    reason: str,
    retryable: bool,
    status: str = E.FAILED,
    attempt: int | None = None,
    holding: str | None = None,
) -> Outcome:
    """Record a failure of a live episode's current attempt (or of ``attempt``, when given: a straggler of an
    older one changes nothing; ``holding`` as for ``fail``). A retryable one (infrastructure, not the agent's
    doing) puts the episode back in the queue for a fresh attempt (new sandbox, empty trajectory) while the
    run's ``max_attempts`` allows. The caller releases the sandbox either way."""
    row = Episode.objects.filter(pk=episode_id).values_list("status", "attempt", "run__max_attempts").first()
    if row is None:
        return Outcome.UNCHANGED
    current_status, current_attempt, max_attempts = row
    if current_status not in LIVE or (attempt is not None and attempt != current_attempt):
        _refused("episode", episode_id, status, LIVE, (current_status, current_attempt))
        return Outcome.UNCHANGED
    if not retryable or current_attempt >= max_attempts:
        noted = reason if current_attempt == 1 else f"attempt {current_attempt}: {reason}"
        failed = fail(episode_id, noted, status, attempt=current_attempt, holding=holding)
        return Outcome.FAILED if failed else Outcome.UNCHANGED
    with transaction.atomic():
        retried = _episode(
            episode_id, E.QUEUED, within=_AUTO_RETRY_FROM, of_attempt=current_attempt, holding=holding,
            add={"attempt": 1}, **_fresh_attempt(), failure_reason=f"attempt {current_attempt} failed: {reason}"[:4000],
        )  # fmt: skip
        if retried:
            Step.objects.filter(episode_id=episode_id).delete()
    return Outcome.RETRYING if retried else Outcome.UNCHANGED


def _fresh_attempt() -> dict:
    """The fields of an episode that starts over (its attempt goes up by one): no sandbox, an empty trajectory."""
    return dict(container_id="", session_key="", step_count=0, prompt_tokens=0, completion_tokens=0, reward=None,
                started_at=None, finished_at=None)  # fmt: skip


def cancel_episodes(run_id: int, reason: str) -> list[tuple[int, str]]:
    """Every unfinished episode of the run → cancelled, in one UPDATE. Returns the (episode, container) pairs
    that were cancelled, so that their sandboxes can be released."""
    with transaction.atomic():
        # Locking the rows first makes the returned list exactly the rows the UPDATE changes.
        unfinished = Episode.objects.select_for_update().filter(run_id=run_id, status__in=UNFINISHED)
        cancelled = list(unfinished.values_list("pk", "container_id"))
        now = timezone.now()
        Episode.objects.filter(pk__in=[pk for pk, _ in cancelled], status__in=UNFINISHED).update(
            status=E.CANCELLED, failure_reason=reason[:4000], finished_at=now, updated_at=now
        )
    return cancelled


def retry_failed(run_id: int) -> int:
    """The run's failed and timed-out episodes → queued for a fresh attempt (their old steps are dropped and
    messages of the old attempt no longer match), and the run → running. Returns how many were requeued."""
    with transaction.atomic():
        if not Run.objects.select_for_update().filter(pk=run_id).exclude(status=R.CANCELLED).exists():
            return 0  # a cancelled run stays cancelled, and so do its episodes
        ids = list(
            Episode.objects.select_for_update()
            .filter(run_id=run_id, status__in=_RETRY_FAILED_FROM)
            .values_list("pk", flat=True)
        )
        if not ids:
            return 0
        Step.objects.filter(episode_id__in=ids).delete()
        Episode.objects.filter(pk__in=ids, status__in=_RETRY_FAILED_FROM).update(
            status=E.QUEUED, failure_reason="", updated_at=timezone.now(), attempt=F("attempt") + 1, **_fresh_attempt()
        )
        reopen_run(run_id)
    return len(ids)


# --- runs ------------------------------------------------------------------------------------------------------


def start_run(run_id: int) -> bool:
    """queued → running."""
    return _run(run_id, R.RUNNING, within={R.QUEUED}, started_at=timezone.now())


def complete_run(run_id: int) -> bool:
    """running → completed, in the same statement that checks no episode of the run is unfinished (a retry
    that requeues one between a check and a write cannot leave a completed run with work in it)."""
    unfinished = Episode.objects.filter(run_id=OuterRef("pk"), status__in=UNFINISHED)
    return _run(run_id, R.COMPLETED, extra=~Q(Exists(unfinished)), finished_at=timezone.now())


def cancel_run(run_id: int) -> bool:
    """queued or running → cancelled."""
    return _run(run_id, R.CANCELLED, finished_at=timezone.now())


def reopen_run(run_id: int) -> bool:
    """completed or failed → running again, for episodes retried by ``retry_failed`` (a running run stays as it
    is; a cancelled one stays cancelled)."""
    if Run.objects.filter(pk=run_id, status=R.RUNNING).exists():
        return True
    return _run(run_id, R.RUNNING, within={R.COMPLETED, R.FAILED}, finished_at=None)


# --- model versions --------------------------------------------------------------------------------------------


def _model_version(model: str, version: str, to: str, **fields) -> bool:
    allowed = sources(MODEL_VERSION_TRANSITIONS, to)
    changed = ModelVersion.objects.filter(model_name=model, version=version, status__in=allowed).update(
        status=to, **fields
    )
    if not changed:
        current = ModelVersion.objects.filter(model_name=model, version=version).values_list("status").first()
        _refused("model version", f"{model}@{version}", to, allowed, current)
    return bool(changed)


def reload_model_version(model: str, version: str, checkpoint_path: str) -> bool:
    """refused → loading: a refused version published again (its checkpoint path may have been fixed)."""
    return _model_version(model, version, V.LOADING, checkpoint_path=checkpoint_path, error="")


def serve_model_version(model: str, version: str) -> bool:
    """loading → serving: a model worker loaded the weights and serves them from its next batch."""
    return _model_version(model, version, V.SERVING, serving_at=timezone.now())


def refuse_model_version(model: str, version: str, error: str) -> bool:
    """loading → refused: the workers cannot load the checkpoint; the old weights keep serving."""
    return _model_version(model, version, V.REFUSED, error=error[:4000])
