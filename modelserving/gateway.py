"""OpenAI-compatible gateway: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` in the Django
site, served through the model queues, so agent frameworks that speak the OpenAI API (mini-swe-agent,
OpenHands, SWE-agent) and trainers use the Model Service unchanged.

Auth is a DRF token sent the way OpenAI clients send keys, ``Authorization: Bearer <token>``
(``python manage.py drf_create_token <user>``). A request becomes one ``modelserving.generate`` task on
``model.<name>`` carrying ``n`` generation requests (one batch); the model worker pushes its answer straight
into a reply inbox the view waits on. Every request parameter is either honoured or refused: an unsupported
one is a 400 that names it. Errors use OpenAI's JSON shape, so clients raise their usual exceptions.

A view runs validate → ``admit`` → build the generation requests → ``publish`` → wait → respond; subclasses
(episode-bound sessions) override the two hooks.
"""

from __future__ import annotations

import abc
import json
import uuid
from dataclasses import replace

from django.conf import settings
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import Draft202012Validator, validator_for
from rest_framework import exceptions, serializers, status
from rest_framework.authentication import TokenAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.views import APIView

from modelserving.backend import Generation, GenerationRequest, SamplingParams, UnknownModel
from modelserving.openai_format import (
    chat_completion_body,
    chat_completion_chunks,
    error_body,
    text_completion_body,
    text_completion_chunks,
)
from modelserving.tasks import publish_generation
from orchestrator import replies
from orchestrator.db import release_connection

MAX_N = 16
MAX_TOP_LOGPROBS = 20
SEED_RANGE = 2**63


class BearerTokenAuthentication(TokenAuthentication):
    keyword = "Bearer"


class OpenAIError(exceptions.APIException):
    """An error answered in OpenAI's shape, with its status, ``code`` and the ``param`` it names."""

    def __init__(
        self,
        message: str,
        code: str,
        param: str | None = None,
        status_code: int = status.HTTP_400_BAD_REQUEST,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message, code)
        self.status_code, self.code, self.param, self.kind = status_code, code, param, kind


# --- validation ---------------------------------------------------------------------------------------------


class StrictSerializer(serializers.Serializer):
    """Refuses keys it does not declare, naming the first: an unsupported parameter is never silently dropped.
    A key set to null counts as absent, as OpenAI counts it."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            data = {key: value for key, value in data.items() if value is not None}
            unknown = [key for key in data if key not in self.fields]
            if unknown:
                detail = serializers.ErrorDetail("is not supported by this gateway", code="unsupported_parameter")
                raise serializers.ValidationError({unknown[0]: [detail]})
        return super().to_internal_value(data)


def text_content(content) -> str:
    """A message's content as one string: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        and set(part) == {"type", "text"}
        for part in content
    ):  # fmt: skip
        return "".join(part["text"] for part in content)
    raise serializers.ValidationError("must be a string or a list of text parts ({'type': 'text', 'text': ...})")


class FunctionCallSerializer(StrictSerializer):
    name = serializers.CharField(max_length=64)
    arguments = serializers.CharField(allow_blank=True, trim_whitespace=False)

    def validate_arguments(self, arguments: str) -> str:
        try:
            json.loads(arguments)
        except ValueError:
            raise serializers.ValidationError("must be a JSON string", code="invalid_json") from None
        return arguments


class ToolCallSerializer(StrictSerializer):
    id = serializers.CharField(max_length=200)
    type = serializers.ChoiceField(choices=["function"])
    function = FunctionCallSerializer()


class MessageSerializer(StrictSerializer):
    role = serializers.ChoiceField(choices=["system", "user", "assistant", "tool"])
    content = serializers.JSONField(required=False)
    name = serializers.CharField(max_length=64, required=False)
    tool_calls = ToolCallSerializer(many=True, required=False)
    tool_call_id = serializers.CharField(max_length=200, required=False)

    def validate_content(self, content) -> str:
        return text_content(content)

    def validate(self, message: dict) -> dict:
        role, calls = message["role"], message.get("tool_calls")
        if calls and role != "assistant":
            raise serializers.ValidationError({"tool_calls": ["only an assistant message carries tool calls"]})
        if role == "tool" and not message.get("tool_call_id"):
            raise serializers.ValidationError({"tool_call_id": ["a tool message must name the call it answers"]})
        if role != "tool" and "tool_call_id" in message:
            raise serializers.ValidationError({"tool_call_id": ["only a tool message answers a tool call"]})
        if "content" not in message and not calls:
            raise serializers.ValidationError(
                {"content": ["may be null only on an assistant message with tool_calls"]}, code="required"
            )
        rendered = {"role": role, "content": message.get("content")}
        for key in ("name", "tool_call_id"):
            if key in message:
                rendered[key] = message[key]
        if calls:
            rendered["tool_calls"] = [
                {"id": call["id"], "type": "function", "function": dict(call["function"])} for call in calls
            ]
        return rendered


class FunctionSerializer(StrictSerializer):
    name = serializers.RegexField(
        r"^[A-Za-z0-9_-]{1,64}$", error_messages={"invalid": "must be 1-64 of a-z A-Z 0-9 _ -"}
    )
    description = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False)
    parameters = serializers.JSONField(required=False)
    strict = serializers.BooleanField(required=False)

    def validate_parameters(self, parameters) -> dict:
        if not isinstance(parameters, dict):
            raise serializers.ValidationError("must be a JSON Schema object")
        try:
            validator_for(parameters, default=Draft202012Validator).check_schema(parameters)
        except SchemaError as error:
            raise serializers.ValidationError(f"is not a valid JSON Schema: {error.message}") from None
        return parameters

    def validate_strict(self, strict: bool) -> bool:
        if strict:
            raise serializers.ValidationError(
                "strict (schema-constrained decoding) is not supported", code="unsupported_parameter"
            )
        return strict


class ToolSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=["function"])
    function = FunctionSerializer()


TOOL_CHOICE_HELP = 'must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}'


def named_tool_choice(choice) -> dict | None:
    """``{"type": "function", "function": {"name": NAME}}`` as given, or None when ``choice`` is not one."""
    if not isinstance(choice, dict) or set(choice) != {"type", "function"} or choice["type"] != "function":
        return None
    function = choice["function"]
    if not isinstance(function, dict) or set(function) != {"name"} or not isinstance(function["name"], str):
        return None
    return {"type": "function", "function": {"name": function["name"]}}


class StreamOptionsSerializer(StrictSerializer):
    include_usage = serializers.BooleanField(default=False)


class GenerationSerializer(StrictSerializer):
    """What chat and text completions share: the model, sampling, ``n``, streaming, vLLM's token ids."""

    model = serializers.CharField(max_length=200)
    temperature = serializers.FloatField(min_value=0, max_value=2, default=0.0)
    top_p = serializers.FloatField(min_value=0, max_value=1, default=1.0)
    stop = serializers.JSONField(required=False)
    seed = serializers.IntegerField(min_value=0, max_value=SEED_RANGE - 1, required=False)
    n = serializers.IntegerField(min_value=1, max_value=MAX_N, default=1)
    stream = serializers.BooleanField(default=False)
    stream_options = StreamOptionsSerializer(required=False)
    return_token_ids = serializers.BooleanField(default=False)
    # Accepted at their neutral value only: nothing here applies a penalty.
    presence_penalty = serializers.FloatField(required=False)
    frequency_penalty = serializers.FloatField(required=False)
    user = serializers.CharField(max_length=256, required=False)  # the caller's end user: nothing to do with it

    default_max_tokens = 512

    def validate_model(self, model: str) -> str:
        if model not in settings.MEGAFLOW_MODELS:
            raise serializers.ValidationError(
                f"unknown model {model!r}; this gateway serves {', '.join(settings.MEGAFLOW_MODELS)}",
                code="model_not_found",
            )
        return model

    def validate_stop(self, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
            raise serializers.ValidationError("must be a string or a list of at most 4 strings")
        return stops

    def validate_presence_penalty(self, penalty: float) -> float:
        return self._neutral(penalty)

    def validate_frequency_penalty(self, penalty: float) -> float:
        return self._neutral(penalty)

    @staticmethod
    def _neutral(penalty: float) -> float:
        if penalty != 0:
            raise serializers.ValidationError("penalties are not supported (only 0)", code="unsupported_parameter")
        return penalty

    def validate(self, data: dict) -> dict:
        if "stream_options" in data and not data["stream"]:
            raise serializers.ValidationError({"stream_options": ["is only allowed with stream: true"]})
        return data

    def token_budget(self) -> int:
        return self.validated_data.get("max_tokens") or self.default_max_tokens

    def sampling(self, logprobs: bool = False, top_logprobs: int = 0) -> SamplingParams:
        data = self.validated_data
        return SamplingParams(
            temperature=data["temperature"],
            top_p=data["top_p"],
            max_tokens=self.token_budget(),
            stop=tuple(data.get("stop") or ()),
            seed=data.get("seed"),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            return_token_ids=data["return_token_ids"],
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.validated_data.get("stream_options", {}).get("include_usage"))


class ChatCompletionSerializer(GenerationSerializer):
    messages = MessageSerializer(many=True, allow_empty=False)
    max_tokens = serializers.IntegerField(min_value=1, max_value=131072, required=False)
    max_completion_tokens = serializers.IntegerField(min_value=1, max_value=131072, required=False)
    logprobs = serializers.BooleanField(default=False)
    top_logprobs = serializers.IntegerField(min_value=0, max_value=MAX_TOP_LOGPROBS, default=0)
    tools = ToolSerializer(many=True, required=False)
    tool_choice = serializers.JSONField(required=False)
    parallel_tool_calls = serializers.BooleanField(default=True)
    response_format = serializers.JSONField(required=False)

    def validate_tools(self, tools: list[dict]) -> list[dict]:
        names = [tool["function"]["name"] for tool in tools]
        if duplicated := sorted({name for name in names if names.count(name) > 1}):
            raise serializers.ValidationError(f"declares function {duplicated[0]!r} more than once")
        return [{"type": "function", "function": dict(tool["function"])} for tool in tools]

    def validate_tool_choice(self, choice):
        if choice in ("auto", "none", "required"):
            return choice
        named = named_tool_choice(choice)
        if named is None:
            raise serializers.ValidationError(TOOL_CHOICE_HELP, code="invalid_tool_choice")
        return named

    def validate_response_format(self, response_format):
        if response_format != {"type": "text"}:
            raise serializers.ValidationError(
                'only {"type": "text"} is supported (no structured outputs)', code="unsupported_parameter"
            )
        return response_format

    def validate(self, data: dict) -> dict:
        data = super().validate(data)
        if data["top_logprobs"] and not data["logprobs"]:
            raise serializers.ValidationError({"top_logprobs": ["needs logprobs: true"]})
        self._check_tool_choice(data.get("tool_choice"), data.get("tools") or [])
        self._check_tool_answers(data["messages"])
        return data

    @staticmethod
    def _check_tool_choice(choice, tools: list[dict]) -> None:
        declared = {tool["function"]["name"] for tool in tools}
        if choice == "required" and not declared:
            raise serializers.ValidationError({"tool_choice": ['"required" needs tools']})
        if isinstance(choice, dict) and choice["function"]["name"] not in declared:
            name = choice["function"]["name"]
            raise serializers.ValidationError(
                {"tool_choice": [f"names function {name!r}, which tools does not declare"]}
            )

    @staticmethod
    def _check_tool_answers(messages: list[dict]) -> None:
        """Every tool message answers a call an earlier assistant message made."""
        calls: set[str] = set()
        for index, message in enumerate(messages):
            calls.update(call["id"] for call in message.get("tool_calls") or ())
            if message["role"] == "tool" and message["tool_call_id"] not in calls:
                problem = f"{message['tool_call_id']!r} answers no tool call of an earlier assistant message"
                raise serializers.ValidationError({"messages": {index: {"tool_call_id": [problem]}}})

    def token_budget(self) -> int:
        data = self.validated_data
        return data.get("max_completion_tokens") or data.get("max_tokens") or self.default_max_tokens


class CompletionSerializer(GenerationSerializer):
    prompt = serializers.JSONField()
    max_tokens = serializers.IntegerField(min_value=1, max_value=131072, required=False)
    logprobs = serializers.IntegerField(min_value=0, max_value=MAX_TOP_LOGPROBS, required=False)
    echo = serializers.BooleanField(default=False)

    default_max_tokens = 16  # OpenAI's default for completions

    def validate_prompt(self, prompt):
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(type(token) is int and token >= 0 for token in prompt):
            return prompt
        raise serializers.ValidationError("must be a string or a non-empty list of token ids (one prompt)")

    def validate_echo(self, echo: bool) -> bool:
        if echo:
            raise serializers.ValidationError("echo is not supported", code="unsupported_parameter")
        return echo


# --- generation requests ------------------------------------------------------------------------------------


def fan_out(request: GenerationRequest, n: int) -> list[dict]:
    """``n`` copies of ``request`` for one batch: ids ``<id>-<i>``, and seeds ``seed + i`` when seeded, so the
    samples differ and are each reproducible."""
    seed = request.sampling.seed
    return [
        replace(
            request,
            request_id=f"{request.request_id}-{index}",
            sampling=replace(request.sampling, seed=None if seed is None else (seed + index) % SEED_RANGE),
        ).as_dict()
        for index in range(n)
    ]


def chat_generation_requests(form: ChatCompletionSerializer, request_id: str) -> list[dict]:
    """The generation requests (dicts for ``modelserving.generate``) of a validated chat completion, one per
    ``n``, in choice order."""
    data = form.validated_data
    request = GenerationRequest(
        request_id=request_id,
        messages=data["messages"],
        sampling=form.sampling(logprobs=data["logprobs"], top_logprobs=data["top_logprobs"]),
        tools=data.get("tools"),
        tool_choice=data.get("tool_choice"),
        parallel_tool_calls=data["parallel_tool_calls"],
    )
    return fan_out(request, data["n"])


def completion_generation_requests(form: CompletionSerializer, request_id: str) -> list[dict]:
    """The generation requests of a validated text completion: the prompt as text or as token ids, no chat
    template."""
    data = form.validated_data
    prompt = data["prompt"]
    top = data.get("logprobs")
    request = GenerationRequest(
        request_id=request_id,
        messages=[],
        sampling=form.sampling(logprobs=top is not None, top_logprobs=top or 0),
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=prompt if isinstance(prompt, list) else None,
    )
    return fan_out(request, data["n"])


# --- views --------------------------------------------------------------------------------------------------


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


ERROR_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


class OpenAIErrorsMixin:
    def handle_exception(self, exc):
        if isinstance(exc, exceptions.ValidationError):
            param, message, code = _first_error(exc.detail)
            return JsonResponse(error_body(f"{param}: {message}", code, param), status=status.HTTP_400_BAD_REQUEST)
        if isinstance(exc, OpenAIError):
            return JsonResponse(error_body(str(exc.detail), exc.code, exc.param, exc.kind), status=exc.status_code)
        if isinstance(exc, exceptions.AuthenticationFailed | exceptions.NotAuthenticated):
            body = error_body(str(exc.detail), "invalid_api_key", kind="authentication_error")
            return JsonResponse(body, status=status.HTTP_401_UNAUTHORIZED)
        if isinstance(exc, exceptions.APIException):
            code = exc.detail.code if isinstance(exc.detail, exceptions.ErrorDetail) else exc.default_code
            kind = (
                "server_error" if exc.status_code >= 500 else ERROR_KINDS.get(exc.status_code, "invalid_request_error")
            )
            body = error_body(str(exc.detail), code, getattr(exc, "param", None), kind)
            return JsonResponse(body, status=exc.status_code)
        raise exc


# OpenAI's own specification documents these; the /api/v1 schema is MegaFlow's API only.
@extend_schema(exclude=True)
class ModelsView(OpenAIErrorsMixin, APIView):
    authentication_classes = [BearerTokenAuthentication]
    permission_classes = [IsAuthenticated]

    def get(self, request):
        data = [{"id": name, "object": "model", "owned_by": "megaflow"} for name in settings.MEGAFLOW_MODELS]
        return JsonResponse({"object": "list", "data": data})


class GenerationView(OpenAIErrorsMixin, APIView, metaclass=abc.ABCMeta):
    """validate → ``admit`` → ``build_requests`` → ``publish`` → wait → ``respond``. Subclasses override
    ``admit`` (refuse a valid request: raise a DRF ``APIException``, answered in OpenAI's shape with its status)
    and ``publish`` (send the requests elsewhere, or record them first)."""

    authentication_classes = [BearerTokenAuthentication]
    permission_classes = [IsAuthenticated]
    form_class: type[GenerationSerializer]
    id_prefix: str
    prompt_param: str  # what a context-length error names
    top_logprobs_param: str  # what asks for top logprobs

    def post(self, request):
        form = self.validate(request)
        self.admit(request, form)
        model = form.validated_data["model"]
        completion_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        requests = self.build_requests(form, completion_id)
        generations = self.generate(model, requests)
        self.check_reply(model, requests[0], generations)
        return self.respond(form, completion_id, generations)

    def validate(self, request) -> GenerationSerializer:
        form = self.form_class(data=request.data)
        form.is_valid(raise_exception=True)
        return form

    def admit(self, request, form: GenerationSerializer) -> None:
        """Hook: refuse a valid request before anything is generated. Admits every request."""

    @abc.abstractmethod
    def build_requests(self, form: GenerationSerializer, request_id: str) -> list[dict]:
        """One generation request dict per sample (``n``) of the validated form."""

    def publish(self, model: str, requests: list[dict], inbox: str) -> None:
        """Hook: send ``requests`` (one batch) to the model's queue; the generations come back to ``inbox``."""
        publish_generation(model, requests, reply_to=inbox)

    def generate(self, model: str, requests: list[dict]) -> list[Generation]:
        """Publish, wait for the worker's reply, and turn a failed generation into the error it is."""
        inbox = replies.new_inbox()
        try:
            self.publish(model, requests, inbox)
        except UnknownModel as error:
            raise OpenAIError(error.reason, "model_not_found", "model") from None
        # The request thread now waits for a model worker: with its pooled connection held, a gunicorn process
        # serves no more calls at once than MEGAFLOW_DB_POOL_SIZE (make bench-frameworks: 8 per process made the
        # turns of 64 concurrent framework episodes wait 4.5 s for a connection).
        release_connection()
        reply = replies.wait_for_reply(inbox, settings.MEGAFLOW_GATEWAY_TIMEOUT_S)
        if reply is None:
            message = f"no model worker for {model!r} answered within {settings.MEGAFLOW_GATEWAY_TIMEOUT_S} s"
            raise OpenAIError(message, "timeout", status_code=status.HTTP_504_GATEWAY_TIMEOUT, kind="server_error")
        generations = [Generation(**generation) for generation in reply]
        for generation in generations:
            if generation.error.startswith("context length exceeded"):
                raise OpenAIError(generation.error, "context_length_exceeded", self.prompt_param)
            if generation.error:
                raise OpenAIError(
                    generation.error, "model_error", status_code=status.HTTP_502_BAD_GATEWAY, kind="server_error"
                )
        return generations

    def check_reply(self, model: str, request: dict, generations: list[Generation]) -> None:
        """What the backend could not give is refused, naming the parameter, never answered empty."""
        wanted = SamplingParams.from_dict(request["sampling"])
        if wanted.logprobs and any(generation.logprobs is None for generation in generations):
            raise OpenAIError(f"model {model!r} does not report logprobs", "unsupported_parameter", "logprobs")
        if wanted.top_logprobs and any(generation.top_logprobs is None for generation in generations):
            message = f"model {model!r} does not report top logprobs"
            raise OpenAIError(message, "unsupported_parameter", self.top_logprobs_param)

    @abc.abstractmethod
    def respond(self, form: GenerationSerializer, completion_id: str, generations: list[Generation]) -> HttpResponse:
        """The answer in the endpoint's own shape, JSON or server-sent events."""


@extend_schema(exclude=True)
class ChatCompletionsView(GenerationView):
    form_class = ChatCompletionSerializer
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    top_logprobs_param = "top_logprobs"

    def build_requests(self, form: ChatCompletionSerializer, request_id: str) -> list[dict]:
        return chat_generation_requests(form, request_id)

    def respond(self, form, completion_id: str, generations: list[Generation]) -> HttpResponse:
        model, token_ids = form.validated_data["model"], form.validated_data["return_token_ids"]
        if form.validated_data["stream"]:
            events = chat_completion_chunks(completion_id, model, generations, form.include_usage, token_ids)
            return StreamingHttpResponse(events, content_type="text/event-stream")
        return JsonResponse(chat_completion_body(completion_id, model, generations, token_ids))


@extend_schema(exclude=True)
class CompletionsView(GenerationView):
    form_class = CompletionSerializer
    id_prefix = "cmpl"
    prompt_param = "prompt"
    top_logprobs_param = "logprobs"

    def build_requests(self, form: CompletionSerializer, request_id: str) -> list[dict]:
        return completion_generation_requests(form, request_id)

    def respond(self, form, completion_id: str, generations: list[Generation]) -> HttpResponse:
        data = form.validated_data
        model, logprobs, token_ids = data["model"], data.get("logprobs"), data["return_token_ids"]
        if data["stream"]:
            events = text_completion_chunks(completion_id, model, generations, logprobs, form.include_usage, token_ids)
            return StreamingHttpResponse(events, content_type="text/event-stream")
        return JsonResponse(text_completion_body(completion_id, model, generations, logprobs, token_ids))
