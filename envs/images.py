"""On-demand pulls: an env host gets a task's image from its registry when it does not hold it.

- **Once per image per host**: a Redis lock per (host, image) is the single flight. The first episode to want an
  image pulls it; the others wait on that lock, then find the image present. When the pull fails, those that
  waited on it fail with its reason instead of each trying again at once.
- **Bounded**: at most ``MEGAFLOW_IMAGE_PULL_CONCURRENCY`` pulls per host at a time (a Redis semaphore with
  leases, as the container start gate, envs/startup_control.py).
- **Failures**: an image the registry does not have fails the episode at once (``ImageNotFound``, not retried);
  a registry that is down, slow past ``MEGAFLOW_IMAGE_PULL_TIMEOUT_S`` or answering errors is infrastructure
  (a retryable ``SandboxError`` with the registry's reason). A pull that takes too long is cut off: the
  connection to the daemon is closed, which cancels it, so a hanging registry never hangs a worker.
- **Only references that name a registry are pulled** (``127.0.0.1:5000/megaflow/task-1:v1``). An unqualified
  name is a locally built image: missing, it fails as ``image not found`` as before.

Each ensure returns a ``PullRecord`` (pulled or not, seconds, bytes downloaded) that the episode's cost carries;
the bounded cache of what was pulled is envs/image_cache.py.
"""

from __future__ import annotations

import logging
import threading
import time

import docker
import requests
from django.conf import settings

from envs import image_reference
from envs.backend import ImageNotFound, PullRecord, SandboxError
from envs.image_cache import ImageCache, key
from envs.startup_control import semaphore_slot
from orchestrator.hot_state import redis_client

logger = logging.getLogger("megaflow.envs.images")

FAILURE_MEMORY_S = 10  # waiters on a pull that failed within this long fail with its reason
_NOT_FOUND_HINTS = ("manifest unknown", "not found", "name unknown", "does not exist")
_DENIED_HINTS = ("unauthorized", "denied", "authentication required")


def ensure_image(api: docker.APIClient, image: str, on_pull=None) -> PullRecord:
    """Make ``image`` present on the daemon of ``api``, pulling it when absent. ``on_pull(image)`` is called
    before waiting on a pull (the episode shows it is pulling). Raises ``ImageNotFound`` or ``SandboxError``."""
    try:
        reference = image_reference.parse(image)
    except image_reference.BadReference as error:
        raise SandboxError(f"bad image reference: {error}", retryable=False) from None
    cache = ImageCache(api)
    info = cache.inspect(image)
    if info is not None:
        cache.touch(image, info)
        return PullRecord(image)
    if not reference.pullable:
        raise ImageNotFound(image)
    if on_pull is not None:
        on_pull(image)
    started = time.monotonic()
    redis = redis_client()
    timeout = settings.MEGAFLOW_IMAGE_PULL_TIMEOUT_S
    lock = redis.lock(key(cache.host, f"pull:{image}"), timeout=timeout + 60, blocking_timeout=timeout + 60)
    asked = time.time()
    if not lock.acquire():
        raise SandboxError(f"waited {timeout + 60} s for another pull of {image} on {cache.host}")
    try:
        if (info := cache.inspect(image)) is not None:  # another episode's pull brought it
            cache.touch(image, info)
            return PullRecord(image, waited=True, seconds=time.monotonic() - started)
        failure = redis.hgetall(key(cache.host, f"failed:{image}"))
        if failure and float(failure["at"]) >= asked:
            raise SandboxError(failure["reason"], retryable=failure["retryable"] == "1")
        slots = key(cache.host, "pulling")
        with semaphore_slot(slots, settings.MEGAFLOW_IMAGE_PULL_CONCURRENCY, f"an image pull slot on {cache.host}",
                            max_wait_s=timeout, lease_s=timeout + 60):  # fmt: skip
            with cache.reservation(image):
                try:
                    downloaded = _pull(api, reference, image, timeout)
                except SandboxError as error:
                    failed = key(cache.host, f"failed:{image}")
                    redis.hset(failed, mapping={"at": time.time(), "reason": error.reason,
                                                "retryable": int(error.retryable)})  # fmt: skip
                    redis.expire(failed, FAILURE_MEMORY_S)
                    raise
                cache.touch(image)
                cache.log("pull", image, downloaded)
        cache.enforce()
    finally:
        try:
            lock.release()
        except Exception:  # the lease ran out (a pull past its timeout): nothing left to release
            pass
    seconds = time.monotonic() - started
    logger.info("pulled %s on %s: %.1f s, %d bytes", image, cache.host, seconds, downloaded)
    return PullRecord(image, pulled=True, seconds=seconds, bytes=downloaded)


def _pull(api: docker.APIClient, reference: image_reference.ImageReference, image: str, timeout_s: float) -> int:
    """Pull ``image``; returns the bytes downloaded (layers the daemon did not have). Cut off at ``timeout_s``."""
    registry = reference.registry
    params = {"fromImage": reference.repository, "tag": reference.digest or reference.tag}
    deadline = time.monotonic() + timeout_s
    cut_off_error = SandboxError(f"pulling {image} from {registry} took longer than {timeout_s:.0f} s; cut off")
    try:
        # The daemon answers with its headers only once the registry answered: the wait for them is cut off too.
        response = api._post(api._url("/images/create"), params=params, stream=True, timeout=timeout_s)
        api._raise_for_status(response)
    except docker.errors.APIError as exc:
        raise _pull_error(image, registry, exc.explanation or str(exc)) from None
    except requests.RequestException as exc:
        if isinstance(exc, requests.Timeout) or time.monotonic() >= deadline:
            raise cut_off_error from None
        raise SandboxError(f"pulling {image}: the Docker daemon did not answer: {exc}") from None
    cut_off = threading.Event()

    def cut() -> None:
        cut_off.set()
        response.close()  # the daemon cancels a pull whose client went away

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.daemon = True
    timer.start()
    totals: dict[str, int] = {}
    try:
        for event in api._stream_helper(response, decode=True):
            if "error" in event:
                raise _pull_error(image, registry, event.get("error") or "")
            if event.get("status") == "Downloading" and event.get("id"):
                total = (event.get("progressDetail") or {}).get("total") or 0
                totals[event["id"]] = max(totals.get(event["id"], 0), int(total))
    except (requests.RequestException, OSError, ValueError, AttributeError) as exc:
        if not cut_off.is_set() and time.monotonic() < deadline:
            raise SandboxError(f"pulling {image}: lost the connection to the Docker daemon: {exc}") from None
    finally:
        timer.cancel()
    if cut_off.is_set() or time.monotonic() >= deadline:
        raise cut_off_error
    try:
        api.inspect_image(image)
    except docker.errors.ImageNotFound:
        raise SandboxError(f"pulling {image} from {registry} ended without the image") from None
    return sum(totals.values())


def _pull_error(image: str, registry: str, message: str) -> SandboxError:
    first = message.strip().splitlines()[0][:300] if message.strip() else "no reason given"
    lowered = first.lower()
    if any(hint in lowered for hint in _DENIED_HINTS):
        return SandboxError(f"pulling {image}: {registry} refused access: {first}", retryable=False)
    if any(hint in lowered for hint in _NOT_FOUND_HINTS) and "dial tcp" not in lowered:
        error = ImageNotFound(image)
        error.reason = f"image not found: {image} ({registry} has no such image: {first})"
        error.args = (error.reason,)
        return error
    return SandboxError(f"pulling {image} from {registry} failed (registry unreachable or failing): {first}")
