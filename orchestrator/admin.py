"""Django admin for datasets, tasks, runs and episodes; trajectories are shown read-only, and so is a run once
it has started (its tasks and configuration are what its episodes ran). List pages cost a fixed number of
queries, whatever the number of rows."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Avg, Count, Q
from django.http import HttpResponseNotAllowed, HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.urls import path, reverse

from orchestrator import costs, run_charts, runs, trajectories
from orchestrator.models import Dataset, Episode, Run, Step, Task


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "task_count", "owner", "created_at"]
    list_select_related = ["owner"]
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
    list_select_related = ["dataset"]
    search_fields = ["instance_id", "problem_statement"]
    readonly_fields = ["spec_sha256", "repo_archive_sha256", "created_at"]


RUN_FIELDS = [
    "name",
    "dataset",
    "tasks",
    "samples_per_task",
    "agent_name",
    "agent_config",
    "model_name",
    "env_pool",
    "max_concurrent_episodes",
    "max_steps",
    "episode_time_limit_s",
    "max_attempts",
    "max_episode_tokens",
]


class RunAddForm(forms.ModelForm):
    """A new run, checked as the API and the CLI check one (``runs.run_errors``), and started like theirs."""

    class Meta:
        model = Run
        fields = RUN_FIELDS

    def clean(self):
        cleaned = super().clean()
        dataset, tasks = cleaned.get("dataset"), cleaned.get("tasks")
        self.run_fields = {
            field: value for field, value in cleaned.items()
            if field not in ("dataset", "tasks") and value not in (None, "")
        }  # fmt: skip
        self.run_fields["dataset"] = dataset.name if dataset else None
        if tasks:
            self.run_fields["instance_ids"] = [task.instance_id for task in tasks]
        for field, reasons in runs.run_errors(self.run_fields).items():
            field = "tasks" if field == "instance_ids" else field
            self.add_error(field if field in self.fields else None, reasons)
        return cleaned


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

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = RunAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        run = runs.create_run(form.run_fields, owner=request.user)  # starts once the request's transaction commits
        obj.pk = run.pk
        obj.refresh_from_db()

    def save_related(self, request, form, formsets, change):
        if change:  # a new run's tasks were chosen by create_run
            super().save_related(request, form, formsets, change)

    def has_change_permission(self, request, obj=None):
        # A started run is what its episodes ran: its page is a view, with the run's actions beside it.
        if obj is not None and (obj.status != Run.Status.QUEUED or obj.started_at is not None):
            return False
        return super().has_change_permission(request, obj)

    def get_urls(self):
        own = [
            path("<int:run_id>/cancel/", self.admin_site.admin_view(self.cancel_view), name="orchestrator_run_cancel"),
            path("<int:run_id>/retry-failed/", self.admin_site.admin_view(self.retry_view),
                 name="orchestrator_run_retry_failed"),
            path("<int:run_id>/export/", self.admin_site.admin_view(self.export_view), name="orchestrator_run_export"),
        ]  # fmt: skip
        return own + super().get_urls()

    def _one(self, request, run_id: int):
        return get_object_or_404(self.get_queryset(request), pk=run_id)

    def _back(self, run_id: int) -> HttpResponseRedirect:
        return HttpResponseRedirect(reverse("admin:orchestrator_run_change", args=[run_id]))

    @staticmethod
    def _may_act(request) -> bool:
        return request.user.has_perm("orchestrator.change_run")

    def cancel_view(self, request, run_id: int):
        return self._on_one_run(request, run_id, self.cancel_runs)

    def retry_view(self, request, run_id: int):
        return self._on_one_run(request, run_id, self.retry_failed_episodes)

    def export_view(self, request, run_id: int):
        return self.export_trajectories(request, self.get_queryset(request).filter(pk=self._one(request, run_id).pk))

    def _on_one_run(self, request, run_id: int, action):
        """The list's ``action`` on one run, from the buttons on its page."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        run = self._one(request, run_id)
        if not self._may_act(request):
            raise PermissionDenied
        action(request, self.get_queryset(request).filter(pk=run.pk))
        return self._back(run_id)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["run_actions"] = {
                "cancel": reverse("admin:orchestrator_run_cancel", args=[obj.pk]) if obj.status not in Run.TERMINAL
                else None,
                "retry": reverse("admin:orchestrator_run_retry_failed", args=[obj.pk])
                if obj.status != Run.Status.CANCELLED else None,
                "export": reverse("admin:orchestrator_run_export", args=[obj.pk]),
                "may_act": self._may_act(request),
            }  # fmt: skip
        return super().render_change_form(request, context, add, change, form_url, obj)

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

    @admin.action(description="Export the rollouts of the selected runs (JSONL)")
    def export_trajectories(self, request, queryset):
        chosen = list(queryset.order_by("pk"))
        lines = (line for run in chosen for line in trajectories.export_run(run))
        response = StreamingHttpResponse(lines, content_type="application/x-ndjson")
        names = "-".join(str(run.pk) for run in chosen[:10])
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
