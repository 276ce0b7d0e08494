"""``/api/v1/``: the REST API, its OpenAPI schema, Swagger UI and Redoc (from our own static files)."""

from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from orchestrator.api import views
from orchestrator.api.models_versions import ModelVersionsView
from orchestrator.api.rollouts import RunRolloutsView

router = DefaultRouter()
router.register("datasets", views.DatasetViewSet)
router.register("tasks", views.TaskViewSet)
router.register("runs", views.RunViewSet)
router.register("episodes", views.EpisodeViewSet)

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path(
        "redoc/", SpectacularRedocView.as_view(url_name="api-schema", template_name="api/redoc.html"), name="api-redoc"
    ),
    # The trailing slash is optional: trainers' clients call these without one.
    re_path(r"^runs/(?P<pk>[0-9]+)/rollouts/?$", RunRolloutsView.as_view(), name="run-rollouts"),
    re_path(r"^models/(?P<name>[^/]+)/versions/?$", ModelVersionsView.as_view(), name="model-versions"),
    path("", include(router.urls)),
]
