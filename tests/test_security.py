"""Every door needs a key: each URL pattern refuses anonymous requests, admin needs staff, Celery accepts JSON
only, and no secret lives in the repository."""

import re
import subprocess
import time

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from megaflow_site.celery import app

# The one public URL: a load balancer's health check, which answers {"status": "ok"} and nothing else. The admin's
# login page is public by its nature and is checked separately below.
PUBLIC = {"healthz"}


def concrete_paths(patterns=None, prefix="") -> list[tuple[str, str]]:
    """(route, path with every parameter filled in) for every URL pattern of the project."""
    found = []
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            found += concrete_paths(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern):
            path = re.sub(r"\(\?P<format>[^)]*\)", "json", route)  # DRF format suffixes (regex routes)
            path = path.replace("<drf_format_suffix:format>", ".json")  # and path routes
            path = re.sub(r"\(\?P<\w+>[^)]*\)", "1", path)  # regex groups
            path = re.sub(r"<(?:\w+:)?(\w+)>", "1", path)  # path converters
            path = "/" + path.replace("^", "").replace("$", "").replace("\\", "").lstrip("/")
            found.append((route, path.replace("?", "").replace("//", "/")))
    return found


@pytest.mark.django_db
def test_every_url_pattern_refuses_anonymous_requests():
    client = Client()
    checked = 0
    for route, path in concrete_paths():
        if route.rstrip("/$").lstrip("^") in PUBLIC:
            continue
        if route.startswith("admin/"):
            if "login" in route or "logout" in route or "password_reset" in route:
                continue
            response = client.get(path)
            assert response.status_code in (302, 404), (route, response.status_code)
            if response.status_code == 302:
                assert "/admin/login/" in response["Location"], route
        else:
            for method in ("get", "post"):
                response = getattr(client, method)(path)
                assert response.status_code in (401, 403), (method, route, path, response.status_code)
        checked += 1
    assert checked > 40, f"only {checked} URL patterns found"


@pytest.mark.django_db
def test_the_admin_needs_staff():
    user = User.objects.create_user("trainer", password="x" * 12)
    client = Client()
    client.force_login(user)
    response = client.get("/admin/orchestrator/run/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    user.is_staff = user.is_superuser = True
    user.save()
    assert client.get("/admin/orchestrator/run/").status_code == 200


def test_celery_speaks_json_only():
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"
    assert app.conf.event_serializer == "json" and app.conf.result_accept_content in (None, ["json"])


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_pickled_message_is_refused_by_the_workers(celery_workers):
    worker = celery_workers.by_queue["agent"]
    app.send_task("orchestrator.admit", serializer="pickle", queue="agent")
    deadline = time.monotonic() + 15
    while "untrusted content of type pickle" not in worker.log.read_text():
        assert time.monotonic() < deadline, "the agent worker did not refuse the pickled message"
        time.sleep(0.2)


def test_no_secret_is_in_the_repository():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=settings.BASE_DIR, capture_output=True, check=True)
    secrets = [settings.SECRET_KEY, settings.FLOWER_BASIC_AUTH.split(":", 1)[1]]
    for name in tracked.stdout.decode().split("\0"):
        path = settings.BASE_DIR / name
        if not name or not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        text = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in text, f"a secret is in {name}"
        assert not re.search(rb"^SECRET_KEY\s*=\s*['\"]", text, re.MULTILINE), f"a literal SECRET_KEY in {name}"
