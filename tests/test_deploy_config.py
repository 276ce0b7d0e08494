"""deploy/docker-compose.yml, the Dockerfiles and the Kubernetes manifests agree with the code: every worker
is started exactly as the topology says, every setting they name exists, every ScaledObject scales a
Deployment on its own queue and on the autoscaler's metric for its pool. (No container registry or cluster is
reachable here: building and applying them is not exercised by the suite.)"""

import re
from pathlib import Path

import pytest
import yaml

from megaflow_site.topology import Service, WorkerSpec

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SETTINGS = (DEPLOY.parent / "megaflow_site" / "settings.py").read_text()
MODEL = "qwen3-8b"  # the model the deploy files default to
LONG_RUNNING = {"postgres", "redis", "web", "flower", "beat", "worker-agent", "worker-agent-framework", "worker-env",
                "worker-model"}  # fmt: skip


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?message}`` with nothing set: defaults, and placeholders."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda match: match.group(2), text)
    return re.sub(r"\$\{(\w+):\?[^}]*\}", lambda match: f"<{match.group(1)}>", text)


@pytest.fixture
def compose() -> dict:
    return yaml.safe_load(interpolate((DEPLOY / "docker-compose.yml").read_text()))["services"]


@pytest.fixture
def manifests() -> list[dict]:
    return [
        doc
        for name in ("megaflow.yaml", "keda.yaml")
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())
    ]


@pytest.fixture
def deployed_model(settings):
    settings.MEGAFLOW_MODELS = [MODEL]
    settings.MEGAFLOW_ENV_POOLS = ["default"]


def worker_argv(service: Service, key: str | None, concurrency: int | None = None) -> list[str]:
    spec = WorkerSpec(service, key, concurrency)
    return spec.argv(node_name=spec.node_name)


def test_compose_has_every_service_restarting_and_workers_started_as_the_topology_says(compose, deployed_model):
    assert LONG_RUNNING | {"migrate"} == set(compose)
    for name in LONG_RUNNING:
        assert compose[name]["restart"] == "always", name
    assert compose["worker-agent"]["command"] == worker_argv(Service.AGENT, None)
    assert compose["worker-agent-framework"]["command"] == worker_argv(Service.AGENT, "framework", 32)
    assert compose["worker-env"]["command"] == worker_argv(Service.ENV, "default")
    assert compose["worker-model"]["command"] == worker_argv(Service.MODEL, MODEL)
    assert compose["beat"]["command"][:4] == ["celery", "-A", "megaflow_site", "beat"]


def test_compose_gives_the_socket_to_env_workers_only_and_a_gpu_to_model_workers(compose):
    sockets = {name for name, service in compose.items() if any("docker.sock" in v for v in service.get("volumes", []))}
    assert sockets == {"worker-env"}
    assert compose["worker-env"]["environment"]["MEGAFLOW_ENV_BACKEND"] == "docker"
    [gpu] = compose["worker-model"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert compose["worker-model"]["build"]["dockerfile"] == "deploy/Dockerfile.model"


def test_secrets_come_from_the_environment(compose):
    environment = compose["web"]["environment"]
    assert environment["MEGAFLOW_SECRET_KEY"] == "<MEGAFLOW_SECRET_KEY>"  # required, no default
    assert environment["MEGAFLOW_FLOWER_BASIC_AUTH"] == "<MEGAFLOW_FLOWER_BASIC_AUTH>"
    assert "--basic-auth=$$MEGAFLOW_FLOWER_BASIC_AUTH" in " ".join(yaml.safe_load(
        (DEPLOY / "docker-compose.yml").read_text())["services"]["flower"]["command"])  # fmt: skip


def test_every_setting_the_deploy_files_name_exists():
    text = "\n".join(path.read_text() for path in [DEPLOY / "docker-compose.yml", *(DEPLOY / "k8s").glob("*.yaml")])
    named = set(re.findall(r"\b(MEGAFLOW_[A-Z_]+|DATABASE_URL|DOCKER_HOST)\b", text)) - {"MEGAFLOW_MODEL_NAME"}
    missing = {name for name in named if f'"{name}"' not in SETTINGS}
    assert not missing, f"settings.py reads no {sorted(missing)}"


def test_the_image_carries_every_package():
    packages = {path.name for path in DEPLOY.parent.iterdir() if (path / "__init__.py").exists()}
    for dockerfile in ("Dockerfile", "Dockerfile.model"):
        copied = set(re.findall(r"^COPY (\w+) \1$", (DEPLOY / dockerfile).read_text(), re.MULTILINE))
        assert packages - {"tests"} <= copied, dockerfile


def test_every_scaled_object_scales_a_deployment_on_its_queue_and_its_pools_desired_replicas(manifests, deployed_model):
    from orchestrator.autoscale import pools

    deployments = {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == "Deployment"}
    scaled = [doc for doc in manifests if doc["kind"] == "ScaledObject"]
    assert {doc["spec"]["scaleTargetRef"]["name"] for doc in scaled} == {
        "worker-agent", "worker-env-default", f"worker-model-{MODEL}"}  # fmt: skip
    autoscaled = {pool.name for pool in pools()}
    for doc in scaled:
        [container] = deployments[doc["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]["containers"]
        command = container["command"]
        queue = command[command.index("-Q") + 1]
        triggers = {trigger["type"]: trigger["metadata"] for trigger in doc["spec"]["triggers"]}
        assert triggers["redis"]["listName"] == queue
        if queue in autoscaled:
            assert triggers["prometheus"]["query"] == f'max(megaflow_desired_replicas{{pool="{queue}"}})'
    assert autoscaled == {f"model.{MODEL}", "env.default"}


def test_kubernetes_workers_start_as_the_topology_says_and_read_existing_config(manifests, deployed_model):
    named = {(doc["kind"], doc["metadata"]["name"]) for doc in manifests}
    commands = {}
    for doc in manifests:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            commands[doc["metadata"]["name"]] = container["command"]
            for source in container.get("envFrom", []):
                kind, ref = (
                    ("Secret", source["secretRef"]) if "secretRef" in source else ("ConfigMap", source["configMapRef"])
                )
                assert (kind, ref["name"]) in named
    assert commands["worker-agent"] == worker_argv(Service.AGENT, None)
    assert commands["worker-env-default"] == worker_argv(Service.ENV, "default")
    assert commands[f"worker-model-{MODEL}"] == worker_argv(Service.MODEL, MODEL)
