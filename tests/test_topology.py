"""The queue topology, proven on real workers: each queue's tasks run on its worker and nowhere else."""

import uuid

import pytest
from celery import current_app

from megaflow_site.celery import app
from megaflow_site.topology import AGENT_QUEUE, Service, UnknownQueue, WorkerSpec, all_worker_specs, route_task
from orchestrator import probe

DECLARED = [spec.queue for spec in all_worker_specs()]


def test_declared_queues_cover_every_model_and_pool():
    # tests/session_env.py declares two models and two pools.
    assert DECLARED == [
        "agent",
        "agent.framework",
        "model.replay",
        "model.sim",
        "model.tiny",
        "model.tiny-hf",
        "env.default",
        "env.heavy",
    ]
    assert [queue.name for queue in app.conf.task_queues] == DECLARED


@pytest.mark.parametrize(
    ("task_name", "kwargs", "queue"),
    [
        ("agents.probe", {}, "agent"),
        ("orchestrator.anything", {}, "agent"),
        ("agents.framework_episode", {}, "agent.framework"),
        ("modelserving.probe", {}, "model.replay"),
        ("modelserving.probe", {"model": "sim"}, "model.sim"),
        ("envs.probe", {}, "env.default"),
        ("envs.probe", {"pool": "heavy"}, "env.heavy"),
    ],
)
def test_router_sends_each_task_to_its_services_queue(task_name, kwargs, queue):
    assert route_task(task_name, (), kwargs, {}) == {"queue": queue}


def test_router_leaves_tasks_of_other_packages_to_the_default_queue():
    assert route_task("celery.backend_cleanup", (), {}, {}) is None
    assert app.conf.task_default_queue == AGENT_QUEUE


@pytest.mark.parametrize(
    ("task_name", "kwargs"), [("modelserving.probe", {"model": "gpt-nope"}), ("envs.probe", {"pool": "nope"})]
)
def test_unknown_model_or_pool_is_refused_at_publish(task_name, kwargs, broker):
    with pytest.raises(UnknownQueue, match="nope"):
        current_app.send_task(task_name, kwargs=kwargs)
    assert not [key for key in broker.keys() if b"nope" in key]


def test_worker_command_names_its_queue_and_service():
    argv = WorkerSpec(Service.MODEL, "sim").argv()
    assert argv[:4] == ["celery", "-A", "megaflow_site", "worker"]
    assert argv[argv.index("-Q") + 1] == "model.sim"
    assert argv[argv.index("-n") + 1] == "model-sim@%h"


@pytest.mark.integration
def test_every_worker_consumes_exactly_its_own_queue(celery_workers):
    active = app.control.inspect(destination=celery_workers.nodes, timeout=5).active_queues()
    consumed = {node: sorted(queue["name"] for queue in queues) for node, queues in active.items()}
    assert consumed == {celery_workers.node_for(queue): [queue] for queue in DECLARED}


@pytest.mark.integration
def test_a_task_sent_to_a_queue_runs_on_that_queues_worker_and_never_another(celery_workers):
    sent = {queue: [probe.start_probe([queue]) for _ in range(20)] for queue in DECLARED}
    for queue, probe_ids in sent.items():
        traces = [probe.wait_for_probe(probe_id, timeout_s=20) for probe_id in probe_ids]
        assert None not in traces, f"a probe sent to {queue} never ran"
        hops = [hop for trace in traces for hop in trace]
        assert {hop["worker"] for hop in hops} == {celery_workers.node_for(queue)}
        assert {hop["queue"] for hop in hops} == {queue}


@pytest.mark.integration
def test_a_step_shaped_relay_crosses_the_services_in_order(celery_workers):
    route = ["agent", "model.sim", "env.heavy", "agent", "model.replay", "env.default", "agent"]
    trace = probe.wait_for_probe(probe.start_probe(route), timeout_s=20)
    assert [hop["queue"] for hop in trace] == route
    assert [hop["worker"] for hop in trace] == [celery_workers.node_for(queue) for queue in route]
    assert [hop["service"] for hop in trace] == ["agent", "model", "env", "agent", "model", "env", "agent"]
    # The publisher stamps the send time and every worker turns it into a queue wait (task_telemetry).
    assert all(0 < hop["queue_wait_ms"] < 10_000 for hop in trace)


@pytest.mark.integration
def test_workers_accept_json_only(celery_workers):
    pickled_id = uuid.uuid4().hex
    kwargs = {"probe_id": pickled_id, "route": ["agent"], "index": 0, "trace": []}
    current_app.send_task("agents.probe", kwargs=kwargs, serializer="pickle")
    # A JSON probe sent after it comes back, so the worker has had its chance at the pickled one.
    assert probe.wait_for_probe(probe.start_probe(["agent"]), timeout_s=20) is not None
    assert probe.wait_for_probe(pickled_id, timeout_s=2) is None
