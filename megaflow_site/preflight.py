"""Checks that the services MegaFlow needs are reachable, each failing with a ``ConfigError`` that says
what is wrong and how to fix it. ``python manage.py megaflow preflight`` runs them all."""

import docker
import psycopg
import redis
import requests
from django.conf import settings
from django.db import DatabaseError, connection

from megaflow_site.config_errors import ConfigError, redact

DATABASE_CONNECT_TIMEOUT_S = 5


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def check_database() -> None:
    """PostgreSQL: one connection of the check's own, outside the process's pool, whose wait for a connection
    (60 s) would hold a refused or silent server's answer back for a minute. SQLite: Django's own."""
    try:
        if connection.vendor == "postgresql":
            params = connection.get_connection_params()
            params = {key: params[key] for key in ("dbname", "user", "password", "host", "port") if params.get(key)}
            psycopg.connect(**params, connect_timeout=DATABASE_CONNECT_TIMEOUT_S).close()
        else:
            connection.ensure_connection()
    except (DatabaseError, psycopg.Error) as exc:
        raise ConfigError(
            f"cannot open the database {redact(settings.DATABASE_URL)} ({_first_line(exc)})",
            "start the database server or fix DATABASE_URL (unset it for the embedded SQLite default)",
        ) from None


def check_redis() -> None:
    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=3, socket_timeout=3).ping()
    except (redis.RedisError, ValueError) as exc:
        raise ConfigError(
            f"Redis is unreachable at {redact(settings.REDIS_URL)} ({_first_line(exc)})",
            "start it (make up does, or: redis-server --daemonize yes) or set MEGAFLOW_REDIS_URL",
        ) from None


def docker_client():
    """A docker SDK client for ``DOCKER_HOST``; raises ``ConfigError`` when the daemon does not answer."""
    try:
        client = docker.DockerClient(base_url=settings.DOCKER_HOST, timeout=10)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise ConfigError(
            f"the Docker daemon is not reachable at {settings.DOCKER_HOST} ({_first_line(exc)})",
            "start it (make up does, as root: dockerd --bridge=none --iptables=false) or set DOCKER_HOST",
        ) from None
    return client


def check_docker() -> None:
    client = docker_client()
    try:
        client.images.get(settings.MEGAFLOW_BASE_IMAGE)
    except docker.errors.ImageNotFound:
        raise ConfigError(
            f"the base environment image {settings.MEGAFLOW_BASE_IMAGE} is missing",
            "build it with deploy/base-image/build.sh (make up does this)",
        ) from None
    finally:
        client.close()


CHECKS = {"database": check_database, "redis": check_redis, "docker": check_docker}


def run_all(names=None) -> list[str]:
    """Run the named checks (default: all), raising the first ``ConfigError``; returns the names checked."""
    names = list(names or CHECKS)
    for name in names:
        CHECKS[name]()
    return names
