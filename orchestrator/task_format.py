"""The task format (DESIGN.md): one JSON object per line, SWE-bench field names.

``load_dataset`` validates a JSONL file and stores it as a ``Dataset`` of ``Task`` rows; ``task_to_dict``
turns a stored task back into the same object, so a task file survives a round trip through the database
(unknown fields included) and a run can be repeated exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from envs import image_reference
from envs.test_results import LOG_PARSERS
from orchestrator.db import bulk_batch_size
from orchestrator.models import Dataset, Task, archive_storage_name

DEFAULT_WORKDIR = "/testbed"
DEFAULT_TIMEOUT_S = 1800
MAX_INSTANCE_ID = 200
GZIP_MAGIC = b"\x1f\x8b"


class TaskFormatError(ValueError):
    """A task that does not follow the format; ``line`` is 1-based within its file when known."""

    def __init__(self, field: str, reason: str, line: int | None = None, instance_id: str | None = None):
        self.field, self.reason, self.line, self.instance_id = field, reason, line, instance_id
        where = f"line {line}: " if line else ""
        which = f"task {instance_id!r}: " if instance_id else ""
        super().__init__(f"{where}{which}{field}: {reason}")


@dataclass
class TaskSpec:
    """A validated task: model field values, plus the archive's bytes when the task ships one."""

    fields: dict
    archive: bytes | None = None
    extra: dict = field(default_factory=dict)


def _string(obj: dict, name: str, *, required: bool = False, default: str = "") -> str:
    value = obj.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, str):
        raise TaskFormatError(name, f"must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise TaskFormatError(name, "is required and must not be empty")
    return value


def _string_list(obj: dict, name: str, *, required: bool = False) -> list[str]:
    value = obj.get(name, [])
    if isinstance(value, str):
        # SWE-bench ships test lists as JSON-encoded strings.
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise TaskFormatError(name, "must be a list of strings (or a JSON string encoding one)") from None
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise TaskFormatError(name, "must be a list of non-empty strings")
    if required and not value:
        raise TaskFormatError(name, "must list at least one test")
    return value


def _timeout(obj: dict) -> int:
    value = obj.get("timeout_s", DEFAULT_TIMEOUT_S)
    if value is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskFormatError("timeout_s", f"must be a positive whole number of seconds, not {value!r}")
    return value


def _image(obj: dict) -> str:
    image = _string(obj, "image")
    if image:
        try:
            image_reference.parse(image)
        except image_reference.BadReference as error:
            raise TaskFormatError("image", str(error)) from None
    return image


def _archive(obj: dict, base_dir: Path | None) -> bytes | None:
    relative = _string(obj, "repo_archive")
    if not relative:
        return None
    if PurePosixPath(relative).is_absolute():
        raise TaskFormatError("repo_archive", "must be a path relative to the dataset file")
    if base_dir is None:
        raise TaskFormatError("repo_archive", "archives can only be read from a dataset file on disk")
    path = base_dir / relative
    if not path.is_file():
        raise TaskFormatError("repo_archive", f"file not found: {path}")
    data = path.read_bytes()
    if not data.startswith(GZIP_MAGIC):
        raise TaskFormatError("repo_archive", f"{relative} is not a .tar.gz archive")
    return data


def _log_parser(obj: dict) -> None:
    # Kept in ``extra`` with the other fields beyond SWE-bench's (Task.log_parser reads it); checked here.
    value = obj.get("log_parser")
    if value is not None and (not isinstance(value, str) or value not in LOG_PARSERS):
        raise TaskFormatError("log_parser", f"must be one of {', '.join(LOG_PARSERS)}, not {value!r}")


KNOWN_FIELDS = {
    "instance_id", "problem_statement", "image", "repo_archive", "workdir", "setup_commands", "patch",
    "test_patch", "test_command", "FAIL_TO_PASS", "PASS_TO_PASS", "timeout_s",
}  # fmt: skip


def parse_task(obj: object, base_dir: Path | None = None) -> TaskSpec:
    """Validate one task object; raises ``TaskFormatError`` naming the field and the reason."""
    if not isinstance(obj, dict):
        raise TaskFormatError("(task)", f"must be a JSON object, not {type(obj).__name__}")
    instance_id = _string(obj, "instance_id", required=True)
    if len(instance_id) > MAX_INSTANCE_ID or any(ch.isspace() for ch in instance_id):
        raise TaskFormatError("instance_id", f"must be at most {MAX_INSTANCE_ID} characters without spaces")
    try:
        workdir = _string(obj, "workdir", default=DEFAULT_WORKDIR) or DEFAULT_WORKDIR
        if not workdir.startswith("/"):
            raise TaskFormatError("workdir", f"must be an absolute path, not {workdir!r}")
        fields = {
            "instance_id": instance_id,
            "problem_statement": _string(obj, "problem_statement", required=True),
            "image": _image(obj),
            "workdir": workdir,
            "setup_commands": _string_list(obj, "setup_commands"),
            "patch": _string(obj, "patch"),
            "test_patch": _string(obj, "test_patch"),
            "test_command": _string(obj, "test_command", required=True),
            "fail_to_pass": _string_list(obj, "FAIL_TO_PASS", required=True),
            "pass_to_pass": _string_list(obj, "PASS_TO_PASS"),
            "timeout_s": _timeout(obj),
        }
        _log_parser(obj)
        archive = _archive(obj, base_dir)
    except TaskFormatError as error:
        raise TaskFormatError(error.field, error.reason, instance_id=instance_id) from None
    extra = {key: value for key, value in obj.items() if key not in KNOWN_FIELDS}
    return TaskSpec(fields=fields, archive=archive, extra=extra)


def read_jsonl(lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for each non-blank line; a line that is not JSON is a ``TaskFormatError``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFormatError("(line)", f"not valid JSON ({exc.msg} at column {exc.colno})", line=number) from None


def check_lines(
    lines: Iterable[str], base_dir: Path | None = None, source: str = "the upload"
) -> tuple[list[TaskSpec], list[TaskFormatError]]:
    """Every task in JSONL ``lines`` validated: the good ones, and one error per bad line (naming its line, task
    and field). Archive paths resolve against ``base_dir`` (a plain JSONL upload has none, so its tasks must bring
    their repository in ``image``)."""
    specs, errors, seen = [], [], {}
    try:
        for number, obj in read_jsonl(lines):
            try:
                spec = parse_task(obj, base_dir=base_dir)
            except TaskFormatError as error:
                errors.append(TaskFormatError(error.field, error.reason, line=number, instance_id=error.instance_id))
                continue
            instance_id = spec.fields["instance_id"]
            if instance_id in seen:
                errors.append(
                    TaskFormatError("instance_id", f"duplicates line {seen[instance_id]}", number, instance_id)
                )
                continue
            seen[instance_id] = number
            specs.append(spec)
    except TaskFormatError as error:  # a line that is not JSON ends the file's reading
        errors.append(error)
    if not specs and not errors:
        errors.append(TaskFormatError("(file)", f"{source} holds no tasks"))
    return specs, errors


def parse_lines(lines: Iterable[str], base_dir: Path | None = None, source: str = "the upload") -> list[TaskSpec]:
    """Every task in JSONL ``lines``, validated (``check_lines``); the first bad line raises."""
    specs, errors = check_lines(lines, base_dir, source)
    if errors:
        raise errors[0]
    return specs


def parse_file(path: Path) -> list[TaskSpec]:
    """Every task in a JSONL file, validated (``parse_lines``)."""
    with path.open(encoding="utf-8") as handle:
        return parse_lines(handle, base_dir=path.parent, source=str(path))


def task_to_dict(task: Task) -> dict:
    """The task as a task-format object; ``repo_archive`` becomes the stored archive's path."""
    obj = dict(task.extra)
    obj.update(
        instance_id=task.instance_id,
        problem_statement=task.problem_statement,
        image=task.image,
        workdir=task.workdir,
        setup_commands=task.setup_commands,
        patch=task.patch,
        test_patch=task.test_patch,
        test_command=task.test_command,
        FAIL_TO_PASS=task.fail_to_pass,
        PASS_TO_PASS=task.pass_to_pass,
        timeout_s=task.timeout_s,
    )
    if task.repo_archive:
        obj["repo_archive"] = task.repo_archive.name
    return obj


def spec_digest(fields: dict, extra: dict, archive_sha256: str) -> str:
    canonical = json.dumps({**extra, **fields, "repo_archive_sha256": archive_sha256}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _store_archive(task: Task, data: bytes) -> None:
    task.repo_archive_sha256 = hashlib.sha256(data).hexdigest()
    name = archive_storage_name(task.repo_archive_sha256)
    if not default_storage.exists(name):
        default_storage.save(name, ContentFile(data))
    task.repo_archive.name = name


def build_task(dataset: Dataset, spec: TaskSpec) -> Task:
    """An unsaved ``Task`` for ``spec``, its archive (if any) already in content-addressed storage."""
    task = Task(dataset=dataset, extra=spec.extra, **spec.fields)
    if spec.archive is not None:
        _store_archive(task, spec.archive)
    task.spec_sha256 = spec_digest(spec.fields, spec.extra, task.repo_archive_sha256)
    return task


def load_dataset(path: Path, name: str, description: str = "", owner=None) -> Dataset:
    """Validate ``path`` and store it as dataset ``name`` (``store_dataset``)."""
    return store_dataset(parse_file(path), name, description, source=str(path), owner=owner)


@transaction.atomic
def store_dataset(specs: list[TaskSpec], name: str, description: str = "", source: str = "", owner=None) -> Dataset:
    """Store validated tasks as dataset ``name``; nothing is written unless every task is valid.

    Loading the same tasks again is a no-op; loading changed tasks under an existing name is refused, because
    runs point at the stored tasks and must stay repeatable.
    """
    dataset, created = Dataset.objects.get_or_create(
        name=name, defaults={"description": description, "source": source, "owner": owner}
    )
    tasks = [build_task(dataset, spec) for spec in specs]
    if created:
        Task.objects.bulk_create(tasks, batch_size=bulk_batch_size(Task))
        return dataset
    stored = dict(dataset.tasks.values_list("instance_id", "spec_sha256"))
    wanted = {task.instance_id: task.spec_sha256 for task in tasks}
    if stored != wanted:
        raise TaskFormatError("(dataset)", f"dataset {name!r} already exists with different tasks; choose a new name")
    return dataset
