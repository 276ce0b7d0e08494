"""``make bench``: what orchestration costs per step, with the model and the sandbox taken out.

The ``sim`` model answers in a fixed time (``--model-latency``, 1.0 s) and the ``sim`` environment backend runs
every command in a fixed time (``--env-latency``, 0.5 s), so an episode of ``--steps`` (10) steps does a known
amount of waiting and everything else is orchestration. At each concurrency level (``--levels``: 100 and
1000; ``--levels 10000 --timeout 420`` for the big one) one run of that many episodes goes through real workers
of all three services, on Redis and PostgreSQL, all admitted at once. In the same run, two baselines do the
same simulated work:

- *raw*: one asyncio process, a coroutine per episode, no broker, no database: the floor;
- *naive*: one blocking Celery task per episode on a prefork pool with as many processes as MegaFlow runs
  workers (tests/bench/naive_celery.py), measured over a window (``--naive-window``) since it would take hours.

Per-step overhead is a step's wall time minus its model and command time: from the previous step's completion
to this one's, for steps 1..n-1 (step 0 starts inside sandbox preparation, which is not a step). CPU per step
by process kind (workers, PostgreSQL, Redis: tests/bench/procstat.py) is read from /proc over the steady state,
from 10% of the run's steps completed to 90%. Writes ``bench-results.json`` and prints the tables. Targets
(issue #5) at 1,000 concurrent: overhead p50 ≤ 5 ms, p99 ≤ 50 ms, steps/s ≥ 0.5× raw and ≥ 10× naive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench.procstat import CpuProfile, group_status, parent, with_descendants
from tests.bench.reference import round_ms as reference_round_ms
from tests.support.databases import ensure_database

REPO = Path(__file__).resolve().parents[2]
BENCH_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/megaflow_bench"
BENCH_REDIS_URL = "redis://127.0.0.1:6379/12"
NAIVE_REDIS_URL = "redis://127.0.0.1:6379/10"  # the naive baseline's own database: killed mid-run, it leaves litter
MAX_SAMPLES_PER_TASK = 1000
STEADY_FROM, STEADY_TO = 0.1, 0.9  # CPU per step is measured from 10% of a run's steps completed to 90%


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def bench_environment(args, max_level: int) -> dict[str, str]:
    """The settings every process of the bench runs with (settings.py reads them; nothing else does)."""
    return {
        "DJANGO_SETTINGS_MODULE": "megaflow_site.settings",
        "DATABASE_URL": os.environ.get("MEGAFLOW_BENCH_DATABASE_URL", BENCH_DATABASE_URL),
        "MEGAFLOW_REDIS_URL": os.environ.get("MEGAFLOW_BENCH_REDIS_URL", BENCH_REDIS_URL),
        "MEGAFLOW_BENCH_NAIVE_REDIS_URL": os.environ.get("MEGAFLOW_BENCH_NAIVE_REDIS_URL", NAIVE_REDIS_URL),
        "MEGAFLOW_DATA_DIR": str(REPO / "var" / "bench"),
        "MEGAFLOW_MODELS": "sim",
        "MEGAFLOW_ENV_POOLS": "default",
        "MEGAFLOW_ENV_BACKEND": "sim",
        "MEGAFLOW_MODEL_CONFIG": json.dumps(
            {"sim": {"backend": "sim", "latency_s": args.model_latency, "steps": args.steps,
                     "prompt_ids_per_message": args.prompt_ids, "completion_ids": args.completion_ids}}),
        "MEGAFLOW_SIM_EXEC_LATENCY_S": str(args.env_latency),
        # Every episode of the largest level live at once, unless the environment caps it lower (to see whether a
        # fleet held below saturation steps its episodes with less overhead).
        "MEGAFLOW_MAX_LIVE_EPISODES": os.environ.get("MEGAFLOW_MAX_LIVE_EPISODES", str(max_level)),
        "MEGAFLOW_LOG_LEVEL": os.environ.get("MEGAFLOW_BENCH_LOG_LEVEL", "WARNING"),
    }  # fmt: skip


def sandbox_execs() -> tuple[int, int]:
    """How many commands sandbox preparation and evaluation run for the bench's task, so that the baselines
    wait for them too."""
    from envs import task_sandbox
    from envs.sim_backend import SimBackend
    from orchestrator.models import Task

    class Counting(SimBackend):
        calls = 0

        def exec(self, sandbox_id, command, timeout_s, workdir=None, output_limit=None):
            Counting.calls += 1
            return super().exec(sandbox_id, command, 0, workdir, output_limit)

    backend, task = Counting(), bench_task_fields()
    sandbox = backend.create(None)
    task_sandbox.prepare(backend, sandbox, Task(**task))
    prepared = Counting.calls
    task_sandbox.evaluate(backend, sandbox, Task(**task))
    return prepared, Counting.calls - prepared


def bench_task_fields() -> dict:
    return {"problem_statement": "Benchmark episode: the sim model scripts every action.", "workdir": "/testbed",
            "test_command": "true", "fail_to_pass": ["test_sim"], "timeout_s": 600}  # fmt: skip


# --- MegaFlow ------------------------------------------------------------------------------------------------


def run_orchestrated(level: int, args, log_dir: Path) -> dict:
    import redis
    from django.conf import settings
    from django.db import connection
    from django.db.models import Count
    from tqdm import tqdm

    from megaflow_site.celery import app
    from megaflow_site.topology import Service, WorkerSpec
    from orchestrator.models import Dataset, Episode, Run, Step, Task
    from tests.support.worker_processes import CeleryWorkers

    Step.objects.all().delete()  # the bench database holds one level's run at a time
    Episode.objects.all().delete()
    Run.objects.all().delete()
    # So does its Redis: what an interrupted bench left (queued and unacked hops, the admission lock) is not this run's.
    redis.Redis.from_url(os.environ["MEGAFLOW_REDIS_URL"]).flushdb()
    dataset, _ = Dataset.objects.get_or_create(name="bench")
    task_count = math.ceil(level / MAX_SAMPLES_PER_TASK)
    tasks = [
        Task.objects.get_or_create(dataset=dataset, instance_id=f"bench-{index}", defaults=bench_task_fields())[0]
        for index in range(task_count)
    ]
    run = Run.objects.create(
        name=f"bench {level}", dataset=dataset, model_name="sim", env_pool="default",
        samples_per_task=level // task_count, max_concurrent_episodes=level, max_steps=args.steps,
        episode_time_limit_s=3600, max_attempts=1,
    )  # fmt: skip
    run.tasks.set(tasks)
    episodes = (level // task_count) * task_count

    # Every in-flight hop holds a thread while it waits on the model or the sandbox; a pool's threads are spread
    # over --processes worker processes, as a deployment would run them. A hop that came in a batch runs on one of
    # the batch threads (megaflow_site/hop_batches.py), as many.
    threads = math.ceil(episodes / args.processes) + 8
    workers = CeleryWorkers({"MEGAFLOW_HOP_THREADS": str(threads), **os.environ}, log_dir, name="bench")
    specs = [(WorkerSpec(Service.AGENT), 1)]
    for service, key in ((Service.MODEL, "sim"), (Service.ENV, "default")):
        specs += [(WorkerSpec(service, key, concurrency=threads), index) for index in range(1, args.processes + 1)]
    started = [workers.start(spec, index) for spec, index in specs]
    workers.wait_ready(started)
    profile = stack_profile(started)
    peak = PeakMemory(profile.kinds)
    completed_steps = Step.objects.filter(episode__run=run, completed_at__isnull=False)
    window: dict = {}  # the steady state: from 10% of the run's steps completed to 90%
    try:
        began = time.time()
        app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})
        deadline = time.monotonic() + args.timeout
        with tqdm(total=episodes, desc=f"megaflow {level}", unit="ep", leave=False) as bar:
            while time.monotonic() < deadline:
                run.refresh_from_db()
                done = run.episodes.filter(status__in=Episode.TERMINAL).count()
                bar.update(done - bar.n)
                stepped = completed_steps.count()
                if "steps_at_start" not in window and stepped >= STEADY_FROM * episodes * args.steps:
                    profile.begin()
                    window.update(steps_at_start=stepped, began=time.monotonic(), carried_from=carried())
                elif "steps_at_start" in window and (
                    stepped >= STEADY_TO * episodes * args.steps or run.status in Run.TERMINAL
                ):
                    window.update(cpu_s=profile.end(), carried_to=carried(), steps=stepped - window["steps_at_start"],
                                  seconds=time.monotonic() - window["began"])  # fmt: skip
                    # Each worker's hop window and the queue wait it followed (megaflow_site/hop_batches.py).
                    window["hop_windows"] = workers.ask("hop_batching", timeout=2)
                    break
                if run.status in Run.TERMINAL:
                    break
                peak.sample()
                time.sleep(0.5)
            while run.status not in Run.TERMINAL and time.monotonic() < deadline:
                run.refresh_from_db()
                done = run.episodes.filter(status__in=Episode.TERMINAL).count()
                bar.update(done - bar.n)
                peak.sample()
                time.sleep(0.5)
        finished = (run.finished_at.timestamp() if run.finished_at else time.time()) - began
    finally:
        workers.stop_all()

    steps = list(
        Step.objects.filter(episode__run=run, completed_at__isnull=False)
        .order_by("episode_id", "index")
        .values_list("episode_id", "index", "created_at", "completed_at", "model_latency_s", "env_latency_s")
    )
    overheads, to_claim, from_claim, previous = [], [], [], {}
    for episode_id, index, claimed, completed, model_s, env_s in steps:
        if index > 0 and (episode_id, index - 1) in previous:
            before = previous[(episode_id, index - 1)]
            overheads.append((completed - before).total_seconds() - (model_s or 0) - (env_s or 0))
            # Where it went: up to the env worker's claim of the step (the turn's two hops, the model worker's
            # statements), and from the claim to the step's record (the env worker's statements, its pool's waits).
            to_claim.append((claimed - before).total_seconds() - (model_s or 0))
            from_claim.append((completed - claimed).total_seconds() - (env_s or 0))
        previous[(episode_id, index)] = completed
    statuses = dict(run.episodes.values_list("status").annotate(n=Count("pk")))
    with connection.cursor() as cursor:  # the table holds this level's steps only: its size is theirs
        cursor.execute("VACUUM FULL orchestrator_step")
        cursor.execute("SELECT pg_total_relation_size('orchestrator_step')")
        [step_table_bytes] = cursor.fetchone()
    return {
        "episodes": episodes,
        "completed": run.status == Run.Status.COMPLETED,
        "statuses": statuses,
        "steps": len(steps),
        "wall_s": finished,
        "episodes_per_s": statuses.get(Episode.Status.SUCCEEDED, 0) / finished,
        "steps_per_s": len(steps) / finished,
        "overhead_p50_ms": ms(percentile(overheads, 0.5)),
        "overhead_p99_ms": ms(percentile(overheads, 0.99)),
        "overhead_to_claim_ms": {"p50": ms(percentile(to_claim, 0.5)), "p99": ms(percentile(to_claim, 0.99))},
        "overhead_from_claim_ms": {"p50": ms(percentile(from_claim, 0.5)), "p99": ms(percentile(from_claim, 0.99))},
        "worker_processes": len(specs),
        "bytes_per_step": step_table_bytes / max(1, len(steps)),
        "peak_pss_mib": peak.total_mib,
        "peak_pss_mib_by_kind": peak.by_kind,
        "peak_rss_mib": peak.rss_mib,
        "hot_queue_pool": settings.MEGAFLOW_HOT_QUEUE_POOL,
        "worker_pools": {spec.queue: "gevent" if spec.cooperative else "threads" for spec, _ in specs},
        "hop_batch_window_ms": settings.MEGAFLOW_HOP_BATCH_WINDOW_MS,
        "hop_batch_window_max_ms": settings.MEGAFLOW_HOP_BATCH_WINDOW_MAX_MS,
        "hop_windows_ms": window.get("hop_windows", {}),
        **cpu_per_step(window),
    }


def stack_profile(workers) -> CpuProfile:
    """CPU per process kind of the whole stack: each worker kind (with any children), the PostgreSQL backends
    of the bench's database (not this process's own connection), the PostgreSQL server's own processes (the
    postmaster, WAL writer, checkpointer...: shared with any other database of the server), and redis-server
    (the whole server: shared with any other Redis database)."""
    import redis
    from django.conf import settings
    from django.db import connection

    from megaflow_site.topology import Service

    def of(service) -> Callable[[], list[int]]:
        return lambda: [pid for worker in workers if worker.spec.service is service
                        for pid in with_descendants(worker.process.pid)]  # fmt: skip

    def postgres(bench_database: bool) -> Callable[[], list[int]]:
        def pids() -> list[int]:
            with connection.cursor() as cursor:
                if bench_database:
                    cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                   [settings.DATABASES["default"]["NAME"]])  # fmt: skip
                    return [pid for (pid,) in cursor.fetchall()]
                cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname IS NULL")
                server = [pid for (pid,) in cursor.fetchall()]
            postmaster = {parent(pid) for pid in server} - {None}
            return server + sorted(postmaster)

        return pids

    redis_pid = redis.Redis.from_url(settings.REDIS_URL).info("server")["process_id"]
    return CpuProfile({
        "agent workers": of(Service.AGENT),
        "model workers": of(Service.MODEL),
        "env workers": of(Service.ENV),
        "postgres backends": postgres(bench_database=True),
        "postgres server": postgres(bench_database=False),
        "redis-server": lambda: [redis_pid],
    })  # fmt: skip


class PeakMemory:
    """The most memory the whole stack held (sampled every few seconds), and each kind's share at that moment: by
    PSS, which counts a shared page once (PostgreSQL's shared buffers, mapped by every backend, made the sum of RSS
    several GiB too high at 10,000), and by RSS, as measured before."""

    def __init__(self, kinds: dict, every_s: float = 2.0):
        self.kinds, self.every_s, self.last = kinds, every_s, 0.0
        self.total_mib, self.by_kind, self.rss_mib = 0.0, {}, 0.0

    def sample(self) -> None:
        if time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        now = {kind: group_status(pids(), pss=True) for kind, pids in self.kinds.items()}
        self.rss_mib = max(self.rss_mib, sum(status["rss_mib"] for status in now.values()))
        if (total := sum(status["pss_mib"] for status in now.values())) > self.total_mib:
            self.total_mib, self.by_kind = total, {kind: status["pss_mib"] for kind, status in now.items()}


def carried() -> dict[str, float]:
    """Counters of what the broker and the database carried until now: Redis commands and bytes in and out (the
    whole server), and the bench database's transactions (a statement each, in autocommit), rows written and
    read, and WAL bytes (the whole server)."""
    import redis
    from django.conf import settings
    from django.db import connection

    stats = redis.Redis.from_url(settings.REDIS_URL).info("stats")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT xact_commit + xact_rollback, tup_inserted, tup_updated, tup_fetched,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') FROM pg_stat_database WHERE datname = current_database()"
        )
        transactions, inserted, updated, fetched, wal = cursor.fetchone()
    return {
        "redis_commands": stats["total_commands_processed"],
        "redis_bytes_in": stats["total_net_input_bytes"],
        "redis_bytes_out": stats["total_net_output_bytes"],
        "pg_transactions": transactions,
        "pg_rows_written": inserted + updated,
        "pg_rows_read": fetched,
        "pg_wal_bytes": float(wal),
    }


def cpu_per_step(window: dict) -> dict:
    """The steady state's CPU per step by process kind (ms), what Redis and PostgreSQL carried per step, and the
    window it was measured over."""
    if not window.get("steps"):
        return {"cpu_per_step_ms": None, "carried_per_step": None, "cpu_window": None}
    per_step = {kind: seconds * 1000 / window["steps"] for kind, seconds in window["cpu_s"].items()}
    per_step["total"] = sum(per_step.values())
    start, end = window["carried_from"], window["carried_to"]
    return {
        "cpu_per_step_ms": per_step,
        "carried_per_step": {key: (end[key] - start[key]) / window["steps"] for key in start},
        "cpu_window": {"steps": window["steps"], "seconds": window["seconds"], "cpu_s": window["cpu_s"],
                       "from": STEADY_FROM, "to": STEADY_TO},
    }  # fmt: skip


# --- raw: asyncio, no broker, no database ---------------------------------------------------------------------


async def run_raw(level: int, args, prepare_execs: int, evaluate_execs: int) -> dict:
    overheads: list[float] = []

    async def episode() -> None:
        await asyncio.sleep(args.env_latency * prepare_execs)
        previous = None
        for _ in range(args.steps):
            began = time.monotonic()
            await asyncio.sleep(args.model_latency)
            model_s = time.monotonic() - began
            began_env = time.monotonic()
            await asyncio.sleep(args.env_latency)
            done = time.monotonic()
            if previous is not None:
                overheads.append(done - previous - model_s - (done - began_env))
            previous = done
        await asyncio.sleep(args.env_latency * evaluate_execs)

    began = time.monotonic()
    await asyncio.gather(*(episode() for _ in range(level)))
    wall = time.monotonic() - began
    return {
        "wall_s": wall,
        "steps_per_s": level * args.steps / wall,
        "episodes_per_s": level / wall,
        "overhead_p50_ms": ms(percentile(overheads, 0.5)),
        "overhead_p99_ms": ms(percentile(overheads, 0.99)),
    }


# --- naive: one blocking Celery task per episode ---------------------------------------------------------------


def run_naive(level: int, processes: int, args, prepare_execs: int, evaluate_execs: int, log_dir: Path) -> dict:
    import redis

    from tests.bench.naive_celery import QUEUE, STEPS_KEY, app

    client = redis.Redis.from_url(os.environ["MEGAFLOW_BENCH_NAIVE_REDIS_URL"])
    client.flushdb()
    log = (log_dir / "naive.log").open("wb")
    argv = [str(Path(sys.executable).with_name("celery")), "-A", "tests.bench.naive_celery", "worker", "-Q", QUEUE,
            "--pool", "prefork", "--concurrency", str(processes), "-n", f"naive-{os.getpid()}@%h",
            "--loglevel", "WARNING", "--without-mingle", "--without-gossip"]  # fmt: skip
    worker = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not app.control.ping(timeout=0.5):
            if worker.poll() is not None:
                raise RuntimeError(f"the naive worker exited at start; see {log.name}")
        for _ in range(level):
            app.send_task(
                "bench.naive_episode",
                kwargs={"steps": args.steps, "model_latency_s": args.model_latency, "env_latency_s": args.env_latency,
                        "prepare_execs": prepare_execs, "evaluate_execs": evaluate_execs},
            )  # fmt: skip
        began = time.time()
        time.sleep(args.naive_window)
        window_end = time.time()
    finally:
        worker.kill()  # its unfinished episodes are not wanted
        worker.wait()
    records = [json.loads(record) for record in client.lrange(STEPS_KEY, 0, -1)]
    client.flushdb()
    in_window = [wall for finished, wall in records if began <= finished <= window_end]
    step_work = args.model_latency + args.env_latency
    overheads = [wall - step_work for wall in in_window]
    return {
        "window_s": args.naive_window,
        "processes": processes,
        "steps_per_s": len(in_window) / args.naive_window,
        "overhead_p50_ms": ms(percentile(overheads, 0.5)),
        "overhead_p99_ms": ms(percentile(overheads, 0.99)),
    }


# --- report ---------------------------------------------------------------------------------------------------


def shown(milliseconds: float | None) -> str:
    return f"{'-':>8}" if milliseconds is None else f"{milliseconds:>6.1f}ms"


def print_table(rows: list[dict]) -> None:
    header = (f"{'concurrency':>11}  {'episodes/s':>10}  {'steps/s':>8}  {'raw':>8}  {'naive':>7}  "
              f"{'vs raw':>6}  {'vs naive':>8}  {'ovh p50':>8}  {'ovh p99':>8}  {'raw p99':>8}  {'peak PSS':>8}  "
              "status")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        vs_naive = "-" if row["ratio_vs_naive"] is None else f"{row['ratio_vs_naive']:.1f}"
        print(
            f"{row['concurrency']:>11}  {row['episodes_per_s']:>10.1f}  {row['steps_per_s']:>8.1f}  "
            f"{row['raw']['steps_per_s']:>8.1f}  {row['naive']['steps_per_s']:>7.2f}  {row['ratio_vs_raw']:>6.2f}  "
            f"{vs_naive:>8}  {shown(row['overhead_p50_ms'])}  {shown(row['overhead_p99_ms'])}  "
            f"{shown(row['raw']['overhead_p99_ms'])}  {row['peak_pss_mib']:>8.0f}  "
            f"{'completed' if row['completed'] else 'NOT COMPLETED'}"
        )
    for row in rows:
        if row.get("overhead_to_claim_ms"):
            parts = [f"{name} p50 {shown(row[key]['p50']).strip()}, p99 {shown(row[key]['p99']).strip()}"
                     for name, key in (("to the claim", "overhead_to_claim_ms"),
                                       ("from the claim", "overhead_from_claim_ms"))]  # fmt: skip
            print(f"{row['concurrency']:>11}  overhead {'; '.join(parts)}")


def print_cpu(rows: list[dict]) -> None:
    rows = [row for row in rows if row.get("cpu_per_step_ms")]
    if not rows:
        return
    kinds = list(rows[0]["cpu_per_step_ms"])
    print()
    print("CPU per step (ms), steady state (10%..90% of the run's steps), by process kind")
    print(f"{'kind':>18}  " + "  ".join(f"{row['concurrency']:>10}" for row in rows))
    for kind in kinds:
        print(f"{kind:>18}  " + "  ".join(f"{row['cpu_per_step_ms'][kind]:>10.2f}" for row in rows))
    window = [f"{row['cpu_window']['steps']:>5} {row['cpu_window']['seconds']:>3.0f}s" for row in rows]
    print(f"{'(window steps, s)':>18}  " + "  ".join(window))
    print()
    print("Carried per step, steady state (Redis and WAL: the whole server; PostgreSQL counters: the bench database)")
    for key in rows[0]["carried_per_step"]:
        print(f"{key:>18}  " + "  ".join(f"{row['carried_per_step'][key]:>10.1f}" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="100,1000", help="concurrent episodes per run, comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model-latency", type=float, default=1.0)
    parser.add_argument("--env-latency", type=float, default=0.5)
    parser.add_argument("--processes", type=int, default=2, help="worker processes per model and env pool")
    parser.add_argument("--naive-window", type=float, default=20.0, help="seconds the naive baseline is measured")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one level may take")
    parser.add_argument(
        "--prompt-ids",
        type=int,
        default=1000,
        help="token ids per system/user message from the sim model (each turn grows the prompt by "
        "about this much; 0: no ids, text only)",
    )
    parser.add_argument("--completion-ids", type=int, default=200, help="token ids per sim completion")
    parser.add_argument("--output", default="bench-results.json")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]

    os.environ.update(bench_environment(args, max(levels)))
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    ensure_database(os.environ["DATABASE_URL"])
    call_command("migrate", verbosity=0)
    log_dir = settings.DATA_DIR / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    prepare_execs, evaluate_execs = sandbox_execs()
    reference = [reference_round_ms()]  # this machine's speed today, before and after (tests/bench/reference.py)
    print(f"reference loop: {reference[0]:.3f} ms a round")

    rows = []
    for level in levels:
        ours = run_orchestrated(level, args, log_dir)
        raw = asyncio.run(run_raw(level, args, prepare_execs, evaluate_execs))
        naive = run_naive(level, ours["worker_processes"], args, prepare_execs, evaluate_execs, log_dir)
        rows.append(
            {
                "concurrency": level,
                **ours,
                "ratio_vs_raw": ours["steps_per_s"] / raw["steps_per_s"],
                # None: naive Celery finished no step in its window (2 processes, 25 s steps at 10,000)
                "ratio_vs_naive": ours["steps_per_s"] / naive["steps_per_s"] if naive["steps_per_s"] else None,
                "raw": raw,
                "naive": naive,
            }
        )
        print_table(rows[-1:])
        print_cpu(rows[-1:])
    reference.append(reference_round_ms())
    for row in rows:  # comparable between runs, where milliseconds are not: see tests/bench/reference.py
        cpu = row["cpu_per_step_ms"]
        row["cpu_per_step_reference_rounds"] = cpu["total"] / (sum(reference) / len(reference)) if cpu else None
    setup = {
        "model_latency_s": args.model_latency,
        "env_latency_s": args.env_latency,
        "steps_per_episode": args.steps,
        "sandbox_execs": {"prepare": prepare_execs, "evaluate": evaluate_execs},
        "cpus": os.cpu_count(),
        "reference_round_ms": {"before": reference[0], "after": reference[1]},
    }
    # Each level's figures under its own key ("1000", "10000"), so make bench and make bench-10k share the file; the
    # last run's levels and setup stay at the top.
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}
    results.update({**setup, "levels": rows}, **{str(row["concurrency"]): {**setup, **row} for row in rows})
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print_table(rows)
    print_cpu(rows)
    print(
        f"reference loop: {reference[0]:.3f} ms a round before, {reference[1]:.3f} after; CPU a step in rounds: "
        + ", ".join(
            f"{row['cpu_per_step_reference_rounds']:.2f} at {row['concurrency']}"
            for row in rows
            if row["cpu_per_step_ms"]
        )
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
