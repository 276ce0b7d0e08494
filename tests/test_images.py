"""Task images from a real registry: on-demand pulls (once per image per host, the others waiting on it), the
bounded LRU cache (never over its bound, never an image in use, evicted images pulled again), a registry that
is down (retried with its reason, nothing lost), an image that does not exist (failed at once), and the cost.

Real parts: Debian's docker-registry on 127.0.0.1, the local dockerd, the session's Celery workers. The images
are the base image plus 1 MB of random bytes, so a pull moves real bytes in well under a second; the session's
cache bound (tests/session_env.py) holds two of them.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from itertools import pairwise

import docker
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command

from envs import image_cache
from envs.backend import SandboxError, get_backend
from envs.image_cache import ImageCache
from orchestrator import episode_loop
from orchestrator.models import Episode, Run, Task
from orchestrator.task_format import TaskFormatError, parse_task
from tests.support.registry import Registry, push_tiny_images, remove_local
from tests.test_episode_loop import start_and_wait

pytestmark = [pytest.mark.integration]

PAYLOAD = 1_000_000
NAMES = ["img-a", "img-b", "img-c", "img-d"]


@pytest.fixture(scope="session")
def registry():
    port = int(os.environ["MEGAFLOW_TEST_REGISTRY_PORT"])
    running = Registry(port, settings.DATA_DIR / f"registry-{port}").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def tiny_images(registry) -> dict[str, str]:
    """Name → reference of four images that exist only in the registry."""
    references = push_tiny_images(registry.address, NAMES, settings.MEGAFLOW_BASE_IMAGE, PAYLOAD)
    yield dict(zip(NAMES, references, strict=True))
    remove_local(references)


@pytest.fixture
def fresh_cache(tiny_images):
    """The test images gone from the daemon and from the host's cache bookkeeping."""
    remove_local(list(tiny_images.values()))
    cache = ImageCache(docker.from_env().api)
    for reference in tiny_images.values():
        cache.forget(reference)
    cache.redis.delete(image_cache.key(cache.host, "events"))
    return cache


def tasks_with_images(swe_mini, images: list[str], prefix: str) -> list[Task]:
    """swe_mini's textkit-1 (archive, reference patch, tests) once per image, in this order."""
    template = swe_mini.tasks.get(instance_id="textkit-1")
    tasks = []
    for index, image in enumerate(images):
        fields = {f.name: getattr(template, f.name) for f in Task._meta.concrete_fields if f.name not in {"id"}}
        fields.update(instance_id=f"{prefix}-{index:02d}", image=image)
        tasks.append(Task.objects.create(**fields))
    return tasks


class CacheSampler(threading.Thread):
    """Samples what the daemon really holds of the test images, every 50 ms, while a run goes on."""

    def __init__(self, references: list[str]):
        super().__init__(daemon=True)
        self.references, self.samples, self.stop = references, [], threading.Event()
        self.cache = ImageCache(docker.from_env().api)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            held = 0
            for reference in self.references:
                info = self.cache.inspect(reference)
                held += 0 if info is None else self.cache.added_bytes(info)
            self.samples.append(held)


# --- in-process: single flight, a missing image, bad references ----------------------------------------------


def test_one_pull_per_image_per_host_however_many_starts_want_it(fresh_cache, tiny_images):
    backend = get_backend("docker")
    image, told = tiny_images["img-a"], []
    records = [None] * 4

    def start(index: int) -> None:
        with backend.holding_image(image):
            records[index] = backend.ensure_image(image, on_pull=told.append)

    threads = [threading.Thread(target=start, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted((r.pulled, r.waited) for r in records) == [(False, True)] * 3 + [(True, False)]
    [pull] = [r for r in records if r.pulled]
    assert PAYLOAD * 0.9 < pull.bytes < PAYLOAD * 2 and pull.seconds > 0
    assert told == [image] * 4, "every start that waited said which image it waited for"
    assert [e["event"] for e in image_cache.events(fresh_cache.host)] == ["pull"]
    # Present now: a start neither pulls nor waits.
    again = backend.ensure_image(image)
    assert (again.pulled, again.waited) == (False, False)


def test_an_image_the_registry_does_not_have_fails_at_once_with_its_name(swe_mini, registry, monkeypatch):
    sent = []
    monkeypatch.setattr(episode_loop, "send", lambda name, **kwargs: sent.append(name))
    ghost = f"{registry.address}/megaflow-test/never-pushed:v1"
    [task] = tasks_with_images(swe_mini, [ghost], "ghost")
    run = Run.objects.create(model_name="replay", env_pool="default", status=Run.Status.RUNNING)
    episode = Episode.objects.create(run=run, task=task, sample_index=0, status=Episode.Status.STARTING)
    episode_loop.episode_start(episode.pk, "default", attempt=1)
    episode.refresh_from_db()
    assert (episode.status, episode.attempt) == (Episode.Status.FAILED, 1), "not retried"
    assert episode.failure_reason.startswith(f"image not found: {ghost} ({registry.address} has no such image")
    assert episode.pulling_image == "" and sent == ["orchestrator.episode_done"]


@pytest.mark.parametrize(
    "image, reason",
    [
        ("Upper/Case:v1", "is not an image reference"),
        ("127.0.0.1:5000/name:", "is not an image reference"),
        ("name with spaces", "is not an image reference"),
        (" padded:v1", "without surrounding spaces"),
    ],
)
def test_a_malformed_image_reference_is_refused_when_the_dataset_is_loaded(image, reason):
    task = {"instance_id": "t-1", "problem_statement": "p", "test_command": "true", "FAIL_TO_PASS": ["t"],
            "image": image}  # fmt: skip
    with pytest.raises(TaskFormatError) as raised:
        parse_task(task)
    assert raised.value.field == "image" and reason in raised.value.reason
    assert str(raised.value).startswith("task 't-1': image: ")


# --- a run on real workers --------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_run_over_more_images_than_the_cache_holds(celery_workers, swe_mini, tiny_images, fresh_cache, client):
    a, b, c, d = (tiny_images[name] for name in NAMES)
    # Two samples each of a, b, c, d, then a again: a and b are evicted for c and d, then a comes back.
    tasks = tasks_with_images(swe_mini, [a, b, c, d, a], "cached")
    run = Run.objects.create(model_name="replay", env_pool="default", samples_per_task=2, max_concurrent_episodes=2)
    run.tasks.set(tasks)
    sampler = CacheSampler(list(tiny_images.values()))
    sampler.start()
    pulling_seen = set()
    run = start_and_wait(run, watch=lambda r: pulling_seen.update(
        r.episodes.exclude(pulling_image="").values_list("pulling_image", flat=True)))  # fmt: skip
    sampler.stop.set()
    sampler.join()

    episodes = list(run.episodes.all())
    assert {(e.status, e.reward) for e in episodes} == {(Episode.Status.SUCCEEDED, 1.0)}, [
        (e.status, e.failure_reason) for e in episodes
    ]
    bound = image_cache.bound_bytes()
    assert sampler.samples and max(sampler.samples) <= bound, f"cache over its bound {bound}: {max(sampler.samples)}"
    assert pulling_seen, "an episode showed the image it waited for"

    log = image_cache.events(fresh_cache.host)
    for image in (a, b, c, d):
        mine = [entry["event"] for entry in log if entry["image"] == image]
        assert mine and mine[0] == "pull", (image, mine)
        assert all(first != second for first, second in pairwise(mine)), (
            f"{image}: pulled again while still cached, or evicted twice: {mine}"
        )
    pulls_of_a = [entry for entry in log if entry["image"] == a and entry["event"] == "pull"]
    assert len(pulls_of_a) == 2, f"a was evicted, so it was pulled again: {log}"
    assert {entry["image"] for entry in log if entry["event"] == "evict"} >= {a, b}

    # The cost: every pull is charged to the episode whose start made it.
    pulls = [entry for entry in log if entry["event"] == "pull"]
    assert sum(e.image_pulls for e in episodes) == len(pulls)
    assert sum(e.image_pull_bytes for e in episodes) == sum(entry["bytes"] for entry in pulls)
    costs = [(e.sandbox_s, e.env_worker_s, e.model_s, e.cost_completion_tokens) for e in episodes]
    assert all(sandbox > 0 and worker > 0 and tokens > 0 for sandbox, worker, _, tokens in costs), costs
    assert all(e.pulling_image == "" for e in episodes)

    client.force_login(User.objects.create_superuser("images-admin", "a@example.com", "pw"))
    body = client.get(f"/api/v1/runs/{run.pk}/").json()
    assert body["cost"]["image_pulls"] == len(pulls) and body["cost"]["sandbox_s"] > 0
    episode_body = client.get(f"/api/v1/episodes/{episodes[0].pk}/").json()
    assert set(episode_body["cost"]) == set(body["cost"]) and "pulling_image" in episode_body
    page = client.get(f"/admin/orchestrator/run/{run.pk}/change/").content.decode()
    assert f"image pulls {len(pulls)} (" in page
    out = io.StringIO()
    call_command("megaflow", "status", str(run.pk), stdout=out)
    assert f"cost: sandbox {body['cost']['sandbox_s']:.1f} s" in out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_a_registry_down_mid_run_is_retried_with_its_reason_and_loses_nothing(
    celery_workers, swe_mini, tiny_images, fresh_cache, registry
):
    c, d = tiny_images["img-c"], tiny_images["img-d"]
    run = Run.objects.create(model_name="replay", env_pool="default", samples_per_task=2, max_attempts=4)
    run.tasks.set(tasks_with_images(swe_mini, [c, d], "outage"))
    registry.stop()
    reasons = set()

    def come_back(current: Run) -> None:
        retried = current.episodes.filter(attempt__gt=1).values_list("failure_reason", flat=True)
        reasons.update(retried)
        if reasons and not registry.answers():
            registry.start()

    try:
        run = start_and_wait(run, watch=come_back)
    finally:
        if not registry.answers():
            registry.start()
    episodes = list(run.episodes.all())
    assert len(episodes) == 4 and all(e.is_terminal for e in episodes), "nothing lost"
    assert any("registry unreachable or failing" in reason for reason in reasons), reasons
    for episode in episodes:
        assert episode.status == Episode.Status.SUCCEEDED or "registry" in episode.failure_reason, (
            episode.status,
            episode.failure_reason,
        )
    assert any(e.status == Episode.Status.SUCCEEDED and e.attempt > 1 for e in episodes), "retried after it came back"


# --- a registry that accepts the connection and never answers ------------------------------------------------


class StallingRegistry:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self) -> None:
        self.closing = True
        self.server.close()
        for connection in self.held:
            connection.close()


def test_a_registry_that_never_answers_is_cut_off_as_a_retryable_failure_and_no_waiter_hangs(settings):
    settings.MEGAFLOW_IMAGE_PULL_TIMEOUT_S = 3
    stalling = StallingRegistry()
    image = f"127.0.0.1:{stalling.port}/megaflow-test/stalled:v1"
    backend = get_backend("docker")
    errors: list = [None, None]
    ended: list = [None, None]
    began = time.monotonic()

    def start(index: int) -> None:
        try:
            with backend.holding_image(image):
                backend.ensure_image(image)
        except SandboxError as error:
            errors[index] = error
        ended[index] = time.monotonic() - began

    try:
        threads = [threading.Thread(target=start, args=(index,), daemon=True) for index in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.3)  # the second start waits on the first's pull (the single flight)
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads), "a pull or a waiter on it hung"
    finally:
        stalling.close()
    assert stalling.held, "the daemon never reached the stalling registry"
    for error, seconds in zip(errors, ended, strict=True):
        assert isinstance(error, SandboxError) and error.retryable, error
        assert error.reason == f"pulling {image} from 127.0.0.1:{stalling.port} took longer than 3 s; cut off"
        assert seconds < 3 + 5, f"ended after {seconds:.1f} s, cut-off 3 s"
