"""Django admin for datasets, tasks, runs and episodes; trajectories are shown read-only."""

from django.contrib import admin, messages
from django.db.models import Avg, Count, Q
from django.http import StreamingHttpResponse

from orchestrator import costs, run_charts, runs, trajectories
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
    list_display = ["__str__", "status", "owner", "model_name", "env_pool", "progress", "success_rate", "mean_reward",
                    "created_at"]  # fmt: skip
    list_filter = ["status", "model_name", "env_pool", "agent_name", "owner", "created_at"]
    search_fields = ["name", "dataset__name"]
    date_hierarchy = "created_at"
    readonly_fields = ["status", "created_at", "updated_at", "started_at", "finished_at", "cost", "charts"]
    filter_horizontal = ["tasks"]
    actions = ["cancel_runs", "retry_failed_episodes", "export_trajectories"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("owner")
            .annotate(
                _episodes=Count("episodes"),
                _done=Count("episodes", filter=Q(episodes__status__in=Episode.TERMINAL)),
                _solved=Count("episodes", filter=Q(episodes__reward__gte=1.0)),
                _mean_reward=Avg("episodes__reward"),
            )
        )

    @admin.display(description="progress")
    def progress(self, run):
        return f"{run._done}/{run._episodes}"

    @admin.display(description="success rate")
    def success_rate(self, run):
        return "-" if not run._done else f"{run._solved / run._done:.0%}"

    @admin.display(description="mean reward", ordering="_mean_reward")
    def mean_reward(self, run):
        return "-" if run._mean_reward is None else f"{run._mean_reward:.3f}"

    @admin.display(description="cost")
    def cost(self, run):
        return costs.format_cost(costs.run_cost(run.pk)) if run.pk else "-"

    @admin.display(description="charts")
    def charts(self, run):
        return run_charts.render(run_charts.run_charts(run)) if run.pk else "-"

    @admin.action(description="Cancel the selected runs")
    def cancel_runs(self, request, queryset):
        cancelled = sum(
            runs.cancel_run(run.pk, f"cancelled by {request.user.get_username()} (admin)")
            for run in queryset.exclude(status__in=Run.TERMINAL)
        )
        self.message_user(request, f"{cancelled} episodes cancelled", messages.SUCCESS)

    @admin.action(description="Retry the failed episodes of the selected runs")
    def retry_failed_episodes(self, request, queryset):
        retried = sum(runs.retry_failed(run.pk) for run in queryset.exclude(status=Run.Status.CANCELLED))
        self.message_user(request, f"{retried} episodes queued for another attempt", messages.SUCCESS)

    @admin.action(description="Export the trajectories of the selected runs (JSONL)")
    def export_trajectories(self, request, queryset):
        runs = list(queryset.order_by("pk"))
        lines = (line for run in runs for line in trajectories.export_run(run))
        response = StreamingHttpResponse(lines, content_type="application/x-ndjson")
        names = "-".join(str(run.pk) for run in runs[:10])
        response["Content-Disposition"] = f'attachment; filename="runs-{names}.jsonl"'
        return response


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
    list_display = ["id", "run", "task", "sample_index", "attempt", "status", "reward", "step_count", "env_host",
                    "sandbox_s", "image_pulls", "updated_at"]  # fmt: skip
    list_filter = ["status", "run__model_name", "attempt", ("reward", admin.EmptyFieldListFilter), "env_host", "run"]
    search_fields = ["task__instance_id", "failure_reason", "worker", "container_id", "pulling_image"]
    list_select_related = ["run", "task"]
    readonly_fields = ["created_at", "updated_at", "started_at", "finished_at", "cost", *costs.FIELDS.values()]

    @admin.display(description="cost")
    def cost(self, episode):
        return costs.format_cost(costs.episode_cost(episode))

    inlines = [StepInline]
