"""``make bench-model``: the Model Service's costs, measured in one run against the same inference server.

It starts its own pieces on this machine: the tiny model in modelserving.hf_server, one ``model.tiny`` Celery
worker (32 threads, the ``openai`` backend), and the Django site (gunicorn) for the gateway, on Redis database 8
and a data dir of its own. Then:

- gateway + queue overhead: the same 1-token completion, one at a time, sent straight to the server and sent
  through ``/v1/chat/completions`` (Django → Redis → model worker → server → reply inbox); overhead is the
  difference of the medians;
- mean batch size vs requests in flight: waves of ``modelserving.generate`` tasks with N in flight at once,
  and the batches the server ran, read from its ``/metrics``.

Writes ``bench-model-results.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REDIS_DB = 8
SERVER_PORT, WEB_PORT = 18990, 18991


def post(url: str, body: dict, token: str = "") -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_for(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers, if only to say 401
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"bench: {url} did not come up in {timeout_s} s")


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def main() -> None:
    data_dir = REPO / "var" / "bench"
    env = {
        **os.environ,
        "MEGAFLOW_DATA_DIR": str(data_dir),
        "MEGAFLOW_REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "MEGAFLOW_MODELS": "tiny",
        "MEGAFLOW_MODEL_CONFIG": json.dumps(
            {"tiny": {"backend": "openai", "base_url": f"http://127.0.0.1:{SERVER_PORT}/v1"}}
        ),
        "DATABASE_URL": "",
        "MEGAFLOW_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "megaflow_site.settings")
    import django

    django.setup()
    import redis
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from megaflow_site.topology import Service, WorkerSpec
    from modelserving.supervisor import read_metrics
    from orchestrator import replies
    from tests.support.tiny_model import build_tiny_model

    redis.Redis.from_url(env["MEGAFLOW_REDIS_URL"]).flushdb()
    call_command("migrate", verbosity=0)
    token = Token.objects.get_or_create(user=User.objects.get_or_create(username="bench")[0])[0].key
    model_path = build_tiny_model(REPO / "var" / "tiny-model")
    (data_dir / "log").mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    worker = WorkerSpec(Service.MODEL, "tiny").argv(node_name="model-tiny@bench", loglevel="WARNING")
    worker[0] = str(bin_dir / "celery")
    commands = {
        "server": [sys.executable, "-m", "modelserving.hf_server", "--model-path", str(model_path),
                   "--served-model-name", "tiny", "--port", str(SERVER_PORT)],
        "worker": worker,
        "web": [str(bin_dir / "gunicorn"), "megaflow_site.wsgi", "--bind", f"127.0.0.1:{WEB_PORT}", "--workers", "2",
                "--threads", "8"],
    }  # fmt: skip
    processes = {
        name: subprocess.Popen(argv, cwd=REPO, env=env, start_new_session=True,
                               stdout=(data_dir / "log" / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
        for name, argv in commands.items()
    }  # fmt: skip
    try:
        server, gateway = f"http://127.0.0.1:{SERVER_PORT}", f"http://127.0.0.1:{WEB_PORT}"
        wait_for(f"{server}/health")
        wait_for(f"{gateway}/v1/models")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "fix it"}], "max_tokens": 1}
        for _ in range(5):  # warm both paths (connections, the worker's backend, gunicorn workers)
            post(f"{server}/v1/chat/completions", body)
            post(f"{gateway}/v1/chat/completions", body, token)
        direct, through = [], []
        for _ in range(60):  # alternate, so both paths see the same machine noise
            started = time.perf_counter()
            post(f"{server}/v1/chat/completions", body)
            direct.append(time.perf_counter() - started)
            started = time.perf_counter()
            post(f"{gateway}/v1/chat/completions", body, token)
            through.append(time.perf_counter() - started)
        overhead = {
            "requests": len(direct),
            "direct_p50_ms": median_ms(direct),
            "gateway_p50_ms": median_ms(through),
            "overhead_p50_ms": median_ms(through) - median_ms(direct),
            "gateway_p99_ms": 1000 * sorted(through)[int(0.99 * (len(through) - 1))],
        }

        from modelserving.tasks import generate

        batching = []
        for in_flight in (1, 2, 4, 8, 16, 32):
            before = read_metrics(server)
            waves, started = 3, time.perf_counter()
            for _ in range(waves):
                inbox = replies.new_inbox()
                for index in range(in_flight):
                    request = {"request_id": str(index), "messages": body["messages"], "sampling": {"max_tokens": 16}}
                    generate.apply_async(kwargs={"model": "tiny", "requests": [request], "reply_to": inbox})
                for _ in range(in_flight):
                    assert replies.wait_for_reply(inbox, 120) is not None, "a generation never came back"
            after = read_metrics(server)
            served = after["megaflow:batch_size_sum"] - before["megaflow:batch_size_sum"]
            batches = after["megaflow:batch_size_count"] - before["megaflow:batch_size_count"]
            batching.append({"in_flight": in_flight, "requests": int(served), "batches": int(batches),
                             "mean_batch_size": served / batches,
                             "requests_per_s": served / (time.perf_counter() - started)})  # fmt: skip
    finally:
        for process in processes.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            process.wait(30)

    results = {"gateway": overhead, "batching": batching}
    out = REPO / "bench-model-results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'path':<32} {'p50':>10}")
    print(f"{'direct to the server':<32} {overhead['direct_p50_ms']:>8.1f} ms")
    print(f"{'gateway + queue + worker':<32} {overhead['gateway_p50_ms']:>8.1f} ms")
    print(f"{'overhead per request':<32} {overhead['overhead_p50_ms']:>8.1f} ms")
    print(f"\n{'requests in flight':>18} {'mean batch size':>16} {'requests/s':>11}")
    for row in batching:
        print(f"{row['in_flight']:>18} {row['mean_batch_size']:>16.2f} {row['requests_per_s']:>11.1f}")
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
