"""The durable truth: datasets of tasks, runs of episodes, and every step of every trajectory."""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from orchestrator.packed import FLOAT64, INT32, PackedArrayField


class Dataset(models.Model):
    """A named collection of tasks, e.g. the bundled ``swe_mini`` suite or an imported SWE-bench split."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    source = models.CharField(max_length=500, blank=True, help_text="File or URL the tasks were loaded from.")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="datasets"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class DatasetValidation(models.Model):
    """One gold validation of a dataset (envs/gold_check.py), started through the API and run on an env worker:
    every task's outcome and reasons, filled in as each task finishes."""

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        ERROR = "error"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="validations")
    env_pool = models.CharField(max_length=100)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    results = models.JSONField(default=list, blank=True, help_text="[{instance_id, ok, problems, seconds}]")
    error = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"validation {self.pk} of {self.dataset_id} ({self.state})"


def archive_storage_name(sha256: str) -> str:
    # Content-addressed: the same archive is stored once however many tasks and datasets use it.
    return f"archives/{sha256}.tar.gz"


def _archive_path(task: "Task", filename: str) -> str:
    return archive_storage_name(task.repo_archive_sha256)


class Task(models.Model):
    """One task in the task format of DESIGN.md, kept whole so that any run of it can be repeated exactly.

    Field names follow SWE-bench where it has them. A task is immutable once stored: ``spec_sha256`` hashes
    its canonical JSON (archive included by digest), and runs record which tasks they used.
    """

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="tasks")
    instance_id = models.CharField(max_length=200)
    problem_statement = models.TextField()
    image = models.CharField(max_length=300, blank=True, help_text="Docker image; blank means the base image.")
    repo_archive = models.FileField(upload_to=_archive_path, blank=True)
    repo_archive_sha256 = models.CharField(max_length=64, blank=True)
    workdir = models.CharField(max_length=300, default="/testbed")
    setup_commands = models.JSONField(default=list, blank=True)
    patch = models.TextField(blank=True, help_text="Reference solution, unified diff.")
    test_patch = models.TextField(blank=True)
    test_command = models.TextField()
    fail_to_pass = models.JSONField(default=list)
    pass_to_pass = models.JSONField(default=list, blank=True)
    timeout_s = models.PositiveIntegerField(default=1800, validators=[MinValueValidator(1)])
    extra = models.JSONField(default=dict, blank=True, help_text="Fields beyond the task format, kept verbatim.")
    spec_sha256 = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["dataset", "instance_id"]
        constraints = [models.UniqueConstraint(fields=["dataset", "instance_id"], name="task_unique_per_dataset")]

    def __str__(self) -> str:
        return self.instance_id

    @property
    def log_parser(self) -> str:
        """How the test log is read (envs/test_results.py); a task-format field kept in ``extra``, so tasks
        stored before it existed keep their digest."""
        return self.extra.get("log_parser") or "auto"


class Run(models.Model):
    """A batch of episodes: every chosen task, ``samples_per_task`` times, under one agent/model/env config."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

    name = models.CharField(max_length=200, blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.PROTECT, related_name="runs")
    tasks = models.ManyToManyField(Task, related_name="runs")
    samples_per_task = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(1024)]
    )
    agent_name = models.CharField(max_length=100, default="bash")
    agent_config = models.JSONField(default=dict, blank=True, help_text="Agent parameters, e.g. prompt templates.")
    model_name = models.CharField(max_length=200)
    env_pool = models.CharField(max_length=100, default="default")
    max_concurrent_episodes = models.PositiveIntegerField(default=64, validators=[MinValueValidator(1)])
    max_steps = models.PositiveIntegerField(default=30, validators=[MinValueValidator(1)])
    episode_time_limit_s = models.PositiveIntegerField(default=1800, validators=[MinValueValidator(1)])
    max_attempts = models.PositiveSmallIntegerField(default=3, validators=[MinValueValidator(1)])
    max_episode_tokens = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Prompt + completion tokens an episode may use; blank for no limit."
    )
    model_version = models.CharField(
        max_length=200, blank=True, default="", db_default="",
        help_text="The model version this run needs: its episodes start once it serves.",
    )  # fmt: skip
    max_staleness = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="How many model versions newer than the one an episode's first turn ran on (or than model_version, "
        "at admission) may serve while it continues; blank for no bound. AReaL's max_head_offpolicyness.",
    )  # fmt: skip
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    idempotency_key = models.CharField(
        max_length=200, blank=True, help_text="The API's Idempotency-Key: a retried create returns this run."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(samples_per_task__gte=1), name="run_samples_positive"),
            models.CheckConstraint(condition=Q(max_concurrent_episodes__gte=1), name="run_concurrency_positive"),
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"], condition=~Q(idempotency_key=""), name="run_idempotency_key"
            ),
        ]

    def __str__(self) -> str:
        return self.name or f"run {self.pk}"


class Episode(models.Model):
    """One sample of one task within a run: an agent driving one sandbox until it submits or runs out.

    ``succeeded`` means the episode ran to the end and was evaluated: its ``reward`` says how well the agent
    did (a wrong answer is a result, 0.0). ``failed`` and ``timed_out`` mean no reward could be produced;
    ``failure_reason`` says why.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        STARTING = "starting"
        RUNNING = "running"
        EVALUATING = "evaluating"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        TIMED_OUT = "timed_out"
        CANCELLED = "cancelled"

    TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED})

    # No index of its own: episode_run_status_id and episode_unique_sample both lead with the run (one index fewer to
    # write on every insert and every non-HOT update).
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="episodes", db_index=False)
    task = models.ForeignKey(Task, on_delete=models.PROTECT, related_name="episodes")
    sample_index = models.PositiveIntegerField()
    attempt = models.PositiveSmallIntegerField(default=1)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    reward = models.FloatField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    step_count = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True, help_text="Celery node that last moved the episode.")
    holder = models.CharField(
        max_length=240,
        blank=True,
        help_text="Worker process incarnation (node#id) that made the episode's last transition or runs its hop.",
    )
    container_id = models.CharField(max_length=80, blank=True)
    session_key = models.CharField(
        max_length=64,
        blank=True,
        help_text="SHA-256 of the secret that binds a framework agent's model calls to this attempt (blank: none).",
    )
    env_host = models.CharField(
        max_length=100, blank=True, help_text="Env host (Docker daemon) chosen for, then holding, its sandbox."
    )
    pulling_image = models.CharField(
        max_length=300, blank=True, help_text="The image its start waits on while the env host pulls it; else blank."
    )
    # Cost, over every attempt (a retried attempt's cost was paid too); orchestrator/costs.py adds to it.
    sandbox_s = models.FloatField(default=0.0, help_text="Seconds its sandboxes were held.")
    env_worker_s = models.FloatField(default=0.0, help_text="Seconds env workers spent on its hops.")
    model_s = models.FloatField(default=0.0, help_text="Seconds of generation (GPU time on a GPU backend).")
    cost_prompt_tokens = models.PositiveBigIntegerField(default=0, help_text="Prompt tokens, every attempt.")
    cost_completion_tokens = models.PositiveBigIntegerField(default=0, help_text="Completion tokens, every attempt.")
    image_pulls = models.PositiveIntegerField(default=0, help_text="Image pulls its starts made.")
    image_pull_bytes = models.PositiveBigIntegerField(default=0, help_text="Bytes those pulls downloaded.")
    image_pull_s = models.FloatField(default=0.0, help_text="Seconds its starts waited for images.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "task", "sample_index"]
        constraints = [
            models.UniqueConstraint(fields=["run", "task", "sample_index"], name="episode_unique_sample"),
        ]
        indexes = [
            # A run's episodes by status, and in id order within one: admission reads the oldest queued a page at a
            # time (orchestrator/runs._ready).
            models.Index(fields=["run", "status", "id"], name="episode_run_status_id"),
            # Fleet-wide by status: admission and the autoscaler count live episodes, metrics count every status,
            # and the watchdog looks for live ones not updated since a cutoff (filtering updated_at on the rows).
            # Not updated_at in the index: every hop moves it, and an update that changes an indexed column cannot
            # be a heap-only (HOT) update, so each hop wrote an entry into every index of the table and left the
            # old ones to walk past (migration 0012; agents/README.md, "Where a step's time goes").
            models.Index(fields=["status"], name="episode_status"),
            # The reaper asks which live episodes hold the containers it found.
            models.Index(fields=["container_id"], name="episode_container"),
            # The gateway finds an episode-bound session's episode by its key on every call.
            models.Index(fields=["session_key"], name="episode_session_key"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id}#{self.sample_index} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class Step(models.Model):
    """One turn of a trajectory: what the model saw and said, the action run, and what the sandbox answered."""

    # No index of its own: step_unique_index leads with the episode.
    episode = models.ForeignKey(Episode, on_delete=models.CASCADE, related_name="steps", db_index=False)
    index = models.PositiveIntegerField()
    model_input = models.JSONField(
        default=list,
        help_text="The messages this turn added to what the model saw (all of them when the prompt was re-rendered).",
    )
    model_output = models.TextField(blank=True)
    action = models.TextField(blank=True, help_text="The bash command parsed from the reply; blank if malformed.")
    observation = models.TextField(blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    model_latency_s = models.FloatField(null=True, blank=True)
    env_latency_s = models.FloatField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    # The row is written before the action runs and claims the step (the unique index decides between two
    # deliveries of one message); completed_at says the action ran and the observation is in.
    completed_at = models.DateTimeField(null=True, blank=True)
    # Token in, token out (null where the backend gives no ids). The prompt is stored linearly: this turn's
    # prompt is the previous turn's prompt + completion cut to ``prompt_prefix_len``, then ``prompt_ids``.
    prompt_prefix_len = models.PositiveIntegerField(null=True, blank=True)
    # Packed (orchestrator/packed.py): the hot path writes and reads them as bytes; the ORM gives lists.
    prompt_ids = PackedArrayField(
        typecode=INT32, null=True, blank=True, help_text="Ids appended after the shared prefix."
    )
    completion_ids = PackedArrayField(typecode=INT32, null=True, blank=True)
    logprobs = PackedArrayField(
        typecode=FLOAT64, null=True, blank=True, help_text="Sampling logprob of every completion id."
    )
    prefix_consistent = models.BooleanField(
        null=True, blank=True, help_text="The prompt extends the previous turn's prompt + completion exactly."
    )
    # db_default: rows written by code from before these columns still insert.
    finish_reason = models.CharField(max_length=32, blank=True, default="", db_default="")
    sampling = models.JSONField(null=True, blank=True, help_text="The sampling parameters of this turn.")
    model_name = models.CharField(max_length=200, blank=True, default="", db_default="")
    model_version = models.CharField(max_length=200, blank=True, default="", db_default="")
    tool_calls = models.JSONField(
        null=True, blank=True, help_text="The reply's tool calls, in OpenAI's shape (null: the reply called none)."
    )

    class Meta:
        ordering = ["episode", "index"]
        constraints = [models.UniqueConstraint(fields=["episode", "index"], name="step_unique_index")]
        # Metrics and the autoscaler read the steps completed in the last minutes.
        indexes = [models.Index(fields=["completed_at"], name="step_completed_at")]

    def __str__(self) -> str:
        return f"step {self.index} of episode {self.episode_id}"


class ModelVersion(models.Model):
    """A version of a model's weights, published by a trainer: the model workers load it between batches, and
    every turn records the version it ran on."""

    class Status(models.TextChoices):
        LOADING = "loading"
        SERVING = "serving"
        REFUSED = "refused"

    model_name = models.CharField(max_length=200)
    version = models.CharField(max_length=200)
    checkpoint_path = models.CharField(max_length=1000)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.LOADING)
    error = models.TextField(blank=True, help_text="Why the workers refused it.")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_versions"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    serving_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["model_name", "created_at"]
        constraints = [models.UniqueConstraint(fields=["model_name", "version"], name="model_version_unique")]

    def __str__(self) -> str:
        return f"{self.model_name}@{self.version}"
