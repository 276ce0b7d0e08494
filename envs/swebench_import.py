"""Convert SWE-bench instances (JSONL, as published on the Hugging Face hub) into MegaFlow's task format.

Each instance runs in the image the SWE-bench harness builds for it, named by the harness's convention:
``swebench/sweb.eval.x86_64.<instance id, "__" written "_1776_">:latest`` (lower case) for the published
images, ``sweb.eval.x86_64.<instance id>:latest`` for images built locally (``namespace=""``). The repository
is inside the image at /testbed, so tasks carry no archive. The test command is derived the way the harness
does for the common cases: Django's runner for django/django, pytest with ``-rA`` for everything else (both
formats are parsed by envs/test_results.py); it runs inside the image's ``testbed`` conda environment.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import docker

from envs.task_sandbox import patched_paths
from orchestrator.task_format import TaskFormatError, parse_task, read_jsonl

CONDA = "source /opt/miniconda3/bin/activate && conda activate testbed"
PASSTHROUGH = ("repo", "base_commit", "version", "hints_text", "created_at", "environment_setup_commit")


def image_name(instance_id: str, namespace: str = "swebench", arch: str = "x86_64", tag: str = "latest") -> str:
    """The harness's image for an instance (swebench.harness.test_spec's naming)."""
    if namespace:
        return f"{namespace}/sweb.eval.{arch}.{instance_id.replace('__', '_1776_')}:{tag}".lower()
    return f"sweb.eval.{arch}.{instance_id}:{tag}".lower()


def test_command(repo: str, test_patch: str) -> str:
    """The command that runs the tests a test patch touches, in the image's conda environment."""
    files = [path for path in patched_paths(test_patch) if path.endswith(".py")]
    if repo == "django/django":
        # tests/forms_tests/tests/test_forms.py -> forms_tests.tests.test_forms
        modules = [path.removeprefix("tests/").removesuffix(".py").replace("/", ".") for path in files]
        command = "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 " + " ".join(modules)
    else:
        command = "pytest --no-header -rA --tb=no -p no:cacheprovider " + " ".join(shlex.quote(f) for f in files)
    return f"bash -c {shlex.quote(f'{CONDA} && cd /testbed && {command}')}"


def convert_instance(instance: dict, namespace: str = "swebench", arch: str = "x86_64") -> dict:
    """One SWE-bench instance as a task-format object (validated)."""
    if not isinstance(instance, dict) or not instance.get("instance_id"):
        raise TaskFormatError("instance_id", "every SWE-bench instance needs one")
    task = {
        "instance_id": instance["instance_id"],
        "problem_statement": instance.get("problem_statement", ""),
        "image": image_name(instance["instance_id"], namespace, arch),
        "workdir": "/testbed",
        "setup_commands": [],
        "patch": instance.get("patch", ""),
        "test_patch": instance.get("test_patch", ""),
        "test_command": test_command(instance.get("repo", ""), instance.get("test_patch", "")),
        "FAIL_TO_PASS": instance.get("FAIL_TO_PASS", []),
        "PASS_TO_PASS": instance.get("PASS_TO_PASS", []),
        "timeout_s": 1800,
        **{key: instance[key] for key in PASSTHROUGH if key in instance},
    }
    spec = parse_task(task)  # validates, and turns SWE-bench's JSON-string test lists into lists
    task["FAIL_TO_PASS"], task["PASS_TO_PASS"] = spec.fields["fail_to_pass"], spec.fields["pass_to_pass"]
    return task


def convert_file(source: Path, destination: Path, namespace: str = "swebench", arch: str = "x86_64") -> list[dict]:
    """Convert a SWE-bench JSONL file; errors name the line. Returns the tasks written."""
    tasks = []
    with source.open(encoding="utf-8") as lines:
        for line, instance in read_jsonl(lines):
            try:
                tasks.append(convert_instance(instance, namespace, arch))
            except TaskFormatError as error:
                raise TaskFormatError(error.field, error.reason, line=line, instance_id=error.instance_id) from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text("".join(json.dumps(task, ensure_ascii=False) + "\n" for task in tasks))
    return tasks


def missing_images(images: set[str], client) -> list[str]:
    """The images that are not present on the Docker daemon of ``client``; nothing is pulled."""
    missing = []
    for image in sorted(images):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            missing.append(image)
    return missing
