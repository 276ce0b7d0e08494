"""The gateway bound to one episode: ``/v1/episodes/<secret>/chat/completions`` (and ``/models``).

A framework agent gets this base URL from the Agent Service (orchestrator/framework_loop.py) and uses it as any
OpenAI base URL; no code change in the framework. The secret in the path is the credential: it names one attempt
of one episode (orchestrator/sessions.py stores only its hash), so no API token is needed, and whatever key the
client sends is ignored. Every call is served by ``modelserving.session_turn`` on the model's queue, which
records it as the episode's next turn, with the token-level fields of a built-in agent's turn, before answering.

Refusals, in OpenAI's error shape: an unknown or expired secret is a 401 (``invalid_episode_token``); an episode
that ended, or used its turns, tokens or wall-clock budget, is a 403 (``episode_ended``,
``episode_budget_exhausted``: clients treat a 403 as final and stop retrying); another model than the run's, or
``n`` > 1 (an episode's turn is one sample), is a 400.
"""

from __future__ import annotations

from celery import current_app
from django.http import JsonResponse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, status
from rest_framework.permissions import BasePermission
from rest_framework.views import APIView

from modelserving.gateway import ChatCompletionsView, OpenAIErrorsMixin
from orchestrator import sessions


class EpisodeTokenInvalid(exceptions.APIException):
    status_code = status.HTTP_401_UNAUTHORIZED
    default_code = "invalid_episode_token"
    default_detail = "no running episode has this session token (unknown, or its attempt is over)"


class EpisodeRefused(exceptions.APIException):
    status_code = status.HTTP_403_FORBIDDEN
    default_code = "episode_ended"


class HoldsEpisodeSecret(BasePermission):
    """The secret in the path names an episode's session, before anything else about the request is read."""

    def has_permission(self, request, view) -> bool:
        view.session = sessions.find_session(view.kwargs["secret"])
        if view.session is None:
            raise EpisodeTokenInvalid()
        return True


class EpisodeBound:
    """No API token: the secret in the path grants its episode (and only it)."""

    authentication_classes: list = []
    permission_classes = [HoldsEpisodeSecret]


@extend_schema(exclude=True)
class EpisodeChatCompletionsView(EpisodeBound, ChatCompletionsView):
    def post(self, request, secret: str):
        return super().post(request)

    def admit(self, request, form) -> None:
        session = self.session
        if refusal := session.refusal():
            code, message = refusal
            raise EpisodeRefused(message, code)
        data = form.validated_data
        if data["model"] != session.run.model_name:
            raise exceptions.ValidationError(
                {"model": [f"this episode's run uses model {session.run.model_name!r}, not {data['model']!r}"]}
            )
        if data.get("n", 1) != 1:
            raise exceptions.ValidationError({"n": ["an episode's turn is one sample: n must be 1"]})

    def publish(self, model: str, requests: list[dict], inbox: str) -> None:
        [request] = requests
        current_app.send_task(
            "modelserving.session_turn",
            kwargs={"model": model, "episode_id": self.session.episode_id, "attempt": self.session.attempt,
                    "request": request, "reply_to": inbox},
        )  # fmt: skip


@extend_schema(exclude=True)
class EpisodeModelsView(EpisodeBound, OpenAIErrorsMixin, APIView):
    def get(self, request, secret: str):
        model = self.session.run.model_name
        return JsonResponse({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "megaflow"}]})
