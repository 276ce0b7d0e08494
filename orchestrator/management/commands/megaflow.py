"""``python manage.py megaflow <subcommand>``: the operator's command line.

    preflight      check the database, Redis and the Docker daemon; one line per problem
    probe          relay messages through the service queues and show which worker ran each hop
    load-dataset   validate a task-format JSONL file and store it as a dataset
    demo           what ``make demo`` runs after ``make up``
"""

import statistics
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from megaflow_site import preflight
from megaflow_site.topology import AGENT_QUEUE, Service, UnknownQueue, queue_name
from orchestrator import probe
from orchestrator.task_format import TaskFormatError, load_dataset


def full_route() -> list[str]:
    """agent → model → env → agent: the path one step of an episode takes."""
    return [AGENT_QUEUE, queue_name(Service.MODEL), queue_name(Service.ENV), AGENT_QUEUE]


class Command(BaseCommand):
    help = "MegaFlow operations: preflight, probe, load-dataset, demo."

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

    def handle_demo(self, **_):
        preflight.run_all()
        route = full_route()
        self.stdout.write(f"Relaying 20 messages through {' -> '.join(route)} on the running workers:")
        self.print_probe_table(route, self.run_probes(route, 20, 15.0))
        web, flower = settings.MEGAFLOW_WEB_PORT, settings.MEGAFLOW_FLOWER_PORT
        self.stdout.write(
            "\nThe three services are up and routed. The episode loop (agent -> model -> environment) is not\n"
            "built yet, so this demo runs no episodes; it grows into the full demo as the services land.\n"
            f"Look around: admin http://127.0.0.1:{web}/admin/ (python manage.py createsuperuser), "
            f"Flower http://127.0.0.1:{flower}/"
        )
        self.stdout.write("demo: 0 episodes, 0 succeeded, 0 failed, mean reward n/a")
