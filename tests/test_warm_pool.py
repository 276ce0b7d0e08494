"""Persistent mode: warm containers are pre-started, lent, reset to a fresh state, retired and reaped."""

import pytest

from envs import service, warm_pool
from envs.backend import SandboxSpec
from envs.task_sandbox import BASE_TAG, GIT
from orchestrator.models import Episode, Run

pytestmark = pytest.mark.integration

POOL = "default"


@pytest.fixture
def pool(settings, docker_backend, broker):
    settings.MEGAFLOW_WARM_POOL_SIZES = {POOL: 2}
    warm = warm_pool.WarmPool(docker_backend, POOL)
    yield warm
    for key in broker.keys("megaflow:warm:*"):
        if key.endswith(b":idle"):
            for container_id in broker.lrange(key, 0, -1):
                warm.discard(container_id.decode())
    for key in broker.keys("megaflow:warm:*"):
        broker.delete(key)


def base_spec(**fields) -> SandboxSpec:
    from django.conf import settings

    return SandboxSpec(image=settings.MEGAFLOW_BASE_IMAGE, **fields)


def test_maintain_prestarts_the_pool_once(pool):
    assert pool.maintain() == {"reaped": 0, "started": 2}
    assert pool.maintain() == {"reaped": 0, "started": 0}
    idle = pool.idle_ids()
    assert len(idle) == 2 and all(pool.backend.is_alive(container_id) for container_id in idle)


def test_acquire_lends_idle_containers_then_creates(pool):
    pool.maintain()
    idle = set(pool.idle_ids())
    lent = [pool.acquire(base_spec()) for _ in range(3)]
    assert {container_id for container_id, warm in lent if warm} == idle
    assert [warm for _, warm in lent] == [True, True, False]
    assert pool.idle_ids() == []
    for container_id, _ in lent:
        pool.discard(container_id)


def test_release_resets_everything_a_task_could_change(pool):
    container_id, _ = pool.acquire(base_spec())
    dirty = "echo code > /testbed/f.py; mkdir -p /testbed/.git; echo t > /tmp/t; echo h > /root/.history; sleep 999 &"
    pool.backend.exec(container_id, dirty, 10)
    assert pool.release(container_id)
    again, warm = pool.acquire(base_spec())
    assert (again, warm) == (container_id, True)
    listing = pool.backend.exec(again, "ls -A /testbed /tmp /root; ps -eo args= | grep -c '^sleep 999' || true", 10)
    assert listing.output.split() == ["/root:", "/testbed:", "/tmp:", "0"]
    pool.discard(again)


def test_a_writable_root_container_is_reset_to_its_base_commit(pool):
    spec = base_spec(writable_root=True)
    container_id, _ = pool.acquire(spec)
    setup = (f"cd /testbed && {GIT} init -q && echo base > f && {GIT} add -A && {GIT} commit -qm base && "
             f"{GIT} tag {BASE_TAG} && echo changed > f && echo new > g")  # fmt: skip
    assert pool.backend.exec(container_id, setup, 20).exit_code == 0
    assert pool.release(container_id)
    again, _ = pool.acquire(spec)
    assert again == container_id
    assert pool.backend.exec(again, "cat f; ls", 10, workdir="/testbed").output.split() == ["base", "f"]
    pool.discard(again)


def test_worn_out_containers_are_retired(pool, settings):
    settings.MEGAFLOW_WARM_MAX_USES = 2
    container_id, _ = pool.acquire(base_spec())
    assert pool.release(container_id)
    assert pool.acquire(base_spec()) == (container_id, True)
    assert not pool.release(container_id)
    assert not pool.backend.is_alive(container_id)


def test_a_dead_idle_container_is_skipped(pool):
    pool.maintain()
    first, second = pool.idle_ids()
    pool.backend.destroy(first)
    assert pool.acquire(base_spec()) == (second, True)
    pool.discard(second)


def test_idle_containers_past_their_ttl_are_reaped_and_replaced(pool, settings):
    pool.maintain()
    old = set(pool.idle_ids())
    settings.MEGAFLOW_WARM_IDLE_TTL_S = 0
    assert pool.maintain() == {"reaped": 2, "started": 2}
    assert not old & set(pool.idle_ids())
    assert not any(pool.backend.is_alive(container_id) for container_id in old)


@pytest.mark.django_db
def test_an_episode_in_a_warm_pool_borrows_and_returns_a_container(pool, swe_mini):
    pool.maintain()
    task = swe_mini.tasks.get(instance_id="calendarx-2")
    run = Run.objects.create(model_name="replay", env_pool=POOL)
    episode = Episode.objects.create(run=run, task=task, sample_index=0)

    sandbox = service.create_sandbox(task, episode.pk, run.pk, POOL)
    assert sandbox.warm and sandbox.container_id not in pool.idle_ids()
    service.prepare_sandbox(sandbox.container_id, task)
    assert service.evaluate(sandbox.container_id, task).reward == 0.0  # nobody fixed the bug
    service.release(sandbox.container_id, POOL)
    assert sandbox.container_id in pool.idle_ids(), "the container went back to the pool"
    service.release(sandbox.container_id, POOL)
    assert pool.idle_ids().count(sandbox.container_id) == 1, "released twice, it is lent out once"
    listing = pool.backend.exec(sandbox.container_id, "ls -A /testbed", 10)
    assert listing.output == "", "and came back empty"
