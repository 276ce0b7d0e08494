"""Image-locality placement and the per-host queues it routes to (no workers: the placer, the router, the specs)."""

from __future__ import annotations

import pytest
from django.test import override_settings

from envs import image_cache
from megaflow_site.topology import Service, WorkerSpec, declared_queues, route_task
from orchestrator.models import Dataset, Episode, Run, Task
from orchestrator.placement import Placer

pytestmark = pytest.mark.django_db

HOSTS = ["h1", "h2"]
IMAGE_A, IMAGE_B = "127.0.0.1:5000/t/a:v1", "127.0.0.1:5000/t/b:v1"


@pytest.fixture
def hosts(broker):
    """Two env hosts of two slots each; h2 holds image a."""
    broker.delete(image_cache.SLOTS_KEY, image_cache.key("h1", "lru"), image_cache.key("h2", "lru"))
    for host in HOSTS:
        image_cache.advertise_slots(host, 2)
    broker.zadd(image_cache.key("h2", "lru"), {IMAGE_A: 1.0})
    with override_settings(MEGAFLOW_ENV_HOSTS=HOSTS):
        yield
    broker.delete(image_cache.SLOTS_KEY, image_cache.key("h2", "lru"))


def live_on(host: str, count: int) -> None:
    dataset = Dataset.objects.create(name=f"d-{host}-{count}")
    task = Task.objects.create(dataset=dataset, instance_id="t", problem_statement="p", test_command="true",
                               fail_to_pass=["t"], spec_sha256="0" * 64)  # fmt: skip
    run = Run.objects.create(model_name="replay", env_pool="default", samples_per_task=count)
    for sample in range(count):
        Episode.objects.create(run=run, task=task, sample_index=sample, status=Episode.Status.RUNNING, env_host=host)


def test_an_episode_goes_to_the_host_holding_its_image_while_it_has_a_free_slot(hosts):
    placer = Placer("default", policy="locality")
    assert [placer.place(IMAGE_A) for _ in range(3)] == ["h2", "h2", "h1"], "h2 is full after two: least loaded"
    # An image nobody holds goes to the least loaded host, which then counts as holding it for this round.
    fresh = Placer("default", policy="locality")
    assert [fresh.place(IMAGE_B), fresh.place(IMAGE_B)] == ["h1", "h1"]


def test_load_counts_the_hosts_live_episodes(hosts):
    live_on("h2", 2)
    placer = Placer("default", policy="locality")
    assert placer.place(IMAGE_A) == "h1", "h2 holds a but its two slots are taken"


def test_blind_placement_ignores_images(hosts):
    placer = Placer("default", policy="blind")
    assert [placer.place(IMAGE_A) for _ in range(4)] == ["h1", "h2", "h1", "h2"]


def test_no_hosts_listed_means_the_pools_shared_queue(broker):
    assert Placer("default").place(IMAGE_A) == ""


@override_settings(MEGAFLOW_ENV_HOSTS=HOSTS)
def test_env_tasks_naming_a_host_go_to_its_queue_and_its_workers_consume_both():
    assert route_task("envs.episode_step", (), {"pool": "heavy", "host": "h1"}, {}) == {"queue": "env.heavy.h1"}
    assert route_task("envs.episode_step", (), {"pool": "heavy", "host": ""}, {}) == {"queue": "env.heavy"}
    assert route_task("envs.episode_step", (), {"pool": "heavy", "host": "elsewhere"}, {}) == {"queue": "env.heavy"}
    assert route_task("modelserving.episode_turn", (), {"model": "replay", "host": "h1"}, {}) == {
        "queue": "model.replay"
    }
    assert {"env.default.h1", "env.default.h2", "env.heavy.h1", "env.heavy.h2"} <= {q.name for q in declared_queues()}
    spec = WorkerSpec(Service.ENV, "default", host="h2")
    argv = spec.argv()
    assert argv[argv.index("-Q") + 1] == "env.default.h2,env.default"
    assert spec.environment == {"MEGAFLOW_ENV_HOST": "h2"} and spec.node_name == "env-default-h2@%h"
