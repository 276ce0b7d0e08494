"""``python manage.py megaflow <subcommand>``: the operator's command line.

preflight      check the database, Redis and the Docker daemon; one line per problem
probe          relay messages through the service queues and show which worker ran each hop
load-dataset   validate a task-format JSONL file and store it as a dataset
build-suite    rebuild a bundled suite's dataset (envs/suites/<name>/dataset/) from its sources
validate       gold-check a dataset's tasks in real sandboxes, in parallel
import-swebench  convert SWE-bench JSONL into the task format (and optionally load it)
run            start a run over a dataset and follow it with a progress bar (or --no-wait)
status         runs and their progress, queue depths; or one run in detail
export         a run's trajectories as JSONL (one episode per line); --format rollouts: the token-level lines of
               GET /api/v1/runs/ID/rollouts
reap           remove orphaned sandbox containers now
demo           what ``make demo`` runs after ``make up``
"""

import statistics
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from envs import gold_check, reaper, swebench_import
from envs.backend import get_backend
from envs.suite_builder import SUITES_DIR, SuiteError, build_suite
from megaflow_site import preflight
from megaflow_site.topology import AGENT_QUEUE, Service, UnknownQueue, default_key, queue_name
from orchestrator import costs, probe, rollouts, runs, trajectories
from orchestrator.api.serializers import run_progress
from orchestrator.fleet import queue_depths
from orchestrator.models import Dataset, Episode, Run
from orchestrator.task_format import TaskFormatError, load_dataset


def full_route() -> list[str]:
    """agent → model → env → agent: the path one step of an episode takes."""
    return [AGENT_QUEUE, queue_name(Service.MODEL), queue_name(Service.ENV), AGENT_QUEUE]


class Command(BaseCommand):
    help = "MegaFlow operations: preflight, probe, datasets and suites, validation, reaping, demo."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True)
        check = sub.add_parser("preflight", help="check that the database, Redis and Docker are reachable")
        check.add_argument("--only", choices=sorted(preflight.CHECKS), action="append", help="run only this check")

        relay = sub.add_parser("probe", help="relay messages through the service queues")
        relay.add_argument("--route", help="comma-separated queues (default: agent, model, env, agent)")
        relay.add_argument("--count", type=int, default=10, help="probes to send (default 10)")
        relay.add_argument("--timeout", type=float, default=15.0, help="seconds to wait per probe")

        load = sub.add_parser("load-dataset", help="store a task-format JSONL file as a dataset")
        load.add_argument("path", type=Path)
        load.add_argument("--name", required=True, help="dataset name (a slug)")
        load.add_argument("--description", default="")

        build = sub.add_parser("build-suite", help="rebuild a bundled suite's dataset from its sources")
        build.add_argument("suite", help="e.g. swe_mini")

        gold = sub.add_parser("validate", help="gold-check every task of a dataset in real sandboxes")
        gold.add_argument("dataset", help="dataset name; a bundled suite (e.g. swe_mini) is loaded if needed")
        gold.add_argument("--parallel", type=int, default=4, help="sandboxes at once (default 4)")
        gold.add_argument("--only", nargs="+", metavar="INSTANCE_ID", help="check only these tasks")

        swe = sub.add_parser("import-swebench", help="convert SWE-bench JSONL into the task format")
        swe.add_argument("source", type=Path, help="SWE-bench instances, one JSON object per line")
        swe.add_argument("--out", type=Path, required=True, help="where to write the task-format JSONL")
        swe.add_argument("--name", help="also load the result as this dataset")
        swe.add_argument("--namespace", default="swebench", help='image namespace ("" for locally built images)')
        swe.add_argument("--arch", default="x86_64")
        swe.add_argument("--skip-image-check", action="store_true", help="do not require the images locally")

        start = sub.add_parser("run", help="start a run over a dataset and follow it to the end")
        start.add_argument("dataset", help="dataset name; a bundled suite (e.g. swe_mini) is loaded if needed")
        start.add_argument("--model", default=None, help="model name (default: the first of MEGAFLOW_MODELS)")
        start.add_argument("--pool", default=None, help="environment pool (default: the first of MEGAFLOW_ENV_POOLS)")
        start.add_argument("--samples", type=int, default=1, help="samples per task (default 1)")
        start.add_argument("--tasks", nargs="+", metavar="INSTANCE_ID", help="only these tasks")
        start.add_argument("--name", default="")
        start.add_argument("--agent", default="bash")
        start.add_argument("--max-steps", type=int, default=30)
        start.add_argument("--concurrency", type=int, default=64, help="live episodes at most (default 64)")
        start.add_argument("--max-attempts", type=int, default=3)
        start.add_argument("--no-wait", action="store_true", help="start the run and return its id")

        state = sub.add_parser("status", help="runs and their progress, and the queues; or one run in detail")
        state.add_argument("run_id", type=int, nargs="?")
        state.add_argument("--limit", type=int, default=20, help="runs to list (default 20)")

        export = sub.add_parser("export", help="a run's trajectories as JSONL, one episode per line")
        export.add_argument("run_id", type=int)
        export.add_argument("--out", type=Path, help="write here instead of standard output")
        export.add_argument(
            "--format", choices=["trajectories", "rollouts"], default="trajectories",
            help="rollouts: token ids, loss masks, logprobs per ended episode (the rollouts API's lines)",
        )  # fmt: skip

        reap = sub.add_parser("reap", help="remove orphaned sandbox containers now")
        reap.add_argument("--grace", type=float, default=None, help="seconds a new container is left alone")

        demo_parser = sub.add_parser("demo", help="the embedded demo (make demo)")
        demo_parser.add_argument("--tasks", type=int, default=None, help="only the first N swe_mini tasks")

    def handle(self, *args, subcommand, **options):
        handler = getattr(self, "handle_" + subcommand.replace("-", "_"))
        return handler(**options)

    def handle_preflight(self, only=None, **_):
        for name in preflight.run_all(only):
            self.stdout.write(f"ok: {name}")

    def run_probes(self, route: list[str], count: int, timeout: float) -> list[list[dict]]:
        traces = []
        for _ in tqdm(range(count), desc="probes", unit="probe", disable=count < 5):
            probe_id = probe.start_probe(route)
            trace = probe.wait_for_probe(probe_id, timeout)
            if trace is None:
                raise CommandError(
                    f"a probe through {' -> '.join(route)} did not come back in {timeout:g} s: is a worker "
                    "consuming every queue on the route? (make up starts them; make status lists them)"
                )
            traces.append(trace)
        return traces

    def print_probe_table(self, route: list[str], traces: list[list[dict]]) -> None:
        self.stdout.write(f"{'hop':<4} {'queue':<20} {'worker':<40} {'queue wait p50':>15}")
        for index, queue in enumerate(route):
            workers = sorted({trace[index]["worker"] for trace in traces})
            wait = statistics.median(trace[index]["queue_wait_ms"] for trace in traces)
            self.stdout.write(f"{index:<4} {queue:<20} {', '.join(workers):<40} {wait:>12.1f} ms")

    def handle_probe(self, route=None, count=10, timeout=15.0, **_):
        queues = route.split(",") if route else full_route()
        try:
            traces = self.run_probes(queues, count, timeout)
        except (UnknownQueue, ValueError) as exc:
            raise CommandError(str(exc)) from None
        self.print_probe_table(queues, traces)

    def handle_load_dataset(self, path, name, description="", **_):
        if not path.is_file():
            raise CommandError(f"no such file: {path}")
        try:
            dataset = load_dataset(path, name, description)
        except TaskFormatError as exc:
            raise CommandError(f"{path}: {exc}") from None
        self.stdout.write(f"dataset {dataset.name}: {dataset.tasks.count()} tasks")

    def handle_build_suite(self, suite, **_):
        try:
            path = build_suite(suite)
        except SuiteError as exc:
            raise CommandError(str(exc)) from None
        count = sum(1 for line in path.read_text().splitlines() if line.strip())
        self.stdout.write(f"suite {suite}: {count} tasks written to {path}")

    def dataset_named(self, name: str) -> Dataset:
        """The stored dataset ``name``; a bundled suite of that name is loaded on first use."""
        if dataset := Dataset.objects.filter(name=name).first():
            return dataset
        bundled = SUITES_DIR / name / "dataset" / "tasks.jsonl"
        if not bundled.is_file():
            raise CommandError(f"no dataset named {name!r} (load one with: megaflow load-dataset FILE --name {name})")
        return load_dataset(bundled, name, f"the bundled {name} suite")

    def handle_validate(self, dataset, parallel=4, only=None, **_):
        preflight.check_docker()
        tasks = self.dataset_named(dataset).tasks.all()
        if only:
            tasks = tasks.filter(instance_id__in=only)
        with tqdm(total=tasks.count(), desc=f"validating {dataset}", unit="task") as bar:
            results = gold_check.check_tasks(get_backend(), list(tasks), parallel, on_done=lambda _: bar.update())
        failed = [result for result in results if not result.ok]
        self.print_validation_table(results)
        self.stdout.write(f"validate {dataset}: {len(results) - len(failed)} of {len(results)} tasks valid")
        if failed:
            raise CommandError(f"{len(failed)} task(s) failed gold validation")

    def print_validation_table(self, results: list[gold_check.GoldResult]) -> None:
        """One row per task: its outcome, the seconds it took, and why it failed (every reason, in full)."""
        width = max([len("task"), *(len(result.instance_id) for result in results)])
        self.stdout.write(f"{'task':<{width}}  {'outcome':<7} {'seconds':>7}  reason")
        for result in results:
            outcome = "valid" if result.ok else "INVALID"
            reason = "; ".join(result.problems) if result.problems else "-"
            self.stdout.write(f"{result.instance_id:<{width}}  {outcome:<7} {result.seconds:>7.1f}  {reason}")

    def handle_import_swebench(self, source, out, name=None, namespace="swebench", arch="x86_64",
                               skip_image_check=False, **_):  # fmt: skip
        if not source.is_file():
            raise CommandError(f"no such file: {source}")
        try:
            tasks = swebench_import.convert_file(source, out, namespace, arch)
        except TaskFormatError as exc:
            raise CommandError(f"{source}: {exc}") from None
        if not skip_image_check:
            missing = swebench_import.missing_images({task["image"] for task in tasks}, preflight.docker_client())
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CommandError(
                    f"image not present locally: {missing[0]}{more} -- build it with the SWE-bench harness or load "
                    "it with docker load; --skip-image-check imports anyway"
                )
        self.stdout.write(f"{len(tasks)} SWE-bench tasks written to {out}")
        if name:
            self.handle_load_dataset(out, name, f"imported from {source}")

    def handle_export(self, run_id, out=None, format="trajectories", **_):
        run = Run.objects.filter(pk=run_id).first()
        if run is None:
            raise CommandError(f"no run {run_id}")
        if format == "rollouts":
            lines = rollouts.stream(run, follow=False, settle_s=0)
        else:
            lines = trajectories.export_run(run)
        if out is None:
            for line in lines:
                self.stdout.write(line, ending="")
            return
        with out.open("w", encoding="utf-8") as handle:
            count = sum(1 for line in lines if handle.write(line))
        self.stderr.write(f"{count} episodes of run {run_id} written to {out}")

    def handle_reap(self, grace=None, **_):
        reaped = reaper.reap_orphans(
            get_backend("docker"), settings.MEGAFLOW_REAPER_GRACE_S if grace is None else grace
        )
        for container_id, reason in reaped.items():
            self.stdout.write(f"reaped {container_id[:12]}: {reason}")
        self.stdout.write(f"{len(reaped)} orphaned container(s) removed")

    def watch_run(self, run: Run, total: int) -> None:
        """A live progress bar until the run ends: episodes finished, and the outcome so far."""
        with tqdm(total=total, desc=f"run {run.pk}", unit="episode") as bar:
            while run.status not in Run.TERMINAL:
                time.sleep(0.5)
                run.refresh_from_db()
                progress = run_progress(run)
                bar.update(progress["done"] - bar.n)
                by_status = progress["by_status"]
                reward = progress["mean_reward"]
                bar.set_postfix(
                    running=by_status["running"] + by_status["starting"] + by_status["evaluating"],
                    ok=by_status["succeeded"],
                    failed=by_status["failed"] + by_status["timed_out"],
                    reward="-" if reward is None else f"{reward:.3f}",
                )

    def handle_run(self, dataset, model=None, pool=None, samples=1, tasks=None, name="", agent="bash",
                   max_steps=30, concurrency=64, max_attempts=3, no_wait=False, **_):  # fmt: skip
        self.dataset_named(dataset)  # loads a bundled suite on first use
        fields = {
            "dataset": dataset, "model_name": model or settings.MEGAFLOW_MODELS[0],
            "env_pool": pool or default_key(Service.ENV), "samples_per_task": samples, "name": name,
            "agent_name": agent, "max_steps": max_steps, "max_concurrent_episodes": concurrency,
            "max_attempts": max_attempts, **({"instance_ids": tasks} if tasks else {}),
        }  # fmt: skip
        try:
            run = runs.create_run(fields)
        except runs.RunRejected as rejected:
            raise CommandError(str(rejected)) from None
        total = run.tasks.count() * run.samples_per_task
        self.stdout.write(
            f"run {run.pk}: {total} episodes ({run.tasks.count()} tasks x {samples}) of {run.agent_name} on "
            f"model.{run.model_name} and env.{run.env_pool}"
        )
        if no_wait:
            return
        self.watch_run(run, total)
        self.print_run(run)

    def print_run(self, run: Run) -> None:
        progress = run_progress(run)
        counts = ", ".join(f"{count} {status}" for status, count in progress["by_status"].items() if count)
        reward = "n/a" if progress["mean_reward"] is None else f"{progress['mean_reward']:.3f}"
        rate = "n/a" if progress["steps_per_s"] is None else f"{progress['steps_per_s']:.2f}"
        success = "n/a" if progress["success_rate"] is None else f"{progress['success_rate']:.3f}"
        tokens = progress["prompt_tokens"] + progress["completion_tokens"]
        self.stdout.write(f"run {run.pk} {run.status}: {counts or 'no episodes'}")
        self.stdout.write(
            f"  mean reward {reward}, success rate {success}, "
            f"{progress['steps']} steps ({rate} steps/s), {tokens} tokens"
        )
        self.stdout.write(f"  cost: {costs.format_cost(costs.run_cost(run.pk))}")
        failures = run.episodes.exclude(failure_reason="").values_list("task__instance_id", "failure_reason")[:5]
        for instance_id, reason in failures:
            self.stdout.write(f"  {instance_id}: {reason[:200]}")

    def handle_status(self, run_id=None, limit=20, **_):
        if run_id is not None:
            run = Run.objects.filter(pk=run_id).first()
            if run is None:
                raise CommandError(f"no run {run_id}")
            self.print_run(run)
            return
        self.stdout.write(f"{'run':>5}  {'status':<10} {'progress':>11} {'reward':>7}  {'model':<12} name")
        for run in Run.objects.order_by("-created_at")[:limit]:
            progress = run_progress(run)
            reward = "-" if progress["mean_reward"] is None else f"{progress['mean_reward']:.3f}"
            done = f"{progress['done']}/{progress['episodes']}"
            self.stdout.write(f"{run.pk:>5}  {run.status:<10} {done:>11} {reward:>7}  {run.model_name:<12} {run.name}")
        depths = ", ".join(f"{queue} {waiting}" for queue, waiting in queue_depths().items())
        self.stdout.write(f"queues: {depths}")

    def handle_demo(self, tasks=None, **_):
        preflight.run_all()
        route = full_route()
        self.stdout.write(f"1. Relaying 20 messages through {' -> '.join(route)} on the running workers:")
        self.print_probe_table(route, self.run_probes(route, 20, 15.0))

        dataset = self.dataset_named("swe_mini")
        chosen = list(dataset.tasks.order_by("instance_id").values_list("instance_id", flat=True))[:tasks]
        model = settings.MEGAFLOW_MODELS[0]
        policy = "replay (the tasks' reference solutions: no model is configured)" if model == "replay" else model
        run = runs.create_run({
            "name": "demo", "dataset": dataset.name, "instance_ids": chosen, "samples_per_task": 2,
            "model_name": model, "env_pool": default_key(Service.ENV), "max_steps": 30, "max_concurrent_episodes": 16,
        })  # fmt: skip
        total = len(chosen) * run.samples_per_task
        self.stdout.write(
            f"\n2. Run {run.pk}: {len(chosen)} swe_mini tasks x {run.samples_per_task} samples through all three "
            f"services (agent -> model.{model} -> env.{run.env_pool}), policy: {policy}"
        )
        self.watch_run(run, total)
        episodes = list(run.episodes.select_related("task").order_by("task__instance_id", "sample_index"))
        self.stdout.write(f"\n{'task':<14} {'sample':>6} {'reward':>7} {'steps':>5} {'seconds':>8}  status")
        for episode in episodes:
            reward = "-" if episode.reward is None else f"{episode.reward:.1f}"
            seconds = (episode.finished_at - episode.started_at).total_seconds() if episode.started_at else 0.0
            note = f"  {episode.failure_reason}" if episode.failure_reason else ""
            self.stdout.write(
                f"{episode.task.instance_id:<14} {episode.sample_index:>6} {reward:>7} {episode.step_count:>5} "
                f"{seconds:>8.1f}  {episode.status}{note}"
            )
        web, flower = settings.MEGAFLOW_WEB_PORT, settings.MEGAFLOW_FLOWER_PORT
        self.stdout.write(
            f"\nLook around: admin http://127.0.0.1:{web}/admin/orchestrator/run/{run.pk}/ "
            "(python manage.py createsuperuser), "
            f"the API http://127.0.0.1:{web}/api/v1/docs/ and the OpenAI gateway http://127.0.0.1:{web}/v1/ "
            "(python manage.py drf_create_token USER), "
            f"Flower http://127.0.0.1:{flower}/ (user:password in var/flower_auth)"
        )
        succeeded = sum(episode.status == Episode.Status.SUCCEEDED for episode in episodes)
        failed = sum(episode.status in (Episode.Status.FAILED, Episode.Status.TIMED_OUT) for episode in episodes)
        rewards = [episode.reward for episode in episodes if episode.reward is not None]
        mean = f"{statistics.fmean(rewards):.3f}" if rewards else "n/a"
        self.stdout.write(f"demo: {len(episodes)} episodes, {succeeded} succeeded, {failed} failed, mean reward {mean}")
