"""The discrete-event simulation drives the real controller, and what it reports follows from what happened."""

import json
import subprocess
import sys

import pytest
from django.conf import settings

from orchestrator.autoscaler import CoordinatedAutoscaler
from tests.sim.autoscale import Cluster, Simulation


@pytest.fixture(scope="module")
def day():
    """A 32-GPU fleet, 2,000 episodes at the peak, the day in one simulated hour; both policies."""
    runs = {}
    for policy in ("coordinated", "utilisation"):
        simulation = Simulation(policy, Cluster(gpus=32), episodes=2000, day_s=3600, slo_s=15, tick_s=15, seed=3)
        runs[policy] = (simulation, simulation.run())
    return runs


def test_the_simulation_runs_the_real_controller(day):
    simulation, report = day["coordinated"]
    assert isinstance(simulation.controller, CoordinatedAutoscaler)
    assert len(simulation.decision_s) == len(simulation.timeline) == 3600 // 15
    assert report["steps"] > 100_000 and report["episodes"] > 3000


def test_coordinated_scaling_follows_the_daily_curve_in_both_pools(day):
    timeline = day["coordinated"][0].timeline
    night, noon = timeline[len(timeline) // 10], max(timeline, key=lambda point: point["demand"])
    assert noon["gpus"] >= 2 * night["gpus"] and noon["cpus"] >= 2 * night["cpus"]
    evening = timeline[-1]
    assert evening["gpus"] < noon["gpus"] / 2 and evening["cpus"] < noon["cpus"] / 2, "it scales back down"


def test_coordinated_costs_less_than_per_pool_utilisation_at_the_same_slo(day):
    coordinated, utilisation = day["coordinated"][1], day["utilisation"][1]
    assert coordinated["cost_usd"] < 0.9 * utilisation["cost_usd"]
    assert coordinated["gpu_useful"] > utilisation["gpu_useful"]
    assert coordinated["slo_attainment"] >= utilisation["slo_attainment"] - 0.01
    # Every worker-second is paid for, whether it ran a pass or not.
    for report in (coordinated, utilisation):
        assert 0 < report["gpu_useful"] <= report["gpu_busy"] <= 1


class Fixed:
    """Stands in for the simulation's random numbers: every episode 10 steps, every command 2 s."""

    def randint(self, low, high):
        return 10

    def expovariate(self, rate):
        return 2.0


def test_the_cost_in_a_runs_units_adds_up():
    simulation = Simulation("coordinated", Cluster(gpus=8), episodes=200, day_s=600, slo_s=15, tick_s=15, seed=3)
    simulation.random = Fixed()
    report = simulation.run()
    cluster, timeline = simulation.cluster, simulation.timeline
    in_flight = sum(worker.busy for worker in simulation.workers["cpu"])  # commands started, not yet done
    assert report["env_worker_s"] == round(2.0 * (report["steps"] + in_flight), 1)
    # Every request pays the pass it was in: a full batch's pass at most, a lone request's at least.
    calls = report["steps"] + in_flight + len(simulation.env_queue)
    fastest, slowest = cluster.pass_base_s + cluster.pass_per_request_s, cluster.pass_base_s + 32 * 0.025
    assert fastest * calls <= report["model_s"] <= slowest * (calls + simulation.live)
    # Sandbox-seconds are the integral of live episodes over time: the tick samples are its Riemann sum.
    sampled = sum(point["live"] for point in timeline) * simulation.tick_s
    assert abs(report["sandbox_s"] - sampled) < 0.03 * sampled
    assert report["sandbox_s"] > report["model_s"] + report["env_worker_s"] - simulation.live * 60
    assert report["gpu_s"] == round(sum(point["gpus"] for point in timeline) * simulation.tick_s, 1)
    dollars = report["gpu_s"] / 3600 * cluster.gpu_hour_usd + simulation.totals.cpu_s / 3600 * cluster.cpu_hour_usd
    assert report["cost_usd"] == round(dollars, 2)


def test_utilisation_scaling_of_gpus_saturates_on_busy_time(day):
    """The known failure of scaling inference on GPU utilisation: a GPU running small batches is 'busy'."""
    timeline = day["utilisation"][0].timeline
    assert max(point["gpus"] for point in timeline[: len(timeline) // 4]) == 32


def test_an_overloaded_fleet_throttles_admission_instead_of_missing_the_slo_for_everyone():
    small = Simulation("coordinated", Cluster(gpus=8), episodes=2000, day_s=900, slo_s=15, tick_s=15, seed=3)
    small.run()
    limits = [point["admission_limit"] for point in small.timeline if point["admission_limit"] is not None]
    assert limits, "8 GPUs cannot carry 2,000 episodes within the SLO"
    assert max(point["gpus"] for point in small.timeline) == 8
    assert min(point["live"] - point["demand"] for point in small.timeline) < 0, "some wanted episodes waited"


def test_make_sim_autoscale_writes_its_table_results_and_plot(tmp_path):
    output, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    result = subprocess.run(
        [sys.executable, "-m", "tests.sim.autoscale", "--gpus", "8", "--episodes", "300", "--day-s", "600",
         "--output", str(output), "--plot", str(plot)],
        cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GPU useful" in result.stdout and "$/1k steps" in result.stdout and "sandbox s" in result.stdout
    report = json.loads(output.read_text())
    assert [row["policy"] for row in report["results"]] == ["coordinated", "utilisation"]
    assert all(row["sandbox_s"] > 0 and row["model_s"] > 0 and row["env_worker_s"] > 0 for row in report["results"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_bench_autoscale_reports_both_policies(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.autoscale", "--decisions", "2000", "--output", str(output)],
        cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert report["decisions"] == 2000 and report["coordinated"]["p50_us"] > 0 and report["ratio_p50"] > 0
