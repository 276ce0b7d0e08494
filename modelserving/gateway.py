"""OpenAI-compatible gateway: ``/v1/chat/completions`` and ``/v1/models`` in the Django site, served through the
model queues, so agent frameworks that speak the OpenAI API (mini-swe-agent, OpenHands, SWE-agent) use the
Model Service unchanged.

Auth is a DRF token sent the way OpenAI clients send keys, ``Authorization: Bearer <token>``
(``python manage.py drf_create_token <user>``). A request becomes one ``modelserving.generate`` task on
``model.<name>``; the model worker pushes its answer straight into a reply inbox the view waits on.
Errors use OpenAI's JSON shape, so clients raise their usual exceptions.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.http import JsonResponse, StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.authentication import TokenAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.views import APIView

from modelserving.backend import Generation, UnknownModel
from modelserving.openai_format import completion_body, error_body, stream_events
from modelserving.tasks import publish_generation
from orchestrator import replies


class BearerTokenAuthentication(TokenAuthentication):
    keyword = "Bearer"


class MessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["system", "user", "assistant", "tool"])
    content = serializers.JSONField()

    def validate_content(self, content):
        """A string, or OpenAI's list of parts of which only text parts are accepted."""
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            return "".join(str(part.get("text", "")) for part in content)
        raise serializers.ValidationError("must be a string or a list of text parts")


class ChatCompletionSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=200)
    messages = MessageSerializer(many=True, allow_empty=False)
    temperature = serializers.FloatField(min_value=0, max_value=2, default=0.0)
    top_p = serializers.FloatField(min_value=0, max_value=1, default=1.0)
    max_tokens = serializers.IntegerField(min_value=1, max_value=131072, required=False)
    max_completion_tokens = serializers.IntegerField(min_value=1, max_value=131072, required=False)
    stop = serializers.JSONField(required=False)
    seed = serializers.IntegerField(required=False)
    n = serializers.IntegerField(min_value=1, max_value=1, default=1)
    stream = serializers.BooleanField(default=False)
    logprobs = serializers.BooleanField(default=False)

    def validate_model(self, model: str) -> str:
        if model not in settings.MEGAFLOW_MODELS:
            raise serializers.ValidationError(
                f"unknown model {model!r}; this gateway serves {', '.join(settings.MEGAFLOW_MODELS)}",
                code="model_not_found",
            )
        return model

    def validate_stop(self, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is None or not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
            raise serializers.ValidationError("must be a string or a list of at most 4 strings")
        return stops

    def sampling(self) -> dict:
        data = self.validated_data
        return {
            "temperature": data["temperature"],
            "top_p": data["top_p"],
            "max_tokens": data.get("max_tokens") or data.get("max_completion_tokens") or 512,
            "stop": data.get("stop") or [],
            "seed": data.get("seed"),
            "logprobs": data["logprobs"],
        }


def _first_error(detail, path: str = "") -> tuple[str, str, str]:
    """(param, message, code) of the first validation error in a DRF error tree; list items are named
    ``messages[0].role``, as OpenAI does."""
    if isinstance(detail, dict):
        key, value = next((key, value) for key, value in detail.items() if value)
        return _first_error(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key))
    if isinstance(detail, list):
        index, first = next((index, item) for index, item in enumerate(detail) if item)
        if isinstance(first, dict | list):
            return _first_error(first, f"{path}[{index}]")
        return path, str(first), getattr(first, "code", "invalid")
    return path, str(detail), getattr(detail, "code", "invalid")


class OpenAIErrorsMixin:
    def handle_exception(self, exc):
        if isinstance(exc, exceptions.ValidationError):
            param, message, code = _first_error(exc.detail)
            return JsonResponse(error_body(f"{param}: {message}", code, param), status=status.HTTP_400_BAD_REQUEST)
        if isinstance(exc, exceptions.AuthenticationFailed | exceptions.NotAuthenticated):
            body = error_body(str(exc.detail), "invalid_api_key", kind="authentication_error")
            return JsonResponse(body, status=status.HTTP_401_UNAUTHORIZED)
        if isinstance(exc, exceptions.APIException):
            return JsonResponse(error_body(str(exc.detail), exc.default_code), status=exc.status_code)
        raise exc


# OpenAI's own specification documents these two; the /api/v1 schema is MegaFlow's API only.
@extend_schema(exclude=True)
class ModelsView(OpenAIErrorsMixin, APIView):
    authentication_classes = [BearerTokenAuthentication]
    permission_classes = [IsAuthenticated]

    def get(self, request):
        data = [{"id": name, "object": "model", "owned_by": "megaflow"} for name in settings.MEGAFLOW_MODELS]
        return JsonResponse({"object": "list", "data": data})


@extend_schema(exclude=True)
class ChatCompletionsView(OpenAIErrorsMixin, APIView):
    authentication_classes = [BearerTokenAuthentication]
    permission_classes = [IsAuthenticated]

    def post(self, request):
        form = ChatCompletionSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        model = form.validated_data["model"]
        request_id = uuid.uuid4().hex
        generation_request = {
            "request_id": request_id,
            "messages": [dict(message) for message in form.validated_data["messages"]],
            "sampling": form.sampling(),
        }
        inbox = replies.new_inbox()
        try:
            publish_generation(model, [generation_request], reply_to=inbox)
        except UnknownModel as error:
            return JsonResponse(
                error_body(error.reason, "model_not_found", "model"), status=status.HTTP_400_BAD_REQUEST
            )
        reply = replies.wait_for_reply(inbox, settings.MEGAFLOW_GATEWAY_TIMEOUT_S)
        if reply is None:
            message = f"no model worker for {model!r} answered within {settings.MEGAFLOW_GATEWAY_TIMEOUT_S} s"
            return JsonResponse(
                error_body(message, "timeout", kind="server_error"), status=status.HTTP_504_GATEWAY_TIMEOUT
            )
        generation = Generation(**reply[0])
        if generation.error:
            if generation.error.startswith("context length exceeded"):
                body = error_body(generation.error, "context_length_exceeded", "messages")
                return JsonResponse(body, status=status.HTTP_400_BAD_REQUEST)
            return JsonResponse(
                error_body(generation.error, "model_error", kind="server_error"), status=status.HTTP_502_BAD_GATEWAY
            )
        if form.validated_data["stream"]:
            return StreamingHttpResponse(stream_events(generation, model), content_type="text/event-stream")
        return JsonResponse(completion_body(generation, model))
