"""The fast part of ``make chaos``: 200 episodes through SIGTERMed workers and a restarted broker, with the
proof (every episode terminal, no step twice, every failure explained). kill -9 waits out the visibility
timeout and runs in ``make chaos`` only."""

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

pytestmark = pytest.mark.integration


def test_runs_survive_sigterm_and_a_broker_restart(tmp_path):
    slot = int(os.environ["MEGAFLOW_TEST_SLOT"])
    database = settings.DATABASES["default"]
    host = database.get("HOST") or "127.0.0.1" if database["ENGINE"].endswith("postgresql") else "127.0.0.1"
    env = {**os.environ, "MEGAFLOW_CHAOS_DATABASE_URL": f"postgres://postgres@{host}:5432/megaflow_chaos_{slot}"}
    output = tmp_path / "chaos.json"
    result = subprocess.run(
        [sys.executable, "-m", "deploy.chaos", "--faults", "sigterm-worker,restart-redis", "--episodes", "200",
         "--redis-port", str(16391 + slot), "--output", str(output)],
        cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["fault"]: row for row in json.loads(output.read_text())}
    assert set(rows) == {"sigterm-worker", "restart-redis"}
    for row in rows.values():
        assert (row["episodes"], row["terminal"], row["lost"], row["duplicated_steps"]) == (200, 200, 0, 0), row
        assert row["run_status"] == "completed" and row["failed_without_reason"] == 0
    assert rows["sigterm-worker"]["injected"] == ["SIGTERM agent", "SIGTERM env.default", "SIGTERM model.sim"]
    assert "chaos: 2 faults, every episode terminal" in result.stdout
