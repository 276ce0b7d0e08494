"""``python manage.py megaflow <subcommand>``: the operator's command line.

preflight      check the database, Redis and the Docker daemon; one line per problem
probe          relay messages through the service queues and show which worker ran each hop
load-dataset   validate a task-format JSONL file and store it as a dataset
build-suite    rebuild a bundled suite's dataset (envs/suites/<name>/dataset/) from its sources
validate       gold-check a dataset's tasks in real sandboxes, in parallel
import-swebench  convert SWE-bench JSONL into the task format (and optionally load it)
reap           remove orphaned sandbox containers now
demo           what ``make demo`` runs after ``make up``
"""

import statistics
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from envs import gold_check, reaper, swebench_import
from envs.backend import get_backend
from envs.suite_builder import SUITES_DIR, SuiteError, build_suite
from megaflow_site import preflight
from megaflow_site.topology import AGENT_QUEUE, Service, UnknownQueue, default_key, queue_name
from orchestrator import demo, probe
from orchestrator.models import Dataset, Episode
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

        reap = sub.add_parser("reap", help="remove orphaned sandbox containers now")
        reap.add_argument("--grace", type=float, default=None, help="seconds a new container is left alone")

        sub.add_parser("demo", help="the embedded demo (make demo)")

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
        for result in failed:
            self.stdout.write(f"FAIL {result.instance_id}: " + "; ".join(result.problems))
        self.stdout.write(f"validate {dataset}: {len(results) - len(failed)} of {len(results)} tasks valid")
        if failed:
            raise CommandError(f"{len(failed)} task(s) failed gold validation")

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

    def handle_reap(self, grace=None, **_):
        reaped = reaper.reap_orphans(
            get_backend("docker"), settings.MEGAFLOW_REAPER_GRACE_S if grace is None else grace
        )
        for container_id, reason in reaped.items():
            self.stdout.write(f"reaped {container_id[:12]}: {reason}")
        self.stdout.write(f"{len(reaped)} orphaned container(s) removed")

    def handle_demo(self, **_):
        preflight.run_all()
        route = full_route()
        self.stdout.write(f"1. Relaying 20 messages through {' -> '.join(route)} on the running workers:")
        self.print_probe_table(route, self.run_probes(route, 20, 15.0))

        dataset = self.dataset_named("swe_mini")
        pool = default_key(Service.ENV)
        samples = 2
        total = dataset.tasks.count() * samples
        self.stdout.write(
            f"\n2. Replaying the reference patch of each of the {dataset.tasks.count()} swe_mini tasks, "
            f"{samples} samples "
            f"each, through the Environment Service (queue env.{pool}): real containers, real evaluation."
        )
        with tqdm(total=total, desc="episodes", unit="episode") as bar:
            run = demo.replay_through_env(dataset, samples, pool, on_done=bar.update)
        rows = demo.summarize(run)
        self.stdout.write(f"\n{'task':<14} {'sample':>6} {'reward':>7} {'steps':>5} {'seconds':>8}  status")
        for row in rows:
            reward = "-" if row.reward is None else f"{row.reward:.1f}"
            note = f"  {row.reason}" if row.reason else ""
            self.stdout.write(
                f"{row.instance_id:<14} {row.sample:>6} {reward:>7} {1:>5} {row.seconds:>8.1f}  {row.status}{note}"
            )

        web, flower = settings.MEGAFLOW_WEB_PORT, settings.MEGAFLOW_FLOWER_PORT
        self.stdout.write(
            "\nWhat ran: the Environment Service and the queue topology. The agent and model services are not in\n"
            "the loop yet (the episode loop is still to come), so each episode applied its task's reference patch in\n"
            "one step instead of an agent finding it.\n"
            f"Look around: admin http://127.0.0.1:{web}/admin/ (python manage.py createsuperuser; run {run.pk}), "
            f"Flower http://127.0.0.1:{flower}/"
        )
        succeeded = sum(row.status == Episode.Status.SUCCEEDED for row in rows)
        failed = sum(row.status in (Episode.Status.FAILED, Episode.Status.TIMED_OUT) for row in rows)
        rewards = [row.reward for row in rows if row.reward is not None]
        mean = f"{statistics.fmean(rewards):.3f}" if rewards else "n/a"
        self.stdout.write(f"demo: {len(rows)} episodes, {succeeded} succeeded, {failed} failed, mean reward {mean}")
