"""``make bench-images``: image-locality placement against image-blind placement, side by side in one run.

Two env hosts, each an env worker on a dockerd of its own (as the chaos harness starts one) with an image cache
that holds 4 task images; a dataset of 12 task images that exist only in a local registry (the base image plus
``--payload-mb`` of random bytes each); ``--samples`` episodes per image in one shuffled order, the same for both
policies. Each policy starts from cold caches and runs the same episodes (the replay policy on swe_mini's
textkit-1: one real command and a real pytest evaluation per episode, in real containers). Reported per policy:
pulls per episode, cache hit rate (episodes whose start found the image on its host), bytes pulled, makespan;
then the ratios. Writes ``bench-images-results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from tests.chaos.harness import Broker, DockerDaemon
from tests.support.registry import Registry, push_tiny_images

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("h1", "h2")
DATABASE_URL = "postgres://postgres@127.0.0.1:5432/megaflow_bench_images"


def environment(args, data_dir: Path) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "megaflow_site.settings",
        "DATABASE_URL": os.environ.get("MEGAFLOW_BENCH_DATABASE_URL", DATABASE_URL),
        "MEGAFLOW_REDIS_URL": f"redis://127.0.0.1:{args.redis_port}/0",
        "MEGAFLOW_DATA_DIR": str(data_dir),
        "MEGAFLOW_MODELS": "replay",
        "MEGAFLOW_ENV_POOLS": "default",
        "MEGAFLOW_ENV_HOSTS": ",".join(HOSTS),
        # What 4 images add to a host, and a little: the 5th evicts the least recently used.
        "MEGAFLOW_IMAGE_CACHE_GB": str(args.payload_mb * 4.5 / 1000),
        "MEGAFLOW_MAX_LIVE_EPISODES": str(args.slots * len(HOSTS)),
        "MEGAFLOW_LOG_LEVEL": "WARNING",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--samples", type=int, default=4, help="episodes per image")
    parser.add_argument("--slots", type=int, default=2, help="sandboxes per env host at once")
    parser.add_argument("--payload-mb", type=float, default=48.0, help="what each task image adds to the base")
    parser.add_argument("--redis-port", type=int, default=6393)
    parser.add_argument("--registry-port", type=int, default=5093)
    parser.add_argument("--policies", default="blind,locality")
    parser.add_argument("--output", default="bench-images-results.json")
    args = parser.parse_args()

    data_dir = REPO / "var" / "bench-images"
    os.environ.update(environment(args, data_dir))
    shutil.rmtree(data_dir / "redis", ignore_errors=True)
    shutil.rmtree(data_dir / "registry" / "data", ignore_errors=True)  # last run's images: new ones are pushed
    broker = Broker(args.redis_port, data_dir / "redis")
    broker.start()
    registry = Registry(args.registry_port, data_dir / "registry").start()
    daemons = {host: DockerDaemon(data_dir / f"docker-{host}", namespace=f"megaflow-bench-{host}") for host in HOSTS}
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from megaflow_site.topology import Service, WorkerSpec
    from tests.support.databases import ensure_database
    from tests.support.worker_processes import CeleryWorkers

    ensure_database(os.environ["DATABASE_URL"])
    call_command("migrate", verbosity=0)
    names = [f"bench-{index:02d}" for index in range(args.images)]
    print(f"registry {registry.address}: pushing {len(names)} images of +{args.payload_mb:g} MB", flush=True)
    images = push_tiny_images(registry.address, names, settings.MEGAFLOW_BASE_IMAGE, int(args.payload_mb * 1e6))
    log_dir = data_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = CeleryWorkers({**os.environ}, log_dir, name="bench-images")
    rows = []
    try:
        for host, daemon in daemons.items():
            daemon.start()
            daemon.ensure_image(settings.MEGAFLOW_BASE_IMAGE)
            workers.queue_env[f"env.default.{host}"] = {"DOCKER_HOST": daemon.host}
        specs = [WorkerSpec(Service.AGENT), WorkerSpec(Service.MODEL, "replay")]
        specs += [WorkerSpec(Service.ENV, "default", concurrency=args.slots, host=host) for host in HOSTS]
        for policy in args.policies.split(","):
            workers.queue_env["agent"] = {"MEGAFLOW_PLACEMENT": policy}
            cold_caches(daemons, images)
            workers.wait_ready([workers.start(spec) for spec in specs])
            rows.append(run_policy(policy, images, args))
            print(format_row(rows[-1]), flush=True)
            workers.stop_all()
            workers.by_queue.clear()
    finally:
        workers.stop_all()
        for daemon in daemons.values():
            daemon.stop()
        registry.stop()
        broker.stop()
    report(rows, args)


def cold_caches(daemons, images: list[str]) -> None:
    """Both hosts without any task image, and the fleet's cache bookkeeping empty: each policy starts cold."""
    from orchestrator.hot_state import redis_client

    for daemon in daemons.values():
        for container in daemon.docker("ps", "-aq", "--filter", "label=megaflow.managed=1", text=True).stdout.split():
            daemon.docker("rm", "-f", container)
        daemon.docker("rmi", "-f", *images)
    redis = redis_client()
    for key in redis.scan_iter("megaflow:images:*"):
        redis.delete(key)


def run_policy(policy: str, images: list[str], args) -> dict:
    from celery import current_app

    from orchestrator.models import Dataset, Episode, Run, Task
    from orchestrator.task_format import load_dataset

    suite = REPO / "envs" / "suites" / "swe_mini" / "dataset" / "tasks.jsonl"
    swe_mini = Dataset.objects.filter(name="swe_mini").first() or load_dataset(suite, "swe_mini")
    template = swe_mini.tasks.get(instance_id="textkit-1")
    dataset, _ = Dataset.objects.get_or_create(name="bench-images")
    tasks = []
    for index, image in enumerate(images):
        fields = {f.name: getattr(template, f.name) for f in Task._meta.concrete_fields}
        del fields["id"], fields["dataset"], fields["instance_id"]
        fields.update(image=image)
        task, _ = Task.objects.update_or_create(dataset=dataset, instance_id=f"image-{index:02d}", defaults=fields)
        tasks.append(task)
    run = Run.objects.create(name=f"bench-images {policy}", dataset=dataset, model_name="replay",
                             env_pool="default", samples_per_task=args.samples,
                             max_concurrent_episodes=args.slots * len(HOSTS))  # fmt: skip
    run.tasks.set(tasks)
    # The same shuffled order for both policies: an image's episodes are spread over the run, as a trainer's
    # sampling spreads them, so what a host holds matters all along.
    order = [(task, sample) for task in tasks for sample in range(args.samples)]
    random.Random(7).shuffle(order)
    Episode.objects.bulk_create([Episode(run=run, task=task, sample_index=sample) for task, sample in order])
    current_app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.status in Run.TERMINAL:
            break
        time.sleep(0.5)
    episodes = list(run.episodes.all())
    succeeded = sum(e.status == Episode.Status.SUCCEEDED for e in episodes)
    pulls = sum(e.image_pulls for e in episodes)
    hits = sum(e.image_pull_s == 0 for e in episodes)
    makespan = (run.finished_at - run.started_at).total_seconds() if run.finished_at and run.started_at else None
    return {
        "policy": policy,
        "episodes": len(episodes),
        "succeeded": succeeded,
        "pulls": pulls,
        "pulls_per_episode": pulls / len(episodes),
        "cache_hit_rate": hits / len(episodes),
        "pulled_mb": sum(e.image_pull_bytes for e in episodes) / 1e6,
        "pull_wait_s": sum(e.image_pull_s for e in episodes),
        "makespan_s": makespan,
        "by_host": {host: sum(e.env_host == host for e in episodes) for host in HOSTS},
        "run_status": run.status,
    }


HEADER = (f"{'policy':<9} {'episodes':>8} {'ok':>4} {'pulls':>5} {'pulls/ep':>8} {'hit rate':>8} {'pulled MB':>9} "
          f"{'pull wait s':>11} {'makespan s':>10}  per host")  # fmt: skip


def format_row(row: dict) -> str:
    makespan = "-" if row["makespan_s"] is None else f"{row['makespan_s']:.1f}"
    return (f"{row['policy']:<9} {row['episodes']:>8} {row['succeeded']:>4} {row['pulls']:>5} "
            f"{row['pulls_per_episode']:>8.3f} {row['cache_hit_rate']:>8.1%} {row['pulled_mb']:>9.1f} "
            f"{row['pull_wait_s']:>11.1f} {makespan:>10}  {row['by_host']}")  # fmt: skip


def report(rows: list[dict], args) -> None:
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    by_policy = {row["policy"]: row for row in rows}
    if {"blind", "locality"} <= set(by_policy):
        blind, local = by_policy["blind"], by_policy["locality"]
        pulls = blind["pulls"] / max(1, local["pulls"])
        makespan = (blind["makespan_s"] or 0) / (local["makespan_s"] or 1)
        print(f"locality vs blind: {pulls:.2f}x fewer pulls, hit rate {local['cache_hit_rate']:.1%} vs "
              f"{blind['cache_hit_rate']:.1%}, makespan {makespan:.2f}x shorter")  # fmt: skip
    print(f"wrote {args.output}")
    if any(row["succeeded"] != row["episodes"] for row in rows):
        print("bench-images: some episodes did not succeed")
        sys.exit(1)


if __name__ == "__main__":
    main()
