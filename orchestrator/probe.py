"""Topology probe: one message relayed through a list of queues, each hop noting which worker ran it.

``start_probe(["agent", "model.replay", "env.default"])`` publishes to the first queue; each service's
``probe`` task records its hop and publishes to the next (event-driven, nobody waits on a result); the last
hop delivers the trace to a reply inbox (orchestrator/replies.py), where ``wait_for_probe`` picks it up. The
test suite uses it to prove that a task sent to a queue runs on that queue's worker and no other's;
``megaflow probe`` shows operators the same.
"""

from __future__ import annotations

import time
import uuid

from celery import current_app

from megaflow_site.megaflow_task import megaflow_task
from megaflow_site.topology import FRAMEWORK_QUEUE, ROUTING_KWARG, Service, queue_name
from orchestrator import replies

TRACE_INBOX = "megaflow:reply:probe:{}"

PROBE_TASK_NAME = {Service.AGENT: "agents.probe", Service.MODEL: "modelserving.probe", Service.ENV: "envs.probe"}
FRAMEWORK_PROBE = "agents.framework_probe"  # the agent service's second queue (megaflow_site/topology.py)


def parse_queue(queue: str) -> tuple[Service, str | None]:
    """``"model.replay"`` → ``(Service.MODEL, "replay")``; the queue must be declared."""
    service_name, _, key = queue.partition(".")
    service = Service(service_name)
    queue_name(service, key or None)  # raises UnknownQueue for an undeclared model or pool
    return service, key or None


def _publish_hop(probe_id: str, route: list[str], index: int, trace: list[dict]) -> None:
    service, key = parse_queue(route[index])
    kwargs = {"probe_id": probe_id, "route": route, "index": index, "trace": trace}
    if key and service in ROUTING_KWARG:
        kwargs[ROUTING_KWARG[service]] = key
    name = FRAMEWORK_PROBE if route[index] == FRAMEWORK_QUEUE else PROBE_TASK_NAME[service]
    current_app.send_task(name, kwargs=kwargs)


def start_probe(route: list[str]) -> str:
    """Send a probe along ``route`` (queue names); returns its id for ``wait_for_probe``."""
    if not route:
        raise ValueError("a probe needs at least one queue")
    for queue in route:
        parse_queue(queue)
    probe_id = uuid.uuid4().hex
    _publish_hop(probe_id, list(route), 0, [])
    return probe_id


def wait_for_probe(probe_id: str, timeout_s: float) -> list[dict] | None:
    """The probe's trace (one dict per hop), or None if it did not come back within ``timeout_s``."""
    return replies.wait_for_reply(TRACE_INBOX.format(probe_id), timeout_s)


def relay(request, service: Service, probe_id: str, route: list[str], index: int, trace: list[dict]) -> None:
    """Record this hop (worker, queue, queue wait) and pass the probe on, or finish it."""
    trace = [*trace, {
        "service": str(service),
        "queue": (request.delivery_info or {}).get("routing_key"),
        "worker": request.hostname,
        "queue_wait_ms": round(1000 * (getattr(request, "megaflow_queue_wait_s", None) or 0.0), 3),
        "at": time.time(),
    }]  # fmt: skip
    if index + 1 < len(route):
        _publish_hop(probe_id, route, index + 1, trace)
        return
    replies.deliver(TRACE_INBOX.format(probe_id), trace)


def define_probe_task(service: Service, name: str | None = None):
    """The thin ``<package>.probe`` Celery task for ``service``; each service package defines one."""

    @megaflow_task(name or PROBE_TASK_NAME[service], bind=True)
    def probe(self, probe_id: str, route: list[str], index: int, trace: list[dict], **routing) -> None:
        relay(self.request, service, probe_id, route, index, trace)

    return probe
