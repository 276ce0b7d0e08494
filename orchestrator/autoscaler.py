"""Coordinated autoscaling of the GPU (model) and CPU (environment) pools, after HeteroScale.

The agent ↔ environment loop is closed: each step is one model call and one command, so both pools serve the
same throughput, and scaling one alone only moves the bottleneck to the other. The controller therefore reads
one throughput signal (steps/s) and sizes every pool from the same demand, each by its own measured capacity,
so the ratio between the pools is the one the workload shows, not a guess.

One decision (``CoordinatedAutoscaler.decide``, every ``interval_s``):

1. **Capacity per replica, per pool**: x_p = T / busy_p, the steps/s one fully busy replica gives, where T is
   the fleet's steps/s and busy_p = in_service_p / slots_p is how many replicas' worth of work pool p is
   serving. Smoothed (EWMA); a pool with no work in service keeps its last estimate (at first, the prior
   ``nominal_steps_per_replica``). x_gpu / x_cpu is the measured CPU:GPU replica ratio.
2. **Demand** (proportional control on throughput): the steps/s the fleet is asked for, not the ones it
   manages. With the mean service time of a step s (model + command, queueing excluded: what the steps
   record), D = (live + waiting) / s by Little's law, where waiting counts episodes wanted but not admitted;
   a saturated pool's queueing then shows as demand above T. Without s, D = T × (live + waiting) / live +
   backlog / drain_s, backlog being the work in the pools' queues.
3. **Latency SLO, negative feedback**: when the p95 step latency is over the SLO, admission of new episodes is
   throttled first (limit = live × SLO / latency) and capacity is held; only if the breach outlasts
   ``throttle_grace`` decisions is capacity sized for the live episodes' demand × latency / SLO (the boost
   capped at ``max_slo_boost``; the waiting episodes are what the throttle keeps out). Under
   ``recover_below`` × SLO the limit grows again, by ``admission_step_fraction`` of itself per decision, and
   is lifted once back at the live count where the breach began (or once it no longer binds).
4. **Desired replicas**: desired_p = ⌈D / (x_p × target_utilisation)⌉ within [min_p, max_p].
5. **Hysteresis and cooldown**: a pool changes only when desired is outside a dead band around the current
   count (``up_band``, ``down_band``), and no sooner than ``up_cooldown_s`` / ``down_cooldown_s`` after its
   last change; it scales down only to the highest desired count of the last ``down_window_s`` (HPA's
   stabilisation window), so a dip does not shed replicas that the next minute needs.

The controller is pure: it sees ``Observation`` and returns ``Decision``, so the same code runs in the beat
task (orchestrator/autoscale.py, which observes the live fleet and actuates) and in the simulation
(tests/sim/autoscale.py). ``make bench-autoscale`` measures the cost of one decision.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolConfig:
    name: str
    min_replicas: int = 1
    max_replicas: int = 64
    slots_per_replica: int = 1  # concurrent work one replica serves: a model worker's batch, an env worker's sandboxes
    nominal_steps_per_replica: float = 1.0  # prior for x_p, until the pool has been seen busy


@dataclass(frozen=True)
class ControllerConfig:
    pools: tuple[PoolConfig, ...]
    latency_slo_s: float = 10.0
    target_utilisation: float = 0.8
    drain_s: float = 60.0
    ewma: float = 0.3
    up_band: float = 0.1
    down_band: float = 0.2
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 180.0
    down_window_s: float = 300.0
    throttle_grace: int = 2
    max_slo_boost: float = 2.0
    recover_below: float = 0.8
    min_admission: int = 1
    admission_step_fraction: float = 0.1


@dataclass(frozen=True)
class PoolObservation:
    replicas: int  # provisioned, starting ones included
    queue_depth: int  # work waiting for this pool
    in_service: int  # work being served by it
    slots: int | None = None  # concurrent work all replicas serve now; None: replicas × slots_per_replica


@dataclass(frozen=True)
class Observation:
    now: float  # seconds, any monotonic origin
    steps_per_s: float
    latency_p95_s: float | None  # step latency; None when no step completed in the window
    live_episodes: int
    pools: dict[str, PoolObservation]
    waiting_episodes: int = 0  # wanted but not admitted yet (queued in running runs)
    service_s: float | None = None  # mean model + command time of a step, queueing excluded; None: unknown


@dataclass(frozen=True)
class Decision:
    replicas: dict[str, int]
    admission_limit: int | None  # None: no throttle
    demand_steps_per_s: float
    slo_breached: bool
    reason: str


@dataclass
class _PoolState:
    capacity: float  # x_p, steps/s per fully busy replica
    last_change: float = -math.inf
    recent: deque = field(default_factory=deque)  # (time, desired) within down_window_s


class CoordinatedAutoscaler:
    """One throughput signal, every pool sized from it together; see the module docstring."""

    def __init__(self, config: ControllerConfig):
        self.config = config
        self.pools = {pool.name: _PoolState(pool.nominal_steps_per_replica) for pool in config.pools}
        self.admission_limit: int | None = None
        self.throttled_from = 0  # live episodes when the present throttle began
        self.breached_for = 0

    def snapshot(self) -> dict:
        """The controller's memory, JSON-able, for a controller that runs as a periodic task."""
        pools = {name: [state.capacity, state.last_change if state.last_change > -math.inf else None,
                        list(state.recent)] for name, state in self.pools.items()}  # fmt: skip
        return {"pools": pools, "admission_limit": self.admission_limit, "throttled_from": self.throttled_from,
                "breached_for": self.breached_for}  # fmt: skip

    def restore(self, snapshot: dict) -> None:
        for name, (capacity, last_change, recent) in snapshot.get("pools", {}).items():
            if name in self.pools:
                self.pools[name] = _PoolState(capacity, -math.inf if last_change is None else last_change,
                                              deque(tuple(entry) for entry in recent))  # fmt: skip
        self.admission_limit = snapshot.get("admission_limit")
        self.throttled_from = snapshot.get("throttled_from", 0)
        self.breached_for = snapshot.get("breached_for", 0)

    def decide(self, observation: Observation) -> Decision:
        config = self.config
        throughput = observation.steps_per_s
        backlog = 0
        for pool in config.pools:
            seen = observation.pools[pool.name]
            backlog += seen.queue_depth
            # Replicas' worth of work in service; resized workers (pool grow/shrink) count by their present slots.
            per_replica = seen.slots / seen.replicas if seen.slots else pool.slots_per_replica
            busy = seen.in_service / per_replica
            if throughput > 0 and busy > 0:
                state = self.pools[pool.name]
                state.capacity += config.ewma * (throughput / busy - state.capacity)
        if observation.service_s:
            # Little's law: unqueued, every episode would take a step per service time.
            per_episode, live_demand = 1 / observation.service_s, observation.live_episodes / observation.service_s
        else:
            # Episodes waiting for admission would step as fast as the live ones do; queued work drains.
            per_episode = throughput / observation.live_episodes if observation.live_episodes else 0.0
            live_demand = throughput + backlog / config.drain_s
        demand = live_demand + observation.waiting_episodes * per_episode

        breached, reason = self._admission(observation)
        holding = breached and self.breached_for <= config.throttle_grace
        if breached and not holding:
            boost = min(config.max_slo_boost, observation.latency_p95_s / config.latency_slo_s)
            demand = live_demand * boost
            reason = f"SLO breached for {self.breached_for} decisions: capacity ×{boost:.2f}"

        replicas = {}
        for pool in config.pools:
            current = observation.pools[pool.name].replicas
            if holding:  # throttling comes first; capacity only if the breach outlasts the grace
                replicas[pool.name] = current
                continue
            wanted = math.ceil(demand / (self.pools[pool.name].capacity * config.target_utilisation))
            replicas[pool.name] = self._damped(pool, current, min(pool.max_replicas, max(pool.min_replicas, wanted)),
                                               observation.now)  # fmt: skip
        return Decision(replicas, self.admission_limit, demand, breached, reason)

    def _admission(self, observation: Observation) -> tuple[bool, str]:
        """Throttle admission while the latency SLO is breached; lift it step by step once latency recovers."""
        config, latency = self.config, observation.latency_p95_s
        if latency is not None and latency > config.latency_slo_s:
            self.breached_for += 1
            limit = max(config.min_admission, int(observation.live_episodes * config.latency_slo_s / latency))
            if self.admission_limit is None:
                self.throttled_from = observation.live_episodes
            self.admission_limit = limit if self.admission_limit is None else min(self.admission_limit, limit)
            return True, f"p95 {latency:.1f} s over the {config.latency_slo_s:g} s SLO: admission ≤ {limit}"
        self.breached_for = 0
        recovered = latency is None or latency < config.recover_below * config.latency_slo_s
        if self.admission_limit is not None and recovered:
            step = max(1, int(self.admission_limit * config.admission_step_fraction))
            self.admission_limit += step
            # Lifted once back where the breach began, or once it no longer binds.
            if self.admission_limit >= min(self.throttled_from, observation.live_episodes + step * 2):
                self.admission_limit = None
                return False, "latency recovered: admission unthrottled"
            return False, f"latency recovering: admission ≤ {self.admission_limit}"
        return False, "within SLO"

    def _damped(self, pool: PoolConfig, current: int, desired: int, now: float) -> int:
        """Hysteresis, cooldown and the scale-down stabilisation window."""
        config, state = self.config, self.pools[pool.name]
        recent = state.recent
        recent.append((now, desired))
        while recent and recent[0][0] < now - config.down_window_s:
            recent.popleft()
        if desired > current * (1 + config.up_band) or (current == 0 and desired > 0):
            if now - state.last_change >= config.up_cooldown_s:
                state.last_change = now
                return desired
            return current
        ceiling = max(wanted for _, wanted in recent)
        if ceiling < current * (1 - config.down_band) and now - state.last_change >= config.down_cooldown_s:
            state.last_change = now
            return max(pool.min_replicas, ceiling)
        return current
