"""The bundled swe_mini suite: built from its sources, varied, and every task gold-valid in real containers."""

import json
from collections import Counter

import pytest
from django.core.management import call_command

from envs.suite_builder import build_suite
from envs.task_sandbox import patched_paths
from tests.conftest import SWE_MINI

TASKS = [json.loads(line) for line in SWE_MINI.read_text().splitlines()]


def test_the_committed_dataset_is_exactly_what_its_sources_build(tmp_path):
    built = build_suite("swe_mini", tmp_path)
    assert built.read_bytes() == SWE_MINI.read_bytes()
    for task in TASKS:
        assert (tmp_path / task["repo_archive"]).read_bytes() == (SWE_MINI.parent / task["repo_archive"]).read_bytes()


def test_at_least_twenty_varied_tasks():
    assert len(TASKS) >= 20
    assert len(Counter(task["repo"] for task in TASKS)) >= 5, "several repositories"
    multi_file = [
        task["instance_id"]
        for task in TASKS
        if len([p for p in patched_paths(task["patch"]) if p.endswith(".py")]) >= 2
    ]
    assert len(multi_file) >= 2, "some fixes span several files"
    for task in TASKS:
        assert task["FAIL_TO_PASS"] and task["PASS_TO_PASS"] and task["problem_statement"].strip()
        assert not set(task["FAIL_TO_PASS"]) & set(task["PASS_TO_PASS"])
        assert task["patch"].startswith("diff --git") and "new file mode" in task["test_patch"]


@pytest.mark.integration
@pytest.mark.django_db
def test_every_task_passes_gold_validation_in_real_containers(capsys):
    call_command("megaflow", "validate", "swe_mini", "--parallel", "4")
    assert (
        capsys.readouterr().out.strip().splitlines()[-1]
        == f"validate swe_mini: {len(TASKS)} of {len(TASKS)} tasks valid"
    )
