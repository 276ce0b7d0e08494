"""Django and Celery settings: the only module that reads the process environment.

The embedded default needs no configuration at all: SQLite under ``var/``, Redis at 127.0.0.1:6379, the local
Docker daemon. Every knob is an environment variable; README.md lists them.
"""

import hashlib
import json
import os
import re
import secrets
import socket
from pathlib import Path

import dj_database_url
import limits

from megaflow_site.config_errors import ConfigError, redact

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _env_number(name: str, default, cast, example: str):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {example}", f"set {name} to {example}") from None


def env_int(name: str, default: int) -> int:
    return _env_number(name, default, int, "a whole number")


def env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number such as 1.5")


def env_sizes(name: str) -> dict[str, int]:
    """``"a=4,b=0"`` → ``{"a": 4, "b": 0}``."""
    sizes = {}
    for item in env_list(name, ""):
        key, _, size = item.partition("=")
        if not key.strip() or not size.strip().isdigit():
            raise ConfigError(f"{name} has {item!r}, not NAME=SIZE", f"write {name} as pool=size pairs, e.g. default=4")
        sizes[key.strip()] = int(size)
    return sizes


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean", f"set {name} to 1 or 0")


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


# --- Where local state lives -------------------------------------------------------------------------------
DATA_DIR = Path(env_str("MEGAFLOW_DATA_DIR", str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _generated_secret(variable: str, file_name: str, make) -> str:
    """``variable`` from the environment, or a random value kept (0600) in the data dir, so that the embedded
    default never ships a secret in the repository."""
    if value := os.environ.get(variable, "").strip():
        return value
    secret_file = DATA_DIR / file_name
    if not secret_file.exists():
        secret_file.write_text(make())
        secret_file.chmod(0o600)
    return secret_file.read_text().strip()


SECRET_KEY = _generated_secret("MEGAFLOW_SECRET_KEY", "secret_key", lambda: secrets.token_urlsafe(50))
# Flower's basic auth (user:password); its HTTP API sits behind the same credentials.
FLOWER_BASIC_AUTH = _generated_secret(
    "MEGAFLOW_FLOWER_BASIC_AUTH", "flower_auth", lambda: f"admin:{secrets.token_urlsafe(18)}"
)
DEBUG = env_bool("MEGAFLOW_DEBUG", False)
ALLOWED_HOSTS = env_list("MEGAFLOW_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")

# --- Django ------------------------------------------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and Redoc as static files
    "orchestrator",
    # The three services: each package's tasks.py is found by Celery's autodiscovery.
    "agents",
    "modelserving",
    "envs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "megaflow_site.urls"
WSGI_APPLICATION = "megaflow_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

SQLITE_PATH = DATA_DIR / "megaflow.sqlite3"
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{SQLITE_PATH}")
try:
    _database = dj_database_url.parse(
        DATABASE_URL, conn_max_age=env_int("MEGAFLOW_DB_CONN_MAX_AGE", 60), conn_health_checks=True
    )
except ValueError:
    raise ConfigError(
        f"DATABASE_URL {redact(DATABASE_URL)!r} is not a database URL MegaFlow knows",
        "use postgres://USER@HOST:5432/NAME, or unset it for the embedded SQLite default",
    ) from None
if _database["ENGINE"] == "django.db.backends.sqlite3":
    # Workers and the web server share the file: WAL lets readers run beside the one writer, and a
    # generous timeout turns a brief write lock into a wait instead of "database is locked".
    _database["CONN_MAX_AGE"] = 0
    _database["OPTIONS"] = {"timeout": 30, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
else:
    # A worker runs hundreds of threads, and Celery closes each thread's connection after every task: without a
    # pool each task would open a new server connection. Threads give theirs back before any long wait
    # (orchestrator/db.py), so a small pool per process serves them all.
    if DB_POOL_SIZE := env_int("MEGAFLOW_DB_POOL_SIZE", 8):
        _database["CONN_MAX_AGE"] = 0  # Django refuses persistent connections beside a pool
        _database["CONN_HEALTH_CHECKS"] = False
        _database.setdefault("OPTIONS", {})["pool"] = {"min_size": 1, "max_size": DB_POOL_SIZE, "timeout": 60}
    # Parameters bound on the server, and a statement prepared once it has run this many times on a (pooled,
    # long-lived) connection: PostgreSQL stops parsing and planning the hot path's statements and the ORM's
    # transitions, and no parameter is quoted into the SQL text. Django's defaults: bound on the client, never
    # prepared. A statement then holds at most 65,535 parameters (orchestrator/db.py sizes bulk inserts for it).
    _database.setdefault("OPTIONS", {})["server_side_binding"] = True
    _database["OPTIONS"]["prepare_threshold"] = env_int("MEGAFLOW_DB_PREPARE_THRESHOLD", 5)
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- REST API (/api/v1, orchestrator/api) ---
MEGAFLOW_MAX_UPLOAD_BYTES = env_int("MEGAFLOW_MAX_UPLOAD_BYTES", 64 * 1024 * 1024)
# Dataset bundles (orchestrator/bundles.py): the upload, what it may unpack to, per member, and how many members.
MEGAFLOW_BUNDLE_MAX_UPLOAD_BYTES = env_int("MEGAFLOW_BUNDLE_MAX_UPLOAD_BYTES", 1024 * 1024 * 1024)
MEGAFLOW_BUNDLE_MAX_BYTES = env_int("MEGAFLOW_BUNDLE_MAX_BYTES", 4 * 1024 * 1024 * 1024)
MEGAFLOW_BUNDLE_MEMBER_MAX_BYTES = env_int("MEGAFLOW_BUNDLE_MEMBER_MAX_BYTES", 512 * 1024 * 1024)
MEGAFLOW_BUNDLE_MAX_MEMBERS = env_int("MEGAFLOW_BUNDLE_MAX_MEMBERS", 100_000)
DATA_UPLOAD_MAX_MEMORY_SIZE = MEGAFLOW_MAX_UPLOAD_BYTES
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "orchestrator.api.conventions.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "orchestrator.api.conventions.StrictOrderingFilter",
    ],
    "DEFAULT_PARSER_CLASSES": ["orchestrator.api.parsers.StrictJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_CLASSES": ["rest_framework.throttling.UserRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": env_str("MEGAFLOW_API_RATE", "1200/min")},
    "EXCEPTION_HANDLER": "orchestrator.api.conventions.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "MegaFlow API",
    "DESCRIPTION": "Runs of agent episodes over datasets of tasks: create, watch, cancel, retry, export.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI and Redoc from our own static files, not a CDN: the docs work on a machine without internet.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "orchestrator.api.schema.document_errors",
    ],
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns about a missing root until collectstatic has run
MEDIA_ROOT = DATA_DIR / "media"
MEDIA_URL = "media/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("MEGAFLOW_LOG_LEVEL", "INFO")},
    # One line per HTTP request to an inference server is noise at hundreds of requests per second.
    "loggers": {"httpx": {"level": "WARNING"}},
}

# --- Services ------------------------------------------------------------------------------------------------
REDIS_URL = env_str("MEGAFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
# A process's Redis clients (hot state, liveness) share one pool each that waits this long for a free connection
# when all of them are in use, instead of failing (megaflow_site/redis_pool.py).
REDIS_MAX_CONNECTIONS = env_int("MEGAFLOW_REDIS_MAX_CONNECTIONS", 256)
REDIS_POOL_TIMEOUT_S = env_float("MEGAFLOW_REDIS_POOL_TIMEOUT_S", 30.0)
# The environment service's default image: bookworm + python3 + git + pytest, built by deploy/bootstrap.sh.
MEGAFLOW_BASE_IMAGE = env_str("MEGAFLOW_BASE_IMAGE", "megaflow/base:bookworm")
# Model names and environment pools that have queues; the first of each is the default.
MEGAFLOW_MODELS = env_list("MEGAFLOW_MODELS", "replay")
MEGAFLOW_ENV_POOLS = env_list("MEGAFLOW_ENV_POOLS", "default")
# Where `make up` serves the web app and Flower.
MEGAFLOW_WEB_PORT = env_int("MEGAFLOW_WEB_PORT", 8000)
MEGAFLOW_FLOWER_PORT = env_int("MEGAFLOW_FLOWER_PORT", 5555)
# Docker daemon address for the preflight check; the docker SDK itself also honours DOCKER_HOST.
DOCKER_HOST = env_str("DOCKER_HOST", "unix:///var/run/docker.sock")
# How long a call waits for a Docker daemon that does not answer (restarting) before the episode's attempt fails.
MEGAFLOW_DOCKER_RECONNECT_S = env_int("MEGAFLOW_DOCKER_RECONNECT_S", 60)
# Agent commands go through one long-lived shell per sandbox (a write and a read, ~ms) instead of a docker exec
# each (three API calls, tens of ms); off: an exec per command. envs/docker_backend.py, "Commands".
MEGAFLOW_DOCKER_PERSISTENT_SHELL = env_bool("MEGAFLOW_DOCKER_PERSISTENT_SHELL", True)

# --- Model service ------------------------------------------------------------------------------------------
# Per-model backend configuration, JSON: {"qwen3-8b": {"backend": "vllm", "model_path": "...", "gpus": "0"}}.
# A model without an entry uses the backend of its own name (replay, sim) or else "openai" at MEGAFLOW_MODEL_URL.
MEGAFLOW_MODEL_URL = env_str("MEGAFLOW_MODEL_URL", "http://127.0.0.1:8001/v1")
try:
    MEGAFLOW_MODEL_CONFIG = json.loads(env_str("MEGAFLOW_MODEL_CONFIG", "{}"))
    if not isinstance(MEGAFLOW_MODEL_CONFIG, dict) or not all(
        isinstance(entry, dict) and "backend" in entry for entry in MEGAFLOW_MODEL_CONFIG.values()
    ):
        raise ValueError
except ValueError:
    raise ConfigError(
        "MEGAFLOW_MODEL_CONFIG is not a JSON object of model configs",
        'write it as {"model-name": {"backend": "openai", "base_url": "http://host:8000/v1"}}',
    ) from None
# Admission control: episodes live (starting, running, evaluating) at once across all runs.
MEGAFLOW_MAX_LIVE_EPISODES = env_int("MEGAFLOW_MAX_LIVE_EPISODES", 256)
MEGAFLOW_MAX_RUN_EPISODES = env_int("MEGAFLOW_MAX_RUN_EPISODES", 1_000_000)
# The coordinated autoscaler (orchestrator/autoscale.py): a decision every interval (0: off), the step-latency
# SLO it defends (p95 wall time between an episode's steps), and the most workers it asks for per pool.
MEGAFLOW_AUTOSCALE_INTERVAL_S = env_int("MEGAFLOW_AUTOSCALE_INTERVAL_S", 15)
MEGAFLOW_LATENCY_SLO_S = env_float("MEGAFLOW_LATENCY_SLO_S", 120.0)
MEGAFLOW_AUTOSCALE_MAX_GPU_WORKERS = env_int("MEGAFLOW_AUTOSCALE_MAX_GPU_WORKERS", 128)
MEGAFLOW_AUTOSCALE_MAX_ENV_WORKERS = env_int("MEGAFLOW_AUTOSCALE_MAX_ENV_WORKERS", 1024)
# An episode retried after an infrastructure failure waits this long, doubling with each further attempt.
MEGAFLOW_RETRY_BACKOFF_S = env_int("MEGAFLOW_RETRY_BACKOFF_S", 10)
# Worker liveness (megaflow_site/liveness.py): a worker silent for MEGAFLOW_WORKER_DEAD_S is dead and the
# episodes it held are re-driven at once; its heartbeat, every MEGAFLOW_WORKER_HEARTBEAT_S, also keeps long work
# alive. The watchdog looks every MEGAFLOW_WATCHDOG_INTERVAL_S.
MEGAFLOW_WORKER_DEAD_S = env_float("MEGAFLOW_WORKER_DEAD_S", 30.0)
MEGAFLOW_WORKER_HEARTBEAT_S = env_float("MEGAFLOW_WORKER_HEARTBEAT_S", MEGAFLOW_WORKER_DEAD_S / 6)
MEGAFLOW_WATCHDOG_INTERVAL_S = env_float("MEGAFLOW_WATCHDOG_INTERVAL_S", 5.0)
# A hop that ends in an error nothing recorded is re-driven by the watchdog; after this many such errors in one
# attempt, the attempt fails (and is retried while the run's max_attempts allow) with the error as its reason.
MEGAFLOW_HOP_ERRORS_MAX = env_int("MEGAFLOW_HOP_ERRORS_MAX", 3)
if not 0 < MEGAFLOW_WORKER_HEARTBEAT_S <= MEGAFLOW_WORKER_DEAD_S / 3:
    raise ConfigError(
        f"MEGAFLOW_WORKER_HEARTBEAT_S={MEGAFLOW_WORKER_HEARTBEAT_S} must be positive and at most a third of "
        f"MEGAFLOW_WORKER_DEAD_S ({MEGAFLOW_WORKER_DEAD_S}): a worker must miss several beats before it is dead",
        "lower MEGAFLOW_WORKER_HEARTBEAT_S or raise MEGAFLOW_WORKER_DEAD_S",
    )
# The gateway waits this long for a model worker's answer before replying 504.
MEGAFLOW_GATEWAY_TIMEOUT_S = env_int("MEGAFLOW_GATEWAY_TIMEOUT_S", 300)
# Framework agents (orchestrator/framework_loop.py): the gateway their episode-bound model URLs point at, as the
# framework workers reach it, and how many framework episodes one framework worker runs at once (a thread each).
MEGAFLOW_GATEWAY_URL = os.environ.get("MEGAFLOW_GATEWAY_URL", f"http://127.0.0.1:{MEGAFLOW_WEB_PORT}")
MEGAFLOW_FRAMEWORK_CONCURRENCY = env_int("MEGAFLOW_FRAMEWORK_CONCURRENCY", 32)
# The rollouts stream (orchestrator/rollouts.py) holds back episodes that ended less than this long ago, so
# that one ending a moment earlier but committed a moment later is never skipped by a cursor; and a publish of
# a model version waits this long for a model worker to load it.
MEGAFLOW_ROLLOUTS_SETTLE_S = env_float("MEGAFLOW_ROLLOUTS_SETTLE_S", 1.0)
MEGAFLOW_MODEL_LOAD_TIMEOUT_S = env_int("MEGAFLOW_MODEL_LOAD_TIMEOUT_S", 600)

# --- Environment service --------------------------------------------------------------------------------------
# "docker" runs each episode in a locked-down container; "local" (a temp dir, bubblewrap when installed) is for
# machines without Docker and is NOT a security boundary.
MEGAFLOW_ENV_BACKEND = env_str("MEGAFLOW_ENV_BACKEND", "docker")
# The "sim" backend's fixed time per command (benchmarks of orchestration cost; see envs/sim_backend.py).
MEGAFLOW_SIM_EXEC_LATENCY_S = env_float("MEGAFLOW_SIM_EXEC_LATENCY_S", 0.5)
MEGAFLOW_SANDBOX_MEMORY_MB = env_int("MEGAFLOW_SANDBOX_MEMORY_MB", 2048)
MEGAFLOW_SANDBOX_CPUS = env_float("MEGAFLOW_SANDBOX_CPUS", 1.0)
MEGAFLOW_SANDBOX_PIDS = env_int("MEGAFLOW_SANDBOX_PIDS", 512)
# Size of the workdir tmpfs (and so of everything a task can write) when the repository comes as an archive.
MEGAFLOW_SANDBOX_DISK_MB = env_int("MEGAFLOW_SANDBOX_DISK_MB", 1024)
MEGAFLOW_SANDBOX_TMP_MB = env_int("MEGAFLOW_SANDBOX_TMP_MB", 256)
# Per-command limits: the observation keeps this many bytes (head and tail); a command that prints more than
# the kill threshold is stopped, so `yes` cannot keep a worker busy until its timeout.
MEGAFLOW_EXEC_TIMEOUT_S = env_int("MEGAFLOW_EXEC_TIMEOUT_S", 180)
MEGAFLOW_OUTPUT_LIMIT_BYTES = env_int("MEGAFLOW_OUTPUT_LIMIT_BYTES", 16 * 1024)
MEGAFLOW_OUTPUT_KILL_BYTES = env_int("MEGAFLOW_OUTPUT_KILL_BYTES", 16 * 1024 * 1024)
# Start-up control across every env worker that shares this Redis: at most this many containers starting at
# once, and a creation rate (limits' syntax, e.g. "20/second") with jittered back-off when it is reached.
MEGAFLOW_START_CONCURRENCY = env_int("MEGAFLOW_START_CONCURRENCY", 8)
MEGAFLOW_START_RATE = env_str("MEGAFLOW_START_RATE", "20/second")
try:
    limits.parse(MEGAFLOW_START_RATE)
except ValueError:
    raise ConfigError(
        f"MEGAFLOW_START_RATE={MEGAFLOW_START_RATE!r} is not a rate", "write it as N/second or N/minute"
    ) from None
# The admission ramp (orchestrator/runs.py): at most this many episodes waiting for a sandbox (admitted, sandbox not
# yet up) at once; each sandbox that comes up lets the next ones in, while its prepare commands run. A burst of
# 10,000 then goes in at the rate sandboxes come up, instead of parking every start hop on the env workers at once
# (their database pools ran dry and the starts gave up). Start hops queue behind step hops on the env queue, so a
# low cap starves admission: at 64, the 10,000-episode bench never had more than ~1,300 live; and counting the
# prepare commands too (5 s each there), 512 admitted ~90 a second (make bench-10k, agents/README.md).
MEGAFLOW_MAX_STARTING = env_int("MEGAFLOW_MAX_STARTING", 512)
# Admission passes at most this often while it is asked again and again (every completed start, every finished
# episode): each pass reads the fleet's live counts (orchestrator/runs.py).
MEGAFLOW_ADMIT_INTERVAL_S = env_float("MEGAFLOW_ADMIT_INTERVAL_S", 0.25)
# Episodes admitted at most this many a second, fleet-wide, evenly (a token bucket; 0: no limit). An episode steps
# once per model-and-command cycle from its start on, so episodes admitted in a burst step in the same wave every
# cycle: at 10,000 on one box, 700 starts a second made waves of 665 steps a second that two cores carried only
# with a p99 of 1.9 s. Admitted at no more than the fleet steps, the waves stay inside what it carries.
MEGAFLOW_ADMIT_RATE = env_float("MEGAFLOW_ADMIT_RATE", 400.0)
if MEGAFLOW_ADMIT_RATE < 0:
    raise ConfigError(f"MEGAFLOW_ADMIT_RATE={MEGAFLOW_ADMIT_RATE} is negative", "set it to 0 (no limit) or more")
if MEGAFLOW_MAX_STARTING < 1:
    raise ConfigError(f"MEGAFLOW_MAX_STARTING={MEGAFLOW_MAX_STARTING} admits nothing", "set it to 1 or more")
# Persistent (warm) pools: POOL=SIZE pairs; a pool not listed runs ephemeral containers.
MEGAFLOW_WARM_POOL_SIZES = env_sizes("MEGAFLOW_WARM_POOL_SIZES")
MEGAFLOW_WARM_IDLE_TTL_S = env_int("MEGAFLOW_WARM_IDLE_TTL_S", 900)
MEGAFLOW_WARM_MAX_USES = env_int("MEGAFLOW_WARM_MAX_USES", 50)
# The orphan reaper leaves a container alone this long after its creation (its episode row may lag).
MEGAFLOW_REAPER_GRACE_S = env_int("MEGAFLOW_REAPER_GRACE_S", 120)
MEGAFLOW_REAPER_INTERVAL_S = env_int("MEGAFLOW_REAPER_INTERVAL_S", 60)
# --- Environment images ---------------------------------------------------------------------------------------
# The registry task images live in (deploy/bootstrap.sh starts one on 127.0.0.1:5000 when this is unset; `make
# push-images` pushes there). Env workers pull any image whose reference names a registry when they lack it.
MEGAFLOW_IMAGE_REGISTRY = env_str("MEGAFLOW_IMAGE_REGISTRY", "")
# Bytes of task images one env host keeps (beyond the base image, which is always kept); the least recently
# used image no container uses is removed past it. 0: no bound.
MEGAFLOW_IMAGE_CACHE_GB = env_float("MEGAFLOW_IMAGE_CACHE_GB", 0.0)
# Pulls one env host runs at once (more episodes wanting other images wait), and how long one may take.
MEGAFLOW_IMAGE_PULL_CONCURRENCY = env_int("MEGAFLOW_IMAGE_PULL_CONCURRENCY", 2)
MEGAFLOW_IMAGE_PULL_TIMEOUT_S = env_int("MEGAFLOW_IMAGE_PULL_TIMEOUT_S", 600)
# Which env host this process is (one Docker daemon and its image cache), and the env hosts that have queues of
# their own (env.<pool>.<host>): episodes are routed to the host that holds their image (MEGAFLOW_PLACEMENT
# "locality"), or to the least loaded one ("blind"). No hosts listed: every env worker of a pool shares env.<pool>.
MEGAFLOW_ENV_HOST = env_str("MEGAFLOW_ENV_HOST", socket.gethostname())
MEGAFLOW_ENV_HOSTS = env_list("MEGAFLOW_ENV_HOSTS", "")
MEGAFLOW_PLACEMENT = env_str("MEGAFLOW_PLACEMENT", "locality")
if MEGAFLOW_PLACEMENT not in {"locality", "blind"}:
    raise ConfigError(f"MEGAFLOW_PLACEMENT={MEGAFLOW_PLACEMENT!r} is not a placement", "set it to locality or blind")
for _host in MEGAFLOW_ENV_HOSTS:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", _host):
        raise ConfigError(f"MEGAFLOW_ENV_HOSTS has {_host!r}", "name env hosts with letters, digits, - and _")

# Labels this deployment's containers, so that deployments sharing a Docker daemon (a dev stack and the test
# suite, say) never reap each other's: the reaper only judges containers of its own deployment.
MEGAFLOW_DEPLOYMENT = env_str("MEGAFLOW_DEPLOYMENT", hashlib.sha256(DATABASE_URL.encode()).hexdigest()[:12])

# --- Celery (read by megaflow_site/celery.py through the CELERY_ namespace) --------------------------------
# A message that a worker took but never acked comes back after the visibility timeout; every task's hard
# time limit must end well before that, or a slow task would run twice at once.
CELERY_BROKER_VISIBILITY_TIMEOUT_S = env_int("MEGAFLOW_VISIBILITY_TIMEOUT_S", 3600)
CELERY_TASK_TIME_LIMIT = env_int("MEGAFLOW_TASK_TIME_LIMIT_S", 900)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - min(30, CELERY_TASK_TIME_LIMIT // 4)
if not 20 <= CELERY_TASK_TIME_LIMIT <= CELERY_BROKER_VISIBILITY_TIMEOUT_S // 2:
    raise ConfigError(
        f"MEGAFLOW_TASK_TIME_LIMIT_S={CELERY_TASK_TIME_LIMIT} must be between 20 s and half the visibility "
        f"timeout ({CELERY_BROKER_VISIBILITY_TIMEOUT_S} s)",
        "lower MEGAFLOW_TASK_TIME_LIMIT_S or raise MEGAFLOW_VISIBILITY_TIMEOUT_S",
    )

CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT_S,
    # Messages a dead worker held come back once their visibility timeout passed, found by a sweep every 5 s
    # (kombu's default sweeps every ~100 s).
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    "socket_connect_timeout": 5,
    # Without it a publish waits forever on a Redis that vanished without closing the connection.
    "socket_timeout": 30,
    "health_check_interval": 25,
    # A worker's broker connections, opened as needed: on the gevent pool every greenlet acks its own message, and
    # with kombu's default of 10 the acks of a burst of finished tasks fail ("Too many connections").
    "max_connections": 1024,
    # A message's body goes into Redis as the JSON it is, not base64 of it (kombu's default, made for binary
    # serializers; this app accepts JSON only): a quarter fewer bytes through Redis, and no encode on publish nor
    # decode on every delivery. Messages of either encoding are read: each names its own.
    "body_encoding": "utf-8",
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A publish rides out a broker that is away for seconds (a restart, a failover) instead of failing its task: kombu tries
# again after 0, 0.5, 1, 1.5 and then every 2 s, ten times (about 15 s while connections are refused; each try waits up
# to socket_connect_timeout where they hang). Celery's default gives up after 0.6 s, and a hop whose next hop could
# not be published is left to the watchdog's vanished-message check (half a minute in make chaos's restart-redis).
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 10, "interval_start": 0, "interval_step": 0.5, "interval_max": 2}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_EVENT_SERIALIZER = "json"
# At-least-once delivery: ack after the task body ran, and give the message back if the worker died under it.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# With late acks a prefetched message is held hostage by a busy worker; take one at a time.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's thread pool plus grow/shrink, so the autoscaler can resize workers (megaflow_site/worker_pool.py).
CELERY_WORKER_POOL = "megaflow_site.worker_pool:ResizableThreadPool"
# No result backend on the hot path: a task's effect is the next message it publishes or the rows it writes.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
# Task events for Flower: every task on a hot queue (model.*, env.*) would cost three more publishes, about an
# eighth of an env worker's CPU (agents/README.md). Workers are started with -E where events are wanted
# (megaflow_site/topology.py: the agent queue, and the hot queues too with MEGAFLOW_HOT_QUEUE_TASK_EVENTS=1);
# Flower lists every worker from their heartbeats either way, and the hot queues by their length.
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_SEND_SENT_EVENT = False
MEGAFLOW_HOT_QUEUE_TASK_EVENTS = env_bool("MEGAFLOW_HOT_QUEUE_TASK_EVENTS", False)
# How a hot queue's worker carries its in-flight messages, each of which mostly waits (on a model, a sandbox):
# "threads", an OS thread each (Celery's thread pool, resizable: megaflow_site/worker_pool.py), or "gevent", a
# greenlet each (Celery's gevent pool: switching among thousands of waiting greenlets costs less than handing the
# GIL among thousands of threads; psycopg 3 and redis-py cooperate once Celery has monkey-patched the process).
# gevent, the default, applies only where the queue's backend is known to run on greenlets (sim and replay models,
# the docker and sim env backends: megaflow_site/topology.py); every other hot queue (openai, vllm, hf, local) and
# the agent queues run threads. agents/README.md, "Where a step's time goes".
MEGAFLOW_HOT_QUEUE_POOL = env_str("MEGAFLOW_HOT_QUEUE_POOL", "gevent")
# What a model worker keeps of its episodes' last turns (their token ids and messages), so that the next turn
# extends them instead of reading every earlier step's ids back (orchestrator/episode_loop.py, _TurnCache).
MEGAFLOW_TURN_CACHE_MB = env_int("MEGAFLOW_TURN_CACHE_MB", 256)
# On a gevent worker, each PostgreSQL wait may first block the process this long, then yield to the hub: a statement
# answered within it holds its pooled connection for its round trip instead of for a turn of every ready greenlet,
# but the process does nothing else meanwhile (megaflow_site/greenlet_db.py; on two cores at 10,000 concurrent the
# two costs came out even: agents/README.md). 0, the default: psycopg's cooperative waits throughout.
MEGAFLOW_GEVENT_DB_BLOCK_MS = env_float("MEGAFLOW_GEVENT_DB_BLOCK_MS", 0.0)
# On a gevent worker, the hot path's statements run on this many native threads, each with a connection of its own
# (beside the process's pool), so no connection waits for a greenlet's turn of the hub (megaflow_site/greenlet_db.py).
# 0: on the greenlets' pooled connections.
MEGAFLOW_GEVENT_DB_THREADS = env_int("MEGAFLOW_GEVENT_DB_THREADS", 4)
if MEGAFLOW_HOT_QUEUE_POOL not in {"threads", "gevent"}:
    raise ConfigError(f"MEGAFLOW_HOT_QUEUE_POOL={MEGAFLOW_HOT_QUEUE_POOL!r} is not a pool",
                      "set MEGAFLOW_HOT_QUEUE_POOL to threads or gevent")  # fmt: skip
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Several hot hops per Celery message (megaflow_site/hop_batches.py): a process holds a hop it publishes for at most
# a window and sends what it collected for one queue as one message, of at most MEGAFLOW_HOP_BATCH_MAX hops. The
# window is MEGAFLOW_HOP_BATCH_WINDOW_MS while hops go straight through (0 ms: every hop alone), and widens with the
# queue wait they see, up to MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS. A worker runs a batch's hops side by side on up to
# MEGAFLOW_HOP_THREADS threads (or greenlets) besides the pool's own.
MEGAFLOW_HOP_BATCH_WINDOW_MS = env_float("MEGAFLOW_HOP_BATCH_WINDOW_MS", 10.0)
MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS = env_float(
    "MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS", max(50.0, MEGAFLOW_HOP_BATCH_WINDOW_MS)
)
MEGAFLOW_HOP_BATCH_MAX = env_int("MEGAFLOW_HOP_BATCH_MAX", 64)
MEGAFLOW_HOP_THREADS = env_int("MEGAFLOW_HOP_THREADS", 2048)
if MEGAFLOW_HOP_BATCH_WINDOW_MS < 0 or MEGAFLOW_HOP_BATCH_MAX < 1 or MEGAFLOW_HOP_THREADS < 1:
    raise ConfigError("MEGAFLOW_HOP_BATCH_WINDOW_MS must be 0 or more, MEGAFLOW_HOP_BATCH_MAX and MEGAFLOW_HOP_THREADS "
                      "1 or more", "fix the hop batching settings")  # fmt: skip
if MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS < MEGAFLOW_HOP_BATCH_WINDOW_MS:
    raise ConfigError(f"MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS ({MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS:g}) is below "
                      f"MEGAFLOW_HOP_BATCH_WINDOW_MS ({MEGAFLOW_HOP_BATCH_WINDOW_MS:g})",
                      "set the window's ceiling at or above its floor")  # fmt: skip

# A worker's cyclic garbage collector, once the worker is ready: what is alive then is frozen out of its sight, and its
# young generation is examined every this many allocations instead of Python's 700 (megaflow_site/gc_tuning.py;
# 0: leave the collector as Python sets it).
MEGAFLOW_GC_YOUNG_THRESHOLD = env_int("MEGAFLOW_GC_YOUNG_THRESHOLD", 50_000)
if MEGAFLOW_GC_YOUNG_THRESHOLD < 0:
    raise ConfigError("MEGAFLOW_GC_YOUNG_THRESHOLD must be 0 or more",
                      "set MEGAFLOW_GC_YOUNG_THRESHOLD to 0 or a number of allocations")  # fmt: skip

# Periodic work (celery beat, started by `make up`): each pool's reaper and warm-pool top-up.
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    f"reap-orphans-{pool}": {
        "task": "envs.reap_orphans",
        "schedule": float(MEGAFLOW_REAPER_INTERVAL_S),
        "kwargs": {"pool": pool},
    }
    for pool in MEGAFLOW_ENV_POOLS
} | {
    f"maintain-warm-pool-{pool}": {"task": "envs.maintain_warm_pool", "schedule": 30.0, "kwargs": {"pool": pool}}
    for pool, size in MEGAFLOW_WARM_POOL_SIZES.items()
    if size > 0
}
# Admission catches up every few seconds too: an episode that ended in another run frees fleet-wide room.
CELERY_BEAT_SCHEDULE["admit-episodes"] = {"task": "orchestrator.admit", "schedule": 5.0}
# ...and episodes whose messages died with a worker or the broker are re-driven from the database.
CELERY_BEAT_SCHEDULE["episode-watchdog"] = {"task": "orchestrator.watchdog", "schedule": MEGAFLOW_WATCHDOG_INTERVAL_S}
if MEGAFLOW_AUTOSCALE_INTERVAL_S > 0:
    CELERY_BEAT_SCHEDULE["autoscale"] = {
        "task": "orchestrator.autoscale",
        "schedule": float(MEGAFLOW_AUTOSCALE_INTERVAL_S),
    }
