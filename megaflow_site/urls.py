"""Top-level URLs: the admin and a health check for load balancers and ``make up``."""

from django.contrib import admin
from django.db import connection
from django.http import JsonResponse
from django.urls import path


def healthz(request):
    """200 when the web process can reach its database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


admin.site.site_header = "MegaFlow"
admin.site.site_title = "MegaFlow admin"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
]
