"""Top-level URLs: the admin, a health check for load balancers and ``make up``, the OpenAI gateway."""

from django.contrib import admin
from django.db import connection
from django.http import JsonResponse
from django.urls import include, path
from django.views.defaults import page_not_found

from modelserving.episode_gateway import EpisodeChatCompletionsView, EpisodeModelsView
from modelserving.gateway import ChatCompletionsView, CompletionsView, ModelsView
from orchestrator.metrics import MetricsView


def healthz(request):
    """200 when the web process can reach its database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def not_found(request, exception):
    """A URL no route matches: JSON for the APIs (their clients parse every answer), Django's page elsewhere."""
    if request.path.startswith(("/api/", "/v1/")):
        return JsonResponse({"detail": "Not found."}, status=404)
    return page_not_found(request, exception)


handler404 = not_found

admin.site.site_header = "MegaFlow"
admin.site.site_title = "MegaFlow admin"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("orchestrator.api.urls")),
    path("healthz", healthz, name="healthz"),
    path("metrics", MetricsView.as_view(), name="metrics"),
    # The OpenAI-compatible gateway to the Model Service (modelserving/gateway.py).
    path("v1/chat/completions", ChatCompletionsView.as_view(), name="openai-chat-completions"),
    path("v1/completions", CompletionsView.as_view(), name="openai-completions"),
    path("v1/models", ModelsView.as_view(), name="openai-models"),
    # The same, bound to one episode of a framework agent (modelserving/episode_gateway.py).
    path("v1/episodes/<str:secret>/chat/completions", EpisodeChatCompletionsView.as_view(), name="episode-chat"),
    path("v1/episodes/<str:secret>/models", EpisodeModelsView.as_view(), name="episode-models"),
]
