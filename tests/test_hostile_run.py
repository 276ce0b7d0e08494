"""Hostile tasks in one run beside ordinary ones, on real workers and real containers.

Each hostile task's test is an attack that passes only if the attack worked: fork without limit, take 8 GiB of
memory, write 20 GiB, reach the network, read a file of the host, reach the Docker daemon, sleep forever. The
reward is therefore 1.0 exactly when containment failed. A control task does the same kinds of things within
the limits and must earn 1.0, which shows that the graders ran the attacks, and the ordinary tasks of the run
must all succeed: one hostile episode never takes a worker, the run or a neighbour down.
"""

import hashlib
import json
import shutil
import textwrap
import time
import uuid
from pathlib import Path

import docker
import pytest
from celery import current_app

from orchestrator.models import Episode, Run
from orchestrator.task_format import load_dataset

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SWE_MINI = Path(__file__).resolve().parent.parent / "envs" / "suites" / "swe_mini" / "dataset"
ORDINARY = ("calendarx-1", "textkit-2", "calendarx-3")

ATTACKS = {
    "fork-bomb": """
        import os, time
        def test_attack():
            children = 0
            for _ in range(5000):
                if os.fork() == 0:
                    time.sleep(600)
                    os._exit(0)
                children += 1
            assert children == 5000
    """,
    "memory-hog": """
        def test_attack():
            hog = b"x" * (8 << 30)
            assert len(hog) == 8 << 30
    """,
    "disk-fill": """
        def test_attack():
            written = 0
            with open("fill", "wb") as out:
                for _ in range(20 << 10):
                    written += out.write(b"\\0" * (1 << 20))
            assert written == 20 << 30
    """,
    "network": """
        import socket
        def test_attack():
            for host, port in (("1.1.1.1", 53), ("8.8.8.8", 53), ("pypi.org", 443)):
                try:
                    socket.create_connection((host, port), timeout=3).close()
                    return
                except OSError:
                    pass
            raise AssertionError("no network")
    """,
    "host-files": """
        import hashlib, pathlib
        CANDIDATES = ["{secret_path}", "/proc/1/root{secret_path}", "/host{secret_path}", "/hostfs{secret_path}"]
        def test_attack():
            for name in CANDIDATES:
                try:
                    if hashlib.sha256(pathlib.Path(name).read_bytes()).hexdigest() == "{secret_sha256}":
                        return
                except OSError:
                    pass
            raise AssertionError("the host file is out of reach")
    """,
    "docker-socket": """
        import socket
        def test_attack():
            for path in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock"):
                try:
                    client = socket.socket(socket.AF_UNIX)
                    client.connect(path)
                    return
                except OSError:
                    pass
            for host in ("127.0.0.1", "172.17.0.1"):
                try:
                    socket.create_connection((host, 2375), timeout=2).close()
                    return
                except OSError:
                    pass
            raise AssertionError("no daemon")
    """,
    "sleep-forever": """
        import time
        def test_attack():
            time.sleep(10 ** 9)
    """,
    # The same kinds of things within the limits: the graders run, so a 0.0 above means the attack failed.
    "control": """
        import os, socket
        def test_attack():
            for _ in range(20):
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
            hog = b"x" * (64 << 20)
            with open("fill", "wb") as out:
                out.write(hog)
            assert os.path.getsize("fill") == len(hog)
            local = socket.socketpair()
            local[0].sendall(b"ok")
            assert local[1].recv(2) == b"ok"
    """,
}


def new_file_patch(path: str, text: str) -> str:
    lines = text.splitlines()
    return (f"diff --git a/{path} b/{path}\nnew file mode 100644\n--- /dev/null\n+++ b/{path}\n"
            f"@@ -0,0 +1,{len(lines)} @@\n" + "".join(f"+{line}\n" for line in lines))  # fmt: skip


@pytest.fixture
def host_secret():
    secret = uuid.uuid4().hex.encode()
    path = Path(f"/tmp/megaflow-host-secret-{uuid.uuid4().hex[:8]}")
    path.write_bytes(secret)
    yield path, hashlib.sha256(secret).hexdigest()
    path.unlink()


def hostile_dataset(directory: Path, secret_path: Path, secret_sha256: str):
    """The ordinary swe_mini tasks and one task per attack, all on the calendarx-1 repository."""
    (directory / "archives").mkdir()
    for name in ORDINARY:
        shutil.copy(SWE_MINI / "archives" / f"{name}.tar.gz", directory / "archives")
    lines = [
        line for line in (SWE_MINI / "tasks.jsonl").read_text().splitlines()
        if json.loads(line)["instance_id"] in ORDINARY
    ]  # fmt: skip
    for name, attack in ATTACKS.items():
        code = textwrap.dedent(attack).strip().replace("{secret_path}", str(secret_path))
        code = code.replace("{secret_sha256}", secret_sha256)
        task = {
            "instance_id": f"hostile-{name}",
            "problem_statement": f"A hostile task: {name}.",
            "repo_archive": "archives/calendarx-1.tar.gz",
            "patch": new_file_patch("NOTES", "the agent's change"),
            "test_patch": new_file_patch("test_attack.py", code),
            "test_command": "python3 -m pytest -rA -p no:cacheprovider test_attack.py",
            "FAIL_TO_PASS": ["test_attack.py::test_attack"],
            "timeout_s": 20,
        }
        lines.append(json.dumps(task))
    (directory / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    return load_dataset(directory / "tasks.jsonl", "hostile")


def test_hostile_tasks_are_contained_and_their_neighbours_succeed(celery_workers, tmp_path, host_secret):
    secret_path, secret_sha256 = host_secret
    dataset = hostile_dataset(tmp_path, secret_path, secret_sha256)
    host_free = shutil.disk_usage("/").free
    run = Run.objects.create(dataset=dataset, model_name="replay", env_pool="default", max_steps=4,
                             max_concurrent_episodes=len(ATTACKS) + len(ORDINARY))  # fmt: skip
    run.tasks.set(dataset.tasks.all())
    current_app.send_task("orchestrator.start_run", kwargs={"run_id": run.pk})

    deadline = time.monotonic() + 240
    while Run.objects.get(pk=run.pk).status not in Run.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    by_task = {episode.task.instance_id: episode for episode in run.episodes.select_related("task")}
    open_ones = {name: episode.status for name, episode in by_task.items() if not episode.is_terminal}
    assert not open_ones, f"episodes still open: {open_ones}"

    for name in ORDINARY:
        episode = by_task[name]
        assert (episode.status, episode.reward) == (Episode.Status.SUCCEEDED, 1.0), (name, episode.failure_reason)
    assert by_task["hostile-control"].reward == 1.0, by_task["hostile-control"].failure_reason
    for name in ATTACKS.keys() - {"control"}:
        episode = by_task[f"hostile-{name}"]
        assert episode.reward != 1.0, f"{name}: the attack succeeded"
        assert episode.status == Episode.Status.SUCCEEDED or episode.failure_reason, name
    assert "timed out" in by_task["hostile-sleep-forever"].failure_reason

    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    # The host: its disk did not take the 20 GiB, its file is untouched, its daemon answers.
    assert host_free - shutil.disk_usage("/").free < 2 << 30
    assert hashlib.sha256(secret_path.read_bytes()).hexdigest() == secret_sha256
    assert docker.from_env().ping()
