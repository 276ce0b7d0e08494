"""`make up` starts what is missing, once; `make down` stops exactly what it started, by pid file."""

import os
import subprocess
import sys
import urllib.request

import pytest
import redis

from tests.conftest import REPO

STACK = ["worker-agent", "worker-agent.framework", "worker-model.replay", "worker-env.default", "beat", "flower", "web"]


def stack(action: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.local_stack", action],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.integration
def test_up_is_idempotent_and_down_stops_only_what_up_started(tmp_path):
    slot = int(os.environ["MEGAFLOW_TEST_SLOT"])  # tests/session_env.py: this session's own Redis db and ports
    redis_url = f"redis://127.0.0.1:6379/{slot - 1}"
    web_port, flower_port = 18700 + 2 * slot, 18701 + 2 * slot
    env = {
        "MEGAFLOW_DATA_DIR": str(tmp_path / "var"),
        "DATABASE_URL": "",
        "MEGAFLOW_REDIS_URL": redis_url,
        "MEGAFLOW_MODELS": "replay",
        "MEGAFLOW_ENV_POOLS": "default",
        "MEGAFLOW_WEB_PORT": str(web_port),
        "MEGAFLOW_FLOWER_PORT": str(flower_port),
    }
    run_dir = tmp_path / "var" / "run"
    bystander = subprocess.Popen(["sleep", "300"])  # running before `up`, not started by it
    try:
        first = stack("up", env)
        assert first.returncode == 0, first.stdout + first.stderr
        pids = {name: int((run_dir / f"{name}.pid").read_text().split()[0]) for name in STACK}
        assert all(alive(pid) for pid in pids.values())
        for name in STACK:
            assert f"{name}: started" in first.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=5) as response:
            assert response.status == 200

        second = stack("up", env)
        assert second.returncode == 0, second.stderr
        for name in STACK:
            assert f"{name}: already running (pid {pids[name]})" in second.stdout
        assert {name: int((run_dir / f"{name}.pid").read_text().split()[0]) for name in STACK} == pids

        down = stack("down", env)
        assert down.returncode == 0, down.stderr
        assert sorted(line.split(":")[0].removeprefix("==> ") for line in down.stdout.splitlines()) == sorted(STACK)
        assert not any(alive(pid) for pid in pids.values())
        assert not list(run_dir.glob("*.pid"))
        assert bystander.poll() is None, "down stopped a process it did not start"
    finally:
        stack("down", env)
        bystander.kill()
        bystander.wait()
        redis.Redis.from_url(redis_url).flushdb()
