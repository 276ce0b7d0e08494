"""``/metrics``: the fleet as Prometheus sees it, computed at scrape time from the broker and the database.

Workers are many processes on many hosts, so per-process counters could not be summed here; the durable state
can. Queue depth comes from the broker; episodes by status from the database; step latency (model,
environment, orchestration overhead), steps/s and tokens/s from the steps completed in the last window.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import Count, F, Sum
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from rest_framework.permissions import IsAdminUser
from rest_framework.renderers import BaseRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from envs import image_cache
from orchestrator import costs
from orchestrator.autoscale import last_decision
from orchestrator.fleet import queue_depths, step_latencies
from orchestrator.models import Episode, Run, Step

WINDOW = timedelta(minutes=5)
RATE_WINDOW = timedelta(seconds=60)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def histogram(name: str, documentation: str, samples: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["phase"])
    for phase, values in samples.items():
        buckets = [(str(edge), sum(value <= edge for value in values)) for edge in BUCKETS]
        family.add_metric([phase], buckets + [("+Inf", len(values))], sum(values))
    return family


class FleetCollector:
    def collect(self):
        depth = GaugeMetricFamily("megaflow_queue_depth", "Messages waiting in each queue.", labels=["queue"])
        for queue, waiting in queue_depths().items():
            depth.add_metric([queue], waiting)
        yield depth

        episodes = GaugeMetricFamily("megaflow_episodes", "Episodes by status.", labels=["status"])
        counts = dict(Episode.objects.values_list("status").annotate(n=Count("pk")).order_by())
        for status in Episode.Status.values:
            episodes.add_metric([status], counts.get(status, 0))
        yield episodes

        now = timezone.now()
        yield histogram(
            "megaflow_step_seconds",
            f"Step latency over the last {int(WINDOW.total_seconds())} s: model, environment, orchestration overhead, "
            "and wall time (from the previous step's end).",
            step_latencies(now - WINDOW),
        )
        recent = Step.objects.filter(completed_at__gte=now - RATE_WINDOW).aggregate(
            steps=Count("pk"), tokens=Sum(F("prompt_tokens") + F("completion_tokens"))
        )
        seconds = RATE_WINDOW.total_seconds()
        yield GaugeMetricFamily("megaflow_steps_per_second", "Steps completed per second (last 60 s).",
                                value=recent["steps"] / seconds)  # fmt: skip
        yield GaugeMetricFamily("megaflow_tokens_per_second", "Prompt + completion tokens per second (last 60 s).",
                                value=(recent["tokens"] or 0) / seconds)  # fmt: skip
        yield from cost_metrics()
        yield from autoscaler_metrics()


def cost_metrics():
    """What runs cost (orchestrator/costs.py): the fleet's total per unit, and each running run's, labelled by run
    (only running runs, so the label set stays as small as the work in flight)."""
    total = GaugeMetricFamily("megaflow_cost_total", "Cost of every episode so far, per unit.", labels=["unit"])
    for unit, amount in costs.totals(Episode.objects.all()).items():
        total.add_metric([unit], amount)
    yield total
    per_run = GaugeMetricFamily("megaflow_run_cost", "Cost of each running run so far, per unit.",
                                labels=["run", "unit"])  # fmt: skip
    for run_id in Run.objects.filter(status=Run.Status.RUNNING).values_list("pk", flat=True):
        for unit, amount in costs.run_cost(run_id).items():
            per_run.add_metric([str(run_id), unit], amount)
    yield per_run
    cached = GaugeMetricFamily("megaflow_env_host_image_cache_bytes", "Bytes of task images each env host caches.",
                              labels=["host"])  # fmt: skip
    for host in settings.MEGAFLOW_ENV_HOSTS or [settings.MEGAFLOW_ENV_HOST]:
        cached.add_metric([host], sum(image_cache.usage(host).values()))
    yield cached


def autoscaler_metrics():
    """The coordinated autoscaler's last decision: desired replicas per pool (for KEDA or an HPA), the
    admission limit it holds, and the demand it sized them for."""
    decision = last_decision()
    if decision is None:
        return
    desired = GaugeMetricFamily("megaflow_desired_replicas", "Worker replicas the autoscaler wants, per pool.",
                                labels=["pool"])  # fmt: skip
    for pool, replicas in decision["replicas"].items():
        desired.add_metric([pool], replicas)
    yield desired
    yield GaugeMetricFamily("megaflow_autoscale_demand_steps_per_second", "Steps/s the autoscaler sized the pools for.",
                            value=decision["demand_steps_per_s"])  # fmt: skip
    limit = decision["admission_limit"]
    yield GaugeMetricFamily("megaflow_admission_limit", "Live episodes admitted at most (-1: unthrottled).",
                            value=-1 if limit is None else limit)  # fmt: skip


class PrometheusText(BaseRenderer):
    media_type = "text/plain"
    format = "prometheus"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data


class MetricsView(APIView):
    """Prometheus exposition; staff tokens only (``authorization: {type: Token, credentials: ...}``)."""

    permission_classes = [IsAdminUser]
    renderer_classes = [PrometheusText]
    throttle_classes = []
    schema = None

    def get(self, request):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector())
        return Response(generate_latest(registry).decode())
