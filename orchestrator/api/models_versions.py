"""``/api/v1/models/{name}/versions``: the versions of a model's weights. A trainer publishes a checkpoint
(POST); the model's workers load it between batches and every turn records the version it ran on
(orchestrator/model_versions.py)."""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from modelserving.backend import UnknownModel
from orchestrator import model_versions
from orchestrator.api.conventions import Conflict
from orchestrator.models import ModelVersion


class LoadTimedOut(APIException):
    status_code = status.HTTP_504_GATEWAY_TIMEOUT
    default_code = "load_timeout"


class ModelVersionSerializer(serializers.ModelSerializer):
    owner = serializers.StringRelatedField()

    class Meta:
        model = ModelVersion
        fields = ["model_name", "version", "checkpoint_path", "status", "error", "owner", "created_at", "serving_at"]
        read_only_fields = fields


class PublishSerializer(serializers.Serializer):
    version = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$", max_length=200, help_text="A name such as a checkpoint step: 'step-200'."
    )
    checkpoint_path = serializers.CharField(max_length=1000, help_text="A path the model workers can read.")


class ModelVersionsResponse(serializers.Serializer):
    model_name = serializers.CharField()
    current = serializers.CharField(help_text="The version serving now.")
    versions = ModelVersionSerializer(many=True)


def _model(name: str) -> str:
    if name not in settings.MEGAFLOW_MODELS:
        raise NotFound(f"unknown model {name!r}; served: {', '.join(settings.MEGAFLOW_MODELS)}")
    return name


class ModelVersionsView(APIView):
    @extend_schema(
        tags=["models"],
        operation_id="models_versions_list",
        responses={200: ModelVersionsResponse, 404: OpenApiResponse(description="unknown model")},
    )
    def get(self, request, name: str):
        """The model's published versions, oldest first, and the one serving now."""
        model = _model(name)
        published = ModelVersion.objects.filter(model_name=model).select_related("owner").order_by("created_at")
        body = {
            "model_name": model,
            "current": model_versions.serving_version(model),
            "versions": ModelVersionSerializer(published, many=True).data,
        }
        return Response(body)

    @extend_schema(
        tags=["models"],
        operation_id="models_versions_publish",
        request=PublishSerializer,
        responses={
            201: ModelVersionSerializer,
            200: OpenApiResponse(ModelVersionSerializer, description="published before (a retry): the same record"),
            400: OpenApiResponse(description="field: reason; checkpoint_path: the workers cannot load it"),
            404: OpenApiResponse(description="unknown model"),
            409: OpenApiResponse(description="the version was published with another checkpoint"),
            504: OpenApiResponse(description="no model worker loaded it in time (it stays loading)"),
        },
    )
    def post(self, request, name: str):
        """Publish a version: one model worker loads the checkpoint (the old weights serve meanwhile, and keep
        serving if it cannot be loaded), then the model's other workers follow between batches."""
        model = _model(name)
        form = PublishSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        try:
            record, created = model_versions.publish(
                model, form.validated_data["version"], form.validated_data["checkpoint_path"], owner=request.user
            )
        except UnknownModel as error:
            raise NotFound(error.reason) from None
        except model_versions.VersionConflict as error:
            raise Conflict(str(error)) from None
        except model_versions.LoadTimeout as error:
            raise LoadTimedOut(str(error)) from None
        if record.status == ModelVersion.Status.REFUSED:
            raise ValidationError({"checkpoint_path": [f"the model workers cannot load it: {record.error}"]})
        return Response(ModelVersionSerializer(record).data, status=status.HTTP_201_CREATED if created else 200)
