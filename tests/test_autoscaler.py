"""The coordinated autoscaler's control law (orchestrator/autoscaler.py), decision by decision."""

import pytest

from orchestrator.autoscaler import ControllerConfig, CoordinatedAutoscaler, Observation, PoolConfig, PoolObservation

GPU = PoolConfig("model.x", min_replicas=1, max_replicas=128, slots_per_replica=32, nominal_steps_per_replica=20)
CPU = PoolConfig("env.x", min_replicas=1, max_replicas=1024, slots_per_replica=8, nominal_steps_per_replica=2)


def config(**overrides) -> ControllerConfig:
    values = dict(pools=(GPU, CPU), latency_slo_s=10, ewma=1.0, up_cooldown_s=30, down_cooldown_s=180,
                  down_window_s=300, throttle_grace=2)  # fmt: skip
    return ControllerConfig(**{**values, **overrides})


def seen(now, steps_per_s, gpu, cpu, latency=5.0, live=1000) -> Observation:
    """gpu / cpu: (replicas, queue depth, in service)."""
    return Observation(
        now, steps_per_s, latency, live, {"model.x": PoolObservation(*gpu), "env.x": PoolObservation(*cpu)}
    )


def test_both_pools_are_sized_from_one_demand_in_their_measured_ratio():
    scaler = CoordinatedAutoscaler(config())
    # 100 steps/s from 2 fully busy GPU workers (50 steps/s each) and 25 fully busy CPU workers (4 each);
    # 600 steps wait in the queues.
    decision = scaler.decide(seen(0, 100, gpu=(2, 300, 64), cpu=(25, 300, 200)))
    assert decision.demand_steps_per_s == pytest.approx(100 + 600 / 60)
    assert decision.replicas == {"model.x": 3, "env.x": 35}  # ⌈110 / (50 × 0.8)⌉, ⌈110 / (4 × 0.8)⌉


def test_a_busier_environment_shifts_the_ratio_towards_cpu():
    scaler = CoordinatedAutoscaler(config())
    # Same throughput, but commands now take twice as long: 50 CPU workers' worth busy.
    decision = scaler.decide(seen(0, 100, gpu=(2, 0, 64), cpu=(50, 0, 400)))
    assert decision.replicas == {"model.x": 3, "env.x": 63}  # ⌈100 / (2 × 0.8)⌉


def test_workers_resized_by_pool_grow_count_by_their_present_slots():
    scaler = CoordinatedAutoscaler(config())
    # Two GPU workers grown to 64 slots each, half full: one worker's worth busy.
    decision = scaler.decide(seen(0, 50, gpu=(2, 0, 64, 128), cpu=(25, 0, 200)))
    assert scaler.pools["model.x"].capacity == pytest.approx(50.0)
    assert decision.replicas["model.x"] == 2


def test_inside_the_dead_band_nothing_changes_and_a_noisy_signal_does_not_flap():
    scaler = CoordinatedAutoscaler(config(up_cooldown_s=0, down_cooldown_s=0, down_window_s=0))
    replicas = []
    for tick, throughput in enumerate([100, 104, 97, 103, 99, 102]):
        decision = scaler.decide(seen(tick * 15, throughput, gpu=(3, 0, 64), cpu=(35, 0, 200)))
        replicas.append(decision.replicas["model.x"])
    assert replicas == [3] * 6


def test_scale_up_waits_out_its_cooldown():
    scaler = CoordinatedAutoscaler(config(up_cooldown_s=30))
    first = scaler.decide(seen(0, 100, gpu=(1, 3000, 32), cpu=(10, 0, 80)))
    assert first.replicas["model.x"] > 1
    held = scaler.decide(seen(15, 100, gpu=(first.replicas["model.x"], 6000, 32), cpu=(10, 0, 80)))
    assert held.replicas["model.x"] == first.replicas["model.x"], "15 s after the last change"
    later = scaler.decide(seen(31, 100, gpu=(first.replicas["model.x"], 6000, 32), cpu=(10, 0, 80)))
    assert later.replicas["model.x"] > first.replicas["model.x"]


def test_scale_down_takes_the_highest_demand_of_its_window_and_its_cooldown():
    scaler = CoordinatedAutoscaler(config(down_cooldown_s=60, down_window_s=120))
    scaler.decide(seen(0, 400, gpu=(10, 0, 320), cpu=(100, 0, 800)))  # needs 10 GPU workers
    quiet = [scaler.decide(seen(t, 40, gpu=(10, 0, 32), cpu=(100, 0, 80))).replicas["model.x"]
             for t in (30, 60, 90, 120)]  # fmt: skip
    assert quiet == [10, 10, 10, 10], "the busy minute is still in the window"
    assert scaler.decide(seen(150, 40, gpu=(10, 0, 32), cpu=(100, 0, 80))).replicas["model.x"] == 2


def test_an_slo_breach_throttles_admission_before_it_adds_capacity():
    scaler = CoordinatedAutoscaler(config(up_cooldown_s=0, throttle_grace=2))
    steady = seen(0, 100, gpu=(3, 0, 64), cpu=(35, 0, 200), latency=5)
    assert scaler.decide(steady).admission_limit is None
    breached = [scaler.decide(seen(t, 100, gpu=(3, 0, 64), cpu=(35, 0, 200), latency=20, live=1000))
                for t in (15, 30)]  # fmt: skip
    for decision in breached:
        assert decision.slo_breached and decision.admission_limit == 500  # live × SLO / latency
        assert decision.replicas == {"model.x": 3, "env.x": 35}, "no capacity yet: throttling comes first"
    boosted = scaler.decide(seen(45, 100, gpu=(3, 0, 64), cpu=(35, 0, 200), latency=20, live=500))
    assert boosted.replicas["model.x"] > 3 and boosted.replicas["env.x"] > 35
    assert "capacity ×2.00" in boosted.reason


def test_admission_recovers_step_by_step_then_is_lifted():
    scaler = CoordinatedAutoscaler(config())
    scaler.decide(seen(0, 100, gpu=(3, 0, 64), cpu=(35, 0, 200), latency=20, live=100))
    assert scaler.admission_limit == 50
    limits, live = [], 50
    for t in range(15, 15 * 12, 15):  # latency is back under the SLO, and the throttle binds: live = limit
        limit = scaler.decide(seen(t, 100, gpu=(3, 0, 64), cpu=(35, 0, 200), latency=5, live=live)).admission_limit
        limits.append(limit)
        live = limit or live
    assert limits[:3] == [55, 60, 66]
    assert limits[-1] is None, limits


def test_replicas_stay_within_bounds():
    scaler = CoordinatedAutoscaler(config())
    flood = scaler.decide(seen(0, 1000, gpu=(100, 10**7, 3200), cpu=(500, 10**7, 4000)))
    assert flood.replicas == {"model.x": 128, "env.x": 1024}
    idle = CoordinatedAutoscaler(config(down_cooldown_s=0, down_window_s=0)).decide(
        seen(0, 0, gpu=(5, 0, 0), cpu=(5, 0, 0), latency=None, live=0)
    )
    assert idle.replicas == {"model.x": 1, "env.x": 1}


def test_a_restored_controller_decides_as_the_original_would():
    original = CoordinatedAutoscaler(config())
    original.decide(seen(0, 100, gpu=(2, 300, 64), cpu=(25, 300, 200), latency=20))
    copy = CoordinatedAutoscaler(config())
    copy.restore(original.snapshot())
    follow_up = seen(15, 120, gpu=(3, 500, 96), cpu=(35, 500, 280), latency=12)
    assert copy.decide(follow_up) == original.decide(follow_up)
