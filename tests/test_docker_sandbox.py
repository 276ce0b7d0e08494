"""The Docker backend on the real daemon: sandbox defaults, and hostile commands contained."""

import io
import tarfile
import threading
import tracemalloc

import docker
import pytest
from django.conf import settings

from envs import task_sandbox
from envs.backend import ImageNotFound, SandboxError, SandboxLimits, SandboxSpec
from envs.docker_backend import KEEPALIVE

pytestmark = pytest.mark.integration

SMALL = SandboxLimits(memory_mb=256, cpus=0.5, pids=128, disk_mb=64, tmp_mb=32)


def inspect(sandbox_id: str) -> dict:
    return docker.from_env().api.inspect_container(sandbox_id)


def processes(backend, sandbox_id: str) -> list[str]:
    """Commands running in the sandbox, other than the ps that lists them."""
    listing = backend.exec(sandbox_id, "ps -eo args=", 10).output.splitlines()
    return [line.strip() for line in listing if line.strip() and not line.startswith(("ps ", "/bin/sh -c ps"))]


def test_sandbox_defaults(docker_backend, sandbox):
    sandbox_id = sandbox(episode_id=41, run_id=7, limits=SMALL)
    info = inspect(sandbox_id)
    host = info["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert (host["PidsLimit"], host["Memory"], host["MemorySwap"]) == (128, 256 << 20, 256 << 20)
    assert host["NanoCpus"] == 500_000_000
    assert host["ReadonlyRootfs"] is True
    assert not host["Binds"] and not info["Mounts"], "no host mounts"
    assert set(host["Tmpfs"]) == {"/testbed", "/tmp", "/root", "/run"}
    labels = info["Config"]["Labels"]
    assert labels["megaflow.episode"] == "41" and labels["megaflow.run"] == "7" and labels["megaflow.managed"] == "1"
    assert labels["megaflow.deployment"] == settings.MEGAFLOW_DEPLOYMENT
    assert info["Config"]["Cmd"] == KEEPALIVE


def test_inside_the_sandbox_there_is_no_network_no_socket_and_no_writable_root(docker_backend, sandbox):
    sandbox_id = sandbox(limits=SMALL)
    assert docker_backend.exec(sandbox_id, "ls /sys/class/net", 10).output.split() == ["lo"]
    reach = docker_backend.exec(
        sandbox_id, "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), 3)\"", 10
    )
    assert reach.exit_code != 0 and "unreachable" in reach.output
    assert docker_backend.exec(sandbox_id, "ls /var/run/docker.sock /run/docker.sock", 10).exit_code != 0
    assert "Read-only file system" in docker_backend.exec(sandbox_id, "touch /usr/x", 10).output
    assert docker_backend.exec(sandbox_id, "cat /etc/hostname; grep -c . /proc/mounts", 10).exit_code == 0


def test_host_files_are_out_of_reach(docker_backend, sandbox):
    # The sandbox's filesystem is the image's, with nothing of the host mounted: not this repository, not the
    # host's secrets, not the daemon's files; and its PID 1 is the sandbox's own reaper (KEEPALIVE).
    sandbox_id = sandbox(limits=SMALL)
    secret = settings.DATA_DIR / "secret_key"

    def run(command: str) -> str:
        return docker_backend.exec(sandbox_id, command, 10).output

    for host_path in (settings.BASE_DIR / "manage.py", secret, "/var/lib/docker/containers"):
        assert "No such file or directory" in run(f"ls {host_path}"), host_path
    mounts = run("cat /proc/mounts")
    # Docker's own per-container files are the only host-disk mounts, and read-only.
    docker_files = {"/etc/resolv.conf", "/etc/hostname", "/etc/hosts"}
    host_disk = [line.split() for line in mounts.splitlines() if " ext4 " in line or str(settings.BASE_DIR) in line]
    assert {fields[1] for fields in host_disk} <= docker_files, mounts
    assert all(fields[3].startswith("ro,") for fields in host_disk), mounts
    assert secret.read_text().strip() not in run("grep -rs . /etc /root /tmp 2>/dev/null | head -c 100000")
    assert run("tr '\\0' ' ' < /proc/1/cmdline").startswith("python3 -c \nimport os, signal"), "the reaper"


def test_exec_returns_exit_code_and_both_streams(docker_backend, sandbox):
    sandbox_id = sandbox()
    result = docker_backend.exec(sandbox_id, "echo out; echo err >&2; pwd; exit 3", 10)
    # stdout and stderr arrive through separate pipes: their relative order is not guaranteed.
    assert result.exit_code == 3
    assert sorted(result.output.splitlines()) == ["/testbed", "err", "out"]
    assert result.output.index("out") < result.output.index("/testbed")
    assert not result.timed_out and not result.truncated


def test_copy_in_unpacks_a_tar_into_the_tmpfs_workdir(docker_backend, sandbox):
    sandbox_id = sandbox()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in {"pkg/mod.py": "X = 1\n", "README": "hi\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    docker_backend.copy_in(sandbox_id, "/testbed", buffer.getvalue())
    assert docker_backend.exec(sandbox_id, "cat pkg/mod.py README", 10).output == "X = 1\nhi\n"


def test_missing_image_is_named(docker_backend):
    with pytest.raises(ImageNotFound) as caught:
        docker_backend.create(SandboxSpec(image="megaflow/not-built:anywhere"))
    assert caught.value.reason == "image not found: megaflow/not-built:anywhere"


def test_a_hanging_command_is_killed_at_its_timeout_with_its_whole_tree(docker_backend, sandbox):
    sandbox_id = sandbox()
    result = docker_backend.exec(sandbox_id, "sleep 300 & (setsid sleep 301 &); echo started; sleep 302", 2)
    assert result.timed_out and result.exit_code == 137
    assert result.observation() == "started\n[megaflow: command timed out after 2 s and was killed]"
    # Background children, even the one that left the session, died with it; PID 1 (the keepalive) did not.
    assert not any(command.startswith("sleep 30") for command in processes(docker_backend, sandbox_id))
    assert docker_backend.is_alive(sandbox_id)


def test_an_output_flood_is_truncated_and_stopped_with_bounded_worker_memory(docker_backend, sandbox):
    sandbox_id = sandbox()
    tracemalloc.start()
    try:
        result = docker_backend.exec(sandbox_id, "yes", 60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.killed_reason.startswith("it printed more than")
    assert result.output_bytes > settings.MEGAFLOW_OUTPUT_KILL_BYTES and result.truncated
    assert len(result.output) < settings.MEGAFLOW_OUTPUT_LIMIT_BYTES + 200
    assert "[megaflow: output truncated," in result.output
    assert peak < 8 * 1024 * 1024, f"exec held {peak} bytes for a {result.output_bytes}-byte flood"
    assert "yes" not in processes(docker_backend, sandbox_id)


def test_long_output_keeps_head_and_tail(docker_backend, sandbox):
    result = docker_backend.exec(sandbox(), "seq 1 200000", 30)
    assert result.exit_code == 0 and result.truncated and not result.killed_reason
    assert result.output.startswith("1\n2\n3\n") and result.output.endswith("199999\n200000\n")


def test_a_fork_bomb_is_contained_and_the_sandbox_recovers(docker_backend, sandbox):
    bombed, bystander = sandbox(limits=SMALL), sandbox(limits=SMALL)
    result = docker_backend.exec(bombed, "bomb() { bomb | bomb & }; bomb; sleep 5", 20)
    assert "process limit" in result.observation() or result.timed_out
    assert docker_backend.exec(bombed, "echo still usable", 10).output == "still usable\n"
    assert docker_backend.exec(bystander, "echo unaffected", 10).output == "unaffected\n"


def test_a_memory_hog_is_killed_inside_its_sandbox(docker_backend, sandbox):
    hog, bystander = sandbox(limits=SMALL), sandbox(limits=SMALL)
    result = docker_backend.exec(hog, "python3 -c 'x = bytearray(1 << 30)'", 60)
    assert result.exit_code == 137
    assert "memory limit" in result.observation()
    assert docker_backend.is_alive(hog)
    assert docker_backend.exec(bystander, "echo unaffected", 10).output == "unaffected\n"


def test_a_disk_fill_hits_the_sandbox_quota_not_the_host(docker_backend, sandbox):
    sandbox_id = sandbox(limits=SMALL)
    result = docker_backend.exec(sandbox_id, "dd if=/dev/zero of=/testbed/fill bs=1M count=1024", 60)
    assert result.exit_code != 0 and "No space left on device" in result.output
    size = docker_backend.exec(sandbox_id, "du -sm /testbed/fill | cut -f1", 10).output.strip()
    assert int(size) <= SMALL.disk_mb
    assert docker_backend.exec(sandbox_id, "dd if=/dev/zero of=/tmp/fill bs=1M count=1024", 60).exit_code != 0
    # Nothing landed in the container's writable layer, i.e. on the host's disk.
    [listed] = docker.from_env().api.containers(filters={"id": sandbox_id}, size=True)
    assert listed.get("SizeRw", 0) < 1 << 20


def test_destroy_is_idempotent(docker_backend, sandbox):
    sandbox_id = sandbox()
    docker_backend.destroy(sandbox_id)
    docker_backend.destroy(sandbox_id)
    assert not docker_backend.is_alive(sandbox_id)


def test_agent_commands_share_one_long_lived_shell_and_keep_exec_semantics(docker_backend, sandbox):
    sandbox_id = sandbox(limits=SMALL)
    run = docker_backend.run_agent_command
    first = run(sandbox_id, "echo out; echo err >&2; exit 3", 10, workdir="/testbed")
    assert (first.exit_code, first.output) == (3, "out\nerr\n")
    shell = docker_backend._shells[sandbox_id]
    assert run(sandbox_id, "pwd; cd /tmp; cat", 10, workdir="/testbed").output == "/testbed\n", "stdin is closed"
    assert run(sandbox_id, "pwd", 10).output == "/testbed\n", "each command starts afresh, where an exec would"
    assert docker_backend._shells[sandbox_id] is shell and shell.exec_id is not None
    marker = run(sandbox_id, 'printf "%s END 0\\n" "$MEGAFLOW_MARK"; echo after', 10)
    assert marker.output.endswith("after\n") and marker.exit_code == 0, "a command cannot end its own frame early"
    big = run(sandbox_id, "head -c 100000 /dev/zero | tr '\\0' x", 10, output_limit=1000)
    assert big.truncated and len(big.output) < 1200 and big.output_bytes == 100000


def test_an_agent_command_past_its_time_limit_is_killed_and_the_next_one_runs(docker_backend, sandbox):
    sandbox_id = sandbox(limits=SMALL)
    hung = docker_backend.run_agent_command(sandbox_id, "echo started; sleep 60", 2)
    assert hung.timed_out and hung.output == "started\n"
    assert hung.note == "[megaflow: command timed out after 2 s and was killed]"
    assert docker_backend.run_agent_command(sandbox_id, "echo next", 10).output == "next\n"
    killer = docker_backend.run_agent_command(sandbox_id, "kill -9 -1; echo unreachable", 10)
    assert killer.exit_code == 137, "the command took its shell down with everything else"
    assert docker_backend.run_agent_command(sandbox_id, "echo again", 10).output == "again\n"


def test_a_setup_command_that_fails_is_final_and_one_whose_sandbox_was_killed_is_retried(docker_backend, sandbox):
    from orchestrator.models import Task

    hog = Task(setup_commands=["python3 -c 'x = bytearray(1 << 30)'"], timeout_s=60)
    with pytest.raises(SandboxError) as failed:
        task_sandbox.prepare(docker_backend, sandbox(limits=SMALL), hog)
    assert not failed.value.retryable and "exit 137" in failed.value.reason, "the task's own memory limit: final"

    victim = sandbox(limits=SMALL)
    killer = threading.Timer(1.0, lambda: docker.from_env().api.kill(victim))
    killer.start()
    with pytest.raises(SandboxError) as lost:
        task_sandbox.prepare(docker_backend, victim, Task(setup_commands=["sleep 30"], timeout_s=60))
    killer.join()
    assert lost.value.retryable and lost.value.reason.startswith("the sandbox stopped: setup command"), lost.value
