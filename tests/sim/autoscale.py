"""``make sim-autoscale``: a discrete-event simulation of the fleet under a daily load curve, driving the real
controller (orchestrator/autoscaler.py) against independent per-pool autoscaling on utilisation.

The simulated cluster: up to ``--gpus`` GPU workers (one GPU each, an inference server batching up to
``batch`` requests per forward pass: a pass takes ``pass_base_s + pass_per_request_s × batch``) and up to
``max_cpu_workers`` CPU workers (``cpu_slots`` sandboxes each; a command takes an exponential time, mean
``command_mean_s``). A new GPU worker takes ``gpu_start_s`` to load its model; a CPU worker ``cpu_start_s``.

The load: a trainer wants N(t) episodes live, from 15 % of ``--episodes`` at night to all of them at midday
(sin²), over a day compressed into ``--day-s`` seconds; episodes are admitted every second up to
min(N(t), the controller's admission limit) and last 10–40 steps. A step is one model call (queue, batch) and
one command (queue, slot); its latency runs from the model request to the command's end. The SLO is the
latency of a step, ``--slo-s``.

Policies, both deciding every ``tick_s``:
- ``coordinated``: ``CoordinatedAutoscaler``, fed what the live beat task reads (steps/s and p95 over the last
  minute, queue depths, work in service, replicas, live episodes), including its admission limit;
- ``utilisation``: each pool on its own, as a Kubernetes HPA on a utilisation metric does:
  desired = ⌈replicas × utilisation / target⌉ with a 10 % tolerance and a 300 s scale-down stabilisation
  window; GPU utilisation is the fraction of time a GPU is in a forward pass (what DCGM reports), CPU
  utilisation the fraction of sandbox slots in use.

Reported per policy: GPU utilisation (busy, and weighted by batch occupancy: the useful share), SLO attainment
(steps within the SLO), p95 step latency, steps and episodes completed, GPU and CPU worker-hours, and cost, in
dollars and in the units of a run's cost (orchestrator/costs.py): ``sandbox_s`` (each live episode holds a sandbox
from its admission to its end), ``env_worker_s`` (the seconds its commands ran), ``model_s`` (each step's model
call: the forward pass its request was in), and ``gpu_s`` (GPU-seconds provisioned).
Writes ``autoscale-sim-results.json`` and a plot, ``autoscale-sim.png``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.autoscaler import ControllerConfig, CoordinatedAutoscaler, Observation, PoolConfig, PoolObservation

GPU, CPU = "gpu", "cpu"


@dataclass
class Cluster:
    gpus: int = 128
    batch: int = 32
    pass_base_s: float = 1.2
    pass_per_request_s: float = 0.025
    gpu_start_s: float = 120.0
    max_cpu_workers: int = 1024
    cpu_slots: int = 16
    command_mean_s: float = 2.0
    cpu_start_s: float = 30.0
    gpu_hour_usd: float = 2.50
    cpu_hour_usd: float = 0.40
    min_gpus: int = 4
    min_cpu_workers: int = 8


@dataclass(eq=False)  # identity: workers sit in dicts and lists, and are told apart by who they are
class Worker:
    kind: str
    ready_at: float
    slots: int
    busy: int = 0  # requests in the pass (GPU) or sandboxes running a command (CPU)
    draining: bool = False
    gone: bool = False


@dataclass
class Episode:
    steps_left: int
    step_started: float = 0.0
    service_s: float = 0.0  # this step's pass and command time, queueing excluded


@dataclass
class Totals:
    steps: int = 0
    within_slo: int = 0
    episodes: int = 0
    gpu_s: float = 0.0  # provisioned worker-seconds
    cpu_s: float = 0.0
    sandbox_s: float = 0.0  # the run cost's units (orchestrator/costs.py): episodes' sandbox-seconds,
    env_worker_s: float = 0.0  # the seconds their commands ran,
    model_s: float = 0.0  # and their model calls' seconds (a pass's time, once per request in it)
    latencies: array = field(default_factory=lambda: array("d"))  # one per step: millions, 8 bytes each


class UtilisationAutoscaler:
    """The baseline: each pool scaled on its own utilisation, as a Kubernetes HPA does."""

    def __init__(self, bounds: dict[str, tuple[int, int]], target: float = 0.7, window_s: float = 300.0):
        self.bounds, self.target, self.window_s = bounds, target, window_s
        self.recent: dict[str, deque] = {pool: deque() for pool in bounds}

    def decide(self, now: float, utilisation: dict[str, float], replicas: dict[str, int]) -> dict[str, int]:
        decided = {}
        for pool, (low, high) in self.bounds.items():
            ratio = utilisation[pool] / self.target
            wanted = replicas[pool] if abs(ratio - 1) <= 0.1 else math.ceil(replicas[pool] * ratio)
            wanted = min(high, max(low, wanted))
            recent = self.recent[pool]
            recent.append((now, wanted))
            while recent[0][0] < now - self.window_s:
                recent.popleft()
            decided[pool] = wanted if wanted >= replicas[pool] else max(w for _, w in recent)
        return decided


class Simulation:
    def __init__(self, policy: str, cluster: Cluster, episodes: int, day_s: float, slo_s: float, tick_s: float,
                 seed: int):  # fmt: skip
        self.policy, self.cluster, self.peak, self.day_s, self.slo_s, self.tick_s = (
            policy, cluster, episodes, day_s, slo_s, tick_s)  # fmt: skip
        self.random = random.Random(seed)
        self.now = 0.0
        self.events: list = []
        self.sequence = 0
        self.workers: dict[str, list[Worker]] = {GPU: [], CPU: []}
        self.model_queue: deque = deque()
        self.env_queue: deque = deque()
        self.idle_gpus: list[Worker] = []
        self.free_cpus: dict[Worker, None] = {}  # CPU workers with a free slot, in insertion order
        self.live = 0
        self.live_since = 0.0  # when ``live`` last changed: sandbox-seconds are its integral over time
        self.admission_limit: int | None = None
        self.recent_steps: deque = deque()  # (time, latency) of the last minute
        self.totals = Totals()
        self.timeline: list[dict] = []
        self.decision_s: list[float] = []
        bounds = {GPU: (cluster.min_gpus, cluster.gpus), CPU: (cluster.min_cpu_workers, cluster.max_cpu_workers)}
        if policy == "coordinated":
            self.controller = CoordinatedAutoscaler(ControllerConfig(
                pools=(PoolConfig(GPU, *bounds[GPU], cluster.batch, nominal_steps_per_replica=10),
                       PoolConfig(CPU, *bounds[CPU], cluster.cpu_slots, nominal_steps_per_replica=6)),
                latency_slo_s=slo_s, up_cooldown_s=2 * tick_s, down_cooldown_s=12 * tick_s,
                down_window_s=20 * tick_s))  # fmt: skip
        else:
            self.controller = UtilisationAutoscaler(bounds)
        self.gpu_busy_s = 0.0  # GPU-seconds in a forward pass
        self.gpu_useful_s = 0.0  # the same, weighted by batch occupancy
        self.gpu_busy_at_tick = 0.0

    # --- events -----------------------------------------------------------------------------------------------

    def at(self, when: float, action, *args) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (when, self.sequence, action, args))

    def run(self) -> dict:
        cluster = self.cluster
        demand_0 = self.demand(0)
        self.scale(GPU, max(cluster.min_gpus, math.ceil(demand_0 / 4.5 / 12)), instant=True)
        self.scale(CPU, max(cluster.min_cpu_workers, math.ceil(demand_0 / 4.5 / 6)), instant=True)
        self.at(0.0, self.admit)
        self.at(self.tick_s, self.tick)
        while self.events:
            when, _, action, args = heapq.heappop(self.events)
            if when > self.day_s:
                break
            self.now = when
            action(*args)
        return self.report()

    def demand(self, t: float) -> int:
        return int(self.peak * (0.15 + 0.85 * math.sin(math.pi * t / self.day_s) ** 2))

    def admit(self) -> None:
        ceiling = self.demand(self.now)
        if self.admission_limit is not None:
            ceiling = min(ceiling, self.admission_limit)
        for _ in range(ceiling - self.live):
            self.live_changes(+1)
            self.request_model(Episode(self.random.randint(10, 40)))
        self.at(self.now + 1.0, self.admit)

    def request_model(self, episode: Episode) -> None:
        episode.step_started = self.now
        self.model_queue.append(episode)
        if self.idle_gpus:
            self.start_pass(self.idle_gpus.pop())

    def start_pass(self, gpu: Worker) -> None:
        batch = [self.model_queue.popleft() for _ in range(min(self.cluster.batch, len(self.model_queue)))]
        gpu.busy = len(batch)
        seconds = self.cluster.pass_base_s + self.cluster.pass_per_request_s * len(batch)
        self.gpu_busy_s += seconds
        self.gpu_useful_s += seconds * len(batch) / self.cluster.batch
        self.totals.model_s += seconds * len(batch)
        for episode in batch:
            episode.service_s = seconds
        self.at(self.now + seconds, self.pass_done, gpu, batch)

    def pass_done(self, gpu: Worker, batch: list[Episode]) -> None:
        gpu.busy = 0
        for episode in batch:
            self.env_queue.append(episode)
        while self.env_queue and self.free_cpus:
            self.start_command(next(reversed(self.free_cpus)))
        self.gpu_free(gpu)

    def gpu_free(self, gpu: Worker) -> None:
        if gpu.draining:
            self.retire(gpu)
        elif self.model_queue:
            self.start_pass(gpu)
        else:
            self.idle_gpus.append(gpu)

    def start_command(self, cpu: Worker) -> None:
        episode = self.env_queue.popleft()
        cpu.busy += 1
        if cpu.busy == cpu.slots:
            del self.free_cpus[cpu]
        seconds = self.random.expovariate(1 / self.cluster.command_mean_s)
        episode.service_s += seconds
        self.totals.env_worker_s += seconds
        self.at(self.now + seconds, self.command_done, cpu, episode)

    def command_done(self, cpu: Worker, episode: Episode) -> None:
        if cpu.busy == cpu.slots and not cpu.draining:
            self.free_cpus[cpu] = None
        cpu.busy -= 1
        latency = self.now - episode.step_started
        self.totals.steps += 1
        self.totals.within_slo += latency <= self.slo_s
        self.totals.latencies.append(latency)
        self.recent_steps.append((self.now, latency, episode.service_s))
        episode.steps_left -= 1
        if episode.steps_left > 0:
            self.request_model(episode)
        else:
            self.live_changes(-1)
            self.totals.episodes += 1
        if cpu.draining:
            if cpu.busy == 0:
                self.retire(cpu)
        elif self.env_queue:
            self.start_command(cpu)

    def live_changes(self, by: int) -> None:
        self.totals.sandbox_s += self.live * (self.now - self.live_since)
        self.live, self.live_since = self.live + by, self.now

    # --- scaling ----------------------------------------------------------------------------------------------

    def provisioned(self, kind: str) -> list[Worker]:
        return [worker for worker in self.workers[kind] if not worker.draining]

    def scale(self, kind: str, wanted: int, instant: bool = False) -> None:
        present = self.provisioned(kind)
        cluster = self.cluster
        if wanted > len(present):
            delay = 0.0 if instant else (cluster.gpu_start_s if kind == GPU else cluster.cpu_start_s)
            for _ in range(wanted - len(present)):
                worker = Worker(kind, self.now + delay, cluster.batch if kind == GPU else cluster.cpu_slots)
                self.workers[kind].append(worker)
                self.at(self.now + delay, self.ready, worker)
            return
        # Scale down: idle workers first, then those still starting, then busy ones (they drain).
        order = sorted(present, key=lambda w: (w.ready_at <= self.now and w.busy == 0, w.ready_at > self.now),
                       reverse=True)  # fmt: skip
        for worker in order[: len(present) - wanted]:
            worker.draining = True
            if worker.ready_at > self.now or worker.busy == 0:
                self.retire(worker)

    def ready(self, worker: Worker) -> None:
        if worker.gone or worker.draining:
            return
        if worker.kind == GPU:
            self.gpu_free(worker)
        else:
            self.free_cpus[worker] = None
            while self.env_queue and worker.busy < worker.slots:
                self.start_command(worker)

    def retire(self, worker: Worker) -> None:
        worker.gone = True
        self.workers[worker.kind].remove(worker)
        if worker.kind == CPU:
            self.free_cpus.pop(worker, None)
        elif worker in self.idle_gpus:
            self.idle_gpus.remove(worker)

    def tick(self) -> None:
        now = self.now
        while self.recent_steps and self.recent_steps[0][0] < now - 60:
            self.recent_steps.popleft()
        latencies = sorted(latency for _, latency, _ in self.recent_steps)
        service_s = sum(service for _, _, service in self.recent_steps) / len(latencies) if latencies else None
        p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else None
        gpus, cpus = self.workers[GPU], self.workers[CPU]
        replicas = {GPU: len(self.provisioned(GPU)), CPU: len(self.provisioned(CPU))}
        self.totals.gpu_s += len(gpus) * self.tick_s
        self.totals.cpu_s += len(cpus) * self.tick_s
        if self.policy == "coordinated":
            observation = Observation(
                now=now, steps_per_s=len(latencies) / min(60.0, now), latency_p95_s=p95, live_episodes=self.live,
                waiting_episodes=max(0, self.demand(now) - self.live), service_s=service_s,
                pools={GPU: PoolObservation(replicas[GPU], len(self.model_queue), sum(w.busy for w in gpus)),
                       CPU: PoolObservation(replicas[CPU], len(self.env_queue), sum(w.busy for w in cpus))},
            )  # fmt: skip
            started = time.perf_counter()
            decision = self.controller.decide(observation)
            self.decision_s.append(time.perf_counter() - started)
            wanted, self.admission_limit = decision.replicas, decision.admission_limit
        else:
            ready_gpus = [w for w in gpus if w.ready_at <= now] or gpus
            utilisation = {
                GPU: min(1.0, (self.gpu_busy_s - self.gpu_busy_at_tick) / (self.tick_s * max(1, len(ready_gpus)))),
                CPU: sum(w.busy for w in cpus) / max(1, sum(w.slots for w in cpus if w.ready_at <= now)),
            }
            started = time.perf_counter()
            wanted = self.controller.decide(now, utilisation, replicas)
            self.decision_s.append(time.perf_counter() - started)
        self.gpu_busy_at_tick = self.gpu_busy_s
        for kind in (GPU, CPU):
            if wanted[kind] != replicas[kind]:
                self.scale(kind, wanted[kind])
        self.timeline.append({"t": now, "demand": self.demand(now), "live": self.live, "gpus": len(gpus),
                              "cpus": len(cpus), "steps_per_s": len(latencies) / 60, "p95_s": p95,
                              "admission_limit": self.admission_limit})  # fmt: skip
        self.at(now + self.tick_s, self.tick)

    def report(self) -> dict:
        self.live_changes(0)  # the sandboxes still held at the end count up to now
        totals, cluster = self.totals, self.cluster
        latencies = sorted(totals.latencies)
        gpu_hours, cpu_hours = totals.gpu_s / 3600, totals.cpu_s / 3600
        return {
            "policy": self.policy,
            "gpu_busy": round(self.gpu_busy_s / max(1e-9, totals.gpu_s), 3),
            "gpu_useful": round(self.gpu_useful_s / max(1e-9, totals.gpu_s), 3),
            "slo_attainment": round(totals.within_slo / max(1, totals.steps), 4),
            "p95_latency_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else None,
            "steps": totals.steps,
            "episodes": totals.episodes,
            "gpu_hours": round(gpu_hours, 1),
            "cpu_hours": round(cpu_hours, 1),
            "cost_usd": round(gpu_hours * cluster.gpu_hour_usd + cpu_hours * cluster.cpu_hour_usd, 2),
            "usd_per_1k_steps": round(
                1000 * (gpu_hours * cluster.gpu_hour_usd + cpu_hours * cluster.cpu_hour_usd) / max(1, totals.steps), 4
            ),  # fmt: skip
            "sandbox_s": round(totals.sandbox_s, 1),
            "env_worker_s": round(totals.env_worker_s, 1),
            "model_s": round(totals.model_s, 1),
            "gpu_s": round(totals.gpu_s, 1),
            "decision_us_p50": round(1e6 * sorted(self.decision_s)[len(self.decision_s) // 2], 1),
        }


COLUMNS = (("policy", "policy", "{:<12}"), ("gpu_busy", "GPU busy", "{:>8.1%}"),
           ("gpu_useful", "GPU useful", "{:>10.1%}"), ("slo_attainment", "SLO met", "{:>8.2%}"),
           ("p95_latency_s", "p95 s", "{:>7.1f}"), ("steps", "steps", "{:>10,}"), ("episodes", "episodes", "{:>9,}"),
           ("gpu_hours", "GPU h", "{:>7.1f}"), ("cpu_hours", "CPU h", "{:>7.1f}"), ("cost_usd", "cost $", "{:>8.2f}"),
           ("usd_per_1k_steps", "$/1k steps", "{:>10.4f}"), ("sandbox_s", "sandbox s", "{:>12,.0f}"),
           ("env_worker_s", "env worker s", "{:>12,.0f}"), ("model_s", "model s", "{:>12,.0f}"),
           ("gpu_s", "GPU s", "{:>10,.0f}"))  # fmt: skip


def table(rows: list[dict]) -> str:
    header = " ".join(f"{title:>{len(fmt.format(rows[0][key]))}}" if key != "policy" else f"{title:<12}"
                      for key, title, fmt in COLUMNS)  # fmt: skip
    lines = [header]
    for row in rows:
        lines.append(" ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS))
    return "\n".join(lines)


def plot(results: dict[str, Simulation], path: Path, slo_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    colours = {"coordinated": "#1f77b4", "utilisation": "#d62728"}
    for policy, simulation in results.items():
        timeline = simulation.timeline
        hours = [point["t"] / simulation.day_s * 24 for point in timeline]
        colour = colours[policy]
        axes[0].plot(hours, [point["live"] for point in timeline], color=colour, label=f"{policy}: live")
        axes[1].plot(hours, [point["gpus"] for point in timeline], color=colour, label=policy)
        axes[2].plot(hours, [point["cpus"] for point in timeline], color=colour, label=policy)
        axes[3].plot(hours, [point["p95_s"] or 0 for point in timeline], color=colour, label=policy)
    first = next(iter(results.values()))
    axes[0].plot([p["t"] / first.day_s * 24 for p in first.timeline], [p["demand"] for p in first.timeline],
                 color="grey", linestyle="--", label="wanted by the trainer")  # fmt: skip
    axes[3].axhline(slo_s, color="black", linestyle=":", label="SLO")
    titles = ("episodes live", "GPU workers", "CPU workers", "p95 step latency (s)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_ylabel(title)
        axis.legend(loc="upper left", fontsize=8)
        axis.grid(alpha=0.3)
    axes[3].set_xlabel("hour of the (compressed) day")
    figure.suptitle("Coordinated vs per-pool utilisation autoscaling")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=128, help="GPU workers at most (one GPU each)")
    parser.add_argument("--episodes", type=int, default=10_000, help="episodes live at the daily peak")
    parser.add_argument("--day-s", type=float, default=4 * 3600.0, help="simulated seconds the daily curve takes")
    parser.add_argument("--slo-s", type=float, default=15.0, help="step latency SLO (p95 with no queueing: ~9 s)")
    parser.add_argument("--tick-s", type=float, default=15.0, help="seconds between autoscaling decisions")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default="autoscale-sim-results.json")
    parser.add_argument("--plot", default="autoscale-sim.png")
    args = parser.parse_args()
    cluster = Cluster(gpus=args.gpus)
    results, rows = {}, []
    for policy in ("coordinated", "utilisation"):
        began = time.monotonic()
        simulation = Simulation(policy, cluster, args.episodes, args.day_s, args.slo_s, args.tick_s, args.seed)
        rows.append(simulation.run())
        results[policy] = simulation
        print(f"{policy}: simulated {args.day_s:.0f} s in {time.monotonic() - began:.1f} s", flush=True)
    timelines = {policy: simulation.timeline for policy, simulation in results.items()}
    report = {"args": vars(args), "cluster": vars(cluster), "results": rows, "timelines": timelines}
    Path(args.output).write_text(json.dumps(report) + "\n")
    plot(results, Path(args.plot), args.slo_s)
    print()
    print(table(rows))
    print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
