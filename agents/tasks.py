"""Celery tasks of the Agent Service (queue ``agent``). The agents themselves are library code, called inline by
the episode loop where the data is (agents/agent.py); the control plane's tasks on this queue are in
orchestrator/tasks.py."""

from megaflow_site.topology import Service
from orchestrator.probe import define_probe_task

probe = define_probe_task(Service.AGENT)
