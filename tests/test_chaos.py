"""The fast part of ``make chaos``: 200 episodes through SIGTERMed workers and a restarted broker, and 100 in
real containers through sandboxes killed from outside and a restarted Docker daemon, each with the proof
(every episode terminal, no step twice, every failure explained); and a short run of the production-settings
mode (shipped time limit and visibility timeout): every worker SIGKILLed, and a broker that comes back empty,
each recovered within a minute by worker liveness, not by the visibility timeout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from orchestrator.models import Episode
from tests.chaos.harness import RecoveryClock, empty_the_database, kill_leftovers
from tests.support.records import new_episode

# Each run of the harness has its own limit (600 s, then a minute's grace to clean up and print what it saw);
# pytest's 300 s would cut it short without that report (a 2-core box that ran the kill-containers run past 300 s).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(720)]


# Each run is judged by the harness after this long, so that two runs and the stack's start end inside the harness's
# 600 s with their rows printed: a run that stalls shows its lost episodes and their statuses, not a bare timeout.
RUN_TIMEOUT_S = 240


def chaos(faults: str, tmp_path, *options: str, episodes: int = 200) -> tuple[dict, str]:
    slot = int(os.environ["MEGAFLOW_TEST_SLOT"])
    database = settings.DATABASES["default"]
    host = database.get("HOST") or "127.0.0.1" if database["ENGINE"].endswith("postgresql") else "127.0.0.1"
    env = {**os.environ, "MEGAFLOW_CHAOS_DATABASE_URL": f"postgres://postgres@{host}:5432/megaflow_chaos_{slot}"}
    env.pop("MEGAFLOW_AUTOSCALE_INTERVAL_S", None)  # the chaos stack runs the autoscaler, as a deployment does
    output = tmp_path / "chaos.json"
    result = run_harness(
        [sys.executable, "-m", "tests.chaos.harness", "--timeout", str(RUN_TIMEOUT_S), *options, "--faults", faults,
         "--episodes", str(episodes), "--redis-port", str(16391 + slot), "--output", str(output)],
        env=env, timeout=600, data_dir=settings.BASE_DIR / "var" / "chaos" / str(16391 + slot),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["fault"]: row for row in json.loads(output.read_text())}
    assert set(rows) == set(faults.split(","))
    for row in rows.values():
        counts = (row["episodes"], row["terminal"], row["lost"], row["duplicated_steps"])
        assert counts == (episodes, episodes, 0, 0), row
        assert row["run_status"] == "completed" and row["failed_without_reason"] == 0
    return rows, result.stdout


def run_harness(
    argv: list[str], env: dict, timeout: float, data_dir: Path, grace_s: float = 60
) -> subprocess.CompletedProcess:
    """Run the harness in a process group of its own, which everything it starts (workers, beat, Redis, dockerd)
    joins. On timeout the group is sent SIGTERM (the harness cleans up), then SIGKILL; whatever is left of the
    group afterwards is killed too, and the sandboxes of its dockerd (on ``data_dir``, the harness's), so that a
    timed-out or crashed harness leaves nothing for the next session."""
    process = subprocess.Popen(argv, cwd=settings.BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(f"the chaos harness ran past {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    finally:
        _signal_group(process.pid, signal.SIGKILL)  # the group outlives its leader: its members may not
        kill_leftovers(data_dir)  # containerd's shims leave the group; a SIGKILLed dockerd did not stop them
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # nobody left in it


def test_runs_survive_sigterm_and_a_broker_restart(tmp_path):
    rows, stdout = chaos("sigterm-worker,restart-redis", tmp_path)
    assert rows["sigterm-worker"]["injected"] == ["SIGTERM agent", "SIGTERM agent.framework", "SIGTERM env.default",
                                                   "SIGTERM model.sim"]  # fmt: skip
    assert "chaos: 2 faults, every episode terminal" in stdout


def test_runs_survive_killed_sandboxes_and_a_docker_daemon_restart(tmp_path):
    # 100 episodes a fault, in containers: the kills (2 to 10 s in) and the restart (4 s in) find the run going, and
    # the two runs fit the harness's 600 s on a box half as fast as this one (200 a fault took 311 s here).
    rows, _ = chaos("kill-containers,restart-docker", tmp_path, episodes=100)
    killed = sum(int(entry.split()[2]) for entry in rows["kill-containers"]["injected"])
    assert killed > 0 and rows["kill-containers"]["retried"] > 0, rows["kill-containers"]["injected"]
    [restart] = rows["restart-docker"]["injected"]
    assert restart.startswith("dockerd stopped for 5 s") and rows["restart-docker"]["retried"] > 0


CLOCK_KEYS = ("fault", "injected", "seconds", "affected", "unrecovered", "unrecovered_at_fault", "statuses")


def test_production_settings_recover_from_sigkill_of_every_worker_and_an_emptied_broker(tmp_path):
    # Twelve steps an episode: each run lasts long enough for its one-shot fault (3 s in) to find it running.
    options = ("--production", "--concurrency", "8", "--steps", "12")
    rows, stdout = chaos("kill-all,redis-nosave", tmp_path, *options, episodes=30)
    for row in rows.values():
        assert row["affected"] > 0 and row["unrecovered"] == 0, {key: row.get(key) for key in CLOCK_KEYS}
        assert row["recover_p99_s"] <= 60, row  # the shipped visibility timeout is an hour
    assert rows["kill-all"]["recover_p50_s"] >= 30, "nothing moves while every worker is down (30 s)"
    assert "rec p99" in stdout


@pytest.mark.django_db(transaction=True)
def test_the_recovery_clock_counts_a_move_made_the_moment_before_it_stops():
    # A run ends the moment its slowest episode moves, and the harness stops the clock right then: when that move
    # was the episode's only one since the fault (its lost grading re-driven), it fell between two samples.
    episode = new_episode(Episode.Status.EVALUATING)
    clock = RecoveryClock(episode.run_id)
    clock.fault()
    time.sleep(0.7)  # a sample that sees no progress
    Episode.objects.filter(pk=episode.pk).update(status=Episode.Status.SUCCEEDED)
    row = clock.stop()
    assert (row["affected"], row["unrecovered"]) == (1, 0), row
    assert 0.7 <= row["recover_p50_s"] < 5


@pytest.mark.django_db
def test_the_harness_empties_only_a_database_named_as_a_chaos_one():
    episode = new_episode(Episode.Status.RUNNING)
    with pytest.raises(SystemExit, match="is not named as a chaos one"):
        empty_the_database(connection.settings_dict["NAME"])  # the test database
    assert Episode.objects.filter(pk=episode.pk).exists()
