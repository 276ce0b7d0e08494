"""SWE-bench instances become tasks that run in the harness's images, and a missing image is named."""

import json

import docker
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from envs.swebench_import import convert_instance, image_name
from orchestrator.models import Dataset

ASTROPY = {
    "repo": "astropy/astropy",
    "instance_id": "astropy__astropy-12907",
    "base_commit": "d16bfe05a744909de4b27f5875fe0d4ed41ce607",
    "patch": "diff --git a/astropy/modeling/separable.py b/astropy/modeling/separable.py\n",
    "test_patch": (
        "diff --git a/astropy/modeling/tests/test_separable.py b/astropy/modeling/tests/test_separable.py\n"
        "--- a/astropy/modeling/tests/test_separable.py\n+++ b/astropy/modeling/tests/test_separable.py\n"
    ),
    "problem_statement": "`separability_matrix` does not compute separability correctly for nested CompoundModels",
    "hints_text": "",
    "created_at": "2022-03-03T15:14:54Z",
    "version": "4.3",
    "FAIL_TO_PASS": '["astropy/modeling/tests/test_separable.py::test_separable[compound_model6-result6]"]',
    "PASS_TO_PASS": '["astropy/modeling/tests/test_separable.py::test_coord_matrix"]',
    "environment_setup_commit": "298ccb478e6bf092953bca67a3d29dc6c35f6752",
}
DJANGO = {
    **ASTROPY,
    "repo": "django/django",
    "instance_id": "django__django-11099",
    "test_patch": "--- a/tests/auth_tests/test_validators.py\n+++ b/tests/auth_tests/test_validators.py\n",
    "FAIL_TO_PASS": '["test_ascii_validator (auth_tests.test_validators.UsernameValidatorsTests)"]',
    "PASS_TO_PASS": "[]",
}


def test_image_names_follow_the_harness_convention():
    assert image_name("astropy__astropy-12907") == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    assert image_name("django__django-11099", namespace="") == "sweb.eval.x86_64.django__django-11099:latest"
    assert image_name("Sympy__sympy-1", arch="arm64") == "swebench/sweb.eval.arm64.sympy_1776_sympy-1:latest"


def test_an_instance_becomes_a_task():
    task = convert_instance(ASTROPY)
    assert task["image"] == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    assert task["FAIL_TO_PASS"] == ["astropy/modeling/tests/test_separable.py::test_separable[compound_model6-result6]"]
    assert task["PASS_TO_PASS"] == ["astropy/modeling/tests/test_separable.py::test_coord_matrix"]
    assert task["workdir"] == "/testbed" and "repo_archive" not in task
    assert task["base_commit"] == ASTROPY["base_commit"] and task["version"] == "4.3"
    assert "conda activate testbed" in task["test_command"]
    assert (
        "pytest --no-header -rA --tb=no -p no:cacheprovider astropy/modeling/tests/test_separable.py"
        in task["test_command"]
    )


def test_django_runs_its_own_runner_on_the_touched_modules():
    command = convert_instance(DJANGO)["test_command"]
    assert "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 auth_tests.test_validators" in command


@pytest.fixture
def swebench_file(tmp_path):
    path = tmp_path / "swe-bench.jsonl"
    path.write_text(json.dumps(ASTROPY) + "\n" + json.dumps(DJANGO) + "\n")
    return path


@pytest.mark.integration
@pytest.mark.django_db
def test_import_refuses_naming_the_missing_image(swebench_file, tmp_path):
    with pytest.raises(CommandError) as caught:
        call_command(
            "megaflow", "import-swebench", str(swebench_file), "--out", str(tmp_path / "t.jsonl"), "--name", "swe"
        )
    assert str(caught.value).startswith(
        "image not present locally: swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest (and 1 more)"
    )
    assert not Dataset.objects.filter(name="swe").exists()


@pytest.mark.integration
@pytest.mark.django_db
def test_import_loads_when_the_images_are_present(swebench_file, tmp_path, settings):
    client = docker.from_env()
    base = client.images.get(settings.MEGAFLOW_BASE_IMAGE)
    names = [image_name(ASTROPY["instance_id"]), image_name(DJANGO["instance_id"])]
    for name in names:
        repository, tag = name.rsplit(":", 1)
        base.tag(repository, tag)
    try:
        call_command(
            "megaflow", "import-swebench", str(swebench_file), "--out", str(tmp_path / "t.jsonl"), "--name", "swe"
        )
    finally:
        for name in names:
            client.images.remove(name)
    dataset = Dataset.objects.get(name="swe")
    assert sorted(dataset.tasks.values_list("image", flat=True)) == sorted(names)


def test_a_bad_instance_is_reported_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ASTROPY) + "\n" + json.dumps({**ASTROPY, "FAIL_TO_PASS": "[]"}) + "\n")
    with pytest.raises(
        CommandError, match="line 2: task 'astropy__astropy-12907': FAIL_TO_PASS: must list at least one test"
    ):
        call_command("megaflow", "import-swebench", str(path), "--out", str(tmp_path / "t.jsonl"), "--skip-image-check")
