"""A bounded, least-recently-used cache of task images per env host (one Docker daemon).

The bound, ``MEGAFLOW_IMAGE_CACHE_GB``, counts what each task image adds to the host beyond the base image (its
size, less the base image's when it is built on it): the base image is always kept and never counted, so a
dataset of images that share it is charged for what they add. An image is never removed while a container of
the daemon (running, stopped or a warm pool's idle one) uses it, nor while an episode holds a pin on it (it was
just pulled for a container about to be created), nor when it is the base image.

Room is made *before* a pull, for the image's size as last seen anywhere in the fleet (else the largest image this
host holds), and the pull's reservation counts until it is recorded; so the cache stays within its bound at
every moment as long as the images in use fit in it. What a host holds is advertised in Redis, where the placement
(orchestrator/placement.py) reads it:

    megaflow:images:<host>:lru        sorted set: image → last use (the advertisement, and the LRU order)
    megaflow:images:<host>:bytes      hash: image → bytes it adds beyond the base image
    megaflow:images:<host>:pins       sorted set: "<image> <token>" → lease expiry
    megaflow:images:<host>:reserved   sorted set: "<token> <bytes>" → lease expiry (pulls under way)
    megaflow:images:<host>:events     list: the host's recent pulls and evictions (JSON)
    megaflow:images:sizes             hash: image → bytes, as last measured on any host (room before a pull)
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from contextlib import contextmanager

import docker
from django.conf import settings

from envs import image_reference
from orchestrator.hot_state import redis_client

logger = logging.getLogger("megaflow.envs.images")

PIN_LEASE_S = 900
EVENTS_KEPT = 10_000
SIZES_KEY = "megaflow:images:sizes"
SLOTS_KEY = "megaflow:env:slots"  # hash: env host → sandboxes its workers run at once (advertised at worker start)


def key(host: str, what: str) -> str:
    return f"megaflow:images:{host}:{what}"


def bound_bytes() -> int:
    return int(settings.MEGAFLOW_IMAGE_CACHE_GB * 1e9)


def held_images(host: str) -> set[str]:
    """The images ``host`` advertises (placement reads these)."""
    return set(redis_client().zrange(key(host, "lru"), 0, -1))


def advertise_slots(host: str, slots: int) -> None:
    redis_client().hset(SLOTS_KEY, host, slots)


def host_slots() -> dict[str, int]:
    return {host: int(slots) for host, slots in redis_client().hgetall(SLOTS_KEY).items()}


def events(host: str) -> list[dict]:
    """The host's recent pulls and evictions, oldest first."""
    return [json.loads(entry) for entry in redis_client().lrange(key(host, "events"), 0, -1)]


def usage(host: str) -> dict[str, int]:
    """Image → bytes it adds, for every image the host's cache holds."""
    return {image: int(size) for image, size in redis_client().hgetall(key(host, "bytes")).items()}


class ImageCache:
    """The image cache of the daemon ``api`` talks to, known to the fleet as ``host``."""

    def __init__(self, api: docker.APIClient, host: str | None = None):
        self.api = api
        self.host = host or settings.MEGAFLOW_ENV_HOST
        self.redis = redis_client()

    # --- what the daemon has -------------------------------------------------------------------------------

    def inspect(self, image: str) -> dict | None:
        try:
            return self.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            return None

    def added_bytes(self, info: dict) -> int:
        """What the image adds beyond the base image (all of it when it is not built on the base)."""
        base = _base_layers(self.api)
        layers = info.get("RootFS", {}).get("Layers") or []
        if base and base[1] and layers[: len(base[1])] == base[1]:
            return max(0, int(info["Size"]) - base[0])
        return int(info["Size"])

    # --- bookkeeping -----------------------------------------------------------------------------------------

    def touch(self, image: str, info: dict | None = None) -> None:
        """Record a use of ``image`` (present on the daemon): it becomes the most recently used. Only images that
        can be pulled again (their reference names a registry) are cached, so only those are ever evicted: a
        locally built image removed would be gone for good."""
        if image == settings.MEGAFLOW_BASE_IMAGE or not image_reference.parse(image).pullable:
            return
        if not self.redis.hexists(key(self.host, "bytes"), image):
            info = info or self.inspect(image)
            if info is None:
                return
            size = self.added_bytes(info)
            self.redis.hset(key(self.host, "bytes"), image, size)
            self.redis.hset(SIZES_KEY, image, size)
        self.redis.zadd(key(self.host, "lru"), {image: time.time()})

    def log(self, event: str, image: str, size: int = 0) -> None:
        """Keep the host's recent pulls and evictions (``events``): what the tests and the benchmark count."""
        entry = json.dumps({"event": event, "image": image, "bytes": size, "at": time.time()})
        self.redis.rpush(key(self.host, "events"), entry)
        self.redis.ltrim(key(self.host, "events"), -EVENTS_KEPT, -1)

    def forget(self, image: str) -> None:
        self.redis.zrem(key(self.host, "lru"), image)
        self.redis.hdel(key(self.host, "bytes"), image)

    def used_bytes(self) -> int:
        return sum(usage(self.host).values())

    def _reserved_bytes(self) -> int:
        reserved = key(self.host, "reserved")
        self.redis.zremrangebyscore(reserved, "-inf", time.time())
        return sum(int(member.rsplit(" ", 1)[1]) for member in self.redis.zrange(reserved, 0, -1))

    def _pinned(self) -> set[str]:
        pins = key(self.host, "pins")
        self.redis.zremrangebyscore(pins, "-inf", time.time())
        return {member.rsplit(" ", 1)[0] for member in self.redis.zrange(pins, 0, -1)}

    @contextmanager
    def pin(self, image: str):
        """Keep ``image`` from eviction while the caller pulls it and creates its container."""
        member = f"{image} {uuid.uuid4().hex}"
        self.redis.zadd(key(self.host, "pins"), {member: time.time() + PIN_LEASE_S})
        try:
            yield
        finally:
            self.redis.zrem(key(self.host, "pins"), member)

    def estimate(self, image: str) -> int:
        """Bytes ``image`` will take here: as measured anywhere before, else the largest image this host holds."""
        known = self.redis.hget(SIZES_KEY, image)
        if known is not None:
            return int(known)
        return max(usage(self.host).values(), default=0)

    # --- the bound ---------------------------------------------------------------------------------------------

    def _lock(self):
        return self.redis.lock(key(self.host, "lock"), timeout=120, blocking_timeout=120)

    @contextmanager
    def reservation(self, image: str):
        """Make room for ``image`` before it is pulled, and hold that room until the pull is over."""
        size = self.estimate(image)
        member = f"{uuid.uuid4().hex} {size}"
        with self._lock():
            self._evict_until(size)
            self.redis.zadd(key(self.host, "reserved"), {member: time.time() + settings.MEGAFLOW_IMAGE_PULL_TIMEOUT_S})
        try:
            yield
        finally:
            self.redis.zrem(key(self.host, "reserved"), member)

    def enforce(self) -> list[str]:
        """Evict until the cache is within its bound again (after a pull whose size was not known)."""
        with self._lock():
            return self._evict_until(0)

    def _evict_until(self, incoming: int) -> list[str]:
        bound = bound_bytes()
        if bound <= 0:
            return []
        sizes = usage(self.host)
        total = sum(sizes.values()) + self._reserved_bytes() + incoming
        if total <= bound:
            return []
        keep = self._pinned() | {settings.MEGAFLOW_BASE_IMAGE}
        in_use, base_id = self._used_image_ids(), self._image_id(settings.MEGAFLOW_BASE_IMAGE)
        evicted = []
        for image in self.redis.zrange(key(self.host, "lru"), 0, -1):  # least recently used first
            if total <= bound:
                break
            if image in keep:
                continue
            image_id = self._image_id(image)
            if image_id is not None and (image_id in in_use or image_id == base_id):
                continue
            if image_id is not None and not self._remove(image):
                continue
            self.forget(image)
            self.log("evict", image, sizes.get(image, 0))
            total -= sizes.get(image, 0)
            evicted.append(image)
        if evicted:
            logger.info("image cache of %s: evicted %s (now %d of %d bytes)", self.host, ", ".join(evicted),
                        total - incoming, bound)  # fmt: skip
        if total > bound:
            logger.warning("image cache of %s: %d bytes over its bound, every image in use", self.host, total - bound)
        return evicted

    def _image_id(self, image: str) -> str | None:
        info = self.inspect(image)
        return None if info is None else info["Id"]

    def _used_image_ids(self) -> set[str]:
        return {container["ImageID"] for container in self.api.containers(all=True)}

    def _remove(self, image: str) -> bool:
        try:
            self.api.remove_image(image)
        except docker.errors.ImageNotFound:
            return True
        except docker.errors.APIError as exc:
            # 409: a container (created since we looked) uses it. Leave it; the next eviction tries again.
            logger.info("image cache of %s: could not remove %s: %s", self.host, image, exc.explanation or exc)
            return False
        return True


@functools.lru_cache(maxsize=8)
def _base_layers_cached(api_id: int, base: str, api) -> tuple[int, list[str]] | None:
    try:
        info = api.inspect_image(base)
    except docker.errors.ImageNotFound:
        return None
    return int(info["Size"]), list(info.get("RootFS", {}).get("Layers") or [])


def _base_layers(api: docker.APIClient) -> tuple[int, list[str]] | None:
    return _base_layers_cached(id(api), settings.MEGAFLOW_BASE_IMAGE, api)
