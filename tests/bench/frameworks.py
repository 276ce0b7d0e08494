"""``make bench-frameworks``: how many framework episodes (mini-swe-agent's own blocking loop) run at once.

A framework episode is one long task on the ``agent.framework`` queue (orchestrator/framework_loop.py): a thread
of the framework worker for the whole episode, an HTTP call to the gateway (a gunicorn thread, waiting on the
model worker) per turn, and a Redis reply inbox (BLPOP) per command. This bench measures what that costs beside
the built-in ``bash`` agent's event-driven episodes, with the model and the sandbox taken out: the ``sim`` model
answers in ``--model-latency`` seconds and scripts ``--steps`` steps, the ``sim`` environment runs every command
in ``--env-latency`` seconds.

At each level of ``--levels`` (episodes admitted at once: ``max_concurrent_episodes`` = level), real processes
run one run of mini-swe-agent in text mode, then one run of the bash agent: celery workers for ``agent``,
``agent.framework``, ``model.sim`` and ``env.default``, and the web as gunicorn with threads (as ``make up`` runs
it) at ``MEGAFLOW_GATEWAY_URL``. The framework worker's threads and gunicorn's follow the level unless
``--framework-threads`` / ``--web-threads`` fix them (to show what happens when they do not).

Per run: the peak number of episodes inside the framework's loop (the framework worker's active tasks, sampled),
episodes/min, turn overhead p50/p99 (a turn's wall time from the previous turn's completion, minus its model and
command time), the first turn's overhead (from sandbox preparation's start: its commands, the dispatch to the
framework, its set-up), the tail (last turn to the episode's end: leaving the loop, grading), CPU seconds of every
process per turn, the framework worker's RSS and threads, gunicorn's, Redis ``connected_clients`` and PostgreSQL
connections (peaks). Each level first runs two episodes of each agent unmeasured: a worker imports an agent's code
(LiteLLM: seconds of CPU) on its first episode. Prints a table and writes ``bench-frameworks-results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.bench.procstat import children, group_status, proc_status

REPO = Path(__file__).resolve().parents[2]
BENCH_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/megaflow_bench_frameworks"
# Redis databases 9, 11, 13 and 15 are the test sessions' slots (tests/session_env.py), 12 and 10 make bench's,
# 8 make bench-model's.
BENCH_REDIS_URL = "redis://127.0.0.1:6379/14"
GATEWAY_PORT = 8791
FRAMEWORK_AGENT = ("mini-swe-agent", {"mode": "text"})
BASELINE_AGENT = ("bash", {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="16,64", help="framework episodes admitted at once, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="turns per episode (the sim model's script)")
    parser.add_argument("--model-latency", type=float, default=1.0, help="seconds per sim model call")
    parser.add_argument("--env-latency", type=float, default=0.5, help="seconds per sim command")
    parser.add_argument("--framework-threads", type=int, default=0,
                        help="the framework worker's concurrency (0: the level)")  # fmt: skip
    parser.add_argument("--web-threads", type=int, default=0,
                        help="gunicorn threads per worker process, of 2 (0: half the level, + 4)")  # fmt: skip
    parser.add_argument("--no-baseline", action="store_true", help="skip the bash agent's run at each level")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--output", default="bench-frameworks-results.json")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in str(args.levels).split(",")]
    if args.steps < 2 or min(args.levels) < 1:
        parser.error("--steps must be at least 2 and every level at least 1")
    return args


def bench_environment(args: argparse.Namespace) -> dict[str, str]:
    """The settings every process of the bench runs with (settings.py reads them; nothing else does)."""
    gateway = f"http://127.0.0.1:{GATEWAY_PORT}"
    return {
        "DJANGO_SETTINGS_MODULE": "megaflow_site.settings",
        "DATABASE_URL": os.environ.get("MEGAFLOW_BENCH_DATABASE_URL", BENCH_DATABASE_URL),
        "MEGAFLOW_REDIS_URL": os.environ.get("MEGAFLOW_BENCH_REDIS_URL", BENCH_REDIS_URL),
        "MEGAFLOW_DATA_DIR": str(REPO / "var" / "bench-frameworks"),
        "MEGAFLOW_MODELS": "sim",
        "MEGAFLOW_ENV_POOLS": "default",
        "MEGAFLOW_ENV_BACKEND": "sim",
        "MEGAFLOW_MODEL_CONFIG": json.dumps(
            {"sim": {"backend": "sim", "latency_s": args.model_latency, "steps": args.steps}}),
        "MEGAFLOW_SIM_EXEC_LATENCY_S": str(args.env_latency),
        "MEGAFLOW_MAX_LIVE_EPISODES": str(max(args.levels)),
        "MEGAFLOW_WEB_PORT": str(GATEWAY_PORT),
        "MEGAFLOW_GATEWAY_URL": gateway,
        "MEGAFLOW_LOG_LEVEL": os.environ.get("MEGAFLOW_BENCH_LOG_LEVEL", "WARNING"),
    }  # fmt: skip


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# --- the web: gunicorn with threads, as deploy/local_stack.py runs it --------------------------------------------


class Gunicorn:
    def __init__(self, env: dict[str, str], threads: int, log_dir: Path):
        self.threads = threads
        argv = [str(Path(sys.executable).with_name("gunicorn")), "megaflow_site.wsgi",
                "--bind", f"127.0.0.1:{GATEWAY_PORT}", "--workers", "2", "--threads", str(threads),
                "--access-logfile", "-"]  # fmt: skip
        self.log = log_dir / "gunicorn.log"
        self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn did not start; see {self.log}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{GATEWAY_PORT}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def worker_pids(self) -> list[int]:
        return children(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- one run ---------------------------------------------------------------------------------------------------


def bench_task_fields() -> dict:
    return {"problem_statement": "Benchmark episode: the sim model scripts every action.", "workdir": "/testbed",
            "test_command": "true", "fail_to_pass": ["test_sim"], "timeout_s": 600}  # fmt: skip


class Sampler:
    """Peaks of what a run holds, sampled every ``interval`` seconds while it runs."""

    def __init__(self, processes: dict[str, object], framework_node: str):
        import redis
        from django.conf import settings

        self.processes = processes  # name → a pid or a callable giving pids
        self.framework_node = framework_node
        self.redis = redis.Redis.from_url(settings.REDIS_URL)
        self.database = settings.DATABASES["default"]["NAME"]
        self.samples: list[dict] = []

    def pids(self, name: str) -> list[int]:
        value = self.processes[name]
        return value() if callable(value) else [value]

    def cpu(self) -> dict[str, float]:
        return {name: group_status(self.pids(name))["cpu_s"] for name in self.processes}

    def sample(self, run) -> dict:
        from django.db import connection

        from megaflow_site.celery import app
        from orchestrator.models import Episode

        active = app.control.inspect(destination=[self.framework_node], timeout=1.0, limit=1).active() or {}
        in_framework = sum(
            1 for task in active.get(self.framework_node, []) if task.get("name") == "agents.framework_episode"
        )
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [self.database])
            [pg_connections] = cursor.fetchone()
        framework = proc_status(self.pids("framework")[0])
        web = group_status(self.pids("web"))
        sample = {
            "t": time.time(),
            "in_framework": in_framework,
            "running": run.episodes.filter(status=Episode.Status.RUNNING).count(),
            "done": run.episodes.filter(status__in=Episode.TERMINAL).count(),
            "framework_rss_mib": framework["rss_mib"],
            "framework_threads": framework["threads"],
            "web_rss_mib": web["rss_mib"],
            "web_threads": web["threads"],
            "redis_clients": self.redis.info("clients")["connected_clients"],
            "pg_connections": pg_connections,
        }
        self.samples.append(sample)
        return sample

    def peak(self, key: str):
        return max((sample[key] for sample in self.samples), default=None)


def run_agent(level: int, agent: tuple[str, dict], args, sampler: Sampler) -> dict:
    from django.db.models import Count
    from tqdm import tqdm

    from megaflow_site.celery import app
    from orchestrator.models import Dataset, Episode, Run, Step, Task

    Step.objects.all().delete()  # the bench database holds one run at a time
    Episode.objects.all().delete()
    Run.objects.all().delete()
    agent_name, agent_config = agent
    dataset, _ = Dataset.objects.get_or_create(name="bench-frameworks")
    task, _ = Task.objects.get_or_create(dataset=dataset, instance_id="bench-0", defaults=bench_task_fields())
    run = Run.objects.create(
        name=f"bench-frameworks {agent_name} {level}", dataset=dataset, model_name="sim", env_pool="default",
        agent_name=agent_name, agent_config=agent_config, samples_per_task=level, max_concurrent_episodes=level,
        max_steps=args.steps, episode_time_limit_s=3600, max_attempts=1,
    )  # fmt: skip
    run.tasks.set([task])

    sampler.samples = []
    cpu_before = sampler.cpu()
    began = time.time()
    app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})
    deadline = time.monotonic() + args.timeout
    with tqdm(total=level, desc=f"{agent_name} {level}", unit="ep", leave=False, disable=None) as bar:
        while time.monotonic() < deadline:
            tick = time.monotonic()
            run.refresh_from_db()
            bar.update(sampler.sample(run)["done"] - bar.n)
            if run.status in Run.TERMINAL:
                break
            time.sleep(max(0.0, args.sample_interval - (time.monotonic() - tick)))
    run.refresh_from_db()
    wall = (run.finished_at.timestamp() if run.finished_at else time.time()) - began
    cpu_after = sampler.cpu()

    steps = list(
        Step.objects.filter(episode__run=run, completed_at__isnull=False)
        .order_by("episode_id", "index")
        .values_list("episode_id", "index", "completed_at", "model_latency_s", "env_latency_s")
    )
    overheads, previous = [], {}
    bounds = {
        pk: (began_at, ended_at)
        for pk, began_at, ended_at in run.episodes.values_list("pk", "started_at", "finished_at")
    }
    firsts, tails, last = [], [], {}
    for episode_id, index, completed, model_s, env_s in steps:
        if index > 0 and (episode_id, index - 1) in previous:
            turn = (completed - previous[(episode_id, index - 1)]).total_seconds()
            overheads.append(turn - (model_s or 0) - (env_s or 0))
        elif index == 0 and bounds[episode_id][0]:  # from sandbox preparation's start: its commands, the dispatch
            firsts.append((completed - bounds[episode_id][0]).total_seconds() - (model_s or 0) - (env_s or 0))
        previous[(episode_id, index)] = last[episode_id] = completed
    for episode_id, completed in last.items():  # grading, releasing the sandbox, and (framework) leaving its loop
        if bounds[episode_id][1]:
            tails.append((bounds[episode_id][1] - completed).total_seconds())
    statuses = dict(run.episodes.values_list("status").annotate(n=Count("pk")))
    failures = list(run.episodes.exclude(failure_reason="").values_list("failure_reason", flat=True)[:3])
    done = sum(count for status, count in statuses.items() if status in Episode.TERMINAL)
    cpu = {name: round(cpu_after[name] - cpu_before[name], 2) for name in cpu_before}
    return {
        "agent": agent_name,
        "episodes": level,
        "completed": run.status == Run.Status.COMPLETED,
        "statuses": statuses,
        "failures": failures,
        "steps": len(steps),
        "wall_s": round(wall, 2),
        "episodes_per_min": round(done / wall * 60, 1),
        "turn_overhead_p50_ms": ms(percentile(overheads, 0.5)),
        "turn_overhead_p99_ms": ms(percentile(overheads, 0.99)),
        "first_turn_overhead_p50_ms": ms(percentile(firsts, 0.5)),
        "tail_p50_ms": ms(percentile(tails, 0.5)),
        "peak_in_framework": sampler.peak("in_framework"),
        "peak_running": sampler.peak("running"),
        "peak_framework_rss_mib": sampler.peak("framework_rss_mib"),
        "peak_framework_threads": sampler.peak("framework_threads"),
        "peak_web_rss_mib": sampler.peak("web_rss_mib"),
        "peak_web_threads": sampler.peak("web_threads"),
        "peak_redis_clients": sampler.peak("redis_clients"),
        "peak_pg_connections": sampler.peak("pg_connections"),
        "cpu_s": cpu,
        "cpu_ms_per_turn": {name: round(seconds * 1000 / max(1, len(steps)), 1) for name, seconds in cpu.items()},
        "box_cpu_busy": round(sum(cpu.values()) / wall / (os.cpu_count() or 1), 2),
    }


def run_level(level: int, args, env: dict[str, str], log_dir: Path) -> dict:
    from megaflow_site.topology import Service, WorkerSpec
    from tests.support.worker_processes import CeleryWorkers

    framework_threads = args.framework_threads or level
    web_threads = args.web_threads or math.ceil(level / 2) + 4
    hop_threads = level + 8  # every in-flight model call and command holds a thread of its worker
    workers = CeleryWorkers(env, log_dir, name="bench-fw")
    specs = {
        "agent": WorkerSpec(Service.AGENT),
        "framework": WorkerSpec(Service.AGENT, "framework", concurrency=framework_threads),
        "model": WorkerSpec(Service.MODEL, "sim", concurrency=hop_threads),
        "env": WorkerSpec(Service.ENV, "default", concurrency=hop_threads),
    }
    started = {name: workers.start(spec) for name, spec in specs.items()}
    web = None
    try:
        workers.wait_ready(list(started.values()))
        web = Gunicorn(env, web_threads, log_dir)
        processes = {name: worker.process.pid for name, worker in started.items()}
        sampler = Sampler({**processes, "web": lambda: web.worker_pids}, started["framework"].node)
        agents = [FRAMEWORK_AGENT] + ([] if args.no_baseline else [BASELINE_AGENT])
        for agent in agents:  # each worker imports an agent's code on its first episode (LiteLLM: seconds of CPU)
            run_agent(2, agent, args, sampler)
        runs = {agent[0]: run_agent(level, agent, args, sampler) for agent in agents}
    finally:
        if web is not None:
            web.stop()
        workers.stop_all()
    framework, baseline = runs[FRAMEWORK_AGENT[0]], runs.get(BASELINE_AGENT[0])
    return {
        "level": level,
        "framework_threads": framework_threads,
        "web_threads": f"2x{web_threads}",
        "hop_threads": hop_threads,
        "framework": framework,
        "baseline": baseline,
        "ratio_vs_bash": round(framework["episodes_per_min"] / baseline["episodes_per_min"], 2) if baseline else None,
    }


# --- report ----------------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    header = (f"{'level':>5} {'agent':>14} {'fw thr':>6} {'web thr':>7} {'peak in':>7} {'ep/min':>7} {'vs bash':>7} "
              f"{'ovh p50':>8} {'ovh p99':>8} {'1st ovh':>8} {'tail':>7} {'fw RSS':>7} {'fw thr':>6} "
              f"{'redis':>5} {'pg':>4} "
              f"{'cpu ms/turn (fw+web / agent, model, env)':>41}  status")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        for result in filter(None, [row["framework"], row["baseline"]]):
            framework = result is row["framework"]
            cpu = result["cpu_ms_per_turn"]
            own = f"{cpu['framework'] + cpu['web']:.1f}" if framework else f"{cpu['agent']:.1f}"
            ratio = f"{row['ratio_vs_bash']:.2f}" if framework and row["ratio_vs_bash"] else "-"
            peak = result["peak_in_framework"] if framework else result["peak_running"]

            def shown(value, unit="", digits=0):
                return "-" if value is None else f"{value:.{digits}f}{unit}"

            print(
                f"{row['level']:>5} {result['agent']:>14} {row['framework_threads']:>6} {row['web_threads']:>7} "
                f"{peak:>7} {result['episodes_per_min']:>7.1f} {ratio:>7} "
                f"{shown(result['turn_overhead_p50_ms'], 'ms'):>8} {shown(result['turn_overhead_p99_ms'], 'ms'):>8} "
                f"{shown(result['first_turn_overhead_p50_ms'], 'ms'):>8} {shown(result['tail_p50_ms'], 'ms'):>7} "
                f"{shown(result['peak_framework_rss_mib'], 'M'):>7} {result['peak_framework_threads']:>6} "
                f"{result['peak_redis_clients']:>5} {result['peak_pg_connections']:>4} "
                f"{own + ' / ' + str(cpu['agent']) + ', ' + str(cpu['model']) + ', ' + str(cpu['env']):>41}  "
                f"{'completed' if result['completed'] else 'NOT COMPLETED'} {result['statuses']}"
            )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = {**os.environ, **bench_environment(args)}
    os.environ.update(env)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from tests.support.databases import ensure_database

    ensure_database(os.environ["DATABASE_URL"])
    call_command("migrate", verbosity=0)
    log_dir = settings.DATA_DIR / "log"
    log_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for level in args.levels:
        rows.append(run_level(level, args, env, log_dir))
        print_table(rows[-1:])
    results = {
        "model_latency_s": args.model_latency,
        "env_latency_s": args.env_latency,
        "steps_per_episode": args.steps,
        "db_pool_per_process": settings.DATABASES["default"].get("OPTIONS", {}).get("pool"),
        "cpus": os.cpu_count(),
        "levels": rows,
    }
    Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print_table(rows)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
