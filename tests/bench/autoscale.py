"""``make bench-autoscale``: the cost of one coordinated autoscaling decision, against the per-pool utilisation
rule (tests/sim/autoscale.py's baseline) timed in the same run on the same observations.

Observations are prepared first (a random walk of load, queues, latency and replicas around a 128-GPU fleet),
so that only ``decide`` is timed, call by call with ``perf_counter_ns``. Prints p50, p99 and mean microseconds
per decision for both and their ratio; the budget is 100 µs per decision.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from orchestrator.autoscaler import ControllerConfig, CoordinatedAutoscaler, Observation, PoolConfig, PoolObservation
from tests.sim.autoscale import CPU, GPU, UtilisationAutoscaler

BUDGET_US = 100.0


def observations(count: int, seed: int) -> list[Observation]:
    rng = random.Random(seed)
    gpus, cpus, live = 64, 300, 5000
    made = []
    for tick in range(count):
        live = max(100, min(10_000, live + rng.randint(-200, 200)))
        gpus = max(4, min(128, gpus + rng.choice((-1, 0, 0, 1))))
        cpus = max(8, min(1024, cpus + rng.choice((-4, 0, 0, 4))))
        steps = live / rng.uniform(4, 8)
        made.append(Observation(
            now=tick * 15.0, steps_per_s=steps, latency_p95_s=rng.uniform(5, 25), live_episodes=live,
            waiting_episodes=rng.randint(0, 500), service_s=rng.uniform(3.5, 5),
            pools={GPU: PoolObservation(gpus, rng.randint(0, 3000), rng.randint(0, gpus * 32)),
                   CPU: PoolObservation(cpus, rng.randint(0, 3000), rng.randint(0, cpus * 16))},
        ))  # fmt: skip
    return made


def timed(decide, inputs) -> list[float]:
    clock = time.perf_counter_ns
    samples = []
    for item in inputs:
        started = clock()
        decide(item)
        samples.append((clock() - started) / 1000)
    return samples


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_us": round(ordered[len(ordered) // 2], 2), "p99_us": round(ordered[int(0.99 * len(ordered))], 2),
            "mean_us": round(statistics.fmean(ordered), 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", default="bench-autoscale-results.json")
    args = parser.parse_args()
    inputs = observations(args.decisions, args.seed)
    coordinated = CoordinatedAutoscaler(ControllerConfig(pools=(
        PoolConfig(GPU, 4, 128, 32, nominal_steps_per_replica=10),
        PoolConfig(CPU, 8, 1024, 16, nominal_steps_per_replica=6))))  # fmt: skip
    baseline = UtilisationAutoscaler({GPU: (4, 128), CPU: (8, 1024)})
    utilisations = [{GPU: (o.pools[GPU].in_service / (32 * o.pools[GPU].replicas)),
                     CPU: (o.pools[CPU].in_service / (16 * o.pools[CPU].replicas))} for o in inputs]  # fmt: skip
    baseline_inputs = [(o.now, u, {GPU: o.pools[GPU].replicas, CPU: o.pools[CPU].replicas})
                       for o, u in zip(inputs, utilisations, strict=True)]  # fmt: skip
    results = {
        "coordinated": summary(timed(coordinated.decide, inputs)),
        "utilisation": summary(timed(lambda args: baseline.decide(*args), baseline_inputs)),
    }
    results["ratio_p50"] = round(results["coordinated"]["p50_us"] / results["utilisation"]["p50_us"], 2)
    Path(args.output).write_text(json.dumps({"decisions": args.decisions, **results}, indent=2) + "\n")
    print(f"{'policy':<12} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8}")
    for policy in ("coordinated", "utilisation"):
        row = results[policy]
        print(f"{policy:<12} {row['p50_us']:>8.2f} {row['p99_us']:>8.2f} {row['mean_us']:>8.2f}")
    verdict = "within" if results["coordinated"]["p99_us"] <= BUDGET_US else "OVER"
    print(f"coordinated / utilisation at p50: {results['ratio_p50']}×; p99 {verdict} the {BUDGET_US:g} µs budget")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
