"""``make bench-env``: the Environment Service against the raw docker SDK doing the same work, in one run.

- start throughput: containers started per second by N threads, ours (``DockerBackend.create``: start gate,
  labels, limits) against ``client.containers.run`` with the very same container options;
- warm-pool acquire latency: ``WarmPool.acquire`` from a pre-started pool, p50/p99;
- exec overhead: ``DockerBackend.exec(sandbox, "true")`` against ``container.exec_run("true")``, alternated so
  both see the same machine noise; and an agent's no-op command through the sandbox's long-lived shell
  (``run_agent_command``; issue #17's target: p50 ≤ 10 ms).

Writes ``bench-env-results.json`` and prints a table. Targets (issue #3): start ≥ 0.9× raw, acquire p50 ≤ 50 ms,
exec ≤ 1.2× raw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_start(backend, client, spec, count: int, threads: int) -> dict:
    from envs.docker_backend import container_options

    def ours(_):
        return backend.create(spec)

    def raw(_):
        options = container_options(spec)
        return client.containers.run(spec.image, **options).id

    results = {}
    for name, start in (("raw", raw), ("ours", ours), ("raw_again", raw), ("ours_again", ours)):
        began = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            ids = list(pool.map(start, range(count)))
        results[name] = count / (time.perf_counter() - began)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(backend.destroy, ids))
    raw_rate = statistics.mean([results["raw"], results["raw_again"]])
    ours_rate = statistics.mean([results["ours"], results["ours_again"]])
    return {"containers": count, "threads": threads, "raw_per_s": raw_rate, "ours_per_s": ours_rate,
            "ratio": ours_rate / raw_rate}  # fmt: skip


def bench_acquire(backend, spec, size: int, rounds: int) -> dict:
    from django.conf import settings

    from envs.warm_pool import WarmPool

    settings.MEGAFLOW_WARM_POOL_SIZES = {**settings.MEGAFLOW_WARM_POOL_SIZES, "bench": size}
    pool = WarmPool(backend, "bench")
    samples, lent = [], []
    try:
        pool.maintain()
        for _ in range(rounds):
            for _ in range(size):
                began = time.perf_counter()
                container_id, warm = pool.acquire(spec)
                samples.append(time.perf_counter() - began)
                assert warm, "the pool was sized to serve every acquire warm"
                lent.append(container_id)
            for container_id in lent:
                pool.release(container_id)
            lent.clear()
    finally:
        for container_id in lent + pool.idle_ids():
            pool.discard(container_id)
    return {
        "acquires": len(samples),
        "p50_ms": 1000 * percentile(samples, 0.5),
        "p99_ms": 1000 * percentile(samples, 0.99),
    }


def bench_exec(backend, client, spec, count: int) -> dict:
    """A no-op command three ways, alternated so all see the same noise: raw ``exec_run``, our ``exec`` (an exec
    per command: setup, grading), and an agent's command through the sandbox's long-lived shell."""
    sandbox_id = backend.create(spec)
    container = client.containers.get(sandbox_id)
    ours, raw, agent = [], [], []
    try:
        backend.run_agent_command(sandbox_id, "true", 30)  # the shell starts once per sandbox
        for _ in range(count):
            for samples, run in (
                (raw, lambda: container.exec_run(["/bin/sh", "-c", "true"])),
                (ours, lambda: backend.exec(sandbox_id, "true", 30)),
                (agent, lambda: backend.run_agent_command(sandbox_id, "true", 30)),
            ):
                began = time.perf_counter()
                run()
                samples.append(time.perf_counter() - began)
    finally:
        backend.destroy(sandbox_id)
    raw_p50 = statistics.median(raw)
    ours_p50, agent_p50 = statistics.median(ours), statistics.median(agent)
    return {"execs": count, "raw_p50_ms": 1000 * raw_p50, "ours_p50_ms": 1000 * ours_p50, "ratio": ours_p50 / raw_p50,
            "agent_p50_ms": 1000 * agent_p50, "agent_p99_ms": 1000 * percentile(agent, 0.99),
            "agent_ratio": agent_p50 / raw_p50}  # fmt: skip


def main() -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "megaflow_site.settings")
    django.setup()
    import docker
    from django.conf import settings

    from envs.backend import SandboxSpec, get_backend

    parser = argparse.ArgumentParser(description="Environment Service benchmark against the raw docker SDK")
    parser.add_argument("--containers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--execs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench-env-results.json"))
    args = parser.parse_args()

    backend, client = get_backend("docker"), docker.from_env()
    spec = SandboxSpec(image=settings.MEGAFLOW_BASE_IMAGE)
    results = {
        "machine": {"cpus": os.cpu_count(), "docker": client.version()["Version"]},
        "start": bench_start(backend, client, spec, args.containers, args.threads),
        "warm_acquire": bench_acquire(backend, spec, args.pool_size, args.rounds),
        "exec": bench_exec(backend, client, spec, args.execs),
    }
    results["targets"] = {
        "start_ratio_min": 0.9, "start_ok": results["start"]["ratio"] >= 0.9,
        "acquire_p50_ms_max": 50, "acquire_ok": results["warm_acquire"]["p50_ms"] <= 50,
        "exec_ratio_max": 1.2, "exec_ok": results["exec"]["ratio"] <= 1.2,
        "agent_command_p50_ms_max": 10, "agent_command_ok": results["exec"]["agent_p50_ms"] <= 10,
    }  # fmt: skip
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    start, acquire, execs = results["start"], results["warm_acquire"], results["exec"]
    rows = [
        (
            "container start",
            f"{start['raw_per_s']:.2f}/s",
            f"{start['ours_per_s']:.2f}/s",
            f"{start['ratio']:.2f}x",
            ">= 0.9x",
        ),
        ("warm acquire p50", "-", f"{acquire['p50_ms']:.1f} ms", "-", "<= 50 ms"),
        ("warm acquire p99", "-", f"{acquire['p99_ms']:.1f} ms", "-", ""),
        (
            "exec `true` p50",
            f"{execs['raw_p50_ms']:.1f} ms",
            f"{execs['ours_p50_ms']:.1f} ms",
            f"{execs['ratio']:.2f}x",
            "<= 1.2x",
        ),
        (
            "agent `true` p50",
            f"{execs['raw_p50_ms']:.1f} ms",
            f"{execs['agent_p50_ms']:.1f} ms",
            f"{execs['agent_ratio']:.2f}x",
            "<= 10 ms",
        ),
        ("agent `true` p99", "-", f"{execs['agent_p99_ms']:.1f} ms", "-", ""),
    ]
    print(f"{'measure':<18} {'raw docker SDK':>15} {'megaflow':>12} {'ratio':>8} {'target':>9}")
    for row in rows:
        print(f"{row[0]:<18} {row[1]:>15} {row[2]:>12} {row[3]:>8} {row[4]:>9}")
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
