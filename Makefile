# MegaFlow. `make demo` and `make test` bootstrap everything they need (see deploy/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export MEGAFLOW_VENV := $(abspath $(VENV))

.PHONY: help bootstrap up down status demo test lint workers bench bench-10k bench-env bench-model chaos sim-autoscale \
	bench-autoscale push-images bench-images bench-frameworks

help:
	@echo "make demo    run the demo on the embedded default (SQLite, local Redis, local Docker)"
	@echo "make test    run the whole test suite (after make lint: ruff check and ruff format --check)"
	@echo "make up      start what is missing: Redis, dockerd, base image, migrations, workers, Flower, web"
	@echo "make down    stop what make up started"
	@echo "make status  show the local stack"
	@echo "make workers print the worker command of every queue"
	@echo "make bench   orchestration overhead per step vs raw asyncio and naive Celery (writes bench-results.json)"
	@echo "make bench-10k  10,000 concurrent episodes, latency-bound (sim model 20 s, sim env 5 s, 4 steps; bench-results.json under \"10000\")"
	@echo "make chaos   runs of 200 episodes under injected faults; every episode must end (writes chaos-results.json)"
	@echo "make bench-frameworks  framework episodes at once (mini-swe-agent) vs the bash agent (writes bench-frameworks-results.json)"
	@echo "make bench-env  Environment Service vs the raw docker SDK (writes bench-env-results.json)"
	@echo "make bench-model  gateway overhead and server batch sizes (writes bench-model-results.json)"
	@echo "make sim-autoscale  coordinated vs per-pool utilisation autoscaling, simulated 128-GPU fleet (table; writes autoscale-sim.png)"
	@echo "make bench-autoscale  microseconds per autoscaling decision (writes bench-autoscale-results.json)"
	@echo "make push-images  push the base image and IMAGES=\"task images...\" to the image registry"
	@echo "make bench-images  image-locality vs image-blind placement, two env hosts (writes bench-images-results.json)"

bootstrap:
	@deploy/bootstrap.sh

up: bootstrap
	@$(PY) -m deploy.local_stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy.local_stack down; else echo "==> nothing to stop (no virtualenv)"; fi

status:
	@$(PY) -m deploy.local_stack status

workers:
	@$(PY) -m megaflow_site.topology

demo: up
	@$(PY) manage.py megaflow demo

lint: bootstrap
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

test: lint
	@$(PY) -m pytest $(PYTEST_ARGS)

bench: bootstrap
	@$(PY) -m tests.bench.orchestration $(BENCH_ARGS)

bench-10k: bootstrap
	@$(PY) -m tests.bench.orchestration --levels 10000 --model-latency 20 --env-latency 5 --steps 4 --timeout 1200 \
		$(BENCH_ARGS)

bench-frameworks: bootstrap
	@$(PY) -m tests.bench.frameworks $(BENCH_FRAMEWORKS_ARGS)

chaos: bootstrap
	@$(PY) -m tests.chaos.harness $(CHAOS_ARGS)

bench-env: bootstrap
	@$(PY) -m tests.bench.environment $(BENCH_ENV_ARGS)

bench-model: bootstrap
	@$(PY) -m tests.bench.model

sim-autoscale: bootstrap
	@$(PY) -m tests.sim.autoscale $(SIM_ARGS)

bench-autoscale: bootstrap
	@$(PY) -m tests.bench.autoscale $(BENCH_AUTOSCALE_ARGS)

push-images: bootstrap
	@deploy/push-images.sh $(IMAGES)

bench-images: bootstrap
	@$(PY) -m tests.bench.images $(BENCH_IMAGES_ARGS)
