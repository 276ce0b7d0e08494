"""Django admin for datasets, tasks, runs and episodes; trajectories are shown read-only."""

from django.contrib import admin
from django.db.models import Avg, Count, Q

from orchestrator.models import Dataset, Episode, Run, Step, Task


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "task_count", "owner", "created_at"]
    search_fields = ["name", "description"]
    readonly_fields = ["created_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_task_count=Count("tasks"))

    @admin.display(description="tasks", ordering="_task_count")
    def task_count(self, dataset):
        return dataset._task_count


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["instance_id", "dataset", "image", "timeout_s", "created_at"]
    list_filter = ["dataset"]
    search_fields = ["instance_id", "problem_statement"]
    readonly_fields = ["spec_sha256", "repo_archive_sha256", "created_at"]


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = ["__str__", "status", "owner", "model_name", "env_pool", "progress", "mean_reward", "created_at"]
    list_filter = ["status", "model_name", "env_pool", "created_at"]
    search_fields = ["name"]
    date_hierarchy = "created_at"
    readonly_fields = ["created_at", "updated_at", "started_at", "finished_at"]
    filter_horizontal = ["tasks"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                _episodes=Count("episodes"),
                _done=Count("episodes", filter=Q(episodes__status__in=Episode.TERMINAL)),
                _mean_reward=Avg("episodes__reward"),
            )
        )

    @admin.display(description="progress")
    def progress(self, run):
        return f"{run._done}/{run._episodes}"

    @admin.display(description="mean reward", ordering="_mean_reward")
    def mean_reward(self, run):
        return "-" if run._mean_reward is None else f"{run._mean_reward:.3f}"


class StepInline(admin.TabularInline):
    model = Step
    fields = ["index", "action", "observation", "exit_code", "model_latency_s", "env_latency_s"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Episode)
class EpisodeAdmin(admin.ModelAdmin):
    list_display = ["id", "run", "task", "sample_index", "attempt", "status", "reward", "step_count", "updated_at"]
    list_filter = ["status", "run"]
    search_fields = ["task__instance_id", "failure_reason", "worker", "container_id"]
    list_select_related = ["run", "task"]
    readonly_fields = ["created_at", "updated_at", "started_at", "finished_at"]
    inlines = [StepInline]
