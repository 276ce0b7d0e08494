"""The local backend (no Docker): same task flow, process-group timeouts, bounded output."""

import pytest

from envs import task_sandbox
from envs.backend import SandboxError, SandboxSpec, get_backend


@pytest.fixture
def local(tmp_path):
    from envs.local_backend import LocalBackend

    backend = LocalBackend(root=tmp_path / "sandboxes")
    created = []

    def make() -> str:
        created.append(backend.create(SandboxSpec(image="unused")))
        return created[-1]

    yield backend, make
    for sandbox_id in created:
        backend.destroy(sandbox_id)


def test_it_is_selected_by_name_and_off_by_default(settings):
    assert settings.MEGAFLOW_ENV_BACKEND == "docker"
    assert get_backend("local").name == "local"


@pytest.mark.django_db
def test_a_swe_mini_task_runs_and_is_graded_locally(local, swe_mini):
    backend, make = local
    task = swe_mini.tasks.get(instance_id="kvconf-4")
    sandbox_id = make()
    task_sandbox.prepare(backend, sandbox_id, task)
    assert task_sandbox.evaluate(backend, sandbox_id, task).reward == 0.0
    task_sandbox.reset_tree(backend, sandbox_id, task)
    assert task_sandbox.apply_patch(backend, sandbox_id, task, task.patch).exit_code == 0
    assert task_sandbox.evaluate(backend, sandbox_id, task).reward == 1.0


def test_the_workers_environment_does_not_leak_into_tasks(local, monkeypatch):
    backend, make = local
    monkeypatch.setenv("DATABASE_URL", "postgres://secret@db/megaflow")
    assert "secret" not in backend.exec(make(), "env", 10).output


def test_timeouts_kill_the_process_group_and_floods_are_cut(local, settings):
    backend, make = local
    sandbox_id = make()
    hung = backend.exec(sandbox_id, "sleep 30 & sleep 30", 1)
    assert hung.timed_out and hung.observation().endswith("[megaflow: command timed out after 1 s and was killed]")
    flood = backend.exec(sandbox_id, "yes", 30)
    assert flood.killed_reason and len(flood.output) < settings.MEGAFLOW_OUTPUT_LIMIT_BYTES + 200


@pytest.mark.django_db
def test_the_sim_backend_takes_its_fixed_time_and_echoes(settings, swe_mini):
    from envs.sim_backend import SimBackend

    settings.MEGAFLOW_SIM_EXEC_LATENCY_S = 0.01
    backend = SimBackend()
    sandbox_id = backend.create(SandboxSpec(image="unused"))
    result = backend.exec(sandbox_id, "echo step 3\nls -la\necho MEGAFLOW_SUBMIT", 5)
    assert (result.exit_code, result.output) == (0, "step 3\nMEGAFLOW_SUBMIT\n")
    task = swe_mini.tasks.get(instance_id="kvconf-1")
    task_sandbox.prepare(backend, sandbox_id, task)
    assert task_sandbox.evaluate(backend, sandbox_id, task).reward == 0.0, "nothing is evaluated for real"
    backend.destroy(sandbox_id)
    with pytest.raises(SandboxError):
        backend.exec(sandbox_id, "echo hi", 5)
