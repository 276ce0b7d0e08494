"""Persistent mode: warm containers per (pool, image), pre-started, reset between episodes, reaped when idle.

A pool named in ``MEGAFLOW_WARM_POOL_SIZES`` keeps up to SIZE idle containers for every sandbox shape it has
served (image, workdir, read-only or writable root). Acquiring is one ``LPOP`` from Redis plus a liveness
check; the expensive part, the reset, happens on release, off the episode's critical path.

Reset, and why this one: for tasks that bring their repository (read-only root), every path a task can
write is a tmpfs, so killing every process but PID 1 and emptying those mounts returns the container to
exactly the state it started in — as clean as a new container, at the cost of one exec. For images that
carry their repository (writable root), the reset is ``git reset --hard`` + ``git clean -ffdx`` to the
episode's ``megaflow-base`` tag, which restores the tree but not changes made outside it (a pip install);
those containers are retired after ``MEGAFLOW_WARM_MAX_USES`` episodes to bound such drift. Snapshots
(``docker commit``/checkpoint) would be cleaner still but cost seconds per episode, which is the cost the
warm pool exists to avoid. A container whose reset fails is destroyed, never reused.

State in Redis: ``megaflow:warm:<pool>:<shape>:idle`` (list of idle container ids),
``megaflow:warm:<pool>:shapes`` (shapes seen, to pre-start and maintain), ``megaflow:warm:c:<id>`` (hash:
pool, shape, state, uses, since).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

from django.conf import settings

from envs.backend import EnvironmentBackend, SandboxError, SandboxSpec
from envs.task_sandbox import BASE_TAG, GIT
from orchestrator.hot_state import redis_client

logger = logging.getLogger("megaflow.envs.warm_pool")

IDLE = "idle"
LEASED = "leased"


def pool_size(pool: str) -> int:
    return settings.MEGAFLOW_WARM_POOL_SIZES.get(pool, 0)


def shape_of(spec: SandboxSpec) -> str:
    """The part of a spec that a warm container is made for: any episode with the same shape can use it."""
    return json.dumps([spec.image, spec.workdir, spec.writable_root])


def spec_for_shape(shape: str) -> SandboxSpec:
    image, workdir, writable_root = json.loads(shape)
    return SandboxSpec(image=image, workdir=workdir, writable_root=writable_root)


def default_shape() -> str:
    return shape_of(SandboxSpec(image=settings.MEGAFLOW_BASE_IMAGE))


def _idle_key(pool: str, shape: str) -> str:
    return f"megaflow:warm:{pool}:{shape}:idle"


def _shapes_key(pool: str) -> str:
    return f"megaflow:warm:{pool}:shapes"


def _container_key(container_id: str) -> str:
    return f"megaflow:warm:c:{container_id}"


class WarmPool:
    """The warm containers of one pool, on one backend."""

    def __init__(self, backend: EnvironmentBackend, pool: str):
        self.backend = backend
        self.pool = pool
        self.size = pool_size(pool)
        self.redis = redis_client()

    def _create(self, spec: SandboxSpec) -> str:
        shape = shape_of(spec)
        container_id = self.backend.create(replace(spec, episode_id=None, run_id=None, mode="warm", pool=self.pool))
        self.redis.hset(_container_key(container_id), mapping={
            "pool": self.pool, "shape": shape, "state": LEASED, "uses": 0, "since": time.time(),
        })  # fmt: skip
        self.redis.sadd(_shapes_key(self.pool), shape)
        return container_id

    def acquire(self, spec: SandboxSpec) -> tuple[str, bool]:
        """A container for ``spec``: (id, True) from the idle list, or (id, False) freshly created."""
        shape = shape_of(spec)
        self.redis.sadd(_shapes_key(self.pool), shape)
        while container_id := self.redis.lpop(_idle_key(self.pool, shape)):
            if self.backend.is_alive(container_id):
                self.redis.hset(_container_key(container_id), mapping={"state": LEASED, "since": time.time()})
                return container_id, True
            forget(container_id)
        return self._create(spec), False

    def release(self, container_id: str) -> bool:
        """Reset the container and make it idle again; destroy it instead when it is worn out, the pool is
        full, or the reset fails. Returns whether it went back to the pool."""
        meta = self.redis.hgetall(_container_key(container_id))
        if not meta:
            self.backend.destroy(container_id)
            return False
        if meta.get("state") == IDLE:
            return True  # released twice (a cancel and the episode's own stop): lend it out once, not twice
        uses = int(meta.get("uses", 0)) + 1
        shape = meta["shape"]
        idle_key = _idle_key(self.pool, shape)
        if uses >= settings.MEGAFLOW_WARM_MAX_USES or self.redis.llen(idle_key) >= self.size:
            self.discard(container_id)
            return False
        try:
            self.reset(container_id, spec_for_shape(shape))
        except SandboxError as error:
            logger.warning("warm container %s failed its reset (%s); destroying it", container_id[:12], error.reason)
            self.discard(container_id)
            return False
        self.redis.hset(_container_key(container_id), mapping={"state": IDLE, "uses": uses, "since": time.time()})
        self.redis.rpush(idle_key, container_id)
        return True

    def reset(self, container_id: str, spec: SandboxSpec) -> None:
        """Return the container to the state of a fresh one (see the module docstring)."""
        workdir = spec.workdir
        if spec.writable_root:
            script = (
                f"kill -9 -1 2>/dev/null; cd {workdir} && {GIT} reset -q --hard {BASE_TAG} && {GIT} clean -qffdx "
                f"&& find /tmp -mindepth 1 -delete"
            )
        else:
            script = f"kill -9 -1 2>/dev/null; find {workdir} /tmp /root -mindepth 1 -delete"
        result = self.backend.exec(container_id, script, timeout_s=60, workdir="/")
        if result.exit_code != 0:
            raise SandboxError(f"reset failed (exit {result.exit_code}): {result.output.strip()[-300:]}")

    def discard(self, container_id: str) -> None:
        self.backend.destroy(container_id)
        forget(container_id)

    def maintain(self) -> dict[str, int]:
        """Destroy containers idle longer than ``MEGAFLOW_WARM_IDLE_TTL_S``, then top every shape up to the
        pool size (the base image's shape is always kept warm). Returns counts of what it did."""
        done = {"reaped": 0, "started": 0}
        if self.size <= 0:
            return done
        # One maintainer per pool at a time, or two workers would both top the pool up.
        lock = self.redis.lock(f"megaflow:warm:{self.pool}:maintaining", timeout=600, blocking=False)
        if not lock.acquire():
            return done
        try:
            return self._maintain(done)
        finally:
            lock.release()

    def _maintain(self, done: dict[str, int]) -> dict[str, int]:
        shapes = self.redis.smembers(_shapes_key(self.pool)) | {default_shape()}
        cutoff = time.time() - settings.MEGAFLOW_WARM_IDLE_TTL_S
        for shape in shapes:
            idle_key = _idle_key(self.pool, shape)
            for container_id in self.redis.lrange(idle_key, 0, -1):
                since = float(self.redis.hget(_container_key(container_id), "since") or 0)
                if since < cutoff or not self.backend.is_alive(container_id):
                    if self.redis.lrem(idle_key, 0, container_id):  # only the maintainer that removed it destroys it
                        self.discard(container_id)
                        done["reaped"] += 1
            while self.redis.llen(idle_key) < self.size:
                spec = spec_for_shape(shape)
                with self.backend.holding_image(spec.image):
                    self.backend.ensure_image(spec.image)  # it may have been evicted while no container used it
                    container_id = self._create(spec)
                self.redis.hset(_container_key(container_id), mapping={"state": IDLE, "since": time.time()})
                self.redis.rpush(idle_key, container_id)
                done["started"] += 1
        return done

    def idle_ids(self, shape: str | None = None) -> list[str]:
        return self.redis.lrange(_idle_key(self.pool, shape or default_shape()), 0, -1)


def is_idle_warm(container_id: str) -> bool:
    """Whether the container sits in a warm pool's idle list (the reaper must leave it alone)."""
    meta = redis_client().hgetall(_container_key(container_id))
    if meta.get("state") != IDLE:
        return False
    return redis_client().lpos(_idle_key(meta["pool"], meta["shape"]), container_id) is not None


def forget(container_id: str) -> None:
    """Drop a container's warm-pool bookkeeping (it was destroyed, or is about to be)."""
    redis = redis_client()
    meta = redis.hgetall(_container_key(container_id))
    if meta:
        redis.lrem(_idle_key(meta["pool"], meta["shape"]), 0, container_id)
    redis.delete(_container_key(container_id))
