"""The task format: stored whole, returned unchanged, and every bad field named with its line."""

import hashlib
import io
import json
import tarfile

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from orchestrator.models import Dataset, Task
from orchestrator.task_format import TaskFormatError, load_dataset, parse_task, task_to_dict


def make_archive(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def full_task(**overrides) -> dict:
    task = {
        "instance_id": "calc__add-1",
        "problem_statement": "add(2, 2) returns 5.",
        "image": "",
        "repo_archive": "repos/calc.tar.gz",
        "workdir": "/testbed",
        "setup_commands": ["pip install -e ."],
        "patch": "--- a/calc.py\n+++ b/calc.py\n",
        "test_patch": "--- a/test_calc.py\n+++ b/test_calc.py\n",
        "test_command": "python3 -m pytest -q",
        "FAIL_TO_PASS": ["test_calc.py::test_add"],
        "PASS_TO_PASS": ["test_calc.py::test_sub"],
        "timeout_s": 600,
    }
    task.update(overrides)
    return task


@pytest.fixture
def dataset_file(tmp_path):
    (tmp_path / "repos").mkdir()
    archive = make_archive({"calc.py": "def add(a, b):\n    return a + b + 1\n"})
    (tmp_path / "repos" / "calc.tar.gz").write_bytes(archive)
    swe_bench_style = {
        "instance_id": "astropy__astropy-12907",
        "problem_statement": "separability_matrix is wrong for nested models",
        "image": "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest",
        "test_command": "pytest astropy/modeling/tests/test_separable.py",
        "FAIL_TO_PASS": '["test_separable[compound_model6]"]',
        "PASS_TO_PASS": "[]",
        "repo": "astropy/astropy",
        "base_commit": "d16bfe05a744909de4b27f5875fe0d4ed41ce607",
    }
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(full_task()) + "\n\n" + json.dumps(swe_bench_style) + "\n")
    return path, archive, swe_bench_style


@pytest.mark.django_db
def test_a_dataset_round_trips_through_the_database(dataset_file):
    path, archive, swe_bench_style = dataset_file
    dataset = load_dataset(path, "mini")

    calc = dataset.tasks.get(instance_id="calc__add-1")
    assert calc.repo_archive_sha256 == hashlib.sha256(archive).hexdigest()
    assert calc.repo_archive.read() == archive
    assert task_to_dict(calc) == {**full_task(), "repo_archive": f"archives/{calc.repo_archive_sha256}.tar.gz"}

    imported = task_to_dict(dataset.tasks.get(instance_id="astropy__astropy-12907"))
    # Defaults are filled in, SWE-bench's JSON-string test lists become lists, unknown fields survive.
    assert imported["workdir"] == "/testbed" and imported["timeout_s"] == 1800
    assert imported["FAIL_TO_PASS"] == ["test_separable[compound_model6]"] and imported["PASS_TO_PASS"] == []
    assert imported["repo"] == "astropy/astropy" and imported["base_commit"] == swe_bench_style["base_commit"]


@pytest.mark.django_db
def test_the_log_parser_is_kept_with_the_task_and_defaults_to_auto(dataset_file):
    path, _, _ = dataset_file
    path.write_text(json.dumps(full_task(log_parser="unittest")) + "\n" + json.dumps(full_task(instance_id="b")) + "\n")
    dataset = load_dataset(path, "parsers")
    assert dataset.tasks.get(instance_id="calc__add-1").log_parser == "unittest"
    assert task_to_dict(dataset.tasks.get(instance_id="calc__add-1"))["log_parser"] == "unittest"
    assert dataset.tasks.get(instance_id="b").log_parser == "auto"


@pytest.mark.django_db
def test_loading_the_same_file_twice_is_a_no_op_and_a_changed_file_is_refused(dataset_file):
    path, _, _ = dataset_file
    first = load_dataset(path, "mini")
    digests = set(Task.objects.values_list("spec_sha256", flat=True))
    assert load_dataset(path, "mini").pk == first.pk
    assert set(Task.objects.values_list("spec_sha256", flat=True)) == digests and Task.objects.count() == 2

    path.write_text(json.dumps(full_task(problem_statement="add() is off by one")) + "\n")
    with pytest.raises(TaskFormatError, match="already exists with different tasks"):
        load_dataset(path, "mini")


@pytest.mark.django_db
def test_identical_archives_are_stored_once(dataset_file):
    path, _, _ = dataset_file
    first = load_dataset(path, "mini").tasks.get(instance_id="calc__add-1")
    second = load_dataset(path, "mini-copy").tasks.get(instance_id="calc__add-1")
    assert first.repo_archive.name == second.repo_archive.name


BAD_TASKS = {
    "missing instance_id": ({"instance_id": None}, "instance_id", "required"),
    "instance_id with spaces": ({"instance_id": "a b"}, "instance_id", "without spaces"),
    "empty problem statement": ({"problem_statement": "  "}, "problem_statement", "required"),
    "no FAIL_TO_PASS": ({"FAIL_TO_PASS": []}, "FAIL_TO_PASS", "at least one test"),
    "test list of numbers": ({"PASS_TO_PASS": [1, 2]}, "PASS_TO_PASS", "list of non-empty strings"),
    "timeout as a string": ({"timeout_s": "600"}, "timeout_s", "positive whole number"),
    "timeout zero": ({"timeout_s": 0}, "timeout_s", "positive whole number"),
    "relative workdir": ({"workdir": "testbed"}, "workdir", "absolute path"),
    "missing archive": ({"repo_archive": "repos/none.tar.gz"}, "repo_archive", "file not found"),
    "absolute archive path": ({"repo_archive": "/etc/passwd"}, "repo_archive", "relative to the dataset file"),
    "missing test command": ({"test_command": ""}, "test_command", "required"),
    "unknown log parser": ({"log_parser": "nose"}, "log_parser", "must be one of auto, pytest, junit, unittest"),
    "log parser not a string": ({"log_parser": ["pytest"]}, "log_parser", "must be one of"),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", BAD_TASKS, ids=list(BAD_TASKS))
def test_a_bad_field_is_named_with_its_line_and_nothing_is_stored(dataset_file, case):
    path, _, _ = dataset_file
    overrides, field, reason = BAD_TASKS[case]
    good = json.dumps(full_task(instance_id="good-1"))
    path.write_text(good + "\n" + json.dumps(full_task(**overrides)) + "\n")
    with pytest.raises(TaskFormatError) as caught:
        load_dataset(path, "broken")
    assert (caught.value.line, caught.value.field) == (2, field)
    assert reason in caught.value.reason
    assert not Dataset.objects.exists() and not Task.objects.exists()


@pytest.mark.django_db
def test_whole_file_errors_are_reported_by_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    cases = {
        '{"instance_id": "x",\n': "not valid JSON",
        "[1, 2]\n": "must be a JSON object",
        json.dumps(full_task(repo_archive=""))
        + "\n"
        + json.dumps(full_task(repo_archive=""))
        + "\n": "duplicates line 1",
        "\n\n": "holds no tasks",
    }
    for text, reason in cases.items():
        path.write_text(text)
        with pytest.raises(TaskFormatError, match=reason):
            load_dataset(path, "broken")


def test_an_archive_that_is_not_gzip_is_refused(tmp_path):
    (tmp_path / "repo.tar.gz").write_text("plain text, not an archive")
    with pytest.raises(TaskFormatError, match="not a .tar.gz archive"):
        parse_task(full_task(repo_archive="repo.tar.gz"), base_dir=tmp_path)


@pytest.mark.django_db
def test_load_dataset_command_reports_one_line(dataset_file, capsys):
    path, _, _ = dataset_file
    call_command("megaflow", "load-dataset", str(path), "--name", "mini")
    assert capsys.readouterr().out.strip() == "dataset mini: 2 tasks"

    path.write_text(json.dumps(full_task(timeout_s=-1, repo_archive="")) + "\n")
    with pytest.raises(CommandError) as caught:
        call_command("megaflow", "load-dataset", str(path), "--name", "other")
    assert (
        str(caught.value)
        == f"{path}: line 1: task 'calc__add-1': timeout_s: must be a positive whole number of seconds, not -1"
    )
