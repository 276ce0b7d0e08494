"""The vllm backend's supervision, against a real subprocess server with vllm's endpoints (modelserving.hf_server):
start and health wait, forwarding, /metrics, restart after a crash, and a clear error when it cannot start.

No GPU is lent to this project's test runs, so `vllm serve` itself does not run here; the command line it
would use is checked instead."""

import os
import signal
import sys
import time

import pytest

from modelserving.backend import GenerationRequest, ModelError, SamplingParams

pytestmark = pytest.mark.integration


def server_command(model_path, port: int) -> list[str]:
    return [sys.executable, "-m", "modelserving.hf_server", "--model-path", str(model_path),
            "--served-model-name", "tiny", "--port", str(port)]  # fmt: skip


@pytest.fixture
def port():
    return 18850 + int(os.environ["MEGAFLOW_TEST_SLOT"])


def hello(max_tokens: int = 4) -> list[GenerationRequest]:
    return [GenerationRequest("r", [{"role": "user", "content": "hello"}], SamplingParams(max_tokens=max_tokens))]


def test_supervised_server_is_started_used_measured_and_restarted(tiny_model, port):
    from modelserving.vllm_backend import VLLMBackend

    backend = VLLMBackend("tiny", command=server_command(tiny_model, port), port=port, restart_backoff_s=0.1)
    try:
        assert backend.supervisor.healthy()
        first = backend.load()
        [generation] = backend.generate(hello())
        assert not generation.error and generation.completion_tokens > 0
        time.sleep(0.05)
        load = backend.load()
        assert set(load) == {"kv_cache_usage", "requests_running", "requests_waiting", "tokens_per_s", "restarts"}
        assert 0 <= load["kv_cache_usage"] <= 1 and load["tokens_per_s"] > 0 and first["restarts"] == 0

        crashed = backend.supervisor.process.pid
        os.killpg(crashed, signal.SIGKILL)
        deadline = time.monotonic() + 60
        # The supervisor counts the restart, waits its backoff, then starts the new server.
        while backend.supervisor.process.pid == crashed and time.monotonic() < deadline:
            time.sleep(0.2)
        assert backend.supervisor.restarts == 1 and backend.supervisor.process.pid != crashed
        [after] = backend.generate(hello())
        assert not after.error, "requests work again after the restart"
    finally:
        backend.close()
    assert backend.supervisor.process.poll() is not None, "close() stops the server"


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path, port):
    from modelserving.vllm_backend import VLLMBackend

    with pytest.raises(ModelError) as caught:
        VLLMBackend("tiny", command=server_command(tmp_path / "no-model", port), port=port)
    assert caught.value.reason.startswith("the model server exited at start (code 1)")
    assert "no-model" in caught.value.reason, "the log tail says why"


def test_the_real_command_line_runs_vllm_serve_on_the_chosen_gpus(monkeypatch, settings):
    from modelserving import vllm_backend

    launched = {}

    class Recorder:
        def __init__(self, command, base_url, log_path, env=None, **_):
            launched.update(command=command, base_url=base_url, env=env)

        def start(self):
            pass

    monkeypatch.setattr(vllm_backend, "ServerSupervisor", Recorder)
    vllm_backend.VLLMBackend(
        "qwen", model_path="/models/qwen", port=8123, gpus="0,1", extra_args=["--tensor-parallel-size", "2"]
    )
    assert launched["command"] == [
        "vllm", "serve", "/models/qwen", "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "qwen",
        "--tensor-parallel-size", "2",
    ]  # fmt: skip
    assert launched["env"] == {"CUDA_VISIBLE_DEVICES": "0,1"} and launched["base_url"] == "http://127.0.0.1:8123"


def test_a_new_version_is_served_through_a_supervised_restart_and_a_bad_one_keeps_the_old(tiny_model, port, tmp_path):
    import threading

    from modelserving.vllm_backend import VLLMBackend
    from tests.test_rollouts import checkpoint

    backend = VLLMBackend(
        "tiny", model_path=str(tiny_model), command=server_command(tiny_model, port), port=port, version="v0"
    )
    try:
        in_flight: list = []
        slow = threading.Thread(target=lambda: in_flight.extend(backend.generate(hello(max_tokens=48))))
        slow.start()
        time.sleep(0.05)
        new = checkpoint(tiny_model, tmp_path / "v1", seed=1)
        backend.load_version("v1", str(new))
        slow.join()
        [before] = in_flight
        assert not before.error and before.model_version == "v0", "the turn in flight finished on its version"
        assert str(new) in backend.supervisor.command and str(tiny_model) not in backend.supervisor.command
        [after] = backend.generate(hello())
        assert not after.error and after.model_version == "v1"
        restarted = backend.supervisor.process.pid
        with pytest.raises(ModelError, match="no config.json"):
            backend.load_version("v2", str(tmp_path / "missing"))
        assert backend.version == "v1" and backend.supervisor.process.pid == restarted, "the old one keeps serving"
    finally:
        backend.close()
