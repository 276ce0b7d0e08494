"""The demo's episodes: reference patches replayed through the env workers, as event-driven chains."""

import pytest

from orchestrator import demo
from orchestrator.models import Episode

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_reference_patches_replayed_through_the_env_workers_earn_full_reward(celery_workers, swe_mini):
    swe_mini.tasks.exclude(instance_id__in=["kvconf-4", "ledger-3", "textkit-3"]).delete()
    run = demo.replay_through_env(swe_mini, samples=2, pool="default", timeout_s=180)
    rows = demo.summarize(run)
    assert [(row.instance_id, row.sample) for row in rows] == [
        ("kvconf-4", 0),
        ("kvconf-4", 1),
        ("ledger-3", 0),
        ("ledger-3", 1),
        ("textkit-3", 0),
        ("textkit-3", 1),
    ]
    assert {(row.status, row.reward) for row in rows} == {(Episode.Status.SUCCEEDED, 1.0)}
    assert all(row.seconds > 0 for row in rows)
