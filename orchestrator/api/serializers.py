"""What the REST API accepts and returns. Every input field is validated here, at the edge: a bad one is a 400
naming the field and the reason, never an error deeper in."""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Avg, Count, Q, Sum
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agents.agent import AgentConfigError, run_agent
from megaflow_site.topology import Service, known_keys
from orchestrator import bundles, costs
from orchestrator.model_versions import known_version
from orchestrator.models import Dataset, DatasetValidation, Episode, Run, Step, Task
from orchestrator.task_format import TaskFormatError, check_lines, parse_task, spec_digest, store_dataset

SLUG = re.compile(r"[-a-zA-Z0-9_]+")


class DatasetSerializer(serializers.ModelSerializer):
    task_count = serializers.IntegerField(read_only=True, source="tasks.count")
    owner = serializers.StringRelatedField(allow_null=True, help_text="username; null for the CLI's datasets and runs")

    class Meta:
        model = Dataset
        fields = ["id", "name", "description", "source", "owner", "task_count", "created_at"]
        read_only_fields = fields


class DatasetUploadSerializer(serializers.Serializer):
    """A dataset from an upload: ``file``, a JSONL file in the task format whose tasks bring their repository in
    their ``image``; or ``bundle``, a ``.tar.gz`` with ``tasks.jsonl`` and the repository archives it names (the
    layout ``megaflow load-dataset`` reads). Every task is checked, and each bad one is named with its reason.
    Sending the same tasks under the same name again changes nothing."""

    name = serializers.SlugField(max_length=100)
    description = serializers.CharField(required=False, allow_blank=True, max_length=10_000, default="")
    file = serializers.FileField(required=False, help_text="JSONL, one task per line (DESIGN.md task format).")
    bundle = serializers.FileField(
        required=False, help_text=".tar.gz: tasks.jsonl and the repo_archive files it names, paths relative to it."
    )

    def validate_file(self, upload):
        try:
            text = upload.read().decode("utf-8")
        except UnicodeDecodeError:
            raise serializers.ValidationError("must be UTF-8 text") from None
        return checked_tasks(text.splitlines(), None, upload.name or "the upload")

    def validate_bundle(self, upload):
        with tempfile.TemporaryDirectory(dir=settings.DATA_DIR, prefix="bundle-") as scratch:
            try:
                root = bundles.unpack(upload, Path(scratch))
            except bundles.BundleError as error:
                raise serializers.ValidationError(str(error)) from None
            try:
                text = (root / bundles.TASKS_FILE).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise serializers.ValidationError(f"{bundles.TASKS_FILE} must be UTF-8 text") from None
            # The archives are read into the specs here, before the scratch directory goes.
            return checked_tasks(text.splitlines(), root, bundles.TASKS_FILE)

    def validate(self, attrs):
        if ("file" in attrs) == ("bundle" in attrs):
            raise serializers.ValidationError({"file": ["give either file (JSONL) or bundle (.tar.gz), not both"]})
        attrs["specs"] = attrs.pop("file", None) or attrs.pop("bundle")
        return attrs

    def create(self, validated):
        owner = self.context.get("owner")
        try:
            return store_dataset(
                validated["specs"], validated["name"], validated["description"], source="upload", owner=owner
            )
        except TaskFormatError as error:
            raise serializers.ValidationError({"name": [str(error)]}) from None


def checked_tasks(lines: list[str], base_dir: Path | None, source: str) -> list:
    """The task specs of ``lines``, or a 400 naming every bad task (its line, instance and field)."""
    specs, errors = check_lines(lines, base_dir, source)
    if errors:
        raise serializers.ValidationError([str(error) for error in errors])
    return specs


class DatasetValidationSerializer(serializers.ModelSerializer):
    dataset = serializers.SlugRelatedField(slug_field="name", read_only=True)
    requested_by = serializers.StringRelatedField(allow_null=True)
    passed = serializers.SerializerMethodField()
    failed = serializers.SerializerMethodField()
    tasks = serializers.IntegerField(source="dataset.tasks.count", read_only=True)

    class Meta:
        model = DatasetValidation
        fields = ["id", "dataset", "env_pool", "state", "tasks", "passed", "failed", "results", "error",
                  "requested_by", "created_at", "finished_at"]  # fmt: skip
        read_only_fields = fields

    def get_passed(self, validation) -> int:
        return sum(result["ok"] for result in validation.results)

    def get_failed(self, validation) -> int:
        return sum(not result["ok"] for result in validation.results)


class TaskSerializer(serializers.ModelSerializer):
    dataset = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = Task
        fields = [
            "id", "dataset", "instance_id", "problem_statement", "image", "workdir", "setup_commands", "test_command",
            "fail_to_pass", "pass_to_pass", "timeout_s", "spec_sha256", "created_at",
        ]  # fmt: skip
        read_only_fields = fields


class DatasetNameField(serializers.SlugRelatedField):
    """A dataset by name; what is not a slug is not looked up (a NUL character is more than PostgreSQL takes)."""

    def to_internal_value(self, data):
        if isinstance(data, str) and not SLUG.fullmatch(data):
            self.fail("does_not_exist", slug_name=self.slug_field, value=data.replace("\x00", "\\x00")[:100])
        return super().to_internal_value(data)


class CostSerializer(serializers.Serializer):
    """What an episode, or a run (the sum of its episodes), cost over every attempt (orchestrator/costs.py)."""

    sandbox_s = serializers.FloatField(help_text="Seconds sandboxes were held.")
    env_worker_s = serializers.FloatField(help_text="Seconds env workers spent on its hops.")
    model_s = serializers.FloatField(help_text="Seconds of generation (GPU time where the backend is on a GPU).")
    prompt_tokens = serializers.IntegerField(help_text="Prompt tokens, every attempt.")
    completion_tokens = serializers.IntegerField(help_text="Completion tokens, every attempt.")
    image_pulls = serializers.IntegerField(help_text="Image pulls its sandbox starts made.")
    image_pull_bytes = serializers.IntegerField(help_text="Bytes those pulls downloaded.")
    image_pull_s = serializers.FloatField(help_text="Seconds starts waited for images.")


class RunSerializer(serializers.ModelSerializer):
    """A run: every chosen task × ``samples_per_task``. Choose tasks by ``dataset`` (all of it, or the
    ``instance_ids`` listed) or give them inline in ``tasks`` (task-format objects)."""

    dataset = DatasetNameField(slug_field="name", queryset=Dataset.objects.all(), required=False, allow_null=True)
    instance_ids = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False, write_only=True, max_length=10_000,
        help_text="With dataset: only these tasks.",
    )  # fmt: skip
    tasks = serializers.ListField(
        child=serializers.DictField(), required=False, write_only=True, max_length=1000,
        help_text="Inline tasks in the task format, instead of a dataset.",
    )  # fmt: skip
    model_name = serializers.CharField(max_length=200)
    env_pool = serializers.CharField(max_length=100, required=False, default="default")
    owner = serializers.StringRelatedField(allow_null=True, help_text="username; null for the CLI's datasets and runs")
    progress = serializers.SerializerMethodField()
    cost = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = [
            "id", "name", "owner", "status", "dataset", "instance_ids", "tasks", "samples_per_task", "agent_name",
            "agent_config", "model_name", "env_pool", "max_concurrent_episodes", "max_steps", "episode_time_limit_s",
            "max_attempts", "max_episode_tokens", "model_version", "max_staleness", "progress", "cost", "created_at",
            "started_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = ["id", "owner", "status", "progress", "cost", "created_at", "started_at", "finished_at"]
        extra_kwargs = {
            "max_concurrent_episodes": {"max_value": 100_000},
            "max_steps": {"max_value": 10_000},
            "episode_time_limit_s": {"max_value": 7 * 24 * 3600},
            "max_attempts": {"max_value": 100},
            "max_episode_tokens": {"max_value": 10**12},
            "max_staleness": {"min_value": 0, "max_value": 1_000_000},
        }

    def get_progress(self, run) -> dict:
        return run_progress(run)

    @extend_schema_field(CostSerializer)
    def get_cost(self, run) -> dict:
        return costs.run_cost(run.pk)

    def validate_model_name(self, value):
        if value not in known_keys(Service.MODEL):
            raise serializers.ValidationError(
                f"unknown model {value!r}; served: {', '.join(known_keys(Service.MODEL))}"
            )
        return value

    def validate_env_pool(self, value):
        if value not in known_keys(Service.ENV):
            raise serializers.ValidationError(
                f"unknown pool {value!r}; configured: {', '.join(known_keys(Service.ENV))}"
            )
        return value

    def validate_agent_config(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be a JSON object")
        return value

    def validate(self, attrs):
        if (version := attrs.get("model_version")) and not known_version(attrs["model_name"], version):
            raise serializers.ValidationError(
                {"model_version": [f"{attrs['model_name']} has no version {version!r}: publish it first"]}
            )
        try:
            run_agent(attrs.get("agent_name", "bash"), attrs.get("agent_config"))
        except AgentConfigError as error:
            field, _, reason = str(error).partition(": ")
            raise serializers.ValidationError({field if reason else "agent_config": [reason or str(error)]}) from None
        dataset, inline = attrs.get("dataset"), attrs.get("tasks")
        if bool(dataset) == bool(inline):
            raise serializers.ValidationError(
                {"dataset": ["give either dataset or tasks (inline), not both or neither"]}
            )
        if inline:
            attrs["specs"] = []
            for index, obj in enumerate(inline):
                try:
                    attrs["specs"].append(parse_task(obj))
                except TaskFormatError as error:
                    raise serializers.ValidationError({"tasks": [f"tasks[{index}]: {str(error)}"]}) from None
        else:
            chosen = dataset.tasks.all()
            if wanted := attrs.get("instance_ids"):
                chosen = chosen.filter(instance_id__in=wanted)
                missing = sorted(set(wanted) - set(chosen.values_list("instance_id", flat=True)))
                if missing:
                    raise serializers.ValidationError(
                        {"instance_ids": [f"not in {dataset.name}: {', '.join(missing[:10])}"]}
                    )
            if not chosen.exists():
                raise serializers.ValidationError({"dataset": [f"{dataset.name} holds no tasks"]})
            attrs["chosen"] = chosen
        episodes = attrs.get("samples_per_task", 1) * (len(inline) if inline else attrs["chosen"].count())
        if episodes > settings.MEGAFLOW_MAX_RUN_EPISODES:
            raise serializers.ValidationError(
                {"samples_per_task": [f"{episodes} episodes is over the limit of {settings.MEGAFLOW_MAX_RUN_EPISODES}"]}
            )
        return attrs

    @transaction.atomic
    def create(self, validated):
        validated.pop("instance_ids", None)
        validated.pop("tasks", None)
        specs, chosen = validated.pop("specs", None), validated.pop("chosen", None)
        user = self.context.get("owner")
        if specs is not None:
            # Inline tasks live in a dataset of their own, named by their content: the same tasks, the same dataset.
            digests = "".join(spec_digest(spec.fields, spec.extra, "") for spec in specs)
            key = hashlib.sha256(digests.encode()).hexdigest()[:16]
            dataset = store_dataset(specs, f"inline-{key}", "inline tasks of a run", source="api", owner=user)
            validated["dataset"], chosen = dataset, dataset.tasks.all()
        run = Run.objects.create(owner=user, **validated)
        run.tasks.set(chosen)
        return run


def run_progress(run: Run) -> dict:
    """Episode counts by status, success rate and mean reward, steps and tokens, throughput since start."""
    counts = dict(run.episodes.values_list("status").annotate(n=Count("pk")).order_by())
    total = sum(counts.values())
    totals = run.episodes.aggregate(
        steps=Sum("step_count"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
        mean_reward=Avg("reward"), solved=Count("pk", filter=Q(reward__gte=1.0)),
    )  # fmt: skip
    terminal = sum(counts.get(status, 0) for status in Episode.TERMINAL)
    solved = totals["solved"]
    elapsed = None
    if run.started_at:
        elapsed = ((run.finished_at or timezone.now()) - run.started_at).total_seconds()
    steps = totals["steps"] or 0
    return {
        "episodes": total,
        "by_status": {status: counts.get(status, 0) for status in Episode.Status.values},
        "done": terminal,
        "fraction_done": terminal / total if total else 0.0,
        "success_rate": solved / terminal if terminal else None,  # solved (reward 1.0) among finished episodes
        "mean_reward": totals["mean_reward"],
        "steps": steps,
        "prompt_tokens": totals["prompt"] or 0,
        "completion_tokens": totals["completion"] or 0,
        "elapsed_s": elapsed,
        "steps_per_s": steps / elapsed if elapsed else None,
        "episodes_per_s": terminal / elapsed if elapsed else None,
    }


class EpisodeSerializer(serializers.ModelSerializer):
    instance_id = serializers.CharField(source="task.instance_id", read_only=True)
    cost = serializers.SerializerMethodField()

    class Meta:
        model = Episode
        fields = [
            "id", "run", "task", "instance_id", "sample_index", "attempt", "status", "reward", "failure_reason",
            "step_count", "prompt_tokens", "completion_tokens", "worker", "container_id", "env_host",
            "pulling_image", "cost", "created_at", "started_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = fields

    @extend_schema_field(CostSerializer)
    def get_cost(self, episode) -> dict:
        return costs.episode_cost(episode)


class StepSerializer(serializers.ModelSerializer):
    class Meta:
        model = Step
        fields = [
            "index", "model_output", "action", "observation", "exit_code", "model_latency_s", "env_latency_s",
            "prompt_tokens", "completion_tokens", "created_at", "completed_at",
        ]  # fmt: skip
        read_only_fields = fields
