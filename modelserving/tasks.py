"""Celery tasks of the modelserving package; routed to this service's queue by megaflow_site.topology."""

from megaflow_site.topology import Service
from orchestrator.probe import define_probe_task

probe = define_probe_task(Service.MODEL)
