"""The Celery topology in one place: which queues exist, which task goes where, how each worker is started.

Three services, routed by resource (DESIGN.md):

    agent          Agent Service        (CPU)  tasks defined in ``agents`` and ``orchestrator``
    model.<name>   Model Service        (GPU)  tasks defined in ``modelserving``; ``model=`` picks the queue
    env.<pool>     Environment Service  (CPU)  tasks defined in ``envs``; ``pool=`` picks the queue

A task's service is the package that defines it, so adding a task never means editing a routing table.
Model and environment tasks take the model name / pool as a keyword argument, and the router reads it from
the message; an unknown name raises ``UnknownQueue`` at publish time instead of parking the message on a
queue that no worker consumes.

Env hosts (``MEGAFLOW_ENV_HOSTS``; a host is one Docker daemon and its image cache) have a queue of their own per
pool, ``env.<pool>.<host>``, which that host's env workers consume beside ``env.<pool>``. An env task that names
a listed host (``host=``) goes there: an episode placed on a host (orchestrator/placement.py), and every hop
that touches its sandbox, which lives on that host's daemon. Everything else stays on ``env.<pool>``.

``python -m megaflow_site.topology`` prints the worker command for every declared queue.
"""

from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass

import django
from django.conf import settings
from kombu import Queue

# Backends that may run on greenlets (MEGAFLOW_HOT_QUEUE_POOL=gevent): their calls block only on sockets and sleeps.
# Not the openai or vllm model backends: their HTTP runs on an asyncio loop, which on greenlets shares the worker's
# one OS thread, so Django takes every task for async code and refuses its queries. Not hf: a forward pass holds
# the interpreter, and with it every greenlet and the heartbeat. docker: its calls are HTTP on the daemon's socket
# and reads of each sandbox's exec or shell stream (envs/docker_backend.py), all of which gevent makes cooperative.
# Not local: it runs commands as the worker's own subprocesses, which have not been tried on greenlets.
COOPERATIVE_MODEL_BACKENDS = frozenset({"sim", "replay"})
COOPERATIVE_ENV_BACKENDS = frozenset({"sim", "docker"})

AGENT_QUEUE = "agent"
# The Agent Service's second queue: tasks that block for a whole episode (a framework's own loop,
# orchestrator/framework_loop.py), kept off the threads the control plane needs.
FRAMEWORK_QUEUE = "agent.framework"
FRAMEWORK_TASK_PREFIX = "agents.framework_"


class Service(enum.StrEnum):
    AGENT = "agent"
    MODEL = "model"
    ENV = "env"


# The package that defines a task decides its service.
SERVICE_OF_PACKAGE = {
    "agents": Service.AGENT,
    "orchestrator": Service.AGENT,
    "modelserving": Service.MODEL,
    "envs": Service.ENV,
}

# The keyword argument that names a model / pool in a message, per keyed service.
ROUTING_KWARG = {Service.MODEL: "model", Service.ENV: "pool"}
HOST_KWARG = "host"  # env tasks: the env host whose own queue takes the message (blank or unlisted: the pool's)


class UnknownQueue(LookupError):
    """A message named a model or pool that has no queue."""


def known_keys(service: Service) -> list[str]:
    return {Service.MODEL: settings.MEGAFLOW_MODELS, Service.ENV: settings.MEGAFLOW_ENV_POOLS}.get(service, [])


def default_key(service: Service) -> str | None:
    keys = known_keys(service)
    return keys[0] if keys else None


def queue_name(service: Service, key: str | None = None) -> str:
    """The queue for ``service``; ``key`` is the model name or env pool (default: the first configured)."""
    if service is Service.AGENT:
        return FRAMEWORK_QUEUE if key == "framework" else AGENT_QUEUE
    key = key or default_key(service)
    if key not in known_keys(service):
        setting = "MEGAFLOW_MODELS" if service is Service.MODEL else "MEGAFLOW_ENV_POOLS"
        raise UnknownQueue(f"no queue for {service} {key!r}: {setting} lists {', '.join(known_keys(service))}")
    return f"{service}.{key}"


def host_queue_name(pool: str, host: str) -> str:
    """The queue of ``pool`` on env host ``host`` (one of ``MEGAFLOW_ENV_HOSTS``)."""
    return f"{queue_name(Service.ENV, pool)}.{host}"


def service_of_task(task_name: str) -> Service | None:
    return SERVICE_OF_PACKAGE.get(task_name.split(".", 1)[0])


def declared_queues() -> list[Queue]:
    names = [AGENT_QUEUE, FRAMEWORK_QUEUE]
    for service in (Service.MODEL, Service.ENV):
        names += [queue_name(service, key) for key in known_keys(service)]
    hosts = settings.MEGAFLOW_ENV_HOSTS
    names += [host_queue_name(pool, host) for pool in known_keys(Service.ENV) for host in hosts]
    return [Queue(name, routing_key=name) for name in names]


def route_task(name, args, kwargs, options, task=None, **_):
    """Celery router: send each MegaFlow task to its service's queue (see the module docstring)."""
    service = service_of_task(name)
    if service is None:
        return None
    if name.startswith(FRAMEWORK_TASK_PREFIX):
        return {"queue": FRAMEWORK_QUEUE}
    key = (kwargs or {}).get(ROUTING_KWARG.get(service, ""))
    host = (kwargs or {}).get(HOST_KWARG) if service is Service.ENV else None
    if host and host in settings.MEGAFLOW_ENV_HOSTS:
        return {"queue": host_queue_name(key or default_key(service), host)}
    return {"queue": queue_name(service, key)}


@dataclass(frozen=True)
class WorkerSpec:
    """How one worker of one queue is started; tests, ``make up`` and the README all use this."""

    service: Service
    key: str | None = None
    concurrency: int | None = None
    host: str | None = None  # an env host's worker: it consumes env.<pool>.<host> and env.<pool>

    # Every service waits on I/O (the database, Redis, Docker, an inference server) rather than computing,
    # so threads carry many tasks per process; the model pool needs many requests in flight to batch.
    DEFAULT_CONCURRENCY = {Service.AGENT: 8, Service.MODEL: 32, Service.ENV: 8}

    @property
    def queue(self) -> str:
        if self.host:
            return host_queue_name(self.key, self.host)
        return queue_name(self.service, self.key)

    @property
    def queues(self) -> list[str]:
        """What the worker consumes: its queue, and for an env host's worker the pool's shared queue too."""
        return [self.queue, queue_name(self.service, self.key)] if self.host else [self.queue]

    @property
    def environment(self) -> dict[str, str]:
        """Variables the worker needs beyond the deployment's own (an env host's worker says which host it is)."""
        return {"MEGAFLOW_ENV_HOST": self.host} if self.host else {}

    @property
    def node_name(self) -> str:
        return self.queue.replace(".", "-") + "@%h"

    def argv(self, node_name: str | None = None, loglevel: str = "INFO") -> list[str]:
        return [
            "celery", "-A", "megaflow_site", "worker",
            "-Q", ",".join(self.queues),
            "-n", node_name or self.node_name,
            "--concurrency", str(self.concurrency or self.DEFAULT_CONCURRENCY[self.service]),
            "--loglevel", loglevel,
            "--without-mingle", "--without-gossip",
            *(["--task-events"] if self.sends_task_events else []),
            *(["--pool", "gevent"] if self.cooperative else []),
        ]  # fmt: skip

    @property
    def cooperative(self) -> bool:
        """Whether the worker runs a greenlet per message rather than a thread: the hot queues' pool (settings),
        where the queue's backend may run on greenlets."""
        if self.service is Service.AGENT or settings.MEGAFLOW_HOT_QUEUE_POOL != "gevent":
            return False
        if self.service is Service.MODEL:
            # The backend is the model's configured one, else the backend of its name (modelserving.backend's
            # model_config; anything else is openai, not cooperative).
            model = self.key or default_key(self.service)
            backend = settings.MEGAFLOW_MODEL_CONFIG.get(model, {}).get("backend", model)
            return backend in COOPERATIVE_MODEL_BACKENDS
        return settings.MEGAFLOW_ENV_BACKEND in COOPERATIVE_ENV_BACKENDS

    @property
    def sends_task_events(self) -> bool:
        """The agent queue's workers report every task to Flower; the hot queues' only when asked (settings)."""
        return self.service is Service.AGENT or settings.MEGAFLOW_HOT_QUEUE_TASK_EVENTS


def flower_argv(celery: str, port: int) -> list[str]:
    """Flower on loopback behind basic auth (``FLOWER_BASIC_AUTH``; its HTTP API needs the same)."""
    return [celery, "-A", "megaflow_site", "flower", "--address=127.0.0.1", f"--port={port}",
            f"--basic-auth={settings.FLOWER_BASIC_AUTH}"]  # fmt: skip


def all_worker_specs() -> list[WorkerSpec]:
    """One worker per declared queue: the local stack and the test suite both start exactly these."""
    specs = [WorkerSpec(Service.AGENT), WorkerSpec(Service.AGENT, "framework", settings.MEGAFLOW_FRAMEWORK_CONCURRENCY)]
    specs += [WorkerSpec(Service.MODEL, key) for key in known_keys(Service.MODEL)]
    for pool in known_keys(Service.ENV):
        hosts = settings.MEGAFLOW_ENV_HOSTS or [None]
        specs += [WorkerSpec(Service.ENV, pool, host=host) for host in hosts]
    return specs


def main() -> None:
    django.setup()
    for spec in all_worker_specs():
        print(f"# {spec.service} service, queue {', '.join(spec.queues)}")
        print(" ".join([*(f"{name}={value}" for name, value in spec.environment.items()), *spec.argv()]))
    sys.exit(0)


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "megaflow_site.settings")
    main()
