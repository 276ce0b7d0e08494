#!/usr/bin/env bash
# Bring a fresh Debian machine to the point where MegaFlow runs: Debian packages, Redis, the Docker daemon,
# the base environment image and the Python virtualenv. Idempotent: each step checks before it acts and
# says what it found or did. Anything this script starts gets a pid file in $MEGAFLOW_DATA_DIR/run, so
# `make down` can stop exactly that and nothing else.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=${MEGAFLOW_DATA_DIR:-$ROOT/var}
VENV=${MEGAFLOW_VENV:-$ROOT/.venv}
BASE_IMAGE=${MEGAFLOW_BASE_IMAGE:-megaflow/base:bookworm}
REDIS_URL=${MEGAFLOW_REDIS_URL:-redis://127.0.0.1:6379/0}
PYTHON=${MEGAFLOW_PYTHON:-python3}
RUN_DIR=$DATA_DIR/run
LOG_DIR=$DATA_DIR/log
mkdir -p "$RUN_DIR" "$LOG_DIR"

step() { printf '==> %s\n' "$*"; }
fail() { printf 'megaflow: %s\n' "$*" >&2; exit 2; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# --- Debian packages ---------------------------------------------------------------------------------------
missing=()
# chromium and chromium-driver: the headless browser tests/test_api_docs.py renders the API docs in;
# docker-registry: the local image registry (MEGAFLOW_IMAGE_REGISTRY unset).
for pkg in redis-server docker.io debootstrap chromium chromium-driver docker-registry; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  step "Debian packages: redis-server, docker.io, debootstrap, chromium, chromium-driver, docker-registry already installed"
else
  is_root || fail "Debian packages ${missing[*]} are missing -- install them as root: apt-get install ${missing[*]}"
  step "Debian packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >"$LOG_DIR/apt.log" 2>&1 \
    || { apt-get update -q >>"$LOG_DIR/apt.log" 2>&1 && apt-get install -y -q "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1; } \
    || fail "apt-get could not install ${missing[*]} -- see $LOG_DIR/apt.log"
fi

# --- Redis -----------------------------------------------------------------------------------------------
redis_host_port=$(printf '%s' "$REDIS_URL" | sed -E 's#^rediss?://([^@/]*@)?([^:/]+)(:([0-9]+))?.*#\2 \4#')
read -r redis_host redis_port <<<"$redis_host_port"
redis_port=${redis_port:-6379}
if redis-cli -h "$redis_host" -p "$redis_port" ping >/dev/null 2>&1; then
  step "Redis: answering at $redis_host:$redis_port"
elif [ "$redis_host" = 127.0.0.1 ] || [ "$redis_host" = localhost ]; then
  step "Redis: starting redis-server on $redis_host:$redis_port"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --dir "$DATA_DIR" --logfile "$LOG_DIR/redis.log" --pidfile "$RUN_DIR/redis.pid"
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 || fail "redis-server did not start -- see $LOG_DIR/redis.log"
  printf 'redis-server\n' >>"$RUN_DIR/redis.pid"
else
  fail "Redis at $redis_host:$redis_port does not answer -- start it there or fix MEGAFLOW_REDIS_URL"
fi

# --- Docker daemon -----------------------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
  step "Docker daemon: running"
else
  is_root || fail "the Docker daemon is not running -- start it as root: dockerd --bridge=none --iptables=false &"
  step "Docker daemon: starting dockerd --bridge=none --iptables=false (containers get no network)"
  nohup dockerd --bridge=none --iptables=false >"$LOG_DIR/dockerd.log" 2>&1 &
  printf '%s\ndockerd\n' "$!" >"$RUN_DIR/dockerd.pid"
  for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.3; done
  docker info >/dev/null 2>&1 || fail "dockerd did not come up within 30 s -- see $LOG_DIR/dockerd.log"
fi

# --- Base environment image --------------------------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  step "Base image: $BASE_IMAGE present"
else
  step "Base image: building $BASE_IMAGE (debootstrap bookworm + python3, git, pytest; a few minutes, once)"
  "$ROOT/deploy/base-image/build.sh" "$BASE_IMAGE" >"$LOG_DIR/base-image.log" 2>&1 \
    || fail "building $BASE_IMAGE failed -- see $LOG_DIR/base-image.log"
fi

# --- Image registry ------------------------------------------------------------------------------------------
# Task images live in a registry and env workers pull them on demand. With MEGAFLOW_IMAGE_REGISTRY unset, a local
# one (Debian's docker-registry) serves on 127.0.0.1:5000 only, storing under $DATA_DIR/registry; docker treats
# 127.0.0.0/8 as an insecure registry, so no daemon configuration is needed. `make push-images` pushes to it.
registry_answers() { python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
  "http://$1/v2/" >/dev/null 2>&1; }
if [ -n "${MEGAFLOW_IMAGE_REGISTRY:-}" ]; then
  step "Image registry: $MEGAFLOW_IMAGE_REGISTRY (configured; nothing started)"
elif registry_answers 127.0.0.1:5000; then
  step "Image registry: answering at 127.0.0.1:5000"
else
  step "Image registry: starting docker-registry on 127.0.0.1:5000 (storage $DATA_DIR/registry)"
  mkdir -p "$DATA_DIR/registry/data"
  printf '%s\n' "version: 0.1" "log:" "  level: warn" "storage:" "  filesystem:" \
    "    rootdirectory: $DATA_DIR/registry/data" "  delete:" "    enabled: true" "http:" "  addr: 127.0.0.1:5000" \
    >"$DATA_DIR/registry/config.yml"
  nohup docker-registry serve "$DATA_DIR/registry/config.yml" >"$LOG_DIR/registry.log" 2>&1 &
  printf '%s\ndocker-registry\n' "$!" >"$RUN_DIR/registry.pid"
  for _ in $(seq 50); do registry_answers 127.0.0.1:5000 && break; sleep 0.2; done
  registry_answers 127.0.0.1:5000 || fail "docker-registry did not start on 127.0.0.1:5000 -- see $LOG_DIR/registry.log"
fi

# --- Python virtualenv ---------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  step "Virtualenv: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
# requirements-model.txt (CPU torch + transformers) serves the hf backend and the tiny-model tests.
wanted=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-model.txt" | sha256sum | cut -d" " -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  step "Virtualenv: requirements.txt and requirements-model.txt already installed"
else
  step "Virtualenv: installing requirements.txt and requirements-model.txt (CPU torch: a minute or two, once)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements.txt" \
    -r "$ROOT/requirements-model.txt" >"$LOG_DIR/pip.log" 2>&1 \
    || fail "pip could not install the requirements -- see $LOG_DIR/pip.log"
  printf '%s\n' "$wanted" >"$stamp"
fi
