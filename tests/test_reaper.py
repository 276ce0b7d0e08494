"""The orphan reaper removes exactly the containers no live episode owns."""

import time

import docker
import pytest

from envs import reaper, warm_pool
from envs.backend import SandboxSpec
from orchestrator.models import Dataset, Episode, Run, Task

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def episodes():
    dataset = Dataset.objects.create(name="reaper")
    task = Task.objects.create(
        dataset=dataset, instance_id="t", problem_statement="p", test_command="true", fail_to_pass=["t"]
    )
    run = Run.objects.create(model_name="replay")
    make = lambda index, status: Episode.objects.create(run=run, task=task, sample_index=index, status=status)  # noqa: E731
    return {
        "running": make(0, Episode.Status.RUNNING),
        "finished": make(1, Episode.Status.SUCCEEDED),
        "cancelled": make(2, Episode.Status.CANCELLED),
        "also running": make(3, Episode.Status.RUNNING),
        "retrying": make(4, Episode.Status.QUEUED),
    }


def test_reaps_containers_of_finished_unknown_or_no_episodes_and_keeps_the_rest(
    docker_backend, sandbox, episodes, settings, broker
):
    settings.MEGAFLOW_WARM_POOL_SIZES = {"default": 1}
    image = settings.MEGAFLOW_BASE_IMAGE
    keep = {
        "live episode": sandbox(episode_id=episodes["also running"].pk),
        "idle warm": warm_pool.WarmPool(docker_backend, "default").acquire(SandboxSpec(image=image))[0],
        "warm, lent to a live episode": sandbox(mode="warm", pool="default"),
    }
    idle = warm_pool.WarmPool(docker_backend, "default")
    assert idle.release(keep["idle warm"])
    Episode.objects.filter(pk=episodes["running"].pk).update(container_id=keep["warm, lent to a live episode"])
    Episode.objects.filter(pk=episodes["also running"].pk).update(container_id=keep["live episode"])
    reap = {
        "earlier attempt of a requeued episode": sandbox(episode_id=episodes["retrying"].pk),
        "finished episode": sandbox(episode_id=episodes["finished"].pk),
        "cancelled episode": sandbox(episode_id=episodes["cancelled"].pk),
        "unknown episode": sandbox(episode_id=999_999),
        "no episode": sandbox(),
        "warm, nobody's": sandbox(mode="warm", pool="default"),
        "stopped": sandbox(episode_id=episodes["running"].pk),
    }
    docker.from_env().api.stop(reap["stopped"], timeout=0)

    assert reaper.reap_orphans(docker_backend, grace_s=3600) == {}, "young containers are left alone"
    reaped = reaper.reap_orphans(docker_backend, grace_s=0)

    assert set(reaped) == set(reap.values())
    assert reaped[reap["unknown episode"]] == "episode 999999 is finished or unknown"
    assert reaped[reap["stopped"]] == "container is exited"
    assert reaped[reap["earlier attempt of a requeued episode"]].endswith(
        "has moved on to another sandbox (a new attempt)"
    )
    assert all(docker_backend.is_alive(container_id) for container_id in keep.values())
    assert not any(docker_backend.is_alive(container_id) for container_id in reap.values())
    idle.discard(keep["idle warm"])
    for key in broker.keys("megaflow:warm:*"):
        broker.delete(key)


def test_containers_of_another_deployment_are_never_judged(docker_backend, sandbox, settings):
    settings.MEGAFLOW_DEPLOYMENT = "someone-else"
    theirs = sandbox()  # labelled as the other deployment's, and no episode of ours owns it
    settings.MEGAFLOW_DEPLOYMENT = "us"
    assert theirs not in reaper.reap_orphans(docker_backend, grace_s=0)
    assert docker_backend.is_alive(theirs)


def test_orphan_reasons_respect_the_grace_period():
    now = time.time()
    entry = {"Id": "c1", "State": "running", "Labels": {"megaflow.created": str(int(now - 10)), "megaflow.episode": ""}}
    assert reaper.orphan_reasons([entry], grace_s=60, now=now) == {}
    assert reaper.orphan_reasons([entry], grace_s=5, now=now) == {"c1": "container names no episode"}


@pytest.mark.django_db(transaction=True)
def test_an_env_worker_reaps_orphans_when_it_starts(celery_workers, docker_backend, settings):
    from django.db import connection

    from tests.conftest import database_url, deployment_of

    # An orphan of the workers' deployment (they use the test database), created long before the grace period.
    deployment = deployment_of(database_url(connection.settings_dict))
    orphan = docker.from_env().containers.run(
        settings.MEGAFLOW_BASE_IMAGE, ["sleep", "600"], detach=True, network_mode="none",
        labels={"megaflow.managed": "1", "megaflow.episode": "424242", "megaflow.deployment": deployment,
                "megaflow.created": str(int(time.time()) - 3600)},
    )  # fmt: skip
    celery_workers.restart("env.default")
    deadline = time.monotonic() + 30
    while docker_backend.is_alive(orphan.id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not docker_backend.is_alive(orphan.id), "the restarted env worker reaped the orphan"
