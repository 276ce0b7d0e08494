"""The trainer's door: ``/api/v1/``. Token auth everywhere; owners see their own runs, staff see all.

Datasets and their tasks are shared (every authenticated user may read them and run them); runs, their
episodes and trajectories belong to whoever created the run.
"""

from __future__ import annotations

import re

from django import forms
from django.conf import settings
from django.db import transaction
from django.http import StreamingHttpResponse
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from envs.tasks import validate_dataset
from megaflow_site.topology import Service, default_key, known_keys
from orchestrator import runs, trajectories
from orchestrator.api import serializers
from orchestrator.api.conventions import (
    Conflict,
    StrictFilterSet,
    UtcIsoDateTimeFilter,
    reject_oversize,
)
from orchestrator.api.parsers import StrictJSONParser
from orchestrator.api.schema import IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_MAX, IDEMPOTENCY_KEY_PATTERN
from orchestrator.models import Dataset, DatasetValidation, Episode, Run, Step, Task

# --- datasets and tasks -------------------------------------------------------------------------------------------


class CreatedByRequestUser:
    """What a user creates is theirs: serializers get the request's user as ``owner``."""

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "owner": self.request.user}


@extend_schema(tags=["datasets"])
class DatasetViewSet(CreatedByRequestUser, mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """Datasets of tasks. Create one by uploading, multipart with a ``name``, either ``file`` (JSONL in the task
    format, tasks whose image holds the repository) or ``bundle`` (a .tar.gz of tasks.jsonl and the repository
    archives it names). Gold-validate one in real sandboxes with ``POST …/validate/`` and read the per-task
    outcome from ``…/validation/``."""

    queryset = Dataset.objects.select_related("owner").order_by("name")
    serializer_class = serializers.DatasetSerializer
    parser_classes = [MultiPartParser]
    filterset_fields = {"name": ["exact", "icontains"]}
    ordering_fields = ["name", "created_at"]

    def get_serializer_class(self):
        return serializers.DatasetUploadSerializer if self.action == "create" else serializers.DatasetSerializer

    @extend_schema(
        request=serializers.DatasetUploadSerializer,
        responses={201: serializers.DatasetSerializer, 400: OpenApiResponse(description="field: reason"),
                   413: OpenApiResponse(description="upload too large")},
    )  # fmt: skip
    def create(self, request, *args, **kwargs):
        reject_oversize(request, limit=settings.MEGAFLOW_BUNDLE_MAX_UPLOAD_BYTES)
        upload = serializers.DatasetUploadSerializer(data=request.data, context=self.get_serializer_context())
        upload.is_valid(raise_exception=True)
        dataset = upload.save()
        return Response(serializers.DatasetSerializer(dataset).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=None,
        parameters=[OpenApiParameter("pool", OpenApiTypes.STR, OpenApiParameter.QUERY, required=False,
                                     description="env pool whose workers run it (default: the first)")],
        responses={202: serializers.DatasetValidationSerializer, 400: OpenApiResponse(description="unknown pool"),
                   409: OpenApiResponse(description="a validation of this dataset is already under way")},
    )  # fmt: skip
    @action(detail=True, methods=["post"])
    def validate(self, request, pk=None):
        """Start a gold validation of every task in real sandboxes (SWE-bench's check: each FAIL_TO_PASS test
        fails on the base tree, and every listed test passes with the reference patch)."""
        dataset = self.get_object()
        pool = request.query_params.get("pool") or default_key(Service.ENV)
        if pool not in known_keys(Service.ENV):
            raise ValidationError(
                {"pool": [f"unknown pool {pool!r}; configured: {', '.join(known_keys(Service.ENV))}"]}
            )
        if dataset.validations.filter(
            state__in=[DatasetValidation.State.QUEUED, DatasetValidation.State.RUNNING]
        ).exists():
            raise Conflict(f"dataset {dataset.name} is being validated already")
        validation = DatasetValidation.objects.create(dataset=dataset, env_pool=pool, requested_by=request.user)
        transaction.on_commit(
            lambda: validate_dataset.apply_async(kwargs={"validation_id": validation.pk, "pool": pool})
        )
        body = serializers.DatasetValidationSerializer(validation).data
        return Response(body, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses={200: serializers.DatasetValidationSerializer,
                              404: OpenApiResponse(description="never validated")})  # fmt: skip
    @action(detail=True, methods=["get"])
    def validation(self, request, pk=None):
        """The dataset's latest gold validation: its state and each task's outcome and reasons so far."""
        latest = self.get_object().validations.select_related("dataset", "requested_by").first()
        if latest is None:
            raise NotFound("this dataset was never validated")
        return Response(serializers.DatasetValidationSerializer(latest).data)


class TaskFilter(StrictFilterSet):
    dataset = filters.CharFilter(field_name="dataset__name", help_text="dataset name")

    class Meta:
        model = Task
        fields = {"instance_id": ["exact", "icontains"]}


@extend_schema(tags=["datasets"])
class TaskViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Task.objects.select_related("dataset").order_by("dataset__name", "instance_id")
    serializer_class = serializers.TaskSerializer
    filterset_class = TaskFilter
    ordering_fields = ["instance_id", "created_at"]


# --- runs ------------------------------------------------------------------------------------------------------


class OwnedQuerysetMixin(CreatedByRequestUser):
    """Staff see everything; everyone else sees what they own (``owner_path`` leads to the owner)."""

    owner_path = "owner"

    def get_queryset(self):
        queryset = super().get_queryset()
        user = self.request.user
        return queryset if user.is_staff else queryset.filter(**{self.owner_path: user})


class ChoiceInFilter(filters.BaseInFilter, filters.ChoiceFilter):
    """``status__in=a,b``: each value one of the choices, or a 400 naming it (an empty one too)."""

    def filter(self, qs, value):
        if value is not None and not all(value):
            raise ValidationError({f"{self.field_name}__in": ["each value must be one of the choices, not empty"]})
        return super().filter(qs, value)


class RunFilter(StrictFilterSet):
    dataset = filters.CharFilter(field_name="dataset__name")
    status__in = ChoiceInFilter(field_name="status", lookup_expr="in", choices=Run.Status.choices)
    created_after = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Run
        fields = {"status": ["exact"], "model_name": ["exact"], "env_pool": ["exact"], "name": ["icontains"]}


@extend_schema(tags=["runs"])
class RunViewSet(OwnedQuerysetMixin, mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """Runs: create (the run starts at once), list and filter, detail with progress; cancel, retry the failed
    episodes, export the trajectories. A create with an ``Idempotency-Key`` header that was used before by the
    same user returns that run (200) instead of starting another."""

    queryset = Run.objects.select_related("owner", "dataset").order_by("-created_at")
    serializer_class = serializers.RunSerializer
    parser_classes = [StrictJSONParser]
    filterset_class = RunFilter
    ordering_fields = ["created_at", "status", "name"]

    @extend_schema(
        parameters=[OpenApiParameter(IDEMPOTENCY_KEY, OpenApiTypes.STR, OpenApiParameter.HEADER, required=False)],
        responses={201: serializers.RunSerializer, 200: serializers.RunSerializer},
    )
    def create(self, request, *args, **kwargs):
        reject_oversize(request)
        key = request.headers.get(IDEMPOTENCY_KEY, "")
        if len(key) > IDEMPOTENCY_KEY_MAX or not re.fullmatch(IDEMPOTENCY_KEY_PATTERN[1:-1], key):
            raise ValidationError(
                {IDEMPOTENCY_KEY: [f"must be at most {IDEMPOTENCY_KEY_MAX} visible ASCII characters"]}
            )
        if key and (existing := Run.objects.filter(owner=request.user, idempotency_key=key).first()):
            return Response(self.get_serializer(existing).data, status=status.HTTP_200_OK)
        try:
            run = runs.create_run(request.data, owner=request.user, idempotency_key=key)
        except runs.RunRejected as rejected:
            raise ValidationError(rejected.errors) from None
        return Response(self.get_serializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: serializers.RunSerializer, 409: OpenApiResponse(description="over")})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel the run: unfinished episodes stop at their next transition and their sandboxes are released."""
        run = self.get_object()
        if run.status in Run.TERMINAL:
            raise Conflict(f"run {run.pk} is already {run.status}")
        runs.cancel_run(run.pk, reason=f"cancelled by {request.user.get_username()}")
        run.refresh_from_db()
        return Response(self.get_serializer(run).data)

    @extend_schema(
        request=None, responses={200: serializers.RunSerializer, 409: OpenApiResponse(description="cancelled")}
    )
    @action(detail=True, methods=["post"], url_path="retry-failed")
    def retry_failed(self, request, pk=None):
        """Give every failed or timed-out episode a fresh attempt; the run runs again."""
        run = self.get_object()
        if run.status == Run.Status.CANCELLED:
            raise Conflict(f"run {run.pk} was cancelled")
        retried = runs.retry_failed(run.pk)
        run.refresh_from_db()
        return Response({**self.get_serializer(run).data, "retried": retried})

    @extend_schema(responses={(200, "application/x-ndjson"): OpenApiTypes.STR})
    @action(detail=True, methods=["get"])
    def export(self, request, pk=None):
        """The run's trajectories as JSONL, one episode per line, streamed."""
        run = self.get_object()
        response = StreamingHttpResponse(trajectories.export_run(run), content_type="application/x-ndjson")
        response["Content-Disposition"] = f'attachment; filename="run-{run.pk}.jsonl"'
        return response


# --- episodes and steps ------------------------------------------------------------------------------------------


@extend_schema_field(OpenApiTypes.INT)
class RunIdFilter(filters.NumberFilter):
    field_class = forms.IntegerField


class EpisodeFilter(StrictFilterSet):
    reward_min = filters.NumberFilter(field_name="reward", lookup_expr="gte")
    reward_max = filters.NumberFilter(field_name="reward", lookup_expr="lte")
    instance_id = filters.CharFilter(field_name="task__instance_id")
    # By id, not as a choice among the runs: an unknown run is an empty list, as any other filter's miss is.
    run = RunIdFilter(field_name="run_id", help_text="run id")
    status__in = ChoiceInFilter(field_name="status", lookup_expr="in", choices=Episode.Status.choices)

    class Meta:
        model = Episode
        fields = {"status": ["exact"]}


@extend_schema(tags=["episodes"])
class EpisodeViewSet(OwnedQuerysetMixin, viewsets.ReadOnlyModelViewSet):
    owner_path = "run__owner"
    queryset = Episode.objects.select_related("task").order_by("run_id", "task_id", "sample_index")
    serializer_class = serializers.EpisodeSerializer
    filterset_class = EpisodeFilter
    ordering_fields = ["reward", "step_count", "created_at", "finished_at"]

    @extend_schema(responses=serializers.StepSerializer(many=True))
    @action(detail=True, methods=["get"], filterset_class=None, ordering_fields=None)
    def steps(self, request, pk=None):
        """The episode's trajectory, step by step, paginated."""
        episode = self.get_object()
        page = self.paginate_queryset(Step.objects.filter(episode=episode).order_by("index"))
        return self.get_paginated_response(serializers.StepSerializer(page, many=True).data)
