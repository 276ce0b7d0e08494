"""Celery tasks of the Agent Service (queues ``agent`` and ``agent.framework``). The agents themselves are library
code, called inline by the episode loop where the data is (agents/agent.py); the control plane's tasks and the
framework agents' loop are in orchestrator/tasks.py."""

from megaflow_site.topology import Service
from orchestrator.probe import FRAMEWORK_PROBE, define_probe_task

probe = define_probe_task(Service.AGENT)
framework_probe = define_probe_task(Service.AGENT, FRAMEWORK_PROBE)
