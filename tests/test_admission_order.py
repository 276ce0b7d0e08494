"""Admission takes a run's oldest queued episodes that may start now, a page at a time (orchestrator/runs._ready):
first attempts, and retried ones whose back-off passed, in id order; one still backing off is passed over, however
many of them come first. Real database."""

from datetime import timedelta

import pytest
from django.utils import timezone

from orchestrator import runs
from orchestrator.models import Episode
from tests.support.records import new_episode

pytestmark = pytest.mark.django_db


@pytest.fixture
def run():
    first = new_episode(image="megaflow/base:bookworm", samples_per_task=12)
    Episode.objects.bulk_create(Episode(run=first.run, task=first.task, sample_index=index) for index in range(1, 12))
    return first.run


def backing_off(run, *indexes):
    """Make the episodes at these positions retried ones whose back-off has not passed."""
    episodes = list(run.episodes.order_by("pk"))
    for index in indexes:
        Episode.objects.filter(pk=episodes[index].pk).update(attempt=3, updated_at=timezone.now())
    return [episode.pk for episode in episodes]


def test_the_oldest_queued_in_id_order(run):
    ids = backing_off(run)
    assert [pk for pk, *_ in runs._ready(run, 4)] == ids[:4]
    assert runs._ready(run, 1)[0] == (ids[0], 1, "megaflow/base:bookworm")


def test_retried_episodes_still_backing_off_are_passed_over_across_pages(run):
    ids = backing_off(run, 0, 1, 2, 3, 5)  # the whole first page of 3 and more
    assert [pk for pk, *_ in runs._ready(run, 3)] == [ids[4], ids[6], ids[7]]
    assert [pk for pk, *_ in runs._ready(run, 20)] == [ids[4], *ids[6:]]


def test_a_retried_episode_whose_back_off_passed_takes_its_place_in_order(run):
    ids = backing_off(run, 0, 1)
    long_ago = timezone.now() - timedelta(hours=1)
    Episode.objects.filter(pk=ids[1]).update(updated_at=long_ago)
    assert [(pk, attempt) for pk, attempt, _ in runs._ready(run, 3)] == [(ids[1], 3), (ids[2], 1), (ids[3], 1)]


def test_only_queued_episodes(run):
    ids = backing_off(run)
    Episode.objects.filter(pk__in=ids[:2]).update(status=Episode.Status.RUNNING)
    assert [pk for pk, *_ in runs._ready(run, 2)] == ids[2:4]
