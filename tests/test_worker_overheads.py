"""What a worker pays per task besides the task's work: database retries that cost nothing until they are needed, and a
garbage collector set for thousands of hops in flight (megaflow_site/megaflow_task.py, megaflow_site/gc_tuning.py)."""

import gc

import pytest
from django.db import OperationalError

from megaflow_site import gc_tuning
from megaflow_site.megaflow_task import retry_on_database_errors


@pytest.fixture
def collector_paused():
    """The collector off, so that what a call leaves for it stays countable; back as it was afterwards."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


def test_a_call_that_succeeds_leaves_nothing_for_the_garbage_collector(collector_paused):
    # tenacity's own decorator made a Retrying, its thread-local and their cycles on every call.
    add = retry_on_database_errors(lambda a, b: a + b)
    assert [add(n, 1) for n in range(200)] == list(range(1, 201))
    assert gc.collect() == 0


def test_a_database_error_is_retried_in_place_until_the_call_succeeds():
    calls = []

    def flaky(value):
        calls.append(value)
        if len(calls) < 3:
            raise OperationalError("the server closed the connection unexpectedly")
        return value * 2

    assert retry_on_database_errors(flaky)(21) == 42
    assert calls == [21, 21, 21]


def test_any_other_error_is_raised_at_once():
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("a bug, not the database")

    with pytest.raises(ValueError, match="a bug"):
        retry_on_database_errors(broken)()
    assert calls == [1]


def test_tuning_freezes_what_is_alive_and_raises_the_young_threshold(settings):
    before = gc.get_threshold()
    settings.MEGAFLOW_GC_YOUNG_THRESHOLD = 12_345
    try:
        gc_tuning.tune()
        state = gc_tuning.state()
        assert state["threshold"] == [12_345, before[1], before[2]]
        assert state["frozen"] > 10_000  # Django, Celery and this test session's modules
        assert len(state["generations"]) == 3
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.integration
def test_every_ready_worker_runs_the_tuned_collector(celery_workers, settings):
    replies = celery_workers.ask("gc_state")  # what `celery -A megaflow_site inspect gc_state` asks
    assert set(celery_workers.nodes) <= set(replies)
    for node, state in replies.items():
        assert state["threshold"][0] == settings.MEGAFLOW_GC_YOUNG_THRESHOLD, node
        assert state["frozen"] > 10_000, node
