"""``GET /api/v1/runs/{id}/rollouts``: a run's rollouts for trainers, streamed as JSON Lines as episodes end
(orchestrator/rollouts.py has the line format, the order and the cursor)."""

from __future__ import annotations

from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.views import APIView

from orchestrator import rollouts
from orchestrator.models import Run


class RolloutsQuery(serializers.Serializer):
    cursor = serializers.CharField(required=False, max_length=500, help_text="Resume after this line's cursor.")
    group_complete = serializers.BooleanField(
        required=False, default=False, help_text="A task's samples together, once all of them ended (GRPO groups)."
    )
    follow = serializers.BooleanField(
        required=False, default=True, help_text="Keep streaming until the run is over; false: what has ended now."
    )
    wait_s = serializers.IntegerField(
        required=False, default=3600, min_value=0, max_value=24 * 3600,
        help_text="Follow at most this long; then resume with the last cursor.",
    )  # fmt: skip


class RunRolloutsView(APIView):
    @extend_schema(
        tags=["runs"],
        operation_id="runs_rollouts",
        parameters=[RolloutsQuery],
        responses={
            (200, "application/x-ndjson"): OpenApiResponse(
                OpenApiTypes.STR, description="One rollout (JSON object) per line; see orchestrator/rollouts.py."
            ),
            400: OpenApiResponse(description="field: reason (a malformed or foreign cursor, a bad flag)"),
            404: OpenApiResponse(description="no such run (or not yours)"),
        },
    )
    def get(self, request, pk: int):
        """The run's rollouts, one ended episode per line, in the order they ended (or, with group_complete,
        a task's samples together once all of them ended). Each line's ``cursor`` resumes after it."""
        runs = Run.objects.all() if request.user.is_staff else Run.objects.filter(owner=request.user)
        run = get_object_or_404(runs, pk=pk)
        query = RolloutsQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        options = query.validated_data
        cursor = None
        if options.get("cursor"):
            try:
                cursor = rollouts.Cursor.decode(options["cursor"], run, options["group_complete"])
            except rollouts.BadCursor as error:
                raise ValidationError({"cursor": [str(error)]}) from None
        lines = rollouts.stream(
            run, cursor, group_complete=options["group_complete"], follow=options["follow"], wait_s=options["wait_s"]
        )
        response = StreamingHttpResponse(lines, content_type="application/x-ndjson")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass lines on as they come
        return response
